"""Vocabularies: how text becomes token ids and back. Saved with every checkpoint (config.json "vocab").

    bytes     ids are the bytes themselves (256 symbols); what every byte-level corpus uses
    table     each byte maps to one of a list of symbols; the reference's enwik8 models number 205 symbols
              (decimal byte strings, newline as "<eos>") in their own order, see `convert.py`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SharnnError


@dataclass(frozen=True)
class Vocab:
    kind: str = "bytes"
    symbols: tuple[str, ...] = ()  # for "table": the symbol of each id, e.g. ("<eos>", "32", "101", ...)

    def __post_init__(self) -> None:
        if self.kind not in ("bytes", "table"):
            raise SharnnError(f"unknown vocabulary kind {self.kind!r}")
        if self.kind == "table":
            if len(set(self.symbols)) != len(self.symbols) or not self.symbols:
                raise SharnnError("a table vocabulary needs distinct symbols")
            for s in self.symbols:
                if s != "<eos>" and not (s.isdigit() and 0 <= int(s) < 256):
                    raise SharnnError(f"table vocabulary symbol {s!r} is neither a byte value nor <eos>")

    @property
    def size(self) -> int:
        return 256 if self.kind == "bytes" else len(self.symbols)

    @property
    def _byte_to_id(self) -> np.ndarray:
        table = np.full(256, -1, dtype=np.int16)  # small ids: a mapped corpus costs 2 bytes per byte
        for i, s in enumerate(self.symbols):
            table[10 if s == "<eos>" else int(s)] = i
        return table

    def encode(self, data: bytes | np.ndarray) -> np.ndarray:
        """Bytes -> ids (uint8 for `bytes`, int16 for `table`). Bytes the table lacks are an error."""
        raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
        if self.kind == "bytes":
            return raw
        ids = self._byte_to_id[raw]
        if (ids < 0).any():
            missing = sorted({int(b) for b in np.unique(raw[ids < 0])})[:5]
            raise SharnnError(f"the text has bytes the model's vocabulary lacks: {missing}")
        return ids

    def decode(self, ids: list[int] | np.ndarray) -> bytes:
        if self.kind == "bytes":
            return bytes(int(i) for i in ids)
        return bytes(10 if self.symbols[int(i)] == "<eos>" else int(self.symbols[int(i)]) for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind} if self.kind == "bytes" else {"type": self.kind, "symbols": list(self.symbols)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        try:
            return cls(d["type"], tuple(d.get("symbols", ())))
        except (KeyError, TypeError) as e:
            raise SharnnError(f"bad vocabulary entry in checkpoint ({e})") from None


BYTES = Vocab()
