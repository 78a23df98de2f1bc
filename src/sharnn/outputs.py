"""What a command may write: a new file or folder, or, with `--overwrite`, one that it can replace; never one of
its own inputs, whatever path names it (a symbolic link, a hard link, `..`).

Files appear whole: a command writes under a temporary name beside the target and renames into place at the
end, so a failure leaves nothing half-written (checkpoint folders do the same, see checkpoint.py). And the one
way a file's contents are hashed (`sha256_file`: checkpoints' manifests, compressed files' checksums).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import SharnnError


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths name one file or folder (os.path.samefile); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies somewhere below it (through any links)."""
    real = Path(os.path.realpath(path))
    return any(same_file(p, folder) for p in (real, *real.parents))


def refuse_input_as_output(out: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """Refuse an output that would replace or delete an input: the same file by another name, a file inside an
    input folder, or a folder that holds an input."""
    out = Path(out)
    for i in map(Path, inputs):
        if same_file(out, i):
            raise SharnnError(f"the output {out} is the input {i}; write to another name")
        if i.is_dir() and out.exists() and _inside(out, i):
            raise SharnnError(f"the output {out} lies inside the input {i}; write somewhere else")
        if out.is_dir() and i.exists() and _inside(i, out):
            raise SharnnError(f"the output {out} holds the input {i}; write somewhere else")


def check_new_file(path: str | os.PathLike, overwrite: bool) -> None:
    """A file a command is about to write: refused if it exists (without --overwrite) or is a folder."""
    path = Path(path)
    if path.is_dir():
        raise SharnnError(f"{path} is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise SharnnError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise SharnnError(f"cannot write {path}: folder {path.parent} does not exist")


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside the targets in `folder`: what the block writes there is moved into `folder`
    (each file by one rename, replacing a file of the same name) when the block ends without an error, and
    thrown away when it fails."""
    folder = Path(folder)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".sharnn-", suffix=".tmp", dir=folder))
    except OSError as e:
        raise SharnnError(f"cannot write to {folder}: {e.strerror}") from None
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            os.replace(f, folder / f.name)
    except OSError as e:
        raise SharnnError(f"cannot write to {folder}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(file: str | os.PathLike | BinaryIO, end: int | None = None) -> str:
    """The SHA-256 (hex) of a file's first `end` bytes (all of them when None), read 4 MB at a time.

    `file`: a path, or a file opened in binary mode (read from its start; its position is left after the bytes
    read)."""
    if not hasattr(file, "read"):
        with open(file, "rb") as f:  # type: ignore[arg-type]
            return sha256_file(f, end)
    h = hashlib.sha256()
    file.seek(0)  # type: ignore[union-attr]
    left = end
    while left is None or left > 0:
        buf = file.read(1 << 22 if left is None else min(left, 1 << 22))  # type: ignore[union-attr]
        if not buf:
            break
        h.update(buf)
        if left is not None:
            left -= len(buf)
    return h.hexdigest()
