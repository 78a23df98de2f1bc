"""Checkpoints: a folder that can be read back without running any code from it.

    <ckpt>/config.json        format marker, SHARNNConfig, vocabulary, progress (epoch, step, best bpc), the
                              size and SHA-256 of every other file (written last: truncation or corruption shows)
                              and of each split of the training data ("data"; older checkpoints lack it)
           train_config.json  the resolved TrainConfig of the run that wrote it
           model.safetensors  weights (tensors only; tied weights stored once)
           train_state.pt     optimizer, RNG states, data position, carried RNN state and memory; written with
                              torch.save but only ever read with weights_only=True (no arbitrary unpickling)

A checkpoint is opened once (`Checkpoint.open`): one object holding its settings, vocabulary and progress, which
reads the weights and the training state when asked, each file once, checked against the manifest as it is read.
Every command that reads a checkpoint takes that object. A run folder (`--save`; `runfolder.py`) holds `best/`,
`last/`, `step-NNNNNN/` and `epoch-NNN/` checkpoints, `log.jsonl` and a lock.

Crash safety. A checkpoint is built in `.NAME.tmp` (every file and the folder fsynced), then swapped in with two
renames: NAME -> `.NAME.old`, `.NAME.tmp` -> NAME, and only then is `.NAME.old` deleted. Killed at any moment,
the folder therefore holds a complete NAME or, between the two renames, a complete `.NAME.old`, which
`resolve_checkpoint` falls back to and `clean_run_folder` renames back. Folders being deleted are renamed to
`.NAME.del` first, so a half-deleted checkpoint is never visible under its name.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as st_save_file

from .config import SHARNNConfig, TrainConfig
from .errors import SharnnError
from .model import SHARNN
from .outputs import sha256_file
from .state import BlockState, State
from .vocab import BYTES, Vocab

FORMAT = "sharnn-checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"step-(\d+)")
RUN_CHECKPOINT = re.compile(r"best|last|step-\d+|epoch-\d+")  # the checkpoint folders training writes in a run


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


def run_folder_of(ckpt: Path) -> Path | None:
    """The run folder a checkpoint sits in (`runs/A` for `runs/A/last`), or None for a checkpoint on its own."""
    name = re.fullmatch(r"\.(.+)\.old", ckpt.name)
    return ckpt.parent if RUN_CHECKPOINT.fullmatch(name.group(1) if name else ckpt.name) else None


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


class Checkpoint:
    """A checkpoint folder, opened once: what every command that reads a checkpoint takes.

    `Checkpoint.open` reads config.json (the model's settings, the vocabulary, the progress, the data's identity
    and the manifest of the other files) and train_config.json (the run's settings), each checked once. The
    weights (`model`) and the training state (`train_state`) are read when asked for, each file in one read
    whose SHA-256 is checked against the manifest before anything is built from it.
    """

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.meta = meta
        try:
            self.model_config = SHARNNConfig.from_dict(meta["model"])
        except (KeyError, TypeError) as e:
            raise SharnnError(f"{path}/config.json has no valid model section ({e})") from None
        self.vocab = Vocab.from_dict(meta.get("vocab", {"type": "bytes"}))
        if self.vocab.size != self.model_config.vocab_size:
            raise SharnnError(f"{path}/config.json is inconsistent: its vocabulary has {self.vocab.size} symbols but "
                              f"its model {self.model_config.vocab_size}; the checkpoint is damaged")
        self.progress: dict[str, Any] = meta.get("progress") or {}
        self.data: dict[str, Any] | None = meta.get("data")  # Corpus.identity of the training data, if recorded
        self.train_config = self._read_train_config()

    @classmethod
    def open(cls, path: str | os.PathLike, prefer: str = "best") -> Checkpoint:
        """The checkpoint at `path`: a checkpoint folder, or a run folder (its `prefer`red best/ or last/)."""
        ckpt = resolve_checkpoint(path, prefer)
        return cls(ckpt, read_meta(ckpt))

    @property
    def training_data(self) -> str:
        """The --data the run trained on (the default's for a checkpoint without run settings)."""
        return (self.train_config or TrainConfig()).data

    @property
    def run_folder(self) -> Path | None:
        """The run folder this checkpoint sits in (`runs/A` for `runs/A/last`), or None for one on its own."""
        return run_folder_of(self.path)

    def _read(self, name: str) -> bytes:
        """A file of the checkpoint, read once and checked against the size and SHA-256 config.json recorded."""
        data = self._bytes(name)
        self._check(name, data)
        return data

    def _bytes(self, name: str) -> bytes:
        old = re.fullmatch(r"\.(.+)\.old", self.path.name)
        if old and not self.path.exists() and (self.path.parent / old.group(1)).is_dir():
            self.path = self.path.parent / old.group(1)  # clean_run_folder put it back under its name, whole
        p = self.path / name
        try:
            return p.read_bytes()
        except OSError as e:
            raise SharnnError(f"cannot read {p}: {e.strerror}") from None

    def _check(self, name: str, data: bytes) -> None:
        """Refuse a file whose size or SHA-256 differs from what config.json recorded when it was written."""
        p = self.path / name
        want = (self.meta.get("files") or {}).get(name)
        if not isinstance(want, dict):
            return  # written before checksums were recorded
        if len(data) != want.get("bytes"):
            raise SharnnError(f"{p} is truncated or corrupt: {len(data):,} bytes, but {want.get('bytes')} were "
                              "written; use another checkpoint (a run folder also has best/, last/ and step-*/)")
        if hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise SharnnError(f"{p} is corrupt: its SHA-256 differs from the one recorded when it was written; "
                              "use another checkpoint (a run folder also has best/, last/ and step-*/)")

    def _read_train_config(self) -> TrainConfig | None:
        p = self.path / "train_config.json"
        if not p.is_file():
            return None
        try:
            return TrainConfig.from_dict(json.loads(self._read(p.name)))
        except (ValueError, TypeError) as e:
            raise SharnnError(f"{p} is corrupt ({e})") from None

    def model(self, device: torch.device | str = "cpu", model_class: Callable[[SHARNNConfig], SHARNN] = SHARNN,
              config: SHARNNConfig | None = None, attn_window: str | None = None) -> SHARNN:
        """The network with the checkpoint's weights, loaded strictly, built by `model_class(config)` (a class, or
        any callable: `sharnn.SHARNN.from_pretrained` passes one that also gives it the vocabulary).

        `config`: build it with these settings instead of the saved ones: the same weights in a model run with
        other dropouts, span or window (`resume.resumed_model_config` gives it; a setting that shapes the
        weights must not differ). `attn_window`: the saved settings under this attention window rule (eval,
        score and generate's --attn-window)."""
        cfg = config or self.model_config
        if attn_window is not None:
            cfg = replace(cfg, attn_window=attn_window)
        weights = self.path / "model.safetensors"
        if not weights.is_file():
            raise SharnnError(f"{self.path} has no model.safetensors; the checkpoint is incomplete")
        data = self._read(weights.name)
        check_weight_shapes(cfg, weights, _safetensors_shapes(data, weights))  # before a damaged config allocates
        model = model_class(cfg)
        try:
            tensors = safetensors.torch.load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise SharnnError(f"{weights} is corrupt or does not match its config.json ({e})") from None
        del data
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = _tied_names(model)
        missing = [n for n in missing if not any(m in tensors for m in tied.get(n, ()))]  # stored once
        if missing or unexpected:
            raise SharnnError(f"{weights} does not match its config.json (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
        return model.to(device)

    def train_state(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """What train_state.pt holds (optimizer, RNG streams, data position, carried state, ...), read with
        `weights_only` (nothing but tensors and plain values is ever unpickled)."""
        p = self.path / "train_state.pt"
        if not p.is_file():
            raise SharnnError(f"{self.path} has no train_state.pt, so it cannot be resumed (it holds weights only)")
        data = self._bytes(p.name)
        try:
            state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        except pickle.UnpicklingError as e:
            raise SharnnError(refused_pickle(p, e)[0]) from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise SharnnError(f"{p} is truncated or corrupt ({_first_line(e)})") from None
        self._check(p.name, data)  # after loading: a crafted pickle is reported as such
        return state


def _safetensors_shapes(data: bytes, weights: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header, without touching its tensors: the format opens with
    the header's length (8 bytes, little-endian) and then the header, JSON (safetensors' documented layout)."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 + n:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(data[8 : 8 + n])
        return {name: tuple(int(d) for d in t["shape"]) for name, t in header.items() if name != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise SharnnError(f"{weights} is corrupt: its header cannot be read ({e})") from None


def _tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """{name: the other names of the same tensor} for weights tied together (the decoder's and the embedding's)."""
    names: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(name)
    return {n: [m for m in group if m != n] for group in names.values() if len(group) > 1 for n in group}


def check_weight_shapes(cfg: SHARNNConfig, weights: Path, stored: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config.json that disagrees with the tensor shapes `weights` (model.safetensors) declares in its
    header (`stored`).

    The expected shapes come from the network built on PyTorch's "meta" device, which allocates nothing. Once
    every shape matches, building the model needs no more memory than the weights file holds, however a
    config.json was edited.
    """
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


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", prefer: str = "best") -> SHARNN:
    """Rebuild the network from config.json and load the weights strictly (`Checkpoint.open(path).model()`)."""
    return Checkpoint.open(path, prefer).model(device)


def load_vocab(path: str | os.PathLike, prefer: str = "best") -> Vocab:
    """The vocabulary a checkpoint's model reads and writes."""
    return Checkpoint.open(path, prefer).vocab


def load_train_config(path: str | os.PathLike, prefer: str = "best") -> TrainConfig | None:
    """The settings of the run that wrote the checkpoint (None for one written outside training)."""
    return Checkpoint.open(path, prefer).train_config


def load_train_state(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the checkpoint's train_state.pt holds (`Checkpoint.train_state`)."""
    return Checkpoint.open(path, prefer="last").train_state(device)


def pretrained_checkpoint(name_or_path: str | os.PathLike) -> Checkpoint:
    """What `SHARNN.from_pretrained` loads: a local checkpoint or run folder, else a Hugging Face Hub repository id.

    The Hub needs the optional `huggingface_hub` package, which sharnn's `hub` extra installs (`pip install -e
    '.[hub]'` in a clone); what is downloaded is the same folder layout, loaded the same safe way.
    """
    if Path(name_or_path).exists():
        return Checkpoint.open(name_or_path)
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
    return Checkpoint.open(local)


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
