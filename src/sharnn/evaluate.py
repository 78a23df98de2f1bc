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
from .model import SHARNN
from .segments import walk

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


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bfloat16 matrices in hardware: CPUs with AVX-512 BF16 or AMX, CUDA GPUs
    from Ampere on. Elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch.cpu's probes are private: a torch without them counts as no native bf16
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def training_precision(device: torch.device, precision: str) -> str:
    """--precision as it runs on `device`: `auto` is bf16 autocast where bf16 is native (on a CPU with AVX-512
    BF16, the tiny preset learns per step as in fp32, 1.467 against 1.459 bpc after 2,000 steps, at 1.4x the
    chars/s; benchmarks/README.md) and fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def split_defaults(run: TrainConfig | None, split: str) -> tuple[int, int]:
    """(streams, segment length) a run measured `split` with, and so `sharnn eval`'s defaults: the paper's 8
    streams on test, the validation streams (--eval-batch-size, else --batch_size) otherwise; the run's bptt.
    A checkpoint without run settings (imported, say) gets the defaults' run."""
    run = run or TrainConfig()
    return (run.test_batch_size if split == "test" else run.eval_batch_size or run.batch_size), run.bptt


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast on the device (matmuls in 16 bits, reductions and the loss in float32), or nothing.

    bf16 keeps float32's range, so it needs no loss scaler; fp16 training does (train.py's GradScaler).
    `auto` is resolved for the device by `training_precision`.
    """
    precision = training_precision(device, precision)
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
    (`segments.walk`), so with lr 0 the result is static evaluation's under either window: exactly when
    pieces are whole segments, else up to float rounding.
    """
    was_training = model.training
    model.eval()
    streams = Streams(ids, batch_size, what=what)
    cuts = tqdm(list(eval_segments(streams, bptt)), desc=f"eval {what}", disable=None if progress else True,
                leave=False, unit="seg")
    pieces: list[list[tuple[float, int]]] = []  # per segment: (mean loss, predictions) of each piece
    start = time.perf_counter()
    try:
        with autocast(torch.device(device), precision):
            for step in walk(model, (streams.segment(i, n, device) for i, n in cuts), adapt=adapt,
                             adapt_every=adapt_every):
                if step.segment == len(pieces):
                    pieces.append([])
                pieces[-1].append((step.out.loss.item(), step.y.numel()))
    finally:
        model.train(was_training)
    losses = [p[0][0] if len(p) == 1 else sum(loss * n for loss, n in p) / sum(n for _, n in p) for p in pieces]
    counts = [sum(n for _, n in p) for p in pieces]
    total = sum(loss * n for loss, n in zip(losses, counts))
    return EvalResult(total / sum(counts), sum(counts), time.perf_counter() - start, tuple(losses))
