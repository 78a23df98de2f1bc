"""How likely is a text? Log-probabilities of sentences and documents under a model.

A text is scored after a context: `--context` if given, else a single newline (the start of a line, which is
what the reference's `<eos>` marks). Line mode scores each line *with* its closing newline (the end of the
sentence, like `<eos>`), so sentences of different lengths compare fairly; `--no-eos` leaves it out.
Document mode streams a file in segments, state carried, so its size is not limited by memory; it gives the
same bits per character as `sharnn eval` over the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SharnnError
from .evaluate import LN2
from .model import SHARNN, BlockState, State

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


def _logprobs(model: SHARNN, ids: Tensor, state: State | None, chunk: int,
              adapt: Callable[[Tensor], None] | None = None,
              adapt_every: int | None = None) -> tuple[Tensor, State | None]:
    """Run (T, B) ids in chunks of `chunk` steps; returns (T-1, B) log P(ids[t+1] | ids[..t]) and the state.

    `adapt` (dynamic evaluation): each chunk is scored in pieces of `adapt_every` steps (the whole chunk when
    None), and once a piece is scored its mean negative log-probability, computed again with autograd from the
    same state, is handed to `adapt` to learn from before the next piece. The pieces start from the memory one
    pass over their chunk would see (`SHARNN.segment_start`), so with lr 0 the scores are the static ones.
    """
    out_lp = []
    for i in range(0, ids.shape[0] - 1, chunk):
        x = ids[i : i + chunk]
        y = ids[i + 1 : i + chunk + 1]
        x = x[: y.shape[0]]
        if adapt is None:
            out = model(x, state)
            out_lp.append(_gather(out.logits, y))  # (t, B)
            state = out.state
            continue
        every = adapt_every or y.shape[0]
        if state is not None and every < y.shape[0]:
            state = model.segment_start(state, y.shape[0])
        for a in range(0, y.shape[0], every):
            xp, yp = x[a : a + every], y[a : a + every]
            out = model(xp, state)
            out_lp.append(_gather(out.logits, yp))
            with torch.enable_grad():  # the piece scored, learn from it: the same pass again, with a graph
                adapt(-_gather(model(xp, state).logits, yp).mean())
            state = out.state
    return torch.cat(out_lp) if out_lp else ids.new_zeros((0, ids.shape[1]), dtype=torch.float), state


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
    for i in range(0, ids.shape[0] - 1, chunk):
        state = model(ids[i : min(i + chunk, ids.shape[0] - 1)], state).state
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
        lp, _ = _logprobs(model, ids.to(device), state, chunk)  # (T-1, B)
        lp = lp.cpu()
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
    pending = b""
    while True:
        piece = stream.read(read_bytes)
        data, pending = pending + piece, b""
        if piece and vocab.kind == "words":  # whole lines only: a word cut by the read waits for the next one
            cut = data.rfind(b"\n") + 1
            data, pending = data[:cut], data[cut:]
        ids = vocab.encode(data) if data else []
        if len(ids):
            seq = torch.empty(len(ids) + 1, 1, dtype=torch.long)
            seq[0, 0] = last
            seq[1:, 0] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            lp, state = _logprobs(model, seq.to(device), state, chunk, adapt, adapt_every)
            lp = lp[:, 0].double().cpu()
            total += float(lp.sum())
            count += len(ids)
            if toks is not None:
                toks.extend((int(t), float(v)) for t, v in zip(ids, lp))
            last = int(ids[-1])
        if not piece:
            break
    if count == 0:
        raise SharnnError("the document is empty: nothing to score")
    return Score(total, count, toks)
