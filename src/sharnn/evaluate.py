"""Loss, bits per character and perplexity over a whole split, carrying RNN state and attention memory."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .config import TrainConfig
from .data import Streams, eval_segments
from .model import SHARNN, State

LN2 = math.log(2)  # nats per bit


class EvalResult(NamedTuple):
    loss: float  # mean cross-entropy per predicted token, in nats
    predictions: int  # how many tokens were predicted
    seconds: float
    segment_losses: tuple[float, ...] = ()  # mean cross-entropy (nats) of each segment, in order

    @property
    def bpc(self) -> float:
        """Bits per character (per byte for byte-level corpora): nats / ln 2."""
        return self.loss / LN2

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))


def split_defaults(run: TrainConfig | None, split: str) -> tuple[int, int]:
    """(streams, segment length) a run measured `split` with, and so `sharnn eval`'s defaults: the paper's 8
    streams on test, the validation streams (--eval-batch-size, else --batch_size) otherwise; the run's bptt.
    A checkpoint without run settings (imported, say) gets the defaults' run."""
    run = run or TrainConfig()
    return (run.test_batch_size if split == "test" else run.eval_batch_size or run.batch_size), run.bptt


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast on the device (matmuls in 16 bits, reductions and the loss in float32), or nothing.

    bf16 keeps float32's range, so it needs no loss scaler; fp16 training does (train.py's GradScaler).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def evaluate(
    model: SHARNN,
    ids: np.ndarray,
    batch_size: int,
    bptt: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
    what: str = "split",
    adapt: Callable[[torch.Tensor], None] | None = None,
    adapt_every: int | None = None,
) -> EvalResult:
    """Walk `ids` in `batch_size` streams of `bptt`-long segments, in order, state carried throughout.

    Every prediction of every stream is counted once, so the result does not depend on `bptt` (the attention
    window slides, see `model.py`) beyond float rounding; under the reference window it does.

    `adapt` (dynamic evaluation, `sharnn.dynamic`): each segment is scored in pieces of `adapt_every` tokens (the
    whole segment when None), and after a piece has been scored `adapt` is given its loss again, computed with
    autograd from the same state, to learn from before the next piece is scored. The segments are the ones
    static evaluation walks, and each piece sees what one pass over its segment would show it
    (`_score_and_learn`), so with lr 0 the result is static evaluation's under either window: exactly when
    pieces are whole segments, else up to float rounding.
    """
    was_training = model.training
    model.eval()
    streams = Streams(ids, batch_size, what=what)
    state = None
    total, count, losses = 0.0, 0, []
    start = time.perf_counter()
    segments = list(eval_segments(streams, bptt))
    try:
        for i, seq_len in tqdm(segments, desc=f"eval {what}", disable=None if progress else True, leave=False,
                               unit="seg"):
            x, y = streams.segment(i, seq_len, device)
            with autocast(torch.device(device), precision):
                if adapt is None:
                    with torch.no_grad():
                        out = model(x, state, targets=y)
                    loss, state = out.loss.item(), out.state
                else:
                    loss, state = _score_and_learn(model, x, y, state, adapt, adapt_every or x.shape[0])
            losses.append(loss)
            total += loss * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return EvalResult(total / count, count, time.perf_counter() - start, tuple(losses))


def _score_and_learn(model: SHARNN, x: torch.Tensor, y: torch.Tensor, state: State | None,
                     adapt: Callable[[torch.Tensor], None], every: int) -> tuple[float, State]:
    """One segment, (T, B) inputs and targets, scored in pieces of `every` tokens, each learned from once scored.

    The pieces start from `SHARNN.segment_start(state, T)`: under the reference window the memory is cut as one
    pass over the whole segment would cut it, so a query sees the same positions as in static evaluation (for
    T <= attn_span; `dynamic_evaluate` checks). Returns the segment's mean loss (nats) and the state after it.
    """
    T = x.shape[0]
    if state is not None and every < T:
        state = model.segment_start(state, T)
    losses = []
    for a in range(0, T, every):
        xp, yp = x[a : a + every], y[a : a + every]
        with torch.no_grad():
            out = model(xp, state, targets=yp)
        losses.append((out.loss.item(), yp.numel()))
        with torch.enable_grad():  # only now, the piece scored, learn from it: the same pass again, with a graph
            adapt(model(xp, state, targets=yp).loss)
        state = out.state
    if len(losses) == 1:
        return losses[0][0], state
    return sum(loss * n for loss, n in losses) / y.numel(), state
