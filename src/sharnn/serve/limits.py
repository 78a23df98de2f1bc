"""What a `sharnn serve` request may ask for (the flags' defaults live here), and the check that the web stack
is installed: both without importing it, so that `sharnn --help` needs no web framework."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SharnnError


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may wait. `sharnn serve` flags set them."""

    slots: int = 8  # generations stepped together (the token step's width)
    queue: int = 64  # requests that may wait beyond the free slots; then 503
    max_length: int = 2000  # bytes one request may generate
    max_prompt: int = 4096  # bytes of a prompt or a score context (primed alone, before any step it joins)
    max_text: int = 65536  # bytes of the texts of one score request together, or of an attention text
    max_texts: int = 64  # texts in one score request
    max_top_k: int = 20  # guesses per position in a score answer

    @property
    def max_body(self) -> int:
        """Request body bytes: room for the largest text written with JSON's six-byte escapes, and the rest."""
        return 6 * max(self.max_text, self.max_prompt) + 65536


def require_web_stack() -> None:
    """Refuse, in one line, to serve without the optional web packages."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SharnnError(f"sharnn serve needs {e.name}: pip install 'sharnn[serve]'") from None
