"""How a run's setup walks through the package: the modules `sharnn.train.train` passes through on a resume.

    python benchmarks/walk.py            # a tiny run of 2 steps, then a traced resume of it for 1 more

The resume is traced with `sys.setprofile` from the call of `train.train` until the first training segment is
drawn (`data.train_segments`): setup only, not the loop. Only frames of sharnn's own modules count; other code
(torch, numpy, the standard library) is transparent. The trace is reduced to the sequence of sharnn modules
control is in; a *move* is a change of module in that sequence (a call into another module or a return out of
one), a move *up* is one into a module of a higher layer (nearer the command line; the layers are the README's
"How the code is laid out"), and a module is *re-entered* each time control comes back to it after it left.
Checkpoint file reads (from the CLI's `flags.resolve_train_settings` on, which reads the saved settings) are
counted by an audit hook on `open` (and `safetensors.safe_open`, which opens its file
in Rust): every read of a file inside the checkpoint folder is one.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import sharnn

PACKAGE = Path(sharnn.__file__).resolve().parent
# README's layers, top (0) to bottom; a module not listed counts with the library layer (2).
LAYERS = {"cli": 0, "flags": 0, "__init__": 0,
          "train": 1, "evaluate": 1, "dynamic": 1, "generate": 1, "score": 1, "compress": 1, "export": 1,
          "convert": 1, "precision": 1, "curves": 1, "attention_map": 1, "plots": 1, "pretrained": 1,
          "progress": 1, "distributed": 1, "trainer": 1, "walker": 1, "serve": 1,
          "checkpoint": 2, "data": 2, "optim": 2, "runtime": 2, "vocab": 2, "outputs": 2, "segments": 2, "resume": 2,
          "runfolder": 2,
          "model": 3, "state": 4, "config": 4, "errors": 5}


def module_of(filename: str) -> str | None:
    try:
        rel = Path(filename).resolve().relative_to(PACKAGE)
    except ValueError:
        return None
    return rel.with_suffix("").as_posix().split("/")[0]


def trace_resume(run: Path) -> dict:
    from sharnn import train as train_module
    from sharnn.cli import build_parser
    from sharnn.flags import resolve_train_settings

    args = build_parser().parse_args(["train", "--resume", str(run), "--max-steps", "3", "--quiet"])
    walk: list[str] = []
    stack: list[str | None] = []
    state = {"on": False, "done": False, "reading": False}
    reads: Counter[str] = Counter()
    ckpt_dir = str(run.resolve())

    def audit(event: str, a: tuple) -> None:
        if state["reading"] and not state["done"] and event == "open" and isinstance(a[0], (str, Path)):
            p = str(Path(a[0]).resolve()) if not str(a[0]).startswith("/proc") else str(a[0])
            mode = a[1] if len(a) > 1 and isinstance(a[1], str) else "r"
            if p.startswith(ckpt_dir + "/") and "w" not in mode and "a" not in mode and "/." not in p[len(ckpt_dir):]:
                reads[p[len(ckpt_dir) + 1:]] += 1

    def profile(frame, event, arg):
        if state["done"]:
            return
        if event not in ("call", "return"):
            return
        mod = module_of(frame.f_code.co_filename)
        if event == "call":
            if not state["on"]:
                if mod == "train" and frame.f_code.co_name == "train":
                    state["on"] = True
                else:
                    return
            if mod == "data" and frame.f_code.co_name == "train_segments":
                state["done"] = True
                return
            stack.append(mod)
            if mod is not None:
                walk.append(mod)
        elif state["on"] and stack:
            stack.pop()
            back = next((m for m in reversed(stack) if m is not None), None)
            if back is not None:
                walk.append(back)

    sys.addaudithook(audit)
    import safetensors
    from safetensors import safe_open as real_safe_open

    def counting_safe_open(filename, *a, **kw):
        audit("open", (filename, "r"))
        return real_safe_open(filename, *a, **kw)

    patched = []
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith(("sharnn", "safetensors")) and getattr(mod, "safe_open", None) is real_safe_open:
            mod.safe_open = counting_safe_open
            patched.append(mod)
    state["reading"] = True  # reads count from the CLI's layering of the saved settings on
    settings = resolve_train_settings(args)
    if hasattr(settings, "checkpoint"):  # the checkpoint the settings came from, opened once, goes to train
        model_cfg, cfg, given = settings.model, settings.train, settings.model_given
        opened = {"checkpoint": settings.checkpoint}
    else:  # before the Checkpoint object: (model config, run config, model flags given)
        model_cfg, cfg, given = settings
        opened = {}
    sys.setprofile(profile)
    try:
        train_module.train(model_cfg, cfg, quiet=True, model_overrides=given, **opened)
    finally:
        sys.setprofile(None)
        for mod in patched:
            mod.safe_open = real_safe_open
        del safetensors
    moves = [(a, b) for a, b in itertools.pairwise(walk) if a != b]
    seq = [walk[0]] + [b for _, b in moves] if walk else []
    entries = Counter(seq)
    return {
        "modules": len(set(walk)),
        "moves": len(moves),
        "moves_up": sum(1 for a, b in moves if LAYERS.get(b, 2) < LAYERS.get(a, 2)),
        "reentries": {m: entries[m] - 1 for m in ("train", "checkpoint", "trainer") if entries[m]},
        "checkpoint_reads": dict(sorted(reads.items())),
        "sequence": seq,
    }


def main() -> None:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from sharnn.config import SHARNNConfig, TrainConfig
    from sharnn.train import train

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_bytes(b"Colourless green ideas sleep furiously; the cat sat on the mat. " * 60)
        run = Path(tmp) / "run"
        model = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)
        train(model, TrainConfig(data=str(text), bptt=16, batch_size=2, max_steps=2, warmup=2, save=str(run),
                                 save_every_minutes=None), quiet=True)
        result = trace_resume(run)
    seq = result.pop("sequence")
    print(json.dumps(result, indent=1))
    print("walk: " + " > ".join(seq))


if __name__ == "__main__":
    main()
