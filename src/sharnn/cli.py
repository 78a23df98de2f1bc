"""`sharnn` command line: each subcommand's flags beside the function that runs it, which builds the settings and
calls the library (the library does the work).

    sharnn data enwik8 DIR [--from-zip PATH]     fetch, check and split enwik8
    sharnn train [--preset NAME] [--config F] [flags]
    sharnn eval CKPT [--split valid|test]
    sharnn generate CKPT [--prompt TEXT] [--length N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    sharnn score CKPT [FILE ...] [--document] [--context FILE] [--per-token]
    sharnn import-reference STATE_DICT.pt OUT [--vocab-from DIR]
    sharnn collapse CKPT OUT
    sharnn export CKPT OUT.onnx [--segment N] [--check-bytes N]
    sharnn plot RUN [RUN ...] -o curves.png|svg
    sharnn attention CKPT --text FILE -o attention.png|svg [--heatmap N] [--at POS] [--max-bytes N]
    sharnn eval CKPT --dynamic | --dynamic-search  [--dynamic-lr ...]   dynamic evaluation
    sharnn compress CKPT IN OUT | --fresh PRESET IN OUT  [--adapt] [--streams N]
    sharnn decompress [CKPT] IN OUT
    sharnn serve CKPT [--host H] [--port N] [--slots N] [--queue N] [--max-length N] ...   HTTP API and web page

Training flags are derived from the fields of `SHARNNConfig` and `TrainConfig` (sharnn.flags). Progress goes to
stderr, results to stdout. A `SharnnError` is printed as one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .config import ATTN_WINDOWS, SHARNNConfig, TrainConfig, preset_names
from .errors import SharnnError
from .flags import add_field_flags, resolve_train_settings

Subparsers = Any  # argparse's _SubParsersAction


# --- what several commands share ------------------------------------------------------------------------------


def _add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder, or a run folder (its best/ is used)")


def _add_inference_flags(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The flags every inference command shares: --device, --precision, --tf32 and --attn-window."""
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                        help="run the model in bf16 (weights and activations) or int8 (dynamic quantisation of the "
                             "weights, CPU only): faster and smaller, at a small cost in bpc (default: fp32)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA GPUs, float32 matmuls and cuDNN's LSTM/GRU use TensorFloat-32 tensor cores, as in "
                             "training (--no-tf32: full float32); no effect on CPUs (default: on)")
    parser.add_argument("--attn-window", "--attn_window", choices=list(ATTN_WINDOWS), default=None,
                        help="attention window rule: sliding, or reference (the original code's; what it reports "
                             "for a model from import-reference) (default: the checkpoint's)")


def _model(ckpt: Any, device: Any, args: argparse.Namespace, dynamic: bool = False) -> Any:
    """The checkpoint's model under the --attn-window asked for (the checkpoint's by default), TF32 as asked (on
    CUDA). Converted to --precision in eval mode, unless it is for `dynamic` evaluation (it learns): then as trained."""
    from .precision import for_inference
    from .runtime import set_tf32

    set_tf32(args.tf32)
    model = ckpt.model(device, attn_window=args.attn_window)
    return model.eval() if dynamic else for_inference(model, args.precision)


DYNAMIC_FLAGS = {"lr": "--dynamic-lr", "decay": "--dynamic-decay", "bptt": "--dynamic-bptt",
                 "stats_tokens": "--dynamic-stats-tokens"}


def _add_dynamic_flags(parser: argparse.ArgumentParser) -> None:
    from .dynamic import DynamicConfig

    d = DynamicConfig()
    g = parser.add_argument_group("dynamic evaluation (Krause et al. 2018)")
    g.add_argument("--dynamic-lr", type=float, help=f"step size (default: {d.lr:g})")
    g.add_argument("--dynamic-decay", type=float, help=f"pull toward the trained weights per step (default: {d.decay:g})")
    g.add_argument("--dynamic-bptt", type=int, help=f"tokens per stream between gradient steps (default: {d.bptt})")
    g.add_argument("--dynamic-stats-tokens", type=int,
                   help=f"training tokens whose gradients normalise the steps (default: {d.stats_tokens:,})")


def _dynamic_config(args: argparse.Namespace, enabled: bool) -> Any:
    """The DynamicConfig the --dynamic-* flags give; refused when dynamic evaluation is off, or not in fp32."""
    from .dynamic import DynamicConfig

    given = {k: getattr(args, f"dynamic_{k}") for k in DYNAMIC_FLAGS if getattr(args, f"dynamic_{k}") is not None}
    if given and not enabled:
        raise SharnnError(f"{', '.join(DYNAMIC_FLAGS[k] for k in given)} set up dynamic evaluation: add --dynamic")
    if enabled and args.precision != "fp32":
        raise SharnnError("dynamic evaluation changes the weights as it goes, so it runs in fp32: drop --precision")
    return DynamicConfig(**given)


def _json(obj: Any, **kw: Any) -> str:
    """One JSON line. JSON has no NaN or infinity (a diverged model's loss): those numbers are written as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, **kw)


def _refuse_non_finite(args: argparse.Namespace) -> None:
    """Every number flag (--lr, --temperature, --top-p, --dynamic-lr, ...) must be finite: NaN and infinity pass
    range checks unnoticed, then poison the computation."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SharnnError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def _require_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """Refuse, in one line, a numeric flag below `minimum` (flags left unset, None, pass)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise SharnnError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def _read_bytes(path: str, limit: int = -1) -> bytes:
    """The file's bytes (its first `limit` ones when given), or one clear error."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as e:
        raise SharnnError(f"cannot read {path}: {e.strerror}") from None


# --- sharnn data ------------------------------------------------------------------------------------------------


def add_data(sub: Subparsers) -> None:
    d = sub.add_parser("data", help="fetch and prepare a corpus", description="Fetch and prepare a corpus.")
    d.add_argument("corpus", choices=["enwik8", "ptb", "ptb-char", "wikitext-2", "wikitext-103"], help="which corpus")
    d.add_argument("dir", help="folder to write the train, valid and test splits into")
    d.add_argument("--from-zip", "--from-archive", dest="archive", metavar="PATH",
                   help="use this archive (enwik8.zip, simple-examples.tgz, wikitext-*.zip) instead of downloading")
    d.add_argument("--url", default=None, help="download from this address instead of the usual one")
    d.add_argument("--overwrite", action="store_true", help="replace split files an earlier run left in DIR")
    d.set_defaults(run=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from .data import ENWIK8_URL, prepare_awd, prepare_enwik8

    if args.corpus == "enwik8":
        sizes = prepare_enwik8(args.dir, zip_path=args.archive, url=args.url or ENWIK8_URL, overwrite=args.overwrite)
    else:
        sizes = prepare_awd(args.corpus, args.dir, archive=args.archive, url=args.url, overwrite=args.overwrite)
    print(f"{args.corpus} ready in {args.dir}: " + ", ".join(f"{k} {v:,} bytes" for k, v in sizes.items()))
    return 0


# --- sharnn train -----------------------------------------------------------------------------------------------


def add_train(sub: Subparsers) -> None:
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
    add_field_flags(t, SHARNNConfig, "model (SHARNNConfig)")
    add_field_flags(t, TrainConfig, "run (TrainConfig)")
    t.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import launched_rank
    from .train import train

    settings = resolve_train_settings(args)
    model_cfg, cfg = settings.model, settings.train
    if "qrnn_window" in settings.model_given and model_cfg.model != "QRNN":
        raise SharnnError(f"--qrnn-window applies to --model QRNN only, not {model_cfg.model}")
    first = launched_rank() == 0  # under torchrun, rank 0 alone speaks
    if not args.quiet and first:
        print("settings: " + json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()}), file=sys.stderr)
    result = train(model_cfg, cfg, quiet=args.quiet or not first, model_overrides=settings.model_given,
                   checkpoint=settings.checkpoint)
    if result.valid is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if args.json:
        print(_json({
            "run_dir": str(result.run_dir), "steps": result.steps, "seconds": round(result.seconds, 2),
            "train_chars_per_s": round(result.train_chars_per_s, 1), "best_valid_bpc": result.best_valid_bpc,
            "metric": result.metric,
            "valid_bpc": result.valid.bpc if result.valid else None,
            "test_bpc": result.test.bpc if result.test else None,
            "valid_ppl": result.valid.ppl if result.valid else None,
            "test_ppl": result.test.ppl if result.test else None,
            "sample": result.sample.decode("utf-8", errors="replace"),
        }))
        return 0
    unit = "tokens/s" if result.metric == "ppl" else "chars/s"
    print(f"run folder: {result.run_dir} (best checkpoint in {result.run_dir / 'best'})")
    print(f"trained {result.steps} steps in {result.seconds:.1f} s, {result.train_chars_per_s:,.0f} {unit}")
    if result.valid and result.test and result.metric == "ppl":
        print(f"valid ppl {result.valid.ppl:.3f} | test ppl {result.test.ppl:.3f} | test loss {result.test.loss:.4f}")
    elif result.valid and result.test:
        print(f"valid bpc {result.valid.bpc:.4f} | test bpc {result.test.bpc:.4f} | test ppl {result.test.ppl:.3f}")
    if result.sample:
        print("--- sample (prompt: the test split's first 64 bytes) ---")
        print(result.sample.decode("utf-8", errors="replace"))
    return 0


# --- sharnn eval ------------------------------------------------------------------------------------------------


def add_eval(sub: Subparsers) -> None:
    e = sub.add_parser("eval", help="bpc and perplexity of a checkpoint on a split")
    _add_checkpoint(e)
    e.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    e.add_argument("--split", choices=["valid", "test", "train"], default="test")
    e.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int,
                   help="streams (default: the training batch_size for valid, 8 for test, as the paper)")
    e.add_argument("--bptt", type=int, help="segment length (default: the training bptt)")
    _add_inference_flags(e)
    e.add_argument("--cuda", dest="device", action="store_const", const="cuda")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--dynamic", action="store_true",
                   help="also evaluate with dynamic evaluation (the model learns from each segment once it is "
                        "scored) and print both bpc side by side")
    e.add_argument("--dynamic-search", action="store_true",
                   help="try a small grid of --dynamic-lr/--dynamic-decay/--dynamic-bptt around the given values on "
                        "the valid split (whatever --split says) and print the best")
    _add_dynamic_flags(e)
    e.set_defaults(run=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .data import data_warning, load_corpus
    from .dynamic import search_around, static_and_dynamic
    from .evaluate import evaluate, split_defaults
    from .runtime import resolve_device

    _require_at_least(args, 1, "batch_size", "bptt")
    device = resolve_device(args.device)
    ckpt = Checkpoint.open(args.checkpoint, prefer="best")
    dynamic = args.dynamic or args.dynamic_search
    cfg = _dynamic_config(args, dynamic)
    model = _model(ckpt, device, args, dynamic=dynamic)  # dynamic evaluation learns the weights as trained
    corpus = load_corpus(args.data or ckpt.training_data, vocab=ckpt.vocab)
    split = "valid" if args.dynamic_search else args.split
    if warning := data_warning(ckpt.data, corpus, [split], str(ckpt.path)):
        print(f"sharnn: warning: {warning}", file=sys.stderr)
    bsz, bptt = split_defaults(ckpt.train_config, split)
    bsz, bptt = args.batch_size or bsz, args.bptt or bptt
    if args.dynamic_search:
        report = None if args.json else _search_reporter(bsz, bptt)
        found = search_around(model, corpus.train, corpus.valid, bsz, bptt, cfg, device, not args.json, report)
        _print_search(found, bsz, bptt, args.json)
        return 0
    dyn = None
    if args.dynamic:
        res, dyn = static_and_dynamic(model, corpus.train, corpus.split(split), bsz, bptt, cfg, device,
                                      progress=not args.json, what=f"{split} split")
    else:
        res = evaluate(model, corpus.split(split), bsz, bptt, device, progress=not args.json, what=f"{split} split")
    if args.json:
        obj = {"checkpoint": str(ckpt.path), "data": args.data or ckpt.training_data, "split": split,
               "loss": res.loss, "metric": corpus.vocab.metric, "bpc": res.bpc, "ppl": res.ppl,
               "predictions": res.predictions, "batch_size": bsz, "bptt": bptt, "precision": args.precision,
               "attn_window": model.cfg.attn_window, "seconds": round(res.seconds, 3)}
        if dyn is not None:
            obj["dynamic"] = {"loss": dyn.loss, "bpc": dyn.bpc, "ppl": dyn.ppl, "seconds": round(dyn.seconds, 3),
                              **cfg.__dict__}
        print(_json(obj))
    elif dyn is not None:
        print(f"{split}: static bpc {res.bpc:.4f} | dynamic bpc {dyn.bpc:.4f} ({100 * (dyn.bpc / res.bpc - 1):+.2f}%) | "
              f"static ppl {res.ppl:.4f} | dynamic ppl {dyn.ppl:.4f} | {res.predictions:,} predictions in {bsz} "
              f"streams | static bptt {bptt}; dynamic lr {cfg.lr:g}, decay {cfg.decay:g}, bptt {cfg.bptt}, "
              f"statistics from {cfg.stats_tokens:,} training tokens | {res.seconds:.1f} s + {dyn.seconds:.1f} s"
              + ("" if math.isfinite(dyn.loss) else " | the steps diverged: lower --dynamic-lr"))
    else:
        print(f"{split}: loss {res.loss:.4f} nats | bpc {res.bpc:.4f} | ppl {res.ppl:.4f} | "
              f"{res.predictions:,} predictions in {bsz} streams, bptt {bptt}, {args.precision}, "
              f"{model.cfg.attn_window} window | {res.seconds:.1f} s "
              f"({res.predictions / max(res.seconds, 1e-9):,.0f} chars/s)")
    return 0


def _search_reporter(bsz: int, bptt: int) -> Callable[[Any], None]:
    """--dynamic-search's progress lines: the static number, then each setting as soon as it is measured."""
    from .evaluate import EvalResult

    static: list[EvalResult] = []

    def report(found: Any) -> None:
        if isinstance(found, EvalResult):
            static.append(found)
            print(f"valid, {bsz} streams: static bpc {found.bpc:.4f} (bptt {bptt})")
            return
        c, bpc = found.cfg, found.result.bpc
        print(f"  --dynamic-lr {c.lr:<9.3g} --dynamic-decay {c.decay:<9.3g} --dynamic-bptt {c.bptt:<4d} "
              f"bpc {bpc:.4f} ({100 * (bpc / static[0].bpc - 1):+.2f}%)", flush=True)

    return report


def _print_search(found: Any, bsz: int, bptt: int, as_json: bool) -> None:
    static, points = found
    best = points[0].cfg
    if as_json:
        print(_json({"split": "valid", "static_bpc": static.bpc, "batch_size": bsz, "bptt": bptt,
                     "settings": [{"lr": p.cfg.lr, "decay": p.cfg.decay, "bptt": p.cfg.bptt, "bpc": p.result.bpc}
                                  for p in points],
                     "best": {"lr": best.lr, "decay": best.decay, "bptt": best.bptt, "bpc": points[0].result.bpc}}))
        return
    print(f"best: --dynamic-lr {best.lr:.3g} --dynamic-decay {best.decay:.3g} --dynamic-bptt {best.bptt}: valid bpc "
          f"{points[0].result.bpc:.4f} (static {static.bpc:.4f})")


# --- sharnn generate --------------------------------------------------------------------------------------------


def add_generate(sub: Subparsers) -> None:
    g = sub.add_parser("generate", help="sample text from a model",
                       description="Sample text. The prompt comes from --prompt, --prompt-file, or stdin ('-').")
    _add_checkpoint(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", "-p", help="prompt text (default: a newline); '-' reads it from stdin")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file (as bytes)")
    g.add_argument("--length", "-n", type=int, default=500, help="bytes to generate (default: 500)")
    g.add_argument("--temperature", "-t", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes only")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    g.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable sample")
    g.add_argument("--raw", action="store_true", help="write raw bytes, not text (invalid UTF-8 kept as is)")
    g.add_argument("--no-prompt", action="store_true", help="do not echo the prompt before the sample")
    g.add_argument("--step-rows", type=int, default=1, metavar="N",
                   help="run each token step N rows wide, the sample in every row: matrix products of one row "
                        "round differently from wider ones, and `sharnn serve --slots N` steps N rows, so the same N "
                        "gives its bytes exactly; slower (default: 1)")
    _add_inference_flags(g)
    g.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import codecs

    from .checkpoint import Checkpoint
    from .generate import check_sampling, generate_ids
    from .runtime import resolve_device

    check_sampling(args.length, args.temperature, args.top_k, args.top_p)  # before anything is printed
    ckpt = Checkpoint.open(args.checkpoint)
    model, vocab = _model(ckpt, resolve_device(args.device), args), ckpt.vocab
    if args.prompt_file:
        prompt = _read_bytes(args.prompt_file)
    elif args.prompt == "-":
        prompt = sys.stdin.buffer.read()
    else:
        prompt = (args.prompt if args.prompt is not None else "\n").encode("utf-8")
    if not prompt:
        raise SharnnError("the prompt is empty; give at least one byte")
    ids = [int(i) for i in vocab.encode(prompt)]
    # Bytes are printed as they come; an incremental decoder holds back an unfinished UTF-8 sequence and turns
    # invalid bytes into U+FFFD, so the terminal never sees broken text.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout.buffer if args.raw else sys.stdout

    def emit(data: bytes, final: bool = False) -> None:
        if args.raw:
            sys.stdout.buffer.write(data)
        else:
            sys.stdout.write(decoder.decode(data, final))
        out.flush()

    if not args.no_prompt:  # word models show the prompt as they read it (tokens, <unk>s, spacing)
        emit(vocab.decode(ids) if vocab.kind == "words" else prompt)
    _require_at_least(args, 1, "step_rows")
    for token, _, _ in generate_ids(model, ids, args.length, args.temperature, args.top_k, args.top_p, args.seed,
                                    rows=args.step_rows):
        emit(vocab.decode([token]))
    emit(b"", final=True)
    if not args.raw:
        sys.stdout.write("\n")
    return 0


# --- sharnn score -----------------------------------------------------------------------------------------------


def add_score(sub: Subparsers) -> None:
    s = sub.add_parser("score", help="log-probability of sentences or documents",
                       description="Score each input line (or a whole file with --document): total log-probability "
                                   "in nats and bits, and bits per character.")
    _add_checkpoint(s)
    s.add_argument("inputs", nargs="*", help="files to read (default: stdin; '-' is stdin)")
    s.add_argument("--document", action="store_true", help="score each file as one text, streamed in pieces")
    s.add_argument("--context", metavar="FILE", help="condition on this text first (default: one newline)")
    s.add_argument("--no-eos", action="store_true", help="line mode: do not score the closing newline")
    s.add_argument("--per-token", action="store_true", help="also list each byte's log-probability (JSON)")
    s.add_argument("--json", action="store_true", help="one JSON object per line or document")
    s.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=32,
                   help="lines scored together (default: 32)")
    _add_inference_flags(s)
    s.add_argument("--dynamic", action="store_true",
                   help="with --document: dynamic evaluation, a gradient step after every --dynamic-bptt bytes")
    s.add_argument("--data", help="with --dynamic: the corpus whose train split gives the gradient statistics "
                                  "(default: the one the checkpoint was trained on)")
    _add_dynamic_flags(s)
    s.set_defaults(run=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .data import load_corpus
    from .dynamic import document_scorer
    from .evaluate import split_defaults
    from .runtime import resolve_device
    from .score import score_lines, score_stream, split_lines

    _require_at_least(args, 1, "batch_size")
    if args.dynamic and not args.document:
        raise SharnnError("--dynamic scores whole documents: add --document")
    if args.data and not args.dynamic:
        raise SharnnError("--data gives --dynamic its training statistics: add --dynamic (or drop --data)")
    cfg = _dynamic_config(args, args.dynamic)
    device = resolve_device(args.device)
    ckpt = Checkpoint.open(args.checkpoint)
    model, vocab = _model(ckpt, device, args, dynamic=args.dynamic), ckpt.vocab
    score_document = score_stream
    if args.dynamic:  # the gradient statistics come from the training corpus
        train = load_corpus(args.data or ckpt.training_data, vocab=vocab).train
        score_document = document_scorer(model, train, cfg, device, progress=not args.json)
    context = _read_bytes(args.context) if args.context else b"\n"
    _, bptt = split_defaults(ckpt.train_config, "test")  # --document walks the segments `sharnn eval` walks
    report = _score_reporter(vocab, args.json or args.per_token)
    if not (args.json or args.per_token):
        print("#logprob_nats\tlogprob_bits\tbpc\ttokens\t" + ("input" if args.document else "text"))
    for name in args.inputs or ["-"]:
        if args.document:
            with _open_input(name) as f:
                report(name, score_document(model, vocab, f, context, args.per_token, chunk=bptt))
            continue
        data = sys.stdin.buffer.read() if name == "-" else _read_bytes(name)
        lines = split_lines(data)
        if not lines:
            raise SharnnError(f"{'stdin' if name == '-' else name} has no lines to score")
        scores = score_lines(model, vocab, lines, context, eos=not args.no_eos, per_token=args.per_token,
                             batch_size=args.batch_size)
        for line, score in zip(lines, scores):
            report(name, score, line)
    return 0


def _open_input(name: str) -> Any:
    """A document to score, open for reading bytes: a file, or stdin for '-' (left open)."""
    import contextlib

    if name == "-":
        return contextlib.nullcontext(sys.stdin.buffer)
    try:
        return open(name, "rb")
    except OSError as e:
        raise SharnnError(f"cannot read {name}: {e.strerror}") from None


def _score_reporter(vocab: Any, as_json: bool) -> Callable[..., None]:
    """Print one score: a tab-separated line, or one JSON object (with --per-token, each token's)."""
    def report(name: str, score: Any, text: bytes | None = None) -> None:
        if not as_json:
            shown = "\t" + (name if text is None else text.decode("utf-8", errors="replace"))
            print(f"{score.logprob:.4f}\t{score.bits:.4f}\t{score.bpc:.4f}\t{score.tokens}{shown}")
            return
        obj = {"input": name, "logprob": score.logprob, "log2prob": score.bits, "tokens": score.tokens,
               "bpc": score.bpc}
        if text is not None:
            obj["text"] = text.decode("utf-8", errors="replace")
        if score.token_logprobs is not None:
            obj["per_token"] = [{"token": vocab.decode([t]).decode("utf-8", errors="replace"), "id": t,
                                 "logprob": lp} for t, lp in score.token_logprobs]
        print(_json(obj, ensure_ascii=False))

    return report


# --- sharnn import-reference, collapse, export ------------------------------------------------------------------


def add_import_reference(sub: Subparsers) -> None:
    r = sub.add_parser("import-reference", help="convert a state dict from the reference code to a checkpoint",
                       description="Convert a state dict saved by the reference SHA-RNN code "
                                   "(torch.save(model.state_dict(), F) in its environment; its whole-model pickles "
                                   "are refused because loading them can run code).")
    r.add_argument("state_dict", help="a .pt file holding only the state dict")
    r.add_argument("out", help="checkpoint folder to write")
    r.add_argument("--vocab-from", metavar="DIR",
                   help="the corpus the model was trained on (its train split gives the reference's symbol order)")
    r.add_argument("--attn-span", type=int, default=5000, help="attention span (default: 5000, the paper's)")
    r.add_argument("--attn-window", "--attn_window", choices=list(ATTN_WINDOWS), default="reference",
                   help="attention window rule stored with the model (default: reference, the rule the original "
                        "code trained and evaluated it with; eval/score/generate --attn-window override it)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it holds a sharnn checkpoint (any other folder is never replaced)")
    r.set_defaults(run=cmd_import_reference)


def cmd_import_reference(args: argparse.Namespace) -> int:
    from .convert import import_reference
    from .model import count_parameters

    model = import_reference(args.state_dict, args.out, vocab_from=args.vocab_from, attn_span=args.attn_span,
                             attn_window=args.attn_window, overwrite=args.overwrite)
    print(f"imported {count_parameters(model):,} parameters ({model.cfg.vocab_size} symbols) into {args.out}")
    return 0


def add_collapse(sub: Subparsers) -> None:
    c = sub.add_parser("collapse", help="store the attention value gates as constants (same outputs)")
    _add_checkpoint(c)
    c.add_argument("out", help="checkpoint folder to write")
    c.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it holds a sharnn checkpoint (any other folder is never replaced)")
    c.set_defaults(run=cmd_collapse)


def cmd_collapse(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .model import count_parameters
    from .precision import collapse_checkpoint

    ckpt = Checkpoint.open(args.checkpoint)
    model, small = collapse_checkpoint(ckpt, args.out, overwrite=args.overwrite, name=args.checkpoint)
    print(f"collapsed {count_parameters(model):,} -> {count_parameters(small):,} parameters into {args.out}")
    return 0


def add_export(sub: Subparsers) -> None:
    x = sub.add_parser("export", help="write the model as ONNX, its state as explicit input and output",
                       description="Export to ONNX: a one-token step (and with --segment an N-token model) whose "
                                   "RNN states and attention memory are inputs and outputs. Needs "
                                   "pip install 'sharnn[onnx]'.")
    _add_checkpoint(x)
    x.add_argument("out", help="the .onnx file to write (the one-token step)")
    x.add_argument("--segment", type=int, metavar="N",
                   help="also write OUT.segmentN.onnx: N tokens per call, for prompts")
    x.add_argument("--check-bytes", type=int, default=300, metavar="N",
                   help="compare onnxruntime's log-probabilities with PyTorch's over N tokens (default: 300; 0: no "
                        "check)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT (and OUT.segmentN.onnx) if they exist")
    x.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .export import check_onnx, export_onnx, require
    from .outputs import refuse_input_as_output

    _require_at_least(args, 0, "check_bytes")
    if args.check_bytes:
        require("onnxruntime", unless="--check-bytes 0")  # before the export, not after it
    ckpt = Checkpoint.open(args.checkpoint)
    refuse_input_as_output(args.out, ckpt.path)
    model = ckpt.model()
    paths = export_onnx(model, args.out, args.segment, overwrite=args.overwrite, vocab=ckpt.vocab)
    print(f"wrote {' and '.join(map(str, paths))}")
    if args.check_bytes:
        diff = check_onnx(model, paths, args.check_bytes)
        print(f"onnxruntime matches PyTorch over {args.check_bytes} tokens: largest log-probability difference "
              f"{diff:.2g}")
    return 0


# --- sharnn plot, attention -------------------------------------------------------------------------------------


def add_plot(sub: Subparsers) -> None:
    pl = sub.add_parser("plot", help="draw learning curves of runs (PNG or SVG)",
                        description="Training and validation bpc against optimizer steps and against training time, "
                                    "the learning rate on a second axis; several runs on one chart. Reads each run "
                                    "folder's log.jsonl (finished, interrupted or resumed runs). Needs "
                                    "pip install 'sharnn[plot]'.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run folders (their --save), or log.jsonl files")
    pl.add_argument("-o", "--output", required=True, metavar="FILE", help="image to write: .png or .svg")
    pl.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    pl.set_defaults(run=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from .curves import curve_unit, read_curves
    from .outputs import check_new_file
    from .plots import curves_figure, image_format, save

    image_format(args.output)  # before reading anything
    check_new_file(args.output, args.overwrite)
    runs = [read_curves(r) for r in args.runs]
    for run in runs:
        if not run.train and not run.valid:
            raise SharnnError(f"{run.name} has no training or validation lines in its log.jsonl yet: nothing to plot")
        if run.unreadable:
            print(f"sharnn: {run.name}: skipped {run.unreadable} unreadable line(s) of its log.jsonl", file=sys.stderr)
    save(curves_figure(runs, curve_unit(args.runs)), args.output)
    print(f"wrote {args.output}: " + "; ".join(
        f"{r.name}: {len(r.train)} train and {len(r.valid)} valid points, {r.processes} process(es)" for r in runs))
    return 0


def add_attention(sub: Subparsers) -> None:
    at = sub.add_parser("attention", help="draw where the attention looks over a text (PNG or SVG)",
                        description="For each attention block: a heat-map of a short window's queries against the "
                                    "keys before and among them, with the bytes as labels; the average attention "
                                    "distance of every query of the text; and the weight by distance. Needs "
                                    "pip install 'sharnn[plot]'.")
    _add_checkpoint(at)
    at.add_argument("--text", required=True, metavar="FILE", help="the text to read (as bytes)")
    at.add_argument("-o", "--output", required=True, metavar="FILE", help="image to write: .png or .svg")
    at.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    at.add_argument("--heatmap", "--window", type=int, default=48, metavar="N", dest="heatmap",
                    help="queries in the heat-map; it shows as many keys before them (default: 48)")
    at.add_argument("--at", type=int, default=None, metavar="POS",
                    help="text position of the heat-map's first query (default: the last --heatmap bytes read)")
    at.add_argument("--max-bytes", type=int, default=20_000, metavar="N",
                    help="read at most the file's first N bytes (default: 20000)")
    at.add_argument("--device", default="auto", help="auto, cpu or cuda")
    at.set_defaults(run=cmd_attention)


def cmd_attention(args: argparse.Namespace) -> int:
    from .attention_map import attention_over_text, heatmap_start
    from .checkpoint import Checkpoint
    from .outputs import check_new_file
    from .plots import attention_figure, image_format, save
    from .runtime import resolve_device

    image_format(args.output)
    check_new_file(args.output, args.overwrite)
    if args.heatmap < 1:
        raise SharnnError(f"--heatmap must be at least 1, got {args.heatmap}")
    _require_at_least(args, 1, "max_bytes")
    device = resolve_device(args.device)
    ckpt = Checkpoint.open(args.checkpoint)
    if not ckpt.model_config.attn_layers:
        raise SharnnError(f"{args.checkpoint} has no attention block (--attn-layers): nothing to draw")
    model = ckpt.model(device)
    ids = [int(i) for i in ckpt.vocab.encode(_read_bytes(args.text, args.max_bytes))]
    start = heatmap_start(len(ids), args.heatmap, args.at, args.text)
    maps, uses = attention_over_text(model, ids, start, args.heatmap)
    save(attention_figure(maps, uses, ids, ckpt.vocab, model.cfg.attn_span), args.output)
    print(f"wrote {args.output}: {len(maps)} attention block(s), {len(ids):,} tokens, heat-map of positions "
          f"{start}-{start + args.heatmap - 1}")
    return 0


# --- sharnn compress, decompress --------------------------------------------------------------------------------


def add_compress(sub: Subparsers) -> None:
    z = sub.add_parser("compress", help="compress a file losslessly with the model (range coding)",
                       description="Compress IN into OUT: each byte range-coded under the model's prediction. "
                                   "Decode with `sharnn decompress` and the same model, on the same kind of machine "
                                   "(same CPU architecture and instruction set, torch, constriction and sharnn versions).")
    z.add_argument("paths", nargs="+", metavar="[CKPT] IN OUT",
                   help="the model's checkpoint (or run folder), the file to compress and the file to write; "
                        "with --fresh, IN and OUT only")
    z.add_argument("--fresh", metavar="PRESET",
                   help="no checkpoint: start from an untrained model of this preset (tiny, paper, ...) or TOML/JSON "
                        "config file; needs --adapt. The decoder rebuilds it from the compressed file's header")
    z.add_argument("--seed", type=int, default=0, help="with --fresh: the seed of its initial weights (default: 0)")
    z.add_argument("--adapt", action="store_true",
                   help="the model learns while it codes (dynamic evaluation, replayed by the decoder)")
    z.add_argument("--adapt-lr", type=float, help="with --adapt: step size (default: 2e-3 with --fresh, 1e-3 otherwise)")
    z.add_argument("--adapt-decay", type=float,
                   help="with --adapt: pull toward the starting weights (default: 0 with --fresh, 0.001 otherwise)")
    z.add_argument("--adapt-bptt", type=int, help="with --adapt: bytes per stream between steps (default: 32)")
    z.add_argument("--streams", type=int, default=32,
                   help="code up to this many parts of the file side by side, one per 4 KiB at most: faster, at a "
                        "small cost in size (default: 32)")
    z.add_argument("--threads", type=int, default=1,
                   help="torch threads; recorded, and the decoder uses the same number (default: 1)")
    z.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    z.add_argument("--quiet", action="store_true", help="no progress bar")
    z.set_defaults(run=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .compress import CoderSettings, adapt_config, compress_file, fresh_model
    from .outputs import refuse_input_as_output

    if len(args.paths) != (2 if args.fresh else 3):
        raise SharnnError("usage: sharnn compress CKPT IN OUT, or sharnn compress --fresh PRESET --adapt IN OUT")
    if args.fresh and not args.adapt:
        raise SharnnError("--fresh needs --adapt: an untrained model that does not learn predicts nothing")
    given = (args.adapt_lr, args.adapt_decay, args.adapt_bptt)
    if not args.adapt and any(v is not None for v in given):
        raise SharnnError("--adapt-lr, --adapt-decay and --adapt-bptt set up --adapt: add --adapt")
    adapt = adapt_config(bool(args.fresh), *given) if args.adapt else None
    src, dst = args.paths[-2:]
    if args.fresh:
        model, fresh = fresh_model(args.fresh, args.seed)
    else:
        ckpt = Checkpoint.open(args.paths[0])
        refuse_input_as_output(dst, ckpt.path)
        model, fresh = ckpt.model("cpu"), None
    res = compress_file(model, src, dst, CoderSettings(streams=args.streams, threads=args.threads, adapt=adapt),
                        fresh=fresh, progress=not args.quiet, overwrite=args.overwrite,
                        vocab=None if args.fresh else ckpt.vocab)
    stored = (f"; {res.stored} of {res.blocks} blocks stored as they are (the model would have made them larger)"
              if res.stored else "")
    print(f"{src}: {res.length:,} -> {res.compressed:,} bytes ({res.bits_per_byte:.4f} bits/byte; the model's "
          f"cross-entropy {res.model_bits / max(res.length, 1):.4f}), {res.streams} streams, {res.kb_per_s:.1f} KB/s"
          + stored)
    return 0


def add_decompress(sub: Subparsers) -> None:
    u = sub.add_parser("decompress", help="decompress a file made by `sharnn compress`",
                       description="Decompress IN into OUT. OUT appears only once the result matches the original's "
                                   "checksum; another model, a damaged file or another format is refused.")
    u.add_argument("paths", nargs="+", metavar="[CKPT] IN OUT",
                   help="the checkpoint the file was compressed with (none for a file made with --fresh), the "
                        "compressed file and the file to write")
    u.add_argument("--ignore-machine", action="store_true",
                   help="try even if the file was made on another kind of machine (a wrong result is still never "
                        "written)")
    u.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(run=cmd_decompress)


def cmd_decompress(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .compress import decompress_file
    from .outputs import refuse_input_as_output

    if len(args.paths) not in (2, 3):
        raise SharnnError("usage: sharnn decompress CKPT IN OUT (or IN OUT for a file compressed with --fresh)")
    src, dst = args.paths[-2:]
    model, vocab = None, None
    if len(args.paths) == 3:
        ckpt = Checkpoint.open(args.paths[0])
        refuse_input_as_output(dst, ckpt.path)  # decompress_file checks IN itself
        model, vocab = ckpt.model("cpu"), ckpt.vocab
    res = decompress_file(src, dst, model, ignore_machine=args.ignore_machine, progress=not args.quiet,
                          overwrite=args.overwrite, checkpoint_name=args.paths[0], vocab=vocab)
    print(f"{dst}: {res.length:,} bytes from {res.compressed:,}, checksum verified, {res.kb_per_s:.1f} KB/s")
    return 0


# --- sharnn serve ----------------------------------------------------------------------------------------------


def add_serve(sub: Subparsers) -> None:
    from .serve.limits import Limits

    lim = Limits()
    sv = sub.add_parser("serve", help="serve a model over HTTP: a JSON API and a web page",
                        description="Serve CKPT over HTTP: POST /v1/generate, /v1/score, /v1/attention, GET "
                                    "/v1/model, /healthz, /openapi.json, and a web page at /. Concurrent generations "
                                    "share one token step. Stops cleanly on SIGTERM or Ctrl-C. Needs "
                                    "pip install 'sharnn[serve]'.")
    _add_checkpoint(sv)
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    sv.add_argument("--slots", type=int, default=lim.slots,
                    help=f"generations stepped together; every token step is this many rows wide, so a request's "
                         f"bytes are those of `sharnn generate --step-rows N` (default: {lim.slots})")
    sv.add_argument("--queue", type=int, default=lim.queue,
                    help=f"requests that may wait beyond the free slots; more are answered 503 with Retry-After "
                         f"(default: {lim.queue})")
    sv.add_argument("--max-length", type=int, default=lim.max_length,
                    help=f"most bytes one request may generate (default: {lim.max_length})")
    sv.add_argument("--max-prompt", type=int, default=lim.max_prompt,
                    help=f"most bytes of a prompt or a score context (default: {lim.max_prompt})")
    sv.add_argument("--max-text", type=int, default=lim.max_text,
                    help=f"most bytes of the texts of one score request, or of an attention text (default: "
                         f"{lim.max_text})")
    sv.add_argument("--drain-seconds", type=float, default=10.0,
                    help="on SIGTERM or Ctrl-C: how long requests in flight may take to finish before they are "
                         "cancelled (default: 10)")
    sv.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sv.add_argument("--attn-window", "--attn_window", choices=list(ATTN_WINDOWS), default=None,
                    help="attention window rule (default: the checkpoint's)")
    sv.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.limits import Limits, require_web_stack

    require_web_stack()
    from .checkpoint import Checkpoint
    from .model import count_parameters
    from .precision import for_inference
    from .runtime import resolve_device, set_tf32
    from .serve.app import create_app, model_card, serve

    _require_at_least(args, 1, "slots", "max_length", "max_prompt", "max_text")
    _require_at_least(args, 0, "queue", "port", "drain_seconds")
    if args.port > 65535:
        raise SharnnError(f"--port must be at most 65535, got {args.port}")
    limits = Limits(slots=args.slots, queue=args.queue, max_length=args.max_length, max_prompt=args.max_prompt,
                    max_text=args.max_text)
    set_tf32(True)  # as `sharnn generate` runs by default, so that a CUDA GPU gives its numbers
    ckpt = Checkpoint.open(args.checkpoint)
    trained = ckpt.model(resolve_device(args.device), attn_window=args.attn_window)
    card = model_card(ckpt, count_parameters(trained))
    app = create_app(for_inference(trained, "fp32"), card, limits, engine_thread=False)
    serve(app, args.host, args.port, args.drain_seconds,
          lambda url: print(f"serving {card.checkpoint} at {url} ({limits.slots} slots); Ctrl-C or SIGTERM stops",
                            file=sys.stderr, flush=True))
    return 0


# --- the parser and main ----------------------------------------------------------------------------------------

SUBCOMMANDS = (add_data, add_train, add_eval, add_generate, add_score, add_import_reference, add_collapse,
               add_export, add_plot, add_attention, add_compress, add_decompress, add_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sharnn", description="Single Headed Attention RNN (Merity 2019).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `score CKPT --document a.txt b.txt`: argparse cannot put file names after a flag into a positional list.
    if extra and args.command == "score" and all(e == "-" or not e.startswith("-") for e in extra):
        args.inputs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _refuse_non_finite(args)
        return args.run(args)
    except SharnnError as e:
        # train.TrainingInterrupted (SIGINT/SIGTERM, checkpoint saved) is no error: 128 + the signal's number.
        status = getattr(e, "exit_status", 2)
        if not getattr(e, "quiet", False):  # under torchrun, an error every rank raised is said by rank 0 alone
            print(f"sharnn: {'error: ' if status == 2 else ''}{e}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print("sharnn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sharnn generate ... | head`: the reader has what it wanted
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so that the exit flush does not fail again
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
