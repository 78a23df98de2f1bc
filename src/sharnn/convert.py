"""Import weights trained with the reference code (Smerity/sha-rnn) into a sharnn checkpoint.

The reference saves `torch.save([model, criterion])`, a pickle of whole objects, which we never load (it can
run code). Extract the state dict in the reference's own environment first:

    m, _ = torch.load("ENWIK8.pt"); torch.save(m.state_dict(), "ENWIK8.state_dict.pt")

then `sharnn import-reference ENWIK8.state_dict.pt OUT --vocab-from data/enwik8`. Our parameter names are the
reference's, so the import is a filter (drop `qkvs`, `r_gate`, `lnout`, which its forward never uses) and a
check of every shape; the architecture is read off the shapes.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .checkpoint import refused_pickle, save_checkpoint
from .config import SHARNNConfig
from .data import load_corpus
from .errors import SharnnError
from .model import SHARNN
from .runfolder import check_checkpoint_output
from .vocab import BYTES, Vocab

UNUSED = re.compile(r"blocks\.\d+\.(attn\.qkvs|attn\.r_gate|lnout\.(weight|bias))$")


def reference_vocab(train_ids: np.ndarray) -> Vocab:
    """The reference's enwik8 symbol order: frequency rank over the train split, ties by first appearance.

    Its corpus holds bytes as decimal strings, one line per newline-separated piece with `<eos>` ending each,
    so the newline byte is the symbol `<eos>`.
    """
    counts = np.bincount(np.asarray(train_ids, dtype=np.uint8), minlength=256)
    present = {int(b) for b in np.flatnonzero(counts)}
    first: dict[int, int] = {}
    step = 1 << 20
    for start in range(0, len(train_ids), step):  # first appearances, scanning only as far as needed
        values, index = np.unique(np.asarray(train_ids[start : start + step]), return_index=True)
        for v, i in zip(values.tolist(), index.tolist()):
            first.setdefault(v, start + i)
        if len(first) == len(present):
            break
    order = sorted(present, key=lambda b: (-counts[b], first[b]))
    return Vocab("table", tuple("<eos>" if b == 10 else str(int(b)) for b in order))


def _load_state_dict(path: Path) -> object:
    """torch.load with weights_only, after checking that the file is one torch.save could have written: a zip
    archive (torch >= 1.6) or a pickle (older torch). Anything else is not called a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise SharnnError(f"{path} not found") from None
    except OSError as e:
        raise SharnnError(f"cannot read {path}: {e.strerror}") from None
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # a pickle's PROTO opcode (protocol >= 2)
        raise SharnnError(f"{path} is not a PyTorch file (neither torch.save's zip archive nor a pickle); "
                          "give the .pt file saved with torch.save(model.state_dict(), F)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message, objects = refused_pickle(path, e)
        hint = ". Save model.state_dict() in the reference environment first (see `sharnn import-reference --help`)"
        raise SharnnError(message + (hint if objects else "")) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SharnnError(f"{path} is not a readable PyTorch file ({first})") from None


def config_from_state_dict(sd: dict[str, torch.Tensor], attn_span: int, attn_window: str = "reference") -> SHARNNConfig:
    """Read the architecture off the tensors' names and shapes."""
    try:
        V, E = sd["encoder.weight"].shape
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
        H = sd[f"blocks.{blocks[0]}.ff.linear1.weight"].shape[0]
    except (KeyError, IndexError, ValueError) as e:
        raise SharnnError(f"not a SHA-RNN state dict in the reference's naming (missing {e})") from None
    if blocks != list(range(len(blocks))):
        raise SharnnError(f"the state dict's blocks are numbered {blocks}, expected 0..{len(blocks) - 1}")
    attn = tuple(i for i in blocks if f"blocks.{i}.attn.q.weight" in sd)
    tied = "decoder.weight" not in sd or torch.equal(sd["decoder.weight"], sd["encoder.weight"])
    return SHARNNConfig(vocab_size=V, emsize=E, nhid=H, nlayers=len(blocks), attn_layers=attn,
                        attn_span=attn_span, attn_window=attn_window, tied=tied)


def import_reference(
    state_dict_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_from: str | os.PathLike | None = None,
    attn_span: int = 5000,
    attn_window: str = "reference",
    overwrite: bool = False,
) -> SHARNN:
    """Convert a reference state dict into a sharnn checkpoint folder; returns the loaded model.

    `out_dir` may be new or an empty folder; a sharnn checkpoint there is replaced only with `overwrite`, and
    nothing else is ever replaced (see `check_checkpoint_output`)."""
    inputs = [state_dict_path] + ([vocab_from] if vocab_from is not None else [])
    check_checkpoint_output(out_dir, overwrite, *inputs)
    sd = _load_state_dict(Path(state_dict_path))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SharnnError(f"{state_dict_path} is not a state dict (a mapping of names to tensors)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # saved from a DataParallel wrapper
    cfg = config_from_state_dict(sd, attn_span, attn_window)
    if vocab_from is not None:
        vocab = reference_vocab(load_corpus(vocab_from).train)
        if vocab.size != cfg.vocab_size:
            raise SharnnError(
                f"the train split of {vocab_from} has {vocab.size} distinct symbols but the model has "
                f"{cfg.vocab_size}: is it the corpus the model was trained on?"
            )
    elif cfg.vocab_size == 256:
        vocab = BYTES
    else:
        raise SharnnError(
            f"the model has {cfg.vocab_size} symbols, so their order must be rebuilt from the corpus it was "
            "trained on: pass --vocab-from DIR (e.g. data/enwik8)"
        )
    model = SHARNN(cfg)
    wanted = model.state_dict()
    # The reference builds lnmid/lnmem in every block but uses them only where there is attention.
    idle_norms = {f"blocks.{i}.{ln}.{p}" for i in range(cfg.nlayers) if i not in cfg.attn_layers
                  for ln in ("lnmid", "lnmem") for p in ("weight", "bias")}
    kept = {k: v for k, v in sd.items() if not UNUSED.search(k) and k not in idle_norms}
    if cfg.tied:
        kept.pop("decoder.weight", None)
        wanted.pop("decoder.weight", None)
    missing, unexpected = sorted(set(wanted) - set(kept)), sorted(set(kept) - set(wanted))
    if missing or unexpected:
        raise SharnnError(f"state dict does not match SHA-RNN: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, v in kept.items():
        if v.shape != wanted[k].shape:
            raise SharnnError(f"{k} has shape {tuple(v.shape)}, expected {tuple(wanted[k].shape)}")
    model.load_state_dict(kept, strict=not cfg.tied)
    save_checkpoint(Path(out_dir), model, vocab=vocab, progress={"imported_from": str(state_dict_path)})
    return model
