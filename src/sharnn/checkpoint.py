"""Checkpoints: a folder that can be read back without running any code from it.

    <ckpt>/config.json        format marker, SHARNNConfig, vocabulary, progress (epoch, step, best bpc), the
                              size and SHA-256 of every other file (written last: truncation or corruption shows)
                              and of each split of the training data ("data"; older checkpoints lack it)
           train_config.json  the resolved TrainConfig of the run that wrote it
           model.safetensors  weights (tensors only; tied weights stored once)
           train_state.pt     optimizer, RNG states, data position, carried RNN state and memory; written with
                              torch.save but only ever read with weights_only=True (no arbitrary unpickling)

A run folder (`--save`) holds `best/` (best validation bpc, the paper's rule), `last/` (latest, for resume) and,
with `--keep K`, the newest K periodic checkpoints `step-NNNNNN/` (`last/` is then hard links to the newest);
`epoch-NNN/` with `--when`; `log.jsonl`; and `.lock`, which a trainer holds while it writes the folder
(`RunLock`). Training writes and deletes only those names, and only what sharnn wrote under them.

Crash safety. A checkpoint is built in `.NAME.tmp` (every file and the folder fsynced), then swapped in with two
renames: NAME -> `.NAME.old`, `.NAME.tmp` -> NAME, and only then is `.NAME.old` deleted. Killed at any moment,
the folder therefore holds a complete NAME or, between the two renames, a complete `.NAME.old`, which
`resolve_checkpoint` falls back to and `clean_run_folder` renames back. Folders being deleted are renamed to
`.NAME.del` first, so a half-deleted checkpoint is never visible under its name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_file as st_save_file

from .config import SHARNNConfig, TrainConfig
from .errors import SharnnError, require_writable_folder
from .model import SHARNN, BlockState, State
from .outputs import refuse_input_as_output, sha256_file
from .vocab import BYTES, Vocab

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no run-folder lock (see RunLock)
    fcntl = None  # type: ignore[assignment]

FORMAT = "sharnn-checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"step-(\d+)")
RUN_CHECKPOINT = re.compile(r"best|last|step-\d+|epoch-\d+")  # the checkpoint folders training writes in a run
LOCK_FILE = ".lock"


def step_name(step: int) -> str:
    """The folder name of the periodic checkpoint after optimizer step `step`: step-000050."""
    return f"step-{step:06d}"


def save_checkpoint(
    path: str | os.PathLike,
    model: SHARNN,
    train_cfg: TrainConfig | None = None,
    progress: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    vocab: Vocab | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (build in `.NAME.tmp`, fsync, swap in by renames; see the top).

    `data`: what identifies the training data (`Corpus.identity`: name, and each split's size and SHA-256), kept
    in config.json so that evaluating or resuming on a same-named corpus with other contents is noticed.

    A failed write (disk full, permissions, ...) removes the temporary folder, leaves the previous checkpoint as
    it was and raises `SharnnError`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
        if train_cfg is not None:
            _write_text(tmp / "train_config.json", json.dumps(train_cfg.to_dict(), indent=2) + "\n")
        tensors, aliases = weights_for_saving(_unwrap(model))
        st_save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", **aliases})
        _fsync(tmp / "model.safetensors")
        if train_state is not None:
            with open(tmp / "train_state.pt", "wb") as f:
                torch.save(train_state, f)
                f.flush()
                os.fsync(f.fileno())
        meta = {"format": FORMAT, "version": VERSION, "model": _unwrap(model).cfg.to_dict(),
                "vocab": (vocab or BYTES).to_dict(), "progress": progress or {}, "files": _manifest(tmp),
                **({"data": data} if data is not None else {})}
        _write_text(tmp / "config.json", json.dumps(meta, indent=2) + "\n")  # last: its presence means complete
        _fsync(tmp)
        _swap_in(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, (OSError, SafetensorError)):
            raise SharnnError(f"cannot write checkpoint {path}: {_reason(e)}; "
                              "the previous checkpoint there, if any, is intact") from None
        raise
    return path


def weights_for_saving(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state as CPU tensors that each own their memory, plus {dropped name: kept name} for ties.

    safetensors' own `save_model` refuses tensors that share memory unless one of them covers it all. On a GPU
    cuDNN flattens an LSTM's or GRU's weights into one buffer (`flatten_parameters`), so every weight is a view
    of it and none covers it: saving failed at the first checkpoint. Each tensor is copied to the CPU on its
    own instead. A weight tied to another (the decoder's and the embedding's: one tensor under two names) is
    stored once under the first name in sorted order, which is what `save_model` chose, so files written
    before and after load alike (`load_model` restores the tie from the model itself).
    """
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name in sorted(state):
        t = state[name]
        same = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())  # one tensor under two names
        if t.numel() and same in seen:
            aliases[name] = seen[same]
            continue
        seen[same] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def link_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make `dst` a copy of checkpoint `src` as hard links (no extra disk, no copying), swapped in atomically.

    Files are never changed in place once written, so two names for them are safe. Where hard links are not
    supported the files are copied.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        _remove(tmp)
        tmp.mkdir()
        for f in sorted(src.iterdir()):
            try:
                os.link(f, tmp / f.name)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                shutil.copyfile(f, tmp / f.name)
                _fsync(tmp / f.name)
        _fsync(tmp)
        _swap_in(tmp, dst)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise SharnnError(f"cannot write checkpoint {dst}: {_reason(e)}; "
                              "the previous checkpoint there, if any, is intact") from None
        raise
    return dst


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace `path` by the complete folder `tmp`; at every moment a complete checkpoint is on disk."""
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        _remove(old)  # garbage: `path` itself is complete
        os.replace(path, old)
    os.replace(tmp, path)  # killed just before this: `path` is missing and `old` complete (resolve_checkpoint)
    _fsync(path.parent)
    _remove(old)


def step_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The periodic checkpoints `step-NNNNNN/` of a run folder, oldest (lowest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints (each renamed out of sight first)."""
    steps = step_checkpoints(run_dir)
    for p in steps[: max(0, len(steps) - keep)]:
        trash = p.with_name(f".{p.name}.del")
        _remove(trash)
        os.replace(p, trash)
        _remove(trash)


def clean_run_folder(run_dir: str | os.PathLike) -> None:
    """Tidy what a killed save left in a run folder: drop `.X.tmp`/`.X.del`, put a lone `.X.old` back as X
    (X one of the checkpoint names training writes: nothing else in the folder is touched)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in sorted(run_dir.iterdir()):
        m = re.fullmatch(r"\.(.+)\.(tmp|old|del)", p.name)
        if not m or not p.is_dir() or p.is_symlink() or not RUN_CHECKPOINT.fullmatch(m.group(1)):
            continue
        name, kind = m.groups()
        if kind == "old" and not (run_dir / name).exists():
            try:
                os.replace(p, run_dir / name)  # complete: a checkpoint is renamed to .old whole, deleted only later
            except OSError:
                pass  # resolve_checkpoint still finds it under its .old name
        else:
            _remove(p)


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _write_text(p: Path, text: str) -> None:
    with open(p, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(p: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk (folders: best effort, not every OS allows it)."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        if p.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not p.is_dir():
            raise
    finally:
        os.close(fd)


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(folder.iterdir())}


def _verify(ckpt: Path, name: str, meta: dict[str, Any]) -> None:
    """Refuse a file whose size or SHA-256 differs from what config.json recorded when it was written."""
    want = (meta.get("files") or {}).get(name)
    if not isinstance(want, dict):
        return  # written before checksums were recorded
    p = ckpt / name
    size = p.stat().st_size
    if size != want.get("bytes"):
        raise SharnnError(f"{p} is truncated or corrupt: {size:,} bytes, but {want.get('bytes')} were written; "
                          "use another checkpoint (a run folder also has best/, last/ and step-*/)")
    if sha256_file(p) != want.get("sha256"):
        raise SharnnError(f"{p} is corrupt: its SHA-256 differs from the one recorded when it was written; "
                          "use another checkpoint (a run folder also has best/, last/ and step-*/)")


def _unwrap(model: torch.nn.Module) -> SHARNN:
    return getattr(model, "module", model)  # DDP / compiled wrappers keep the real module here


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its `best/`, `last/`, or newest `step-*/`)."""
    p = Path(path)
    if not p.exists():
        old = p.with_name(f".{p.name}.old")  # a crash between the two renames of a save leaves this
        if (old / "config.json").is_file():
            return old
        raise SharnnError(f"checkpoint {p} {missing_reason(p)}")
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_dir():
        order = ("best", "last") if prefer == "best" else ("last", "best")
        for name in order:
            for cand in (p / name, p / f".{name}.old"):
                if (cand / "config.json").is_file():
                    return cand
        for cand in reversed(step_checkpoints(p)):
            if (cand / "config.json").is_file():
                return cand
    raise SharnnError(
        f"{p} is not a sharnn checkpoint (no config.json + model.safetensors); "
        "pass a folder written by `sharnn train --save`"
    )


def missing_reason(p: Path) -> str:
    """Why a path that `exists()` calls missing cannot be opened: a link loop, a broken link, or nothing there."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a loop of symbolic links (each points on to the next and none reaches a folder)"
        if p.is_symlink():
            return f"is a symbolic link to {os.readlink(p)}, which does not exist"
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"cannot be opened: {e.strerror}"
    return "does not exist"


def is_checkpoint(p: str | os.PathLike) -> bool:
    """A folder sharnn wrote as a checkpoint: its config.json carries the format marker."""
    try:
        meta = json.loads((Path(p) / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def refused_pickle(path: str | os.PathLike, e: Exception) -> tuple[str, bool]:
    """One line for a file torch.load(weights_only=True) refused, without torch's advice (several lines, which
    suggest loading it unsafely); and True when it holds Python objects (a GLOBAL) rather than a damaged pickle."""
    text = str(e)
    if m := re.search(r"GLOBAL (\S+)", text):
        return (f"{path} holds pickled Python objects ({m.group(1)}), not only tensors; refusing to load it, as "
                "loading could run code"), True
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return f"{path} is not a readable PyTorch file ({m.group(1).strip() if m else 'a damaged pickle'})", False


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SharnnError(f"{ckpt}/config.json is unreadable or corrupt ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SharnnError(f"{ckpt} is not a sharnn checkpoint (config.json has no '{FORMAT}' marker)")
    if meta.get("version", 0) > VERSION:
        raise SharnnError(f"{ckpt} was written by a newer sharnn (format {meta['version']}); upgrade sharnn")
    return meta


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", prefer: str = "best",
               model_class: type[SHARNN] = SHARNN) -> SHARNN:
    """Rebuild the network from config.json and load the weights strictly."""
    ckpt = resolve_checkpoint(path, prefer)
    meta = read_meta(ckpt)
    try:
        cfg = SHARNNConfig.from_dict(meta["model"])
    except (KeyError, TypeError) as e:
        raise SharnnError(f"{ckpt}/config.json has no valid model section ({e})") from None
    vocab = Vocab.from_dict(meta.get("vocab", {"type": "bytes"}))
    if vocab.size != cfg.vocab_size:
        raise SharnnError(f"{ckpt}/config.json is inconsistent: its vocabulary has {vocab.size} symbols but its "
                          f"model {cfg.vocab_size}; the checkpoint is damaged")
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise SharnnError(f"{ckpt} has no model.safetensors; the checkpoint is incomplete")
    _verify(ckpt, "model.safetensors", meta)
    check_weight_shapes(cfg, weights)  # before the model is built: a damaged config.json must not allocate
    model = model_class(cfg)
    model.vocab = vocab
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SharnnError(f"{weights} is corrupt or does not match its config.json ({e})") from None
    if missing or unexpected:
        raise SharnnError(f"{weights} does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device)


def check_weight_shapes(cfg: SHARNNConfig, weights: Path) -> None:
    """Refuse a config.json that disagrees with the tensor shapes model.safetensors declares in its header.

    Only the header is read (no tensor data), and the expected shapes come from the network built on PyTorch's
    "meta" device, which allocates nothing. Once every shape matches, building the model needs no more memory
    than the weights file holds, however a config.json was edited.
    """
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise SharnnError(f"{weights} is corrupt: its header cannot be read ({e})") from None
    try:
        with torch.device("meta"):
            expected = SHARNN(cfg).state_dict(keep_vars=True)
    except (RuntimeError, ValueError, OverflowError, MemoryError):  # sizes past what PyTorch can address
        # The embedding, stored as encoder.weight, or as decoder.weight when the two are tied (the first
        # name in sorted order is the one kept, see weights_for_saving).
        name = next((n for n in ("encoder.weight", "decoder.weight") if n in stored), None)
        have = f"{name} {list(stored[name])}" if name else "no encoder.weight or decoder.weight"
        raise SharnnError(
            f"{weights.parent}/config.json describes an impossibly large model (emsize {cfg.emsize}, nhid "
            f"{cfg.nhid}, nlayers {cfg.nlayers}, vocab_size {cfg.vocab_size}), unlike its weights ({have}); "
            "the checkpoint is damaged"
        ) from None
    names_of: dict[int, list[str]] = {}  # tied weights: one tensor under two names, stored once
    for name, t in expected.items():
        names_of.setdefault(id(t), []).append(name)
    problem = next((f"model.safetensors has {name}, which the configuration does not"
                    for name in stored if name not in expected), None)
    for names in names_of.values():
        if problem:
            break
        present = [n for n in names if n in stored]
        if not present:
            problem = f"model.safetensors lacks {names[0]}"
        for n in present:
            want = tuple(expected[n].shape)
            if stored[n] != want:
                problem = f"{n} is {list(stored[n])} in model.safetensors but {list(want)} by config.json"
                break
    if problem:
        raise SharnnError(f"{weights.parent}/config.json does not match its weights: {problem}; "
                          "the checkpoint is damaged (use another one, or the config.json it was saved with)")


def load_vocab(path: str | os.PathLike, prefer: str = "best") -> Vocab:
    """The vocabulary a checkpoint's model reads and writes."""
    ckpt = resolve_checkpoint(path, prefer)
    return Vocab.from_dict(read_meta(ckpt).get("vocab", {"type": "bytes"}))


def load_train_config(ckpt: Path) -> TrainConfig | None:
    p = ckpt / "train_config.json"
    if not p.is_file():
        return None
    _verify(ckpt, p.name, read_meta(ckpt))
    try:
        return TrainConfig.from_dict(json.loads(p.read_text()))
    except (ValueError, TypeError) as e:
        raise SharnnError(f"{p} is corrupt ({e})") from None


def load_train_state(ckpt: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    p = ckpt / "train_state.pt"
    if not p.is_file():
        raise SharnnError(f"{ckpt} has no train_state.pt, so it cannot be resumed (it holds weights only)")
    try:
        state = torch.load(p, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SharnnError(refused_pickle(p, e)[0]) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise SharnnError(f"{p} is truncated or corrupt ({_first_line(e)})") from None
    _verify(ckpt, p.name, read_meta(ckpt))  # after loading: a crafted pickle is reported as such
    return state


def load_pretrained(name_or_path: str | os.PathLike, device: torch.device | str = "cpu",
                    model_class: type[SHARNN] = SHARNN) -> SHARNN:
    """`SHARNN.from_pretrained`: a local checkpoint or run folder, else a Hugging Face Hub repository id.

    The Hub needs the optional `huggingface_hub` package, which sharnn's `hub` extra installs (`pip install -e
    '.[hub]'` in a clone); what is downloaded is the same folder layout, loaded the same safe way.
    """
    if Path(name_or_path).exists():
        return load_model(name_or_path, device, model_class=model_class)
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise SharnnError(f"{name} is neither a local folder nor a Hub repository id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SharnnError(f"{name} is not a local folder; to fetch it from the Hugging Face Hub, install sharnn's "
                          "hub extra (pip install -e '.[hub]' in a clone, or pip install huggingface_hub)") from None
    try:
        local = snapshot_download(name, allow_patterns=["config.json", "model.safetensors", "train_config.json"])
    except Exception as e:  # noqa: BLE001 - the Hub client raises many kinds: offline, not found, gated, ...
        raise SharnnError(f"cannot fetch {name} from the Hugging Face Hub: {e}") from None
    return load_model(local, device, model_class=model_class)


# --- the run folder -------------------------------------------------------------------------------------------


def run_checkpoints(run_dir: Path) -> list[str]:
    """The names of the checkpoints training wrote in `run_dir` (best, last, step-*, epoch-*)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if RUN_CHECKPOINT.fullmatch(p.name) and is_checkpoint(p))


def run_folder_of(ckpt: Path) -> Path | None:
    """The run folder a checkpoint sits in (`runs/A` for `runs/A/last`), or None for a checkpoint on its own."""
    name = re.fullmatch(r"\.(.+)\.old", ckpt.name)
    return ckpt.parent if RUN_CHECKPOINT.fullmatch(name.group(1) if name else ckpt.name) else None


def _is_run_log(p: Path) -> bool:
    """A log.jsonl that training wrote: empty, or its first line a JSON object with an "event"."""
    try:
        with open(p, "rb") as f:
            first = f.readline()
        return not first or "event" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return False


def claim_run_folder(run_dir: Path, cfg: TrainConfig, resuming_here: bool = False) -> None:
    """Make sure training writes only what it may in its --save folder.

    An entry under a name training writes (best/, last/, step-*/, epoch-*/, log.jsonl) that sharnn did not write
    is refused, even with --overwrite. A new run (or a resume into another run's folder) never silently replaces
    the checkpoints of an earlier one: with --overwrite it deletes those checkpoints and the log, nothing else.
    `resuming_here`: the run continues from a checkpoint of this folder.
    """
    for p in sorted(run_dir.iterdir()):
        ours = is_checkpoint(p) if RUN_CHECKPOINT.fullmatch(p.name) else _is_run_log(p) if p.name == "log.jsonl" else True
        if not ours:
            raise SharnnError(f"{p} is in the way: training writes there, but sharnn did not write it; move it "
                              "away or pass another --save (--overwrite replaces only what sharnn wrote)")
    old = run_checkpoints(run_dir)
    if resuming_here or not old:
        return
    if not cfg.overwrite:
        raise SharnnError(
            f"{run_dir} already holds a run ({', '.join(old)}); continue it with --resume {run_dir}, start over "
            "with --overwrite, or pass another --save"
        )
    for name in old:
        trash = run_dir / f".{name}.del"  # out of sight first: a half-deleted checkpoint is never seen as one
        _remove(trash)
        os.replace(run_dir / name, trash)
        _remove(trash)
    (run_dir / "log.jsonl").unlink(missing_ok=True)


def check_checkpoint_output(out: str | os.PathLike, overwrite: bool, *inputs: str | os.PathLike) -> None:
    """A command that writes the checkpoint folder `out` (collapse, import-reference) may create it, fill an
    empty folder, or with --overwrite replace a checkpoint sharnn wrote; never an input, a run folder or a
    folder of anything else."""
    out = Path(out)
    refuse_input_as_output(out, *inputs)
    if not (out.exists() or out.is_symlink()) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        return
    if run_checkpoints(out):
        raise SharnnError(f"{out} is a run folder ({', '.join(run_checkpoints(out))}), which a checkpoint never "
                          "replaces; give a new folder name")
    if not is_checkpoint(out) or out.is_symlink():
        raise SharnnError(f"{out} exists and is not a sharnn checkpoint, so it is never replaced (not even with "
                          "--overwrite); give a new folder name")
    if not overwrite:
        raise SharnnError(f"{out} already holds a checkpoint; pass --overwrite to replace it, or give another name")


class RunLock:
    """While a trainer writes a run folder it holds an exclusive lock on `<run>/.lock` (fcntl.flock), so a second
    trainer of the same folder is refused at once; the file names the holder (pid, host, start time). The
    operating system releases the lock when the process ends, however it ends (SIGKILL too), so a killed run
    never leaves the folder locked (only the file, which the next trainer takes over). On systems without
    fcntl (Windows) no lock is taken (`held` stays False)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise SharnnError(f"cannot create {self.path}: {e.strerror}; pass a writable --save") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise SharnnError(f"cannot lock {self.path}: {e.strerror}") from None
                raise SharnnError(f"{self.path.parent} is in use by another training ({self._holder()}); wait "
                                  "for it to end, stop it, or pass another --save") from None
            # The holder deletes the file as it lets go: a lock on a file that is no longer (or no longer this)
            # .lock locks nothing, so take the new one.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on host {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not yet said which"

    def release(self) -> None:
        """Delete the file, then let go of the lock (closing the only descriptor releases it)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[RunLock]:
    """Create the run folder if needed (proving it writable) and hold its lock for the block.

    A folder this call created is removed again if the block leaves it empty (a run that failed before writing
    anything), its new parent folders too."""
    first_new = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    require_writable_folder(run_dir, "pass a writable --save")  # now, not after hours of training
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
        with contextlib.suppress(OSError):  # rmdir fails on a folder that is not empty
            for p in (run_dir, *run_dir.parents) if first_new is not None else ():
                p.rmdir()
                if p == first_new:
                    break


def checkpoint_bytes_needed(n_params: int, cfg: TrainConfig) -> int:
    """About how much disk the run's checkpoints take at once: best, last, one being written, the kept step-*."""
    moments = 2 if cfg.optimizer in ("lamb", "adam", "adamw") else 0
    return 4 * n_params * (1 + moments) * (3 + cfg.keep)  # float32 weights and optimizer moments


# --- what train_state.pt holds besides tensors of the model: RNG streams and the carried state ----------------


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """Every random stream training draws from, as tensors and plain values (loadable with weights_only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy_global": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                             "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: np.random.Generator, s: dict[str, Any]) -> None:
    """Put back what `rng_state` captured: `rng` and the global Python, NumPy, torch and CUDA streams."""
    rng.bit_generator.state = s["numpy"]
    torch.set_rng_state(s["torch"].cpu())
    random.setstate(_as_tuple(s["python"]))
    if "numpy_global" in s:
        g = s["numpy_global"]
        np.random.set_state(("MT19937", g["keys"].cpu().numpy().astype(np.uint32), g["pos"], g["has_gauss"],
                             g["gauss"]))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def state_to_list(state: State | None) -> list[dict[str, Any]] | None:
    """A recurrent state as lists and dicts of tensors: what `torch.load(weights_only=True)` reads back."""
    if state is None:
        return None
    return [{"rnn": list(s.rnn), "memory": s.memory} for s in state]


def state_from_list(saved: list[dict[str, Any]] | None) -> State | None:
    if saved is None:
        return None
    return tuple(BlockState(tuple(s["rnn"]), s["memory"]) for s in saved)
