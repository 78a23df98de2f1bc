"""The one exception for mistakes a user can make (bad flags, missing data, foreign checkpoints), and the
check for the most common one (an output folder that cannot be written) made before any long work.

`sharnn.cli.main` prints it as a single line and exits non-zero; any other exception is our bug.
"""

from pathlib import Path


class SharnnError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


def require_writable_folder(folder: Path, hint: str) -> None:
    """Create `folder` if needed and prove a file can be written there, or raise a SharnnError ending in `hint`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".sharnn-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise SharnnError(f"cannot write to {folder}: {e.strerror}; {hint}") from None
