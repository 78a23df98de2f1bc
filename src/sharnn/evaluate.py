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

from .data import Streams, eval_segments
from .model import SHARNN

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
) -> EvalResult:
    """Walk `ids` in `batch_size` streams of `bptt`-long segments, in order, state carried throughout.

    Every prediction of every stream is counted once, so the result does not depend on `bptt` (the attention
    window slides, see `model.py`) beyond float rounding.

    `adapt` (dynamic evaluation, `sharnn.dynamic`): after a segment has been scored, `adapt` is given its loss
    again, computed with autograd from the same state, to learn from before the next segment is scored. The
    scores themselves come from the very computation static evaluation does (with lr 0 they are identical).
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
            with torch.no_grad(), autocast(torch.device(device), precision):
                out = model(x, state, targets=y)
            loss = out.loss.item()
            if adapt is not None:  # only now, the segment scored, learn from it: the same pass again, with a graph
                with torch.enable_grad(), autocast(torch.device(device), precision):
                    adapt(model(x, state, targets=y).loss)
            state = out.state
            losses.append(loss)
            total += loss * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return EvalResult(total / count, count, time.perf_counter() - start, tuple(losses))
