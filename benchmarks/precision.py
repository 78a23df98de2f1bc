"""What lower precision costs in bits per character, measured on a validation split.

    python benchmarks/precision.py                          # train the tiny preset twice (fp32, bf16), compare
    python benchmarks/precision.py --steps 600 --threads 2
    python benchmarks/precision.py --checkpoint runs/enwik8 --data data/enwik8   # inference rows, your model

Training: two seeded runs of the same model on the same data, one in fp32 and one under bf16 autocast
(`sharnn train --precision bf16`), and the validation bpc each reaches. Inference: the fp32 run's model (or
--checkpoint) evaluated on the validation split as trained, in bf16 and in int8 (`sharnn eval --precision`).
Prints a Markdown table; the target is a difference under 0.01 bpc. A third training run, fp32 with another
seed, shows how far a run moves by chance: a short run's bf16 difference means little unless it is well under
that (early in training the seed alone moves validation bpc by several hundredths).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from sharnn.checkpoint import load_model, load_train_config, load_vocab, resolve_checkpoint
from sharnn.config import SHARNNConfig, TrainConfig, load_preset, split_settings
from sharnn.data import load_corpus
from sharnn.evaluate import evaluate
from sharnn.precision import for_inference
from sharnn.train import train

TARGET = 0.01


def row(what: str, base: float, other: float) -> str:
    d = other - base
    return f"| {what} | {base:.4f} | {other:.4f} | {d:+.4f} | {'yes' if abs(d) < TARGET else 'NO'} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per training run (default: 400)")
    ap.add_argument("--preset", default="tiny", help="the model and data to train (default: tiny)")
    ap.add_argument("--checkpoint", help="measure inference on this model instead of training one")
    ap.add_argument("--data", help="with --checkpoint: its corpus (default: the one it was trained on)")
    ap.add_argument("--eval-bytes", type=int, default=200_000, help="validation tokens used (default: 200,000)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| measure (validation bpc) | fp32 | compared | difference | within 0.01 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = resolve_checkpoint(args.checkpoint, prefer="best")
            data = args.data or (load_train_config(ckpt) or TrainConfig()).data
        else:
            model_kw, train_kw = split_settings(load_preset(args.preset))
            model_cfg, tcfg = SHARNNConfig.from_dict(model_kw), TrainConfig.from_dict(train_kw)
            runs = {}
            for name, precision, seed in (("fp32", "fp32", 1), ("bf16", "bf16", 1), ("seed", "fp32", 2)):
                cfg = replace(tcfg, save=str(Path(tmp) / name), max_steps=args.steps, max_time=None,
                              sample=0, precision=precision, max_eval_bytes=args.eval_bytes, seed=seed)
                runs[name] = train(model_cfg, cfg, quiet=True)
            what = f"training: {args.preset} preset, {args.steps} seeded steps"
            print(row(f"{what}, bf16 autocast", runs["fp32"].valid.bpc, runs["bf16"].valid.bpc), flush=True)
            # The yardstick: how far fp32 itself moves when only the seed changes.
            print(row(f"{what}, fp32 with another seed (the noise)", runs["fp32"].valid.bpc, runs["seed"].valid.bpc))
            ckpt = resolve_checkpoint(runs["fp32"].run_dir, prefer="best")
            data = tcfg.data
        model = load_model(ckpt)
        corpus = load_corpus(data, vocab=load_vocab(ckpt))
        ids = corpus.valid[: args.eval_bytes]
        bptt = (load_train_config(ckpt) or TrainConfig()).bptt
        base = evaluate(for_inference(model, "fp32"), ids, 8, bptt).bpc
        for precision in ("bf16", "int8"):
            other = evaluate(for_inference(model, precision), ids, 8, bptt).bpc
            print(row(f"inference: {precision} model ({len(ids):,} validation tokens)", base, other), flush=True)


if __name__ == "__main__":
    main()
