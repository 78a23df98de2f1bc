"""Checkpoints: a folder that can be read back without running any code from it.

    <ckpt>/config.json        format marker, SHARNNConfig, vocabulary, progress (epoch, step, best bpc)
           train_config.json  the resolved TrainConfig of the run that wrote it
           model.safetensors  weights (tensors only; tied weights stored once)
           train_state.pt     optimizer, RNG states, data position, carried RNN state and memory; written with
                              torch.save but only ever read with weights_only=True (no arbitrary unpickling)

A run folder (`--save`) holds `best/` (best validation bpc, the paper's rule) and `last/` (latest, for resume).
Each checkpoint is written to a temporary folder and renamed into place, so a crash while saving leaves the
previous one readable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from .config import SHARNNConfig, TrainConfig
from .errors import SharnnError
from .model import SHARNN
from .vocab import BYTES, Vocab

FORMAT = "sharnn-checkpoint"
VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    model: SHARNN,
    train_cfg: TrainConfig | None = None,
    progress: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    vocab: Vocab | None = None,
) -> Path:
    """Write a checkpoint folder atomically (build in a temp folder, then rename over the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict(), "vocab": (vocab or BYTES).to_dict(),
            "progress": progress or {}}
    _write_text(tmp / "config.json", json.dumps(meta, indent=2) + "\n")
    if train_cfg is not None:
        _write_text(tmp / "train_config.json", json.dumps(train_cfg.to_dict(), indent=2) + "\n")
    st_save_model(_unwrap(model), str(tmp / "model.safetensors"))
    if train_state is not None:
        with open(tmp / "train_state.pt", "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _write_text(p: Path, text: str) -> None:
    with open(p, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unwrap(model: torch.nn.Module) -> SHARNN:
    return getattr(model, "module", model)  # DDP / compiled wrappers keep the real module here


def resolve_checkpoint(path: str | os.PathLike, prefer: str = "best") -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its `best/` or `last/`)."""
    p = Path(path)
    if not p.exists():
        old = p.with_name(f".{p.name}.old")  # a crash between the two renames of a save leaves this
        if old.is_dir():
            return old
        raise SharnnError(f"checkpoint {p} does not exist")
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_dir():
        order = ("best", "last") if prefer == "best" else ("last", "best")
        for name in order:
            for cand in (p / name, p / f".{name}.old"):
                if (cand / "config.json").is_file():
                    return cand
    raise SharnnError(
        f"{p} is not a sharnn checkpoint (no config.json + model.safetensors); "
        "pass a folder written by `sharnn train --save`"
    )


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


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", prefer: str = "best") -> SHARNN:
    """Rebuild the network from config.json and load the weights strictly."""
    ckpt = resolve_checkpoint(path, prefer)
    meta = read_meta(ckpt)
    try:
        cfg = SHARNNConfig.from_dict(meta["model"])
    except (KeyError, TypeError) as e:
        raise SharnnError(f"{ckpt}/config.json has no valid model section ({e})") from None
    model = SHARNN(cfg)
    model.vocab = Vocab.from_dict(meta.get("vocab", {"type": "bytes"}))
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise SharnnError(f"{ckpt} has no model.safetensors; the checkpoint is incomplete")
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SharnnError(f"{weights} is corrupt or does not match its config.json ({e})") from None
    if missing or unexpected:
        raise SharnnError(f"{weights} does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device)


def load_vocab(path: str | os.PathLike, prefer: str = "best") -> Vocab:
    """The vocabulary a checkpoint's model reads and writes."""
    ckpt = resolve_checkpoint(path, prefer)
    return Vocab.from_dict(read_meta(ckpt).get("vocab", {"type": "bytes"}))


def load_train_config(ckpt: Path) -> TrainConfig | None:
    p = ckpt / "train_config.json"
    if not p.is_file():
        return None
    try:
        return TrainConfig.from_dict(json.loads(p.read_text()))
    except (ValueError, TypeError) as e:
        raise SharnnError(f"{p} is corrupt ({e})") from None


def load_train_state(ckpt: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    p = ckpt / "train_state.pt"
    if not p.is_file():
        raise SharnnError(f"{ckpt} has no train_state.pt, so it cannot be resumed (it holds weights only)")
    try:
        return torch.load(p, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SharnnError(f"{p} holds objects other than tensors and plain values; refusing to load it ({e})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SharnnError(f"{p} is truncated or corrupt ({e})") from None


def load_pretrained(name_or_path: str | os.PathLike, device: torch.device | str = "cpu") -> SHARNN:
    """`SHARNN.from_pretrained`: a local checkpoint or run folder, else a Hugging Face Hub repository id.

    The Hub needs the optional `huggingface_hub` package (`pip install sharnn[hub]`); what is downloaded is the
    same folder layout, loaded the same safe way (JSON + safetensors).
    """
    if Path(name_or_path).exists():
        return load_model(name_or_path, device)
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise SharnnError(f"{name} is neither a local folder nor a Hub repository id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SharnnError(f"{name} is not a local folder; to fetch it from the Hub, pip install huggingface_hub") from None
    try:
        local = snapshot_download(name, allow_patterns=["config.json", "model.safetensors", "train_config.json"])
    except Exception as e:  # the Hub client raises many kinds: offline, not found, gated, ...
        raise SharnnError(f"cannot fetch {name} from the Hugging Face Hub: {e}") from None
    return load_model(local, device)
