"""A run folder (`sharnn train --save DIR`): its checkpoints, its log and the lock a trainer holds on it.

    DIR/best/        the best validation bpc so far (the paper's rule)
        last/        the latest, for resume (also written every --save-every / --save-every-minutes)
        step-NNNNNN/ with --keep K, the newest K periodic checkpoints (`last/` is then hard links to the newest)
        epoch-NNN/   with --when, the model from before each learning-rate drop
        log.jsonl    one JSON line per event (progress.RunLog)
        .lock        held by the trainer writing the folder (`RunLock`)

Training writes and deletes only those names, and only what sharnn wrote under them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import RUN_CHECKPOINT, Checkpoint, is_checkpoint, step_checkpoints
from .config import TrainConfig
from .errors import SharnnError, require_writable_folder
from .outputs import refuse_input_as_output, same_file

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no run-folder lock (see RunLock)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


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


def run_checkpoints(run_dir: Path) -> list[str]:
    """The names of the checkpoints training wrote in `run_dir` (best, last, step-*, epoch-*)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if RUN_CHECKPOINT.fullmatch(p.name) and is_checkpoint(p))


def _is_run_log(p: Path) -> bool:
    """A log.jsonl that training wrote: empty, or its first line a JSON object with an "event"."""
    try:
        with open(p, "rb") as f:
            first = f.readline()
        return not first or "event" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return False


def claim_run_folder(run_dir: Path, cfg: TrainConfig, resumed: Checkpoint | None = None) -> None:
    """Make sure training writes only what it may in its --save folder.

    An entry under a name training writes (best/, last/, step-*/, epoch-*/, log.jsonl) that sharnn did not write
    is refused, even with --overwrite. A new run (or a resume into another run's folder) never silently replaces
    the checkpoints of an earlier one: with --overwrite it deletes those checkpoints and the log, nothing else.
    `resumed`: the checkpoint the run continues from (already opened: not read again); the run continues in
    this folder when it is one of the folder's.
    """
    resuming_here = resumed is not None and resumed.run_folder is not None and same_file(resumed.run_folder, run_dir)

    def ours(p: Path) -> bool:
        if RUN_CHECKPOINT.fullmatch(p.name):
            return (resumed is not None and same_file(p, resumed.path)) or is_checkpoint(p)
        return _is_run_log(p) if p.name == "log.jsonl" else True

    for p in sorted(run_dir.iterdir()):
        if not ours(p):
            raise SharnnError(f"{p} is in the way: training writes there, but sharnn did not write it; move it "
                              "away or pass another --save (--overwrite replaces only what sharnn wrote)")
    if resuming_here:
        return
    old = run_checkpoints(run_dir)
    if not old:
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


