"""How likely is a text? Log-probabilities of sentences and documents under a model.

A text is scored after a context: `--context` if given, else a single newline (the start of a line, which is
what the reference's `<eos>` marks). Line mode scores each line *with* its closing newline (the end of the
sentence, like `<eos>`), so sentences of different lengths compare fairly; `--no-eos` leaves it out.
Document mode streams a file in segments, state carried, so its size is not limited by memory; it gives the
same bits per character as `sharnn eval` over the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SharnnError
from .evaluate import LN2
from .model import SHARNN
from .segments import Segment, cut, cut_stream, walk
from .state import BlockState, State

if TYPE_CHECKING:
    from .vocab import Vocab


SCORE_CHUNK = 1024  # tokens per pass (the paper's bptt): memory stays bounded whatever the text's length


class Score(NamedTuple):
    logprob: float  # natural log of the probability of the scored bytes
    tokens: int  # how many tokens were scored
    token_logprobs: list[tuple[int, float]] | None = None  # (token id, natural-log probability) per token

    @property
    def bits(self) -> float:
        return self.logprob / LN2

    @property
    def bpc(self) -> float:
        """Bits per character (per byte): -log2 P / tokens."""
        return -self.bits / self.tokens if self.tokens else float("nan")


def _logprobs(model: SHARNN, segments: Iterable[Segment], state: State | None,
              adapt: Callable[[Tensor], None] | None = None,
              adapt_every: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Walk `segments` (`segments.walk`); per piece, (t, B) log P(target | ids before it) and the (t, B) targets.
    `adapt`, `adapt_every`: dynamic evaluation, a gradient step after each piece of `adapt_every` tokens."""
    for step in walk(model, segments, state, loss=False, adapt=adapt, adapt_every=adapt_every):
        assert step.y is not None
        yield _gather(step.out.logits, step.y), step.y


def _gather(logits: Tensor, y: Tensor) -> Tensor:
    """(t, B, V) logits, (t, B) ids -> (t, B) log-probabilities of the ids."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def split_lines(data: bytes) -> list[bytes]:
    """Line mode's lines: `data` cut at every \n, which ends its line (and is scored as its end, see
    `score_lines`). Every other byte is the line's own, a \r before the \n included: the bytes are scored as they
    are given. A last line without a \n is a line too."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


@torch.no_grad()
def prime(model: SHARNN, context_ids: np.ndarray, chunk: int = SCORE_CHUNK) -> tuple[State | None, int]:
    """Run the context (all but its last token) and return the state and that last token, for scoring after it."""
    if len(context_ids) == 0:
        raise SharnnError("the context is empty; give at least one byte")
    device = model.encoder.weight.device
    ids = torch.as_tensor(np.asarray(context_ids, dtype=np.int64), device=device).unsqueeze(1)  # (T, 1)
    state = None
    for step in walk(model, cut(ids[:-1], chunk, targets=False), loss=False):
        state = step.out.state
    return state, int(ids[-1, 0])


@torch.no_grad()
def score_lines(
    model: SHARNN,
    vocab: Vocab,
    lines: Iterable[bytes],
    context: bytes = b"\n",
    eos: bool = True,
    per_token: bool = False,
    batch_size: int = 32,
    chunk: int = SCORE_CHUNK,
) -> Iterable[Score]:
    """Score each line on its own, after `context`, in batches of right-padded lines.

    Right padding is safe: the model is causal, so padding after a line never changes that line's scores. Except
    under the reference attention window, whose memory is trimmed by the segment's length: there a batch holds
    only lines of one length, so that a line's score never depends on the lines scored beside it.
    """
    model.eval()
    device = model.encoder.weight.device
    ctx_state, ctx_last = prime(model, vocab.encode(context), chunk)
    batch: list[np.ndarray] = []

    def flush() -> Iterable[Score]:
        B = len(batch)
        T = 1 + max(len(b) for b in batch)
        ids = torch.zeros(T, B, dtype=torch.long)
        ids[0] = ctx_last
        for j, b in enumerate(batch):
            ids[1 : 1 + len(b), j] = torch.from_numpy(b.astype(np.int64))
        state = None if ctx_state is None else _expand(ctx_state, B)
        lp = torch.cat([p for p, _ in _logprobs(model, cut(ids.to(device), chunk), state)]).cpu()  # (T-1, B)
        for j, b in enumerate(batch):
            vals = lp[: len(b), j]
            toks = [(int(t), float(v)) for t, v in zip(b, vals)] if per_token else None
            yield Score(float(vals.double().sum()), len(b), toks)

    for line in lines:
        data = line + b"\n" if eos else line
        if not data:
            raise SharnnError("an input line is empty (and --no-eos leaves nothing to score)")
        ids = vocab.encode(data)
        if batch and model.cfg.attn_window == "reference" and len(ids) != len(batch[0]):
            yield from flush()
            batch = []
        batch.append(ids)
        if len(batch) == batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def _expand(state: State, B: int) -> State:
    """A batch-1 state repeated for B streams."""
    return tuple(
        BlockState(tuple(t.expand(-1, B, -1).contiguous() for t in s.rnn),
                   None if s.memory is None else s.memory.expand(-1, B, -1).contiguous())
        for s in state
    )


@torch.no_grad()
def score_stream(
    model: SHARNN,
    vocab: Vocab,
    stream: BinaryIO,
    context: bytes = b"\n",
    per_token: bool = False,
    chunk: int = SCORE_CHUNK,
    read_bytes: int = 1 << 20,
    adapt: Callable[[Tensor], None] | None = None,
    adapt_every: int | None = None,
) -> Score:
    """Score a whole file read in pieces of `read_bytes`, in segments of `chunk` tokens: memory stays bounded
    whatever its size.

    `adapt`, `adapt_every`: dynamic evaluation, see `_logprobs` (`sharnn.dynamic.dynamic_score_stream`).
    """
    model.eval()
    device = model.encoder.weight.device
    state, last = prime(model, vocab.encode(context), chunk)
    total, count = 0.0, 0
    toks: list[tuple[int, float]] | None = [] if per_token else None
    segments = cut_stream(_read_ids(stream, vocab, read_bytes), last, chunk, device)
    for lp, y in _logprobs(model, segments, state, adapt, adapt_every):
        lp = lp[:, 0].double().cpu()
        total += float(lp.sum())
        if toks is not None:
            toks.extend(zip(y[:, 0].tolist(), lp.tolist()))
        count += lp.shape[0]
    if count == 0:
        raise SharnnError("the document is empty: nothing to score")
    return Score(total, count, toks)


def _read_ids(stream: BinaryIO, vocab: Vocab, read_bytes: int) -> Iterator[Tensor]:
    """The (n,) ids of each part of `read_bytes` of a text as it is read; a word corpus's at whole lines (a word
    cut by a read waits for the next one)."""
    pending = b""
    while True:
        piece = stream.read(read_bytes)
        data, pending = pending + piece, b""
        if piece and vocab.kind == "words":
            cut_at = data.rfind(b"\n") + 1
            data, pending = data[:cut_at], data[cut_at:]
        if data and len(ids := vocab.encode(data)):
            yield torch.tensor(ids, dtype=torch.long)  # torch's memory, not a second NumPy copy
        del data
        if not piece:
            return
