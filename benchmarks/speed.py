"""Speed and memory of SHA-RNN on this machine, next to the machine's own ceilings.

    python benchmarks/speed.py                       # paper and small configurations, fp32
    python benchmarks/speed.py --configs small --repeats 5 --dtype bf16
    python benchmarks/speed.py --kinds eval generate --dtype int8

For each configuration it measures, each in a fresh subprocess (so peak memory is that measurement's own):
training chars/s (forward, backward, clip, LAMB step; state and memory carried), evaluation chars/s (no grad,
state carried), and batch-1 generation chars/s with the attention memory full (ring memory, as `sharnn
generate` runs). In the same run it measures the ceilings: fp32 and bf16 matrix multiply GFLOP/s and memory
bandwidth. FLOPs per character are counted from the shapes (matmuls only); utilisation is achieved FLOP/s over
the matching matmul ceiling, except for generation, which is bound by memory traffic: there it is the bytes a
token reads (every weight once, the attention memory twice) per second over the measured bandwidth.

--dtype: training with bf16 runs under autocast (fp32 master weights), as `sharnn train --precision bf16`;
evaluation and generation convert the model as `sharnn eval/generate --precision bf16|int8` do
(sharnn.precision). int8 is for inference only.
It waits (up to --quiet-wait seconds) for the 1-minute load average to fall below --quiet-load, and reports
medians of --repeats timed repetitions after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace

import torch

from sharnn.config import SHARNNConfig, load_preset, split_settings
from sharnn.model import SHARNN, count_parameters
from sharnn.optim import Lamb
from sharnn.precision import for_inference
from sharnn.state import detach_state

CONFIGS = {
    # name: (model config, bptt, batch)
    "paper": (SHARNNConfig(), 1024, 16),
    "small": (SHARNNConfig(emsize=256, nhid=1024), 256, 16),
    "tiny": (SHARNNConfig.from_dict(split_settings(load_preset("tiny"))[0]), 128, 16),  # the preset as it is now
}


def flops_per_char(cfg: SHARNNConfig, keys: int) -> float:
    """Forward matmul FLOPs per predicted character, with `keys` attention positions per query."""
    E, H, V = cfg.emsize, cfg.nhid, cfg.vocab_size
    per_block = 2 * 8 * E * E + 2 * E * H  # LSTM (input and hidden maps, 4 gates) and the Boom's E -> H
    attn = 2 * E * E + 2 * 2 * E * keys  # the query map; scores and mix over the keys
    return cfg.nlayers * per_block + len(cfg.attn_layers) * attn + 2 * E * V


def bytes_per_token(cfg: SHARNNConfig, dtype: str) -> float:
    """Bytes one generated token reads: every weight once (not the embedding: its one row, or the tied
    decoder's read, is counted with the decoder), and the attention memory twice (keys, then values)."""
    with torch.device("meta"):
        model = SHARNN(replace(cfg, collapsed_gate=True))  # as sharnn.precision runs it
    weights = count_parameters(model) - (0 if cfg.tied else model.encoder.weight.numel())
    memory = 2 * len(cfg.attn_layers) * cfg.attn_span * cfg.emsize
    weight_bytes = {"fp32": 4, "bf16": 2, "int8": 1}[dtype]
    return weights * weight_bytes + memory * (2 if dtype == "bf16" else 4)  # int8 keeps fp32 activations


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def training_step(cfg: SHARNNConfig, bptt: int, batch: int, dtype: str = "fp32",
                  recompute: bool = False) -> Callable[[], float]:
    """A function that runs one training step (state carried from its last call) and returns its seconds."""
    torch.manual_seed(0)
    model = SHARNN(cfg).train()
    opt = Lamb(model.parameters(), lr=1e-3, weight_decay=1.2e-6)
    state = None

    def step() -> float:
        nonlocal state
        x = torch.randint(0, cfg.vocab_size, (bptt + 1, batch))
        t0 = time.perf_counter()
        with autocast(dtype):
            out = model(x[:-1], state, targets=x[1:], recompute=recompute)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state = detach_state(out.state)
        return time.perf_counter() - t0

    return step


def measure_train(cfg: SHARNNConfig, bptt: int, batch: int, repeats: int, dtype: str,
                  recompute: bool = False) -> list[float]:
    step = training_step(cfg, bptt, batch, dtype, recompute)
    step()  # warm-up: allocations, memory filling
    return [bptt * batch / step() for _ in range(repeats)]


@torch.no_grad()
def measure_eval(cfg: SHARNNConfig, bptt: int, batch: int, repeats: int, dtype: str) -> list[float]:
    model = for_inference(SHARNN(cfg), dtype)
    state, times = None, []
    for i in range(repeats + 1):
        x = torch.randint(0, cfg.vocab_size, (bptt + 1, batch))
        t0 = time.perf_counter()
        state = model(x[:-1], state, targets=x[1:]).state
        if i:
            times.append(bptt * batch / (time.perf_counter() - t0))
    return times


@torch.no_grad()
def measure_generate(cfg: SHARNNConfig, repeats: int, dtype: str, tokens: int = 32,
                     ring: bool = True) -> list[float]:
    model = for_inference(SHARNN(cfg), dtype)
    state = None
    for chunk in range(0, cfg.attn_span, 1024):  # fill the memory to its span, in segments
        n = min(1024, cfg.attn_span - chunk)
        state = model(torch.randint(0, cfg.vocab_size, (n, 1)), state).state
    if ring:
        state = model.ring_state(state)  # what sharnn.generate does before the token steps
    token = torch.zeros(1, 1, dtype=torch.long)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in range(tokens):
            out = model(token, state)
            state = out.state
            token = out.logits[-1:, :, :].argmax(-1)
        if i:
            times.append(tokens / (time.perf_counter() - t0))
    return times


def one(kind: str, name: str, repeats: int, dtype: str, recompute: bool, ring: bool) -> None:
    """Run one measurement (in its own process) and print it as JSON."""
    cfg, bptt, batch = CONFIGS[name]
    torch.manual_seed(0)
    fn = {"train": lambda: measure_train(cfg, bptt, batch, repeats, dtype, recompute),
          "eval": lambda: measure_eval(cfg, bptt, batch, repeats, dtype),
          "generate": lambda: measure_generate(cfg, repeats, dtype, ring=ring)}[kind]
    rates = fn()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"chars_per_s": statistics.median(rates), "peak_rss": rss}))


def ceilings(seconds: float = 1.0) -> dict[str, float]:
    """Matrix-multiply GFLOP/s (fp32, bf16) and memory bandwidth GB/s on this machine, now."""
    out = {}
    n = 2048
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        out[str(dtype).split(".")[-1]] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    # int8: the dynamically quantised Linear that `--precision int8` runs on (fp32 in and out).
    int8 = for_inference(SHARNN(SHARNNConfig(emsize=n, nhid=n, nlayers=1, attn_layers=())), "int8").blocks[0].ff.linear1
    a = torch.randn(n, n)
    int8(a)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        int8(a)
        reps += 1
    out["int8"] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    src = torch.ones(64 * 2**20 // 4)  # 256 MB: well past the caches
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        dst.copy_(src)
        reps += 1
    out["bandwidth_gbs"] = 2 * src.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9  # read + write
    return out


def wait_for_quiet(load: float, max_wait: float) -> float:
    t0 = time.time()
    while os.getloadavg()[0] > load and time.time() - t0 < max_wait:
        time.sleep(5)
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["paper", "small"], choices=sorted(CONFIGS))
    ap.add_argument("--kinds", nargs="+", default=["train", "eval", "generate"], choices=["train", "eval", "generate"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                    help="bf16: autocast in training, bf16 weights in eval/generate; int8: eval/generate only")
    ap.add_argument("--checkpoint-activations", action="store_true",
                    help="training recomputes each block in the backward pass (less memory, more compute)")
    ap.add_argument("--plain-memory", action="store_true",
                    help="generation without the memory ring: each token concatenates the memory (for comparison)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quiet-load", type=float, default=0.5)
    ap.add_argument("--quiet-wait", type=float, default=120)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], args.one[1], args.repeats, args.dtype, args.checkpoint_activations, not args.plain_memory)
        return
    load = wait_for_quiet(args.quiet_load, args.quiet_wait)
    ceil = ceilings()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f} at start")
    print(f"ceilings: fp32 matmul {ceil['float32']:.0f} GFLOP/s, bf16 matmul {ceil['bfloat16']:.0f} GFLOP/s, "
          f"int8 dynamic-quantised linear {ceil['int8']:.0f} GFLOP/s, memory {ceil['bandwidth_gbs']:.1f} GB/s")
    print()
    print(f"| config | params | what ({args.dtype}) | chars/s (median of {args.repeats}) | MFLOP/char | "
          "GFLOP/s | utilisation | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    matmul_ceiling = {"fp32": ceil["float32"], "bf16": ceil["bfloat16"], "int8": ceil["int8"]}[args.dtype]
    for name in args.configs:
        cfg, bptt, batch = CONFIGS[name]
        with torch.device("meta"):
            params = count_parameters(SHARNN(cfg))
        for kind in args.kinds:
            if kind == "train" and args.dtype == "int8":
                print(f"| {name} | {params / 1e6:.1f}M | train: int8 is for inference only | | | | | |")
                continue
            cmd = [sys.executable, __file__, "--one", kind, name, "--repeats", str(args.repeats), "--dtype", args.dtype,
                   *(["--checkpoint-activations"] if args.checkpoint_activations else []),
                   *(["--plain-memory"] if args.plain_memory else [])]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            fpc = flops_per_char(cfg, cfg.attn_span) * (3 if kind == "train" else 1)
            rate = res["chars_per_s"]
            gflops = fpc * rate / 1e9
            recomputed = ", blocks recomputed" if args.checkpoint_activations else ""
            what = {"train": f"train {bptt}x{batch}{recomputed}", "eval": f"eval {bptt}x{batch}",
                    "generate": "generate batch 1, memory full" + (", no ring" if args.plain_memory else "")}[kind]
            if kind == "generate":  # bound by memory traffic, not arithmetic
                gbs = bytes_per_token(cfg, args.dtype) * rate / 1e9
                used = f"{gbs / ceil['bandwidth_gbs']:.0%} of bandwidth ({gbs:.1f} GB/s)"
            else:
                used = f"{gflops / matmul_ceiling:.0%} of matmul"
            print(f"| {name} | {params / 1e6:.1f}M | {what} | {rate:,.0f} | {fpc / 1e6:.0f} | {gflops:.1f} | "
                  f"{used} | {res['peak_rss'] / 2**30:.2f} GB |")


if __name__ == "__main__":
    main()
