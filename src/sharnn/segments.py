"""The one walk over a text in segments, RNN state and attention memory carried from each to the next.

Evaluation, scoring (lines and documents), dynamic evaluation, the attention map and prompt priming all read a
text this way: `walk` runs the segments it is given, in order, and yields each one's output; `cut` and
`cut_stream` make the segments (of a given length, the last one shorter) from ids in memory or read as they come.

Where the segments are cut matters under the reference attention window (its memory is trimmed by the segment's
length before each segment, `model.py`); under the sliding window it changes nothing beyond float rounding. So
every reader that must agree with another (score --document with eval, dynamic with static evaluation) cuts the
same segments, and dynamic evaluation's shorter pieces start from the memory one pass over their segment would
see (`SHARNN.segment_start`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .model import SHARNN, SHARNNOutput
from .state import State, holds_ring

Segment = tuple[Tensor, Tensor | None]  # (T, B) inputs, and (T, B) targets or None


class Step(NamedTuple):
    """One piece of the walk: a segment, or with `adapt` a piece of one."""

    start: int  # position of the piece's first input in the walk (the sum of the lengths before it)
    segment: int  # which segment it belongs to (0-based)
    x: Tensor  # (t, B) inputs
    y: Tensor | None  # (t, B) targets, when the segments have them
    out: SHARNNOutput  # the model's output: logits (or log-probabilities), loss (with `loss` and targets), state


def walk(model: SHARNN, segments: Iterable[Segment], state: State | None = None, loss: bool = True,
         adapt: Callable[[Tensor], None] | None = None, adapt_every: int | None = None) -> Iterator[Step]:
    """Run `segments` through `model` in order, the state carried, without gradients; one `Step` per segment.

    Args:
        state: what the first segment starts from (None: the initial state); never written to. A text is read on
            ordinary memory: a MemoryRing in it is read in order first (a ring would be written in place, and an
            adapted piece's second pass must start from the same memory as its first).
        loss: give the model the targets, so that each step's `out.loss` is their mean cross-entropy (nats).
        adapt: dynamic evaluation. Each segment is run in pieces of `adapt_every` tokens (the whole segment when
            None), one Step each; once the consumer has taken a piece, `adapt` is given its loss again, computed
            with autograd from the same state, before the next piece runs. The pieces start from
            `SHARNN.segment_start`, so each query sees what one pass over its segment shows it (for segments of
            at most attn_span tokens), and with lr 0 the outputs are the static walk's.
    """
    if state is not None and holds_ring(state):
        state = model.ordered_state(state)
    start = 0
    for k, (x, y) in enumerate(segments):
        T = x.shape[0]
        if adapt is None:
            with torch.no_grad():
                out = model(x, state, targets=y if loss else None)
            yield Step(start, k, x, y, out)
            state = out.state
        else:
            assert y is not None, "learning needs targets"
            every = adapt_every or T
            if state is not None and every < T:
                state = model.segment_start(state, T)
            for a in range(0, T, every):
                xp, yp = x[a : a + every], y[a : a + every]
                with torch.no_grad():
                    out = model(xp, state, targets=yp if loss else None)
                yield Step(start + a, k, xp, yp, out)
                with torch.enable_grad():  # only now, the piece scored, learn from it: the same pass, with a graph
                    adapt(model(xp, state, targets=yp).loss)
                state = out.state
        start += T


def cut(ids: Tensor, length: int, targets: bool = True) -> Iterator[Segment]:
    """(N, B) ids as segments of `length` (the last one shorter). With `targets`, each input's target is the next
    id, so the inputs stop one short of the end (N - 1 predictions); without, all N ids are inputs."""
    end = ids.shape[0] - 1 if targets else ids.shape[0]
    for i in range(0, end, length):
        x = ids[i : min(i + length, end)]
        yield x, (ids[i + 1 : i + 1 + x.shape[0]] if targets else None)


def cut_stream(pieces: Iterable[Tensor], first: int, length: int,
               device: torch.device | str = "cpu") -> Iterator[Segment]:
    """Segments of `length` (the last one shorter) over (n,) ids that arrive in `pieces` of any size, as a file
    read in parts: each segment is cut where one text in memory would be cut, whatever the parts' sizes.
    `first` is the id before the first piece (the first input); each piece's ids are predicted in turn.
    Segments are (t, 1), on `device`."""
    held = torch.tensor([first], dtype=torch.long)  # inputs not yet run, and the last one's next id
    for piece in pieces:
        held = torch.cat([held, piece.to(torch.long).cpu()])
        whole = (held.shape[0] - 1) // length  # a segment takes length inputs and their length targets
        ids = held.to(device)
        for j in range(0, whole * length, length):
            yield ids[j : j + length, None], ids[j + 1 : j + 1 + length, None]
        held = held[whole * length :]
    if held.shape[0] > 1:
        ids = held.to(device)
        yield ids[:-1, None], ids[1:, None]
