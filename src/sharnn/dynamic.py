"""Dynamic evaluation: the model keeps learning from the text it has just scored.

Krause et al. (2018), "Dynamic Evaluation of Neural Sequence Models". A text is walked segment by segment, state
carried; each segment is scored first and only then learned from, with one gradient step on that segment, so no
prediction ever sees its own target. The step is RMS-normalised SGD with a decay that pulls every weight back
toward its trained value theta_0:

    theta <- theta - lr * g / (rms + eps) + lambda * (theta_0 - theta),   lambda = min(decay * rms / mean(rms), 1)

g is the gradient of the segment's mean cross-entropy; rms is each weight's root mean square gradient, gathered
once from segments of *training* data of the same shape (`gradient_stats`), and mean(rms) its mean over all
weights. Weights whose gradients are usually large take smaller normalised steps and are pulled back faster.
One guard beyond the paper: the step divides by max(rms, running rms of this text's gradients so far), so a
weight whose training gradients were tiny cannot take huge steps on unfamiliar text. After the text the trained
weights are put back (`DynamicEval` is a context manager).

The compressor (`compress.py`) uses the same rule with running statistics of the gradients of the text already
coded (`rms=None`), so it needs no training data, and a fresh model can learn from nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .data import Streams, eval_segments
from .errors import SharnnError
from .evaluate import EvalResult, evaluate
from .model import SHARNN
from .optim import WeightSnapshot
from .score import SCORE_CHUNK, Score, score_stream
from .state import detach_state

if TYPE_CHECKING:
    from .vocab import Vocab


@dataclass(frozen=True)
class DynamicConfig:
    """One dynamic evaluation's settings. The defaults were chosen on the tiny preset's validation split
    (`sharnn eval runs/tiny --split valid --dynamic-search`; README)."""

    lr: float = 3e-4  # step size of the normalised gradient
    decay: float = 0.001  # pull toward the trained weights, per step, for a weight of average rms
    bptt: int = 32  # segment length: one gradient step after every `bptt` tokens of each stream
    eps: float = 1e-5  # added to rms: weights whose gradient was ~0 on the training data still move boundedly
    stats_tokens: int = 100_000  # training tokens whose gradients give rms

    def __post_init__(self) -> None:
        if self.lr < 0 or self.decay < 0 or not math.isfinite(self.lr) or not math.isfinite(self.decay):
            raise SharnnError(f"--dynamic-lr and --dynamic-decay must be finite and not negative, "
                              f"got {self.lr} and {self.decay}")
        if self.bptt < 1:
            raise SharnnError(f"--dynamic-bptt must be at least 1, got {self.bptt}")
        if self.eps <= 0:
            raise SharnnError(f"eps must be positive, got {self.eps}")
        if self.stats_tokens < 1:
            raise SharnnError(f"--dynamic-stats-tokens must be at least 1, got {self.stats_tokens}")


def pieces_reproduce(model: SHARNN, segment: int, piece: int) -> bool:
    """Whether pieces of `piece` tokens show every query what one pass over a `segment`-token segment shows it.

    Always, except under the reference window for a segment longer than attn_span: its queries then see more
    than attn_span positions back, more than a carried memory holds (`SHARNN.segment_start`)."""
    attention = any(b.attn is not None for b in model.blocks)
    reference = attention and model.cfg.attn_window == "reference"
    return not (reference and piece < segment and segment > model.cfg.attn_span)


class DynamicEval:
    """The learning half of dynamic evaluation: `learn(loss)` after each scored segment; weights put back on exit.

    Args:
        model: the network; its parameters are changed in place by `learn` and restored by `restore`.
        cfg: lr, decay and eps (the segment length is the caller's business).
        rms: per parameter, (same shape) root mean square gradients from training data (`gradient_stats`); or
            None: use only the running estimate over the gradients seen so far (what the compressor does).
        beta: the running estimate's decay: ms <- beta * ms + (1 - beta) * g^2, with Adam's bias correction.
            With `rms` given, a step is normalised by max(rms, sqrt(ms)) (see `learn`).
    """

    def __init__(self, model: SHARNN, cfg: DynamicConfig, rms: list[Tensor] | None = None, beta: float = 0.999):
        self.model = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
        self.start = WeightSnapshot(self.params)  # theta_0: put back on exit, and pulled toward meanwhile
        if rms is not None and [r.shape for r in rms] != [p.shape for p in self.params]:
            raise SharnnError("the gradient statistics do not match this model's parameters")
        self.rms = rms
        self.beta = beta
        self.ms = [torch.zeros_like(p) for p in self.params]  # running mean square of the gradients seen here
        self.steps = 0
        self.decay_rates = None if rms is None else self._decay_rates(rms)

    def _decay_rates(self, rms: list[Tensor]) -> list[Tensor]:
        """lambda per weight: decay * rms / mean(rms), capped at 1 so that a step never overshoots theta_0."""
        mean = torch.cat([r.flatten() for r in rms]).mean().clamp_min(1e-30)
        return [(self.cfg.decay * r / mean).clamp(max=1.0) for r in rms]

    def learn(self, loss: Tensor) -> None:
        """One step on `loss`, the mean cross-entropy of a segment that has already been scored."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self.steps += 1
        with torch.no_grad():
            b = self.beta
            for m, g in zip(self.ms, grads):  # this gradient joins the running statistics before the step
                if g is not None:
                    m.mul_(b).addcmul_(g, g, value=1 - b)
            correction = 1 - b**self.steps
            running = [(m / correction).sqrt() for m in self.ms]
            if self.rms is None:
                rms, rates = running, self._decay_rates(running) if self.cfg.decay else None
            else:
                # The training rms, but never below the running rms of this text's own gradients: a weight whose
                # gradients were tiny in training would otherwise take huge normalised steps on text unlike the
                # training data and can diverge (the tiny preset did, scoring one stream of Python modules).
                rms, rates = [torch.maximum(r, q) for r, q in zip(self.rms, running)], self.decay_rates
            for i, (p, g, r, p0) in enumerate(zip(self.params, grads, rms, self.start.values)):
                if g is not None and self.cfg.lr:
                    p.sub_(self.cfg.lr * g / (r + self.cfg.eps))
                if rates is not None and self.cfg.decay:
                    p.add_(rates[i] * (p0 - p))

    def restore(self) -> None:
        """Put the weights the model had when this object was made back in place."""
        self.start.restore()

    def __enter__(self) -> DynamicEval:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def gradient_stats(
    model: SHARNN,
    ids: np.ndarray,
    batch_size: int,
    bptt: int,
    max_tokens: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[Tensor]:
    """Root mean square gradient of every weight over segments of training data.

    Args:
        ids: (N,) training token ids, read as `batch_size` streams of `bptt`-long segments from their starts
            (state carried, no dropout), as dynamic evaluation will read its text.
        max_tokens: stop after this many predicted tokens (at least one segment).
    Returns:
        One tensor per parameter (in `model.parameters()` order), shaped like it.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    streams = Streams(ids, batch_size, what="training data for the dynamic-evaluation statistics")
    segments = list(eval_segments(streams, bptt))
    count = max(1, min(len(segments), -(-max_tokens // (bptt * batch_size))))
    state = None
    try:
        for i, seq_len in tqdm(segments[:count], desc="gradient statistics", disable=None if progress else True,
                               leave=False, unit="seg"):
            x, y = streams.segment(i, seq_len, device)
            with torch.enable_grad():
                out = model(x, state, targets=y)
                grads = torch.autograd.grad(out.loss, params, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.addcmul_(g, g)
            state = detach_state(out.state)
    finally:
        model.train(was_training)
    return [(s / count).sqrt() for s in sums]


def dynamic_evaluate(
    model: SHARNN,
    ids: np.ndarray,
    batch_size: int,
    cfg: DynamicConfig,
    rms: list[Tensor],
    device: torch.device | str = "cpu",
    progress: bool = False,
    what: str = "split",
    bptt: int | None = None,
) -> EvalResult:
    """`evaluate` with a gradient step after every `cfg.bptt` tokens; the model's weights are the same after.

    The text is walked in the segments static evaluation with `bptt` walks (default: `cfg.bptt`), each scored in
    pieces of `cfg.bptt` tokens (a step also ends each segment), so lr 0 gives static evaluation's number under
    either attention window: its segment cut is part of what the reference window computes.
    """
    bptt = bptt or cfg.bptt
    if not pieces_reproduce(model, bptt, cfg.bptt):
        span = model.cfg.attn_span
        raise SharnnError(f"under the reference attention window a segment of --bptt {bptt} tokens lets a query "
                          f"see more than attn_span {span} positions, which pieces of --dynamic-bptt {cfg.bptt} "
                          f"cannot reproduce: use --bptt {span} or less, --dynamic-bptt {bptt}, or --attn-window "
                          "sliding")
    with DynamicEval(model, cfg, rms) as dyn:
        return evaluate(model, ids, batch_size, bptt, device, progress=progress, what=f"{what}, dynamic",
                        adapt=dyn.learn, adapt_every=cfg.bptt)


def static_and_dynamic(
    model: SHARNN,
    train_ids: np.ndarray,
    ids: np.ndarray,
    batch_size: int,
    bptt: int,
    cfg: DynamicConfig,
    device: torch.device | str = "cpu",
    progress: bool = False,
    what: str = "split",
) -> tuple[EvalResult, EvalResult]:
    """Static evaluation of `ids` (segments of `bptt`), then dynamic evaluation of the same streams and segments
    with statistics from `train_ids`: `sharnn eval --dynamic`."""
    static = evaluate(model, ids, batch_size, bptt, device, progress=progress, what=what)
    rms = gradient_stats(model, train_ids, batch_size, cfg.bptt, cfg.stats_tokens, device, progress)
    return static, dynamic_evaluate(model, ids, batch_size, cfg, rms, device, progress, what, bptt)


class SearchPoint(NamedTuple):
    cfg: DynamicConfig
    result: EvalResult


def search_grid(cfg: DynamicConfig) -> list[DynamicConfig]:
    """The settings `--dynamic-search` tries around `cfg`: lr x {1/3, 1, 3} times decay x {0, 1, 10} at its bptt,
    then its lr and decay at half and at twice its bptt (11 settings)."""
    grid = [replace(cfg, lr=cfg.lr * a, decay=cfg.decay * d) for a in (1 / 3, 1, 3) for d in (0, 1, 10)]
    grid += [replace(cfg, bptt=b) for b in (max(1, cfg.bptt // 2), cfg.bptt * 2) if b != cfg.bptt]
    return grid


def dynamic_search(
    model: SHARNN,
    ids: np.ndarray,
    batch_size: int,
    grid: Iterable[DynamicConfig],
    stats: Callable[[int], list[Tensor]],
    device: torch.device | str = "cpu",
    progress: bool = False,
    report: Callable[[SearchPoint], None] | None = None,
    bptt: int | None = None,
) -> list[SearchPoint]:
    """Dynamic evaluation of `ids` under every setting of `grid`, best (lowest loss) first; a setting whose steps
    diverged (loss nan or inf) comes last.

    `stats(bptt)` gives the gradient statistics for segments of that length (computed once per length).
    `report` sees each point as soon as it is measured. `bptt`: static evaluation's segment length, which every
    setting walks (`dynamic_evaluate`); default: each setting's own.
    """
    cache: dict[int, list[Tensor]] = {}
    points = []
    for cfg in grid:
        if cfg.bptt not in cache:
            cache[cfg.bptt] = stats(cfg.bptt)
        point = SearchPoint(cfg, dynamic_evaluate(model, ids, batch_size, cfg, cache[cfg.bptt], device, progress,
                                                  "valid", bptt))
        points.append(point)
        if report is not None:
            report(point)
    return sorted(points, key=lambda p: p.result.loss if math.isfinite(p.result.loss) else math.inf)  # diverged last


class SearchResult(NamedTuple):
    static: EvalResult  # static evaluation of the same streams and segments
    points: list[SearchPoint]  # every setting tried, best first


def search_around(
    model: SHARNN,
    train_ids: np.ndarray,
    ids: np.ndarray,
    batch_size: int,
    bptt: int,
    cfg: DynamicConfig,
    device: torch.device | str = "cpu",
    progress: bool = False,
    report: Callable[[EvalResult | SearchPoint], None] | None = None,
) -> SearchResult:
    """`sharnn eval --dynamic-search`: static evaluation of `ids`, then dynamic evaluation under every setting of
    `search_grid(cfg)`, gradient statistics from `train_ids` (once per segment length). `report` sees the
    static result, then each point, as soon as they are measured."""
    static = evaluate(model, ids, batch_size, bptt, device, progress=progress, what="valid split")
    if report is not None:
        report(static)
    points = dynamic_search(
        model, ids, batch_size, search_grid(cfg),
        lambda b: gradient_stats(model, train_ids, batch_size, b, cfg.stats_tokens, device, progress),
        device, progress=progress, report=report, bptt=bptt)
    return SearchResult(static, points)


def document_scorer(model: SHARNN, train_ids: np.ndarray, cfg: DynamicConfig, device: torch.device | str = "cpu",
                    progress: bool = False) -> Callable[..., Score]:
    """`score_stream`'s signature, scoring with dynamic evaluation (`sharnn score --document --dynamic`); the
    gradient statistics come from `train_ids`, the training corpus, read as one stream."""
    rms = gradient_stats(model, train_ids, 1, cfg.bptt, cfg.stats_tokens, device, progress=progress)

    def score(model: SHARNN, vocab: Vocab, f: BinaryIO, context: bytes = b"\n", per_token: bool = False,
              chunk: int = SCORE_CHUNK) -> Score:
        return dynamic_score_stream(model, vocab, f, cfg, rms, context, per_token, chunk)

    return score


def dynamic_score_stream(
    model: SHARNN,
    vocab: Vocab,
    stream: BinaryIO,
    cfg: DynamicConfig,
    rms: list[Tensor],
    context: bytes = b"\n",
    per_token: bool = False,
    chunk: int = SCORE_CHUNK,
) -> Score:
    """`score_stream` (one document, read in pieces) with a gradient step after every `cfg.bptt` tokens.

    The document is cut into the segments `score_stream` cuts it into, each scored in pieces of `cfg.bptt` (see
    `dynamic_evaluate`): with lr 0 this is `score_stream`'s result under either attention window."""
    if not pieces_reproduce(model, chunk, cfg.bptt):
        raise SharnnError(f"under the reference attention window a document is read in segments of "
                          f"{chunk} tokens, and this model's attn_span is {model.cfg.attn_span}: pieces of "
                          f"--dynamic-bptt {cfg.bptt} cannot reproduce them; use --dynamic-bptt {chunk} or "
                          "--attn-window sliding")
    with DynamicEval(model, cfg, rms) as dyn:
        return score_stream(model, vocab, stream, context, per_token, chunk, adapt=dyn.learn, adapt_every=cfg.bptt)
