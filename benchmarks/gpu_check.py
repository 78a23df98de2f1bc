"""Everything sharnn promises on a GPU, checked and timed by one command, with a markdown table as the result.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out "$OUT"            # on a GPU machine, <= ~9.5 minutes
    PYTHONPATH=src python3 benchmarks/gpu_check.py --device cpu --scale tiny --out /tmp/check   # the plumbing

It needs only the machine's own torch, numpy, safetensors and tqdm (nothing is installed), and no data beyond
the Python standard library's source (`--data python-stdlib`, on every machine with Python). Sections, in order,
each row written to OUT/gpu_check.md (and .json) as soon as it is measured, so a run cut short keeps its rows:

1. smoke: tiny runs on the device for the LSTM, GRU and QRNN cores in fp32, bf16 and fp16, --wdrop,
   --checkpoint-activations, --resume, eval, generate (CUDA graph against eager), score --document, a checkpoint
   saved on the GPU loaded on the CPU and the other way, and torchrun --nproc_per_node 1 (its launch only: one
   rank makes no process group, and NCCL needs two GPUs). Each must exit 0 and leave a loadable checkpoint.
2. speed: the paper's configuration (E 1024, H 4096, 4 blocks, batch 16, bptt 1024, memory 5000, 256 symbols):
   training ms/step and chars/s in fp32 (TF32 off), TF32, bf16 and fp16, evaluation chars/s in fp32 and bf16,
   batch-1 generation chars/s with the memory full (CUDA graph and eager), peak GPU memory of each; and the
   attention kernels alone (benchmarks/attention.py).
3. quality: 200 training steps of the paper's configuration per precision (LAMB, lr 2e-3, warm-up 100, seed 0,
   the same data in the same order), then validation bpc on 200 KB of held-out text: fp32 (TF32 off), bf16, fp16,
   TF32, and bf16 with parts kept in fp32 (--fp32-parts), to find which computation loses the signal.
4. compile: the bf16 training step with every block torch.compile'd (item 5 of issue #11: adopt it only if it
   wins here).

A time budget (--budget seconds) is checked before every row: what does not fit is listed as skipped.
`--scale tiny` shrinks every model (for trying the script on a CPU); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from sharnn.checkpoint import load_model
from sharnn.cli import main as sharnn
from sharnn.config import SHARNNConfig
from sharnn.data import load_corpus
from sharnn.evaluate import autocast
from sharnn.generate import generate_ids
from sharnn.model import SHARNN
from sharnn.optim import Lamb
from sharnn.precision import for_inference
from sharnn.runtime import set_tf32
from sharnn.state import detach_state

PAPER = SHARNNConfig()  # E 1024, H 4096, 4 blocks, attention in block 2, M 5000, V 256
TINY_FLAGS = ["--emsize", "32", "--nhid", "128", "--nlayers", "4", "--attn-span", "128", "--bptt", "64",
              "--batch_size", "4", "--warmup", "2", "--max-eval-bytes", "4000", "--save-every-minutes", "none"]


class Report:
    """Rows of named sections, rewritten to OUT/gpu_check.md and .json after every row."""

    def __init__(self, out: Path, header: dict, budget: float):
        self.out, self.header, self.rows = out, header, []
        self.deadline = time.monotonic() + budget
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, **row) -> None:
        self.rows.append({"section": section, **row})
        print(f"[{section}] " + " | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps({"header": self.header, "rows": self.rows}, indent=1))
        lines = [f"# sharnn GPU check, {self.header['date']}", ""]
        lines += [f"- {k}: {v}" for k, v in self.header.items() if k != "date"]
        for section in dict.fromkeys(r["section"] for r in self.rows):
            rows = [r for r in self.rows if r["section"] == section]
            keys = list(dict.fromkeys(k for r in rows for k in r if k != "section"))
            lines += ["", f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def run_cli(*args: str) -> tuple[int, str, str]:
    """`sharnn ARGS` in this process (CUDA stays initialised between runs): exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = sharnn(list(args))
        except Exception:  # noqa: BLE001 - a crash is a result here, with its traceback
            traceback.print_exc(file=err)
            rc = -1
    return rc, out.getvalue(), err.getvalue()


def last_line(text: str, limit: int | None = 300) -> str:
    """The last non-blank line, cut to `limit` characters for a table's note (None: whole, to parse it)."""
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:limit] if lines else ""


def summary(command: str, out: str) -> str:
    """A short note on a successful command's output."""
    if command in ("eval", "score"):
        return f"bpc {json.loads(last_line(out, None))['bpc']:.3f}"
    return f"{len(out.encode('utf-8', errors='replace'))} bytes printed"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: torch.device) -> float | str:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else "-"


# --- 1. smoke ----------------------------------------------------------------------------------------------------


def smoke(rep: Report, device: torch.device, work: Path) -> None:
    text = work / "smoke.txt"
    text.write_bytes(bytes(load_corpus("python-stdlib").train[:400_000]))
    dev = ["--device", device.type]
    base = ["--data", str(text), *TINY_FLAGS, *dev, "--quiet", "--json", "--overwrite"]

    def train(name: str, *flags: str, steps: int = 12) -> Path | None:
        if rep.left() < 30:
            rep.add("smoke", check=name, result="skipped (time)")
            return None
        run = work / name.replace(" ", "_").replace("/", "_")
        t0 = time.perf_counter()
        rc, out, err = run_cli("train", *base, "--save", str(run), "--max-steps", str(steps), *flags)
        ok, note = rc == 0, last_line(err) if rc else ""
        if ok:
            try:  # a checkpoint written on the device loads on the CPU and back on the device
                load_model(run / "last", "cpu")
                load_model(run / "best", device)
            except Exception as e:  # noqa: BLE001
                ok, note = False, f"checkpoint does not load: {e}"[:300]
        if ok:
            note = f"test bpc {json.loads(out)['test_bpc']:.3f}"
        rep.add("smoke", check=name, result="ok" if ok else f"FAILED (exit {rc})", seconds=time.perf_counter() - t0,
                note=note)
        return run if ok else None

    for core in ("LSTM", "GRU", "QRNN"):
        for precision in ("fp32", "bf16", "fp16"):
            if device.type == "cpu" and precision == "fp16" and core == "LSTM":
                rep.add("smoke", check=f"train {core} {precision}", result="n/a on CPU (no fp16 LSTM kernel)")
                continue
            train(f"train {core} {precision}", "--model", core, "--precision", precision)
    train("train LSTM wdrop 0.2", "--wdrop", "0.2")
    train("train LSTM bf16 wdrop 0.2", "--wdrop", "0.2", "--precision", "bf16")
    train("train LSTM bf16 checkpoint-activations", "--checkpoint-activations", "--precision", "bf16")
    train("train LSTM bf16 fp32-parts core,decoder", "--precision", "bf16", "--fp32-parts", "core,decoder")
    run = train("train for resume", steps=8)
    if run is not None:
        t0 = time.perf_counter()
        rc, _, err = run_cli("train", *base, "--save", str(run), "--resume", str(run), "--max-steps", "14")
        steps = json.loads((run / "last" / "config.json").read_text())["progress"].get("step") if rc == 0 else None
        rep.add("smoke", check="resume 8 -> 14 steps", result="ok" if rc == 0 and steps == 14 else f"FAILED ({rc})",
                seconds=time.perf_counter() - t0, note=last_line(err) if rc else f"step {steps}")
    ckpt = work / "train_LSTM_fp32"
    if (ckpt / "best").is_dir():
        for name, args in (
            ("eval fp32", ["eval", str(ckpt), *dev, "--split", "valid", "--json"]),
            ("eval bf16", ["eval", str(ckpt), *dev, "--split", "valid", "--json", "--precision", "bf16"]),
            ("eval reference window", ["eval", str(ckpt), *dev, "--json", "--attn-window", "reference"]),
            ("generate fp32", ["generate", str(ckpt), *dev, "--length", "200", "--seed", "1"]),
            ("generate bf16", ["generate", str(ckpt), *dev, "--length", "200", "--seed", "1", "--precision", "bf16"]),
            ("score --document", ["score", str(ckpt), *dev, "--document", str(text), "--json"]),
        ):
            t0 = time.perf_counter()
            rc, out, err = run_cli(*args)
            rep.add("smoke", check=name, result="ok" if rc == 0 else f"FAILED (exit {rc})",
                    seconds=time.perf_counter() - t0, note=last_line(err) if rc else summary(args[0], out))
        smoke_generation_graph(rep, ckpt, device)
    cpu_run = train("train on CPU, load on the device", "--device", "cpu")
    if cpu_run is not None and device.type == "cuda":
        rc, _, err = run_cli("eval", str(cpu_run), "--device", "cuda", "--json")
        rep.add("smoke", check="CPU checkpoint evaluated on the GPU", result="ok" if rc == 0 else "FAILED",
                note=last_line(err) if rc else "")
    smoke_torchrun(rep, base, work, device)


@torch.no_grad()
def smoke_generation_graph(rep: Report, ckpt: Path, device: torch.device) -> None:
    """Greedy generation replayed as a CUDA graph gives the eager step's bytes and scores."""
    if device.type != "cuda":
        rep.add("smoke", check="generate: CUDA graph = eager", result="n/a (no CUDA)")
        return
    try:
        model = for_inference(load_model(ckpt, device), "fp32")
        prompt = list(b"def main():\n    ")
        # Each step's logits are copied as they come: a graph's output buffer is overwritten by the next replay.
        runs = [[(t, logits.clone()) for t, _, logits in generate_ids(model, prompt, 300, temperature=0, graph=g)]
                for g in (True, False)]
        tokens = [[t for t, _ in r] for r in runs]
        diff = max(float((a[1] - b[1]).abs().max()) for a, b in zip(*runs))  # every step's scores
        ok = tokens[0] == tokens[1] and diff < 1e-3
        rep.add("smoke", check="generate: CUDA graph = eager", result="ok" if ok else "FAILED",
                note=f"300 greedy bytes, max |logit diff| {diff:.2e}")
    except Exception as e:  # noqa: BLE001
        rep.add("smoke", check="generate: CUDA graph = eager", result="FAILED", note=repr(e)[:300])


def smoke_torchrun(rep: Report, base: list[str], work: Path, device: torch.device) -> None:
    if rep.left() < 60:
        rep.add("smoke", check="torchrun --nproc_per_node 1", result="skipped (time)")
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "sharnn.cli",
           "train", *base, "--save", str(work / "torchrun"), "--max-steps", "10"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    ok = proc.returncode == 0 and (work / "torchrun" / "last" / "config.json").is_file()
    # One process makes no process group: torchrun's launch and environment are checked, not NCCL (that needs
    # two GPUs).
    rep.add("smoke", check="torchrun --nproc_per_node 1 (launch only: no process group with one rank)", result="ok" if ok else f"FAILED ({proc.returncode})",
            seconds=time.perf_counter() - t0, note="" if ok else last_line(proc.stderr))


# --- 2. speed ----------------------------------------------------------------------------------------------------


def speed(rep: Report, device: torch.device, cfg: SHARNNConfig, bptt: int, batch: int, repeats: int) -> None:
    train_speeds(rep, device, cfg, bptt, batch, repeats, [
        ("fp32, TF32 off", "fp32", False, False), ("TF32", "fp32", True, False),
        ("bf16 autocast", "bf16", True, False), ("fp16 autocast + scaler", "fp16", True, False)])
    set_tf32(True)
    for precision in ("fp32", "bf16"):
        try:
            rate, gb = eval_rate(device, cfg, bptt, batch, precision, repeats)
            rep.add("speed", measure=f"eval, {precision} model, TF32", chars_per_s=rate, peak_gb=gb)
        except Exception as e:  # noqa: BLE001
            rep.add("speed", measure=f"eval, {precision}", result="FAILED", note=repr(e)[:300])
    for precision in ("fp32", "bf16"):
        for graph in ((True, False) if device.type == "cuda" else (False,)):
            name = f"generate batch 1, memory full, {precision}, {'CUDA graph' if graph else 'eager'}"
            try:
                rep.add("speed", measure=name, chars_per_s=generate_rate(device, cfg, precision, graph))
            except Exception as e:  # noqa: BLE001
                rep.add("speed", measure=name, result="FAILED", note=repr(e)[:300])
    if rep.left() > 60:
        from attention import measure as attention_measure  # benchmarks/attention.py, beside this file

        sizes = ["paper", "token"] if device.type == "cuda" else ["tiny", "token"]
        for size in sizes:
            for dtype in (torch.float32, torch.bfloat16):
                r = attention_measure(size, device, dtype, repeats, 0.1)
                rep.add("attention kernels (ms)", size=size, dtype=r["dtype"], T=r["T"], K=r["K"],
                        eval_plain=r["eval_plain_ms"], eval_fused=r["eval_fused_ms"],
                        train_plain=r.get("train_plain_ms", "-"), train_fused=r.get("train_fused_ms", "-"),
                        max_diff=r["max_abs_diff"])


def train_speeds(rep: Report, device: torch.device, cfg: SHARNNConfig, bptt: int, batch: int, repeats: int,
                 variants: list[tuple[str, str, bool, bool]]) -> None:
    for name, precision, tf32, compiled in variants:
        if device.type == "cpu" and precision == "fp16":
            continue
        if rep.left() < (120 if compiled else 40):
            rep.add("speed", measure=f"train, {name}", result="skipped (time)")
            continue
        try:
            s, gb = train_step_seconds(device, cfg, bptt, batch, precision, tf32, compiled, repeats)
            rep.add("speed", measure=f"train, {name}", ms=1000 * s, chars_per_s=bptt * batch / s, peak_gb=gb)
        except Exception as e:  # noqa: BLE001
            rep.add("speed", measure=f"train, {name}", result="FAILED", note=repr(e)[:300])
    set_tf32(True)


def train_step_seconds(device: torch.device, cfg: SHARNNConfig, bptt: int, batch: int, precision: str, tf32: bool,
                       compiled: bool, repeats: int) -> tuple[float, float | str]:
    """Median seconds of a training step as `sharnn train` takes it (state carried, clip, LAMB), and peak memory."""
    set_tf32(tf32)
    torch.manual_seed(0)
    model = SHARNN(cfg).to(device).train()
    if compiled:
        for block in model.blocks:
            block.compile()
    opt = Lamb(model.parameters(), lr=1e-3, weight_decay=1.2e-6, foreach=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = None
    reset_peak(device)
    times = []
    warmup = -(-cfg.attn_span // bptt) + 2  # the memory fills up (shapes settle), then allocator, plans, compiling
    for i in range(repeats + warmup):
        x = torch.randint(0, cfg.vocab_size, (bptt + 1, batch), device=device)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            out = model(x[:-1], state, targets=x[1:])
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        state = detach_state(out.state)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    gb = peak_gb(device)
    del model, opt, state, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), gb


@torch.no_grad()
def eval_rate(device: torch.device, cfg: SHARNNConfig, bptt: int, batch: int, precision: str,
              repeats: int) -> tuple[float, float | str]:
    torch.manual_seed(0)
    model = for_inference(SHARNN(cfg).to(device), precision)
    state, times = None, []
    reset_peak(device)
    warmup = -(-cfg.attn_span // bptt) + 1  # segments that fill the memory
    for i in range(repeats + warmup):
        x = torch.randint(0, cfg.vocab_size, (bptt + 1, batch), device=device)
        sync(device)
        t0 = time.perf_counter()
        state = model(x[:-1], state, targets=x[1:]).state
        sync(device)
        if i >= warmup:
            times.append(bptt * batch / (time.perf_counter() - t0))
    gb = peak_gb(device)
    del model, state
    return statistics.median(times), gb


@torch.no_grad()
def generate_rate(device: torch.device, cfg: SHARNNConfig, precision: str, graph: bool, tokens: int = 300) -> float:
    """Bytes per second of `generate_ids` (sampling and the host sync per byte included), memory full."""
    torch.manual_seed(0)
    model = for_inference(SHARNN(cfg).to(device), precision)
    state = None
    for _ in range(0, cfg.attn_span, 1024):
        state = model(torch.randint(0, cfg.vocab_size, (1024, 1), device=device), state).state
    out = model(torch.randint(0, cfg.vocab_size, (1, 1), device=device), state)
    it = generate_ids(model, [], tokens + 20, state=out.state, logits=out.logits[-1, 0], seed=0, graph=graph)
    for _ in range(20):  # capture and warm-up
        next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in it:
        pass
    sync(device)
    return tokens / (time.perf_counter() - t0)


# --- 3. quality ---------------------------------------------------------------------------------------------------


def quality(rep: Report, device: torch.device, work: Path, scale: str) -> None:
    if scale == "paper":
        common = ["--preset", "paper", "--max-steps", "200", "--log-interval", "50", "--max-eval-bytes", "200000"]
        per_run = {"fp32": 110, "tf32": 80}
    else:
        common = [*TINY_FLAGS, "--max-steps", "20", "--log-interval", "5"]
        per_run = {}
    common += ["--data", "python-stdlib", "--lr", "2e-3", "--warmup", str(100 if scale == "paper" else 5),
               "--seed", "0", "--device", device.type, "--save-every-minutes", "none", "--quiet", "--json",
               "--overwrite"]
    variants = [("fp32, TF32 off", ["--precision", "fp32", "--no-tf32"]),
                ("bf16 autocast", ["--precision", "bf16"]),
                ("fp16 autocast + scaler", ["--precision", "fp16"]),
                ("TF32", ["--precision", "fp32"]),
                ("bf16, core in fp32", ["--precision", "bf16", "--fp32-parts", "core"]),
                ("bf16, decoder in fp32", ["--precision", "bf16", "--fp32-parts", "decoder"]),
                ("bf16, boom and attention in fp32", ["--precision", "bf16", "--fp32-parts", "boom,attention"])]
    reference = None
    for name, flags in variants:
        if device.type == "cpu" and "fp16" in flags:
            continue
        need = per_run.get("fp32" if "--no-tf32" in flags else "tf32" if flags == ["--precision", "fp32"] else "", 45)
        if rep.left() < need:
            rep.add("quality", run=name, result="skipped (time)")
            continue
        run = work / ("quality-" + name.replace(" ", "_").replace(",", ""))
        t0 = time.perf_counter()
        rc, out, err = run_cli("train", *common, *flags, "--save", str(run))
        if rc != 0:
            rep.add("quality", run=name, result=f"FAILED (exit {rc})", note=last_line(err))
            continue
        res = json.loads(out)
        events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        curve = " / ".join(f"{e['bpc']:.2f}" for e in events if e["event"] == "train")
        reference = res["valid_bpc"] if reference is None else reference
        rep.add("quality", run=name, train_bpc_curve=curve, valid_bpc=res["valid_bpc"],
                vs_first=res["valid_bpc"] - reference, train_seconds=res["seconds"],
                wall_seconds=time.perf_counter() - t0)
        shutil.rmtree(run, ignore_errors=True)  # checkpoints of the paper's size: 650 MB each


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for the report")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--sections", nargs="+", default=["smoke", "speed", "quality", "compile"],
                    choices=["smoke", "speed", "quality", "compile"])
    ap.add_argument("--budget", type=float, default=560, help="seconds for the whole check (rows beyond: skipped)")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU",
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "scale": args.scale, "command": " ".join(sys.argv)}
    rep = Report(out, header, args.budget)
    sys.path.insert(0, str(Path(__file__).parent))
    if args.scale == "paper":
        cfg, bptt, batch = PAPER, 1024, 16
    else:
        cfg, bptt, batch = replace(PAPER, emsize=64, nhid=256, attn_span=512), 128, 4
    started = time.monotonic()
    for section in args.sections:
        try:
            if section == "smoke":
                smoke(rep, device, work)
            elif section == "speed":
                speed(rep, device, cfg, bptt, batch, args.repeats)
            elif section == "quality":
                quality(rep, device, work, args.scale)
            else:  # last: the least needed, and compiling takes a while
                train_speeds(rep, device, cfg, bptt, batch, args.repeats,
                             [("bf16 autocast, torch.compile'd blocks", "bf16", True, True)])
        except Exception as e:  # noqa: BLE001 - report and go on with the next section
            rep.add(section, result="SECTION FAILED", note=repr(e)[:300])
    rep.header["seconds"] = round(time.monotonic() - started)
    rep.write()
    shutil.rmtree(work, ignore_errors=True)
    print((out / "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
