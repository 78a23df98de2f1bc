"""Vocabularies: how text becomes token ids and back. Saved with every checkpoint (config.json "vocab").

    bytes     ids are the bytes themselves (256 symbols); what every byte-level corpus uses
    table     each byte maps to one of a list of symbols; the reference's enwik8 models number 205 symbols
              (decimal byte strings, newline as "<eos>") in their own order, see `convert.py`
    words     whitespace-separated tokens with "<eos>" ending every line (the awd-lstm layout, lines as
              `text_lines` cuts them); built from the
              train split in order of first appearance. Penn Treebank's character corpus is this kind too (its
              tokens are characters, "_" between words), with `level="char"` so results are reported in bpc.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .errors import SharnnError

KINDS = ("bytes", "table", "words")
EOS, UNK = "<eos>", "<unk>"
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def text_lines(text: str) -> list[str]:
    """The lines of `text` as awd-lstm's data.py reads them (`for line in open(path)`: Python's universal
    newlines): broken at \n, \r\n and \r only. Not at the other characters `str.splitlines` breaks at (\v,
    \f, \x1c-\x1e, \x85, \u2028, \u2029): inside a line they separate words, as any whitespace does. A line
    break at the very end ends the last line; it does not start an empty one.
    """
    lines = LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@dataclass(frozen=True)
class Vocab:
    kind: str = "bytes"
    symbols: tuple[str, ...] = ()  # "table" and "words": the symbol of each id, e.g. ("<eos>", "32", ...)
    level: str = "char"  # "char" (report bpc) or "word" (report perplexity)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SharnnError(f"unknown vocabulary kind {self.kind!r}")
        if self.level not in ("char", "word"):
            raise SharnnError(f"unknown vocabulary level {self.level!r}")
        if self.kind != "bytes" and (not self.symbols or len(set(self.symbols)) != len(self.symbols)):
            raise SharnnError(f"a {self.kind} vocabulary needs distinct symbols")
        if self.kind == "table":
            for s in self.symbols:
                if s != EOS and not (s.isdigit() and 0 <= int(s) < 256):
                    raise SharnnError(f"table vocabulary symbol {s!r} is neither a byte value nor {EOS}")

    @property
    def size(self) -> int:
        return 256 if self.kind == "bytes" else len(self.symbols)

    @property
    def metric(self) -> str:
        """What results are reported in: bits per character, or perplexity for word-level models."""
        return "ppl" if self.level == "word" else "bpc"

    # --- bytes and tables -------------------------------------------------------------------------------------

    # Built once per vocabulary, not per call: `score` encodes every line on its own, and a WikiText-103
    # vocabulary has 267k words. (cached_property writes the instance __dict__, which a frozen dataclass allows.)
    @cached_property
    def _byte_to_id(self) -> np.ndarray:
        table = np.full(256, -1, dtype=np.int16)  # small ids: a mapped corpus costs 2 bytes per byte
        for i, s in enumerate(self.symbols):
            table[10 if s == EOS else int(s)] = i
        return table

    @cached_property
    def _index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.symbols)}

    def encode(self, data: bytes | np.ndarray) -> np.ndarray:
        """Text -> ids: uint8 for `bytes`, int16 for `table`, int32 for `words` (lines split on whitespace)."""
        if self.kind == "words":
            text = (bytes(data) if not isinstance(data, (bytes, bytearray)) else data).decode("utf-8", "replace")
            ids = self.encode_lines(text_lines(text))
            # A text that stops mid-line (a prompt, say) has no <eos> after its last line.
            return ids[:-1] if text and not text.endswith(("\n", "\r")) else ids
        raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
        if self.kind == "bytes":
            return raw
        ids = self._byte_to_id[raw]
        if (ids < 0).any():
            missing = sorted({int(b) for b in np.unique(raw[ids < 0])})[:5]
            raise SharnnError(f"the text has bytes the model's vocabulary lacks: {missing}")
        return ids

    def encode_lines(self, lines: Iterable[str], what: str = "the text") -> np.ndarray:
        """Word ids of `lines`, each followed by <eos>. Unknown words map to <unk> if the vocabulary has it."""
        index = self._index
        unk = index.get(UNK)
        out: list[int] = []
        unknown: list[str] = []
        for line in lines:
            for w in line.split():
                i = index.get(w, unk)
                if i is None:
                    unknown.append(w)
                    continue
                out.append(i)
            out.append(index[EOS])
        if unknown:
            first = list(dict.fromkeys(unknown))[:5]
            raise SharnnError(
                f"{what} has {len(unknown):,} words that are not in the training vocabulary, e.g. {first}; "
                f"add an {UNK} token to the training text or use a byte-level model"
            )
        return np.asarray(out, dtype=np.int32)

    def decode(self, ids: list[int] | np.ndarray) -> bytes:
        if self.kind == "bytes":
            return bytes(int(i) for i in ids)
        if self.kind == "table":
            return bytes(10 if self.symbols[int(i)] == EOS else int(self.symbols[int(i)]) for i in ids)
        # words: each token followed by a space, <eos> as a line break, so decoding token by token concatenates
        return "".join("\n" if self.symbols[int(i)] == EOS else self.symbols[int(i)] + " " for i in ids).encode()

    @classmethod
    def from_words(cls, lines: Iterable[str], level: str = "word") -> Vocab:
        """A word vocabulary in order of first appearance, <eos> included (awd-lstm's Dictionary)."""
        seen: dict[str, None] = {}
        for line in lines:
            seen.update(dict.fromkeys(line.split()))
            seen.setdefault(EOS)
        if not seen:
            raise SharnnError("the training text has no words")
        return cls("words", tuple(seen), level)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "bytes":
            return {"type": "bytes"}
        return {"type": self.kind, "symbols": list(self.symbols), "level": self.level}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        try:
            return cls(d["type"], tuple(d.get("symbols", ())), d.get("level", "char"))
        except (KeyError, TypeError) as e:
            raise SharnnError(f"bad vocabulary entry in checkpoint ({e})") from None


BYTES = Vocab()


def vocab_of(model: Any, given: Vocab | None = None) -> Vocab:
    """The vocabulary a model's ids are read and written with: `given` (a checkpoint's, from the caller), else the
    model's own (a `sharnn.SHARNN` holds the one it was loaded with), else bytes for a 256-symbol model."""
    vocab = given or getattr(model, "vocab", None)
    if vocab is not None:
        return vocab
    if model.cfg.vocab_size != BYTES.size:
        raise SharnnError(f"the model has {model.cfg.vocab_size} symbols, so its vocabulary is not bytes: pass the "
                          "checkpoint's (Checkpoint.open(path).vocab)")
    return BYTES
