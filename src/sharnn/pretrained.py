"""`sharnn.SHARNN`: the network of `sharnn.model` with the conveniences of a trained model, and its vocabulary.

    model = SHARNN.from_pretrained("runs/tiny")       # a checkpoint or run folder, or a Hugging Face Hub id
    g = model.generate("def main(", length=200)       # sharnn.generate.generate
    model.save_pretrained("my-model")                 # sharnn.checkpoint.save_checkpoint

The methods live here, above generation and checkpoints, so that the network itself (`sharnn.model`) imports
nothing but torch and its config: the imports run one way. Everything else takes either class.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import model
from .checkpoint import pretrained_checkpoint, save_checkpoint
from .config import SHARNNConfig
from .errors import SharnnError
from .generate import Generation, generate
from .runfolder import check_checkpoint_output
from .vocab import BYTES, Vocab, vocab_of


class SHARNN(model.SHARNN):
    """`sharnn.model.SHARNN` plus `generate`, `save_pretrained` and `from_pretrained`, and the vocabulary its ids
    are read and written with (`from_pretrained` gives the checkpoint's; unless given, bytes for 256 symbols)."""

    def __init__(self, cfg: SHARNNConfig, vocab: Vocab | None = None):
        super().__init__(cfg)
        if vocab is not None and vocab.size != cfg.vocab_size:
            raise SharnnError(f"the vocabulary has {vocab.size} symbols but the model {cfg.vocab_size}")
        self.vocab = vocab if vocab is not None else BYTES if cfg.vocab_size == BYTES.size else None

    def like(self, cfg: SHARNNConfig) -> SHARNN:
        return type(self)(cfg, self.vocab)

    def generate(self, prompt: bytes | str = b"\n", length: int = 200, **kw: Any) -> Generation:
        """Continue `prompt`; see `sharnn.generate.generate` (temperature, top_k, top_p, seed, state, logits)."""
        return generate(self, prompt, length, **kw)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write weights (safetensors) and config.json into `directory`, Hugging Face Hub style. It replaces a
        sharnn checkpoint there, fills an empty folder, and refuses any other folder (SharnnError)."""
        vocab = vocab_of(self)  # a model of another size without a vocabulary is refused, not saved as bytes
        check_checkpoint_output(directory, True)
        save_checkpoint(directory, self, vocab=vocab)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: torch.device | str = "cpu") -> SHARNN:
        """Load from a local folder (a checkpoint or a run), or a Hugging Face Hub repository id."""
        ckpt = pretrained_checkpoint(name_or_path)
        return ckpt.model(device, model_class=lambda cfg: cls(cfg, ckpt.vocab))  # type: ignore[return-value]
