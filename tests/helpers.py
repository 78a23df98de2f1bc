"""What several test files share: a tiny model's training flags and a small text to train it on."""

from __future__ import annotations

from pathlib import Path

TINY = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--attn-layers", "1", "--attn-span", "24",
        "--bptt", "16", "--batch_size", "2", "--max-steps", "3", "--warmup", "2", "--quiet", "--json"]


def write_sentences(folder: Path) -> Path:
    p = folder / "text.txt"
    p.write_bytes(b"Colourless green ideas sleep furiously; the cat sat on the mat. " * 60)
    return p
