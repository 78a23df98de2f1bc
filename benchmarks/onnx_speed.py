"""Batch-1 token steps: the exported ONNX model under onnxruntime (CPU) next to PyTorch.

    python benchmarks/onnx_speed.py                      # tiny (the quick start's size) and paper, 2 threads
    python benchmarks/onnx_speed.py --configs tiny --threads 1

Both run one token per call with the attention memory full (the ring, as `sharnn generate` steps): PyTorch
through `TokenStep` (eager, as `sharnn generate` runs on a CPU), onnxruntime through the file `sharnn export`
writes, each call feeding the previous call's state back. Random weights: speed does not depend on them.
Also the prompt pass: `--segment` tokens per call, through the segment model and through PyTorch's forward.
Medians of --repeats timed runs of --tokens steps, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sharnn.config import SHARNNConfig, load_preset, split_settings
from sharnn.export import export_onnx, initial_feed
from sharnn.generate import TokenStep
from sharnn.model import SHARNN
from sharnn.precision import for_inference

CONFIGS = {
    "tiny": SHARNNConfig.from_dict(split_settings(load_preset("tiny"))[0]),  # the tiny preset's network, as it is now
    "paper": SHARNNConfig(),
}


def rate(fn, tokens: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


@torch.no_grad()
def measure(name: str, threads: int, tokens: int, segment: int, repeats: int, folder: Path) -> dict:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = SHARNN(cfg)
    paths = export_onnx(model, folder / f"{name}.onnx", segment)
    fast = for_inference(model, "fp32")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    step_s, seg_s = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in paths)

    # Fill the memory to its span first (the costliest steps: every key present).
    ids = torch.randint(0, cfg.vocab_size, (cfg.attn_span + segment * 4, 1))
    state, feed = fast.initial_state(1), initial_feed(step_s, 1)
    for pos in range(0, cfg.attn_span, segment):
        state = fast(ids[pos : pos + segment], state).state
        feed = dict(zip(feed, seg_s.run(None, {"tokens": ids[pos : pos + segment].numpy(), **feed})[1:]))
    step = TokenStep(fast, fast.ring_state(state))
    token = torch.zeros(1, 1, dtype=torch.long)

    def torch_steps() -> None:
        for _ in range(tokens):
            step(token)

    def ort_steps() -> None:
        nonlocal feed
        t = np.zeros((1, 1), np.int64)
        for _ in range(tokens):
            out = step_s.run(None, {"tokens": t, **feed})
            feed = dict(zip(feed, out[1:]))

    seg_ids = ids[: segment].numpy()
    full = feed

    def torch_segment() -> None:
        fast(ids[:segment], state)

    def ort_segment() -> None:
        seg_s.run(None, {"tokens": seg_ids, **full})

    return {"config": name, "threads": threads, "params": sum(p.numel() for p in fast.parameters()),
            "onnx_mb": round(paths[0].stat().st_size / 1e6, 1),
            "step_torch": rate(torch_steps, tokens, repeats), "step_onnxruntime": rate(ort_steps, tokens, repeats),
            "segment": segment, "segment_torch": rate(torch_segment, segment, repeats),
            "segment_onnxruntime": rate(ort_segment, segment, repeats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["tiny", "paper"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            r = measure(name, args.threads, args.tokens, args.segment, args.repeats, Path(tmp))
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
