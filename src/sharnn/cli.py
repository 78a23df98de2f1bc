"""`sharnn` command line: each subcommand parses its flags, builds configs and calls one library function.

    sharnn data enwik8 DIR [--from-zip PATH]     fetch, check and split enwik8
    sharnn train [--preset NAME] [--config F] [flags]
    sharnn eval CKPT [--split valid|test]

Training flags are derived from the fields of `SHARNNConfig` and `TrainConfig` and spelled as in the seed's
parameter table (`--batch_size`, `--log-interval`); each also accepts the other spelling (`--batch-size`).
Progress goes to stderr, results to stdout. A `SharnnError` is printed as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any, Sequence

from .config import SHARNNConfig, TrainConfig, load_config_file, load_preset, preset_names, split_settings
from .errors import SharnnError

# Fields that are set by the data, not by the user.
NOT_FLAGS = {"vocab_size"}
# Fields whose value changes the weights' shapes: on --resume they come from the checkpoint.
ARCHITECTURE = {"vocab_size", "model", "emsize", "nhid", "nlayers", "attn_layers", "tied"}


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "off", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_field_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if f.name in NOT_FLAGS:
            continue
        under, hyphen = f"--{f.name}", f"--{f.name.replace('_', '-')}"
        # The table spells batch_size with an underscore and log-interval with a hyphen; accept both everywhere.
        names = [under, hyphen] if f.name == "batch_size" else list(dict.fromkeys([hyphen, under]))
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        default = f.default
        help_text = f"{f.metadata.get('help', '')} (default: {_show(default)})"
        t = str(f.type)
        if t == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif t.startswith("tuple"):
            kw.update(nargs="+", type=int, metavar="N")
        elif "None" in t:
            base = int if t.startswith("int") else float if t.startswith("float") else str
            kw.update(type=_none_or(base), metavar=base.__name__.upper())
        else:
            kw["type"] = type(default)
            if f.name == "optimizer":
                kw["choices"] = ["lamb", "adam", "adamw", "sgd"]
        group.add_argument(*names, help=help_text, **kw)


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return " ".join(map(str, v))
    return "none" if v is None else str(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sharnn", description="Single Headed Attention RNN (Merity 2019).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="fetch and prepare a corpus", description="Fetch and prepare a corpus.")
    d.add_argument("corpus", choices=["enwik8"], help="which corpus")
    d.add_argument("dir", help="folder to write train.bin, valid.bin, test.bin into")
    d.add_argument("--from-zip", metavar="PATH", help="use this enwik8.zip instead of downloading it")
    d.add_argument("--url", default=None, help="download from this address instead of the Hutter Prize site")

    t = sub.add_parser(
        "train", help="train a model",
        description="Train SHA-RNN. Settings: defaults < --preset < --config < flags.",
    )
    t.add_argument("--preset", help=f"built-in settings: {', '.join(preset_names())}")
    t.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (flat, or [model]/[train])")
    t.add_argument("--cuda", dest="device", action="store_const", const="cuda", default=argparse.SUPPRESS,
                   help="train on the GPU (same as --device cuda)")
    t.add_argument("--json", action="store_true", help="print the final results as one JSON object")
    t.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    _add_field_flags(t, SHARNNConfig, "model (SHARNNConfig)")
    _add_field_flags(t, TrainConfig, "run (TrainConfig)")

    e = sub.add_parser("eval", help="bpc and perplexity of a checkpoint on a split")
    e.add_argument("checkpoint", help="checkpoint folder, or a run folder (its best/ is used)")
    e.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    e.add_argument("--split", choices=["valid", "test", "train"], default="test")
    e.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int,
                   help="streams (default: the training batch_size for valid, 8 for test, as the paper)")
    e.add_argument("--bptt", type=int, help="segment length (default: the training bptt)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--cuda", dest="device", action="store_const", const="cuda")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def resolve_train_settings(args: argparse.Namespace) -> tuple[SHARNNConfig, TrainConfig, dict[str, Any]]:
    """Defaults < preset < config file < flags. Returns the configs and the model settings the user gave."""
    settings: dict[str, Any] = {}
    if args.preset:
        settings.update(load_preset(args.preset))
    if args.config:
        settings.update(load_config_file(args.config))
    flag_names = {f.name for f in fields(SHARNNConfig)} | {f.name for f in fields(TrainConfig)}
    settings.update({k: v for k, v in vars(args).items() if k in flag_names})
    model_kw, train_kw = split_settings(settings)
    try:
        model_cfg = SHARNNConfig.from_dict(model_kw)
        train_cfg = TrainConfig.from_dict(train_kw)
    except TypeError as e:  # a config file value of the wrong kind
        raise SharnnError(f"bad setting: {e}") from None
    return model_cfg, train_cfg, model_kw


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    model_cfg, cfg, model_given = resolve_train_settings(args)
    if cfg.resume:
        _check_resume_architecture(cfg.resume, model_given)
    if not args.quiet:
        print("settings: " + json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()}), file=sys.stderr)
    result = train(model_cfg, cfg, quiet=args.quiet, model_overrides=model_given)
    if args.json:
        print(json.dumps({
            "run_dir": str(result.run_dir), "steps": result.steps, "seconds": round(result.seconds, 2),
            "train_chars_per_s": round(result.train_chars_per_s, 1), "best_valid_bpc": result.best_valid_bpc,
            "valid_bpc": result.valid.bpc if result.valid else None,
            "test_bpc": result.test.bpc if result.test else None,
            "sample": result.sample.decode("utf-8", errors="replace"),
        }))
        return 0
    print(f"run folder: {result.run_dir} (best checkpoint in {result.run_dir / 'best'})")
    print(f"trained {result.steps} steps in {result.seconds:.1f} s, {result.train_chars_per_s:,.0f} chars/s")
    if result.valid and result.test:
        print(f"valid bpc {result.valid.bpc:.4f} | test bpc {result.test.bpc:.4f} | test ppl {result.test.ppl:.3f}")
    if result.sample:
        print("--- sample (prompt: the test split's first 64 bytes) ---")
        print(result.sample.decode("utf-8", errors="replace"))
    return 0


def _check_resume_architecture(resume: str, given: dict[str, Any]) -> None:
    from .checkpoint import read_meta, resolve_checkpoint

    saved = read_meta(resolve_checkpoint(resume, prefer="last"))["model"]
    for name in sorted(ARCHITECTURE & set(given)):
        want = list(given[name]) if isinstance(given[name], tuple) else given[name]
        if saved.get(name) != want:
            raise SharnnError(
                f"--{name} {_show(given[name])} conflicts with the checkpoint's {saved.get(name)}: "
                "on --resume the architecture comes from the checkpoint; drop the flag"
            )


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, load_train_config, load_vocab, resolve_checkpoint
    from .data import load_corpus
    from .evaluate import evaluate
    from .train import resolve_device

    device = resolve_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint, prefer="best")
    model = load_model(ckpt, device)
    tcfg = load_train_config(ckpt) or TrainConfig()
    data = args.data or tcfg.data
    corpus = load_corpus(data, vocab=load_vocab(ckpt))
    if args.batch_size is not None and args.batch_size < 1 or args.bptt is not None and args.bptt < 1:
        raise SharnnError("--batch_size and --bptt must be at least 1")
    default_bsz = tcfg.test_batch_size if args.split == "test" else (tcfg.eval_batch_size or tcfg.batch_size)
    bsz = args.batch_size or default_bsz
    bptt = args.bptt or tcfg.bptt
    res = evaluate(model, corpus.split(args.split), bsz, bptt, device, progress=not args.json, what=args.split)
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "data": data, "split": args.split, "loss": res.loss,
                          "bpc": res.bpc, "ppl": res.ppl, "predictions": res.predictions,
                          "batch_size": bsz, "bptt": bptt, "seconds": round(res.seconds, 3)}))
    else:
        print(f"{args.split}: loss {res.loss:.4f} nats | bpc {res.bpc:.4f} | ppl {res.ppl:.4f} | "
              f"{res.predictions:,} predictions in {bsz} streams, bptt {bptt} | {res.seconds:.1f} s "
              f"({res.predictions / max(res.seconds, 1e-9):,.0f} chars/s)")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import ENWIK8_URL, prepare_enwik8

    sizes = prepare_enwik8(args.dir, zip_path=args.from_zip, url=args.url or ENWIK8_URL)
    print(f"enwik8 ready in {args.dir}: " + ", ".join(f"{k} {v:,} bytes" for k, v in sizes.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"train": cmd_train, "eval": cmd_eval, "data": cmd_data}[args.command](args)
    except SharnnError as e:
        print(f"sharnn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sharnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
