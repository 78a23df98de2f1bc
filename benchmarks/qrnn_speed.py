"""Training-step time of the three recurrent cores (`--model LSTM|GRU|QRNN`) at equal width, on this machine.

    python benchmarks/qrnn_speed.py                        # small and large, 5 timed rounds each
    python benchmarks/qrnn_speed.py --configs small --steps 10 --threads 2

For each configuration the same SHA-RNN (attention in the second to last block) is built with each core and
timed on full training steps: forward, backward, clip and LAMB step on random bytes, state and memory carried
from step to step. "core" times the recurrent core alone (forward and backward of one (bptt, batch, E)
segment), where the cores differ. The cores take turns, one step each per round, so that drift (the attention
memory grows every step; other jobs come and go) hits all of them alike; after one warm-up round the table
reports the fastest of the timed rounds, the least disturbed figure on a shared machine.
The QRNN/LSTM ratio is the one to watch: below 1 the QRNN step is faster.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from speed import training_step  # benchmarks/speed.py: one full training step, state carried

from sharnn.config import SHARNNConfig
from sharnn.model import SHARNN, Block, count_parameters

CONFIGS = {
    # name: (model config, bptt, batch)
    "small": (SHARNNConfig(emsize=256, nhid=1024), 128, 16),
    "large": (SHARNNConfig(emsize=1024, nhid=4096), 256, 16),
}
CORES = ("LSTM", "QRNN", "GRU")


def core_step(cfg: SHARNNConfig, bptt: int, batch: int) -> Callable[[], float]:
    """A function that runs the recurrent core's forward and backward on a segment; returns its seconds."""
    torch.manual_seed(0)
    block = Block(cfg, use_attn=False).train()
    state = SHARNN(replace(cfg, nlayers=1, attn_layers=())).initial_state(batch)[0].rnn

    def step() -> float:
        x = torch.randn(bptt, batch, cfg.emsize, requires_grad=True)
        t0 = time.perf_counter()
        y, _ = block.run_rnn(x, state)
        y.sum().backward()
        return time.perf_counter() - t0

    return step


def fastest(steps: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Interleaved rounds (one call of each per round); the first round warms up and is not counted."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + 1):
        for k, step in steps.items():
            t = step()
            if r:
                times[k].append(t)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["small", "large"], choices=sorted(CONFIGS))
    ap.add_argument("--cores", nargs="+", default=list(CORES), choices=CORES)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastest of {args.steps} rounds")
    print("| config | core | params | bptt x batch | s/step | train chars/s | step / LSTM's "
          "| core s (fwd+bwd) | core / LSTM's |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        base, bptt, batch = CONFIGS[name]
        cfgs = {core: replace(base, model=core) for core in args.cores}
        step = fastest({c: training_step(cfg, bptt, batch) for c, cfg in cfgs.items()}, args.steps)
        core = fastest({c: core_step(cfg, bptt, batch) for c, cfg in cfgs.items()}, args.steps)
        for c, cfg in cfgs.items():
            with torch.device("meta"):
                n = count_parameters(SHARNN(cfg))
            ratio = f"{step[c] / step['LSTM']:.2f}" if "LSTM" in step else "—"
            core_ratio = f"{core[c] / core['LSTM']:.2f}" if "LSTM" in core else "—"
            print(f"| {name} (E {cfg.emsize}, H {cfg.nhid}) | {c} | {n / 1e6:.2f}M | {bptt} x {batch} | "
                  f"{step[c]:.3f} | {bptt * batch / step[c]:,.0f} | {ratio} | {core[c]:.3f} | {core_ratio} |")


if __name__ == "__main__":
    main()
