"""Which attention computation is faster for a SHA-RNN head: two plain matmuls or PyTorch's fused SDPA?

    python benchmarks/attention.py                      # CPU, fp32 and bf16, a few sizes
    python benchmarks/attention.py --device cuda --sizes paper
    python benchmarks/attention.py --json out.json

`sharnn.model.fused_attention_wins` picks between `attend` (softmax(q k^T / sqrt(E)) with dropout, then @ v)
and `attend_fused` (scaled_dot_product_attention) from these measurements. For each size it times, with the
masks a training segment uses (sliding window over memory + segment), the forward and backward pass with
dropout (training) and the forward pass without gradients (evaluation), and checks that both give the same
numbers without dropout. Prints a markdown table; medians of --repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from sharnn.model import attend, attend_fused
from sharnn.state import visible_keys

SIZES = {
    # name: (T queries, memory rows, E width, B batch)
    "tiny": (128, 255, 128, 16),
    "small": (256, 4999 - 256, 256, 16),
    "paper": (1024, 4999, 1024, 16),
    "token": (1, 4999, 1024, 1),  # one generated token over a full memory (no mask)
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, device: torch.device, dtype: torch.dtype, repeats: int, dropout: float) -> dict:
    T, m, E, B = SIZES[name]
    K = m + T
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(n, B, E, generator=g).to(device, dtype) for n in (T, K, K))
    visible = visible_keys(T, K, m, 5000, "sliding", device)
    drop = nn.Dropout(dropout)
    row = {"size": name, "device": device.type, "dtype": str(dtype).removeprefix("torch."), "T": T, "K": K, "E": E,
           "B": B}
    with torch.no_grad():  # same numbers (no dropout)
        a = attend(q, k, v, visible, nn.Identity()).float()
        b = attend_fused(q, k, v, visible, 0.0).float()
        row["max_abs_diff"] = float((a - b).abs().max())
        row["eval_plain_ms"] = 1000 * timed(lambda: attend(q, k, v, visible, nn.Identity()), device, repeats)
        row["eval_fused_ms"] = 1000 * timed(lambda: attend_fused(q, k, v, visible, 0.0), device, repeats)
    if T > 1:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def train(fused: bool) -> None:
            out = attend_fused(qg, kg, vg, visible, dropout) if fused else attend(qg, kg, vg, visible, drop)
            out.float().square().mean().backward()

        row["train_plain_ms"] = 1000 * timed(lambda: train(False), device, repeats)
        row["train_fused_ms"] = 1000 * timed(lambda: train(True), device, repeats)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small", "token"], choices=sorted(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rows = [measure(s, device, dtypes[d], args.repeats, args.dropout) for s in args.sizes for d in args.dtypes]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"attention, {where}, torch {torch.__version__}: milliseconds, median of {args.repeats}\n")
    print("| size | dtype | T | K | E | B | eval plain | eval fused | train plain | train fused | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tp, tf = r.get("train_plain_ms"), r.get("train_fused_ms")
        print(f"| {r['size']} | {r['dtype']} | {r['T']} | {r['K']} | {r['E']} | {r['B']} | {r['eval_plain_ms']:.2f} | "
              f"{r['eval_fused_ms']:.2f} | {'-' if tp is None else f'{tp:.2f}'} | {'-' if tf is None else f'{tf:.2f}'} | "
              f"{r['max_abs_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
