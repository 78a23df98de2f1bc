"""The recurrent state a forward pass takes and returns, and the attention memory's one interface.

Each block's state is a `BlockState`: its core's state, and (in an attention block) its memory of earlier
attention inputs. The memory has two implementations behind one function, `extend`, which is all a block asks
of it: "here is a segment's rows; give me the keys its queries attend over, which of them each query may see,
and the memory the next segment starts from".

- Ordinary memory, a (m, B, E) tensor of the last m <= M-1 rows, oldest first: training, evaluation, scoring.
  Each segment's keys are a new tensor, memory then segment (`extend_rows`).
- `MemoryRing`, M preallocated slots written in place: token-by-token generation and serving, and the ONNX
  export, where no shape may depend on how much has been read (`MemoryRing.extend`).

Both give a query the same positions under the attention window rule (see sharnn.model's docstring), so they
give the same numbers up to float rounding; which one a state holds is the caller's choice (`ring_state`,
`ordered_state`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Extended(NamedTuple):
    """What a block's attention gets from its memory for one segment (`extend`)."""

    keys: Tensor  # (K, B, E) keys' and values' input: memory rows, then the segment's T rows (last)
    visible: Tensor | None  # which keys each query may see: (T, K), (K,) or (B, 1, K) bool; None = all of them
    memory: Tensor | MemoryRing  # what the next segment starts from


def reference_memory(memory: Tensor, span: int, T: int) -> Tensor:
    """(m, B, E) -> its last min(m, span - T) rows: what the reference window keeps before a T-token segment."""
    return memory[memory.shape[0] - min(memory.shape[0], max(span - T, 0)):]


def visible_keys(T: int, K: int, mem_len: int, span: int, window: str, device: torch.device) -> Tensor | None:
    """(T, K) bool: which of K keys (mem_len memory rows, then the T-token segment) each query may attend to.

    Query i sits at key position mem_len + i. "sliding": it sees keys j with mem_len + i - M < j <= mem_len + i.
    "reference": every memory row (the memory was trimmed to M - T rows beforehand) and the segment up to itself.
    None when every query sees every key (a single query over at most M keys), so no mask is built.
    """
    if T == 1 and (K <= span or window == "reference"):
        return None
    qpos = torch.arange(T, device=device)[:, None] + mem_len
    kpos = torch.arange(K, device=device)[None, :]
    if window == "reference":
        return kpos <= qpos
    return (kpos <= qpos) & (kpos > qpos - span)


def extend_rows(memory: Tensor, new: Tensor, span: int, window: str) -> Extended:
    """Ordinary memory: keys are the memory then the segment, a new tensor; the last M-1 of them are kept.

    Args:
        memory: (m, B, E) earlier attention inputs, oldest first. new: (T, B, E) the segment's.
    """
    if window == "reference":  # the original trims its memory to M - T rows first
        memory = reference_memory(memory, span, new.shape[0])
    keys = torch.cat([memory, new])  # (m + T, B, E)
    K = keys.shape[0]
    visible = visible_keys(new.shape[0], K, memory.shape[0], span, window, new.device)
    return Extended(keys, visible, keys[K - min(K, span - 1):])  # the last M-1 rows stay visible


class MemoryRing(NamedTuple):
    """Attention memory as a preallocated ring of the last M inputs, written in place.

    A token's step writes its row into the slot of the oldest one and attends over all M slots as they lie, the
    ones not yet written masked out: a single query sees every position it holds, and attention does not depend
    on the keys' order. So nothing is copied or recomputed per token, however long the memory, and every tensor
    of a step has the same shape and address from one token to the next (the write position is a tensor too):
    what lets a GPU replay the step as a CUDA graph (sharnn.generate). A segment of several tokens attends over
    the slots as they lie, then its own rows, and writes its last rows in: its shapes do not depend on the count
    either (what ONNX export needs), but it always attends over M + T keys, however few slots are filled, so
    texts are read on ordinary memory (`segments.walk` orders a ring first). Being written in place, a ring is
    valid until the next step; `ordered` (or `ordered_state`) gives an independent, ordered copy.

    Streams that started at different times (the requests `sharnn serve` steps together) have a count each, a
    (B,) tensor: each stream then writes its own slot and sees its own filled slots, so its numbers are those it
    would have alone. Such a ring takes one-token steps only.
    """

    rows: Tensor  # (M, B, E) the slots; row t of the sequence (0-based) lives in slot t % M
    count: Tensor  # () int64 on the rows' device, or (B,) one per stream: rows written so far; min(count, M) hold data

    def extend(self, new: Tensor, span: int, window: str) -> Extended:
        """`extend` for a ring of `span` slots (see the class docstring). `new`: (T, B, E)."""
        assert self.rows.shape[0] == span, "a MemoryRing has attn_span slots (ring_state)"
        if new.shape[0] == 1:  # one token: its row written in place, the slots themselves are the keys
            ring = self.written(new)
            return Extended(ring.rows, ring.filled(), ring)  # a view: nothing copied
        return self.extended(new, window)

    def ordered(self, keep: int) -> Tensor:
        """(m, B, E) the last m = min(count, keep) rows, oldest first: a copy, safe from later steps."""
        if self.count.dim():
            raise ValueError("a ring with a count per stream has no common order: take its streams one by one")
        M, count = self.rows.shape[0], int(self.count)
        m = min(count, keep)
        start = (count - m) % M
        if start + m <= M:
            return self.rows[start : start + m].clone()
        return torch.cat([self.rows[start:], self.rows[: start + m - M]])

    def written(self, row: Tensor) -> MemoryRing:
        """Write `row` (1, B, E) into the next slot, in place; the ring that then holds it."""
        M = self.rows.shape[0]
        if self.count.dim():  # a count per stream: each writes its own next slot
            slot = (self.count % M).view(1, -1, 1).expand(1, *self.rows.shape[1:])
            self.rows.scatter_(0, slot, row.to(self.rows.dtype))
        else:
            self.rows.index_copy_(0, (self.count % M).view(1), row.to(self.rows.dtype))
        return MemoryRing(self.rows, self.count + 1)

    def filled(self) -> Tensor:
        """(M,) bool: the slots that hold a row (all of them once M rows were written); (B, 1, M) with a count
        per stream."""
        slots = torch.arange(self.rows.shape[0], device=self.rows.device)
        if self.count.dim():
            return (slots < self.count[:, None]).unsqueeze(1)
        return slots < self.count

    def extended(self, new: Tensor, window: str) -> Extended:
        """A segment of T rows over the ring, with shapes that do not depend on the count.

        Returns keys (M + T, B, E): the slots as they lie, then the segment; visible (T, M + T): which of them
        each query may attend to; and the ring with the segment's last min(T, M) rows written in, in place.
        """
        assert not self.count.dim(), "a ring with a count per stream takes one-token steps only"
        M, T, dev = self.rows.shape[0], new.shape[0], self.rows.device
        keys = torch.cat([self.rows, new.to(self.rows.dtype)])  # a copy: the writes below cannot reach it
        i = torch.arange(T, device=dev)[:, None]  # query i sits at position count + i
        j = torch.arange(T, device=dev)[None, :]
        age = (self.count - 1 - torch.arange(M, device=dev)) % M  # (M,) 0 = the slot written last
        if window == "reference":  # every query sees the last M - T rows and the segment up to itself
            seen, own = (age < M - T).expand(T, M), j <= i
        else:  # query i sees positions after count + i - M, i.e. rows of age < M - 1 - i
            seen, own = age < M - 1 - i, (j <= i) & (j > i - M)
        visible = torch.cat([seen & (age < self.count), own], dim=1)  # slots never written are not seen
        n = min(T, M)  # distinct slots: only the last M rows of a long segment stay
        slots = (self.count + torch.arange(T - n, T, device=dev)) % M
        self.rows.index_copy_(0, slots, new[T - n :].to(self.rows.dtype))
        return Extended(keys, visible, MemoryRing(self.rows, self.count + T))


def extend(memory: Tensor | MemoryRing, new: Tensor, span: int, window: str) -> Extended:
    """The memory's one interface: the keys a T-token segment `new` (T, B, E) attends over (memory, then the
    segment), which of them each query may see under the `window` rule with `span` M, and the next memory.
    Ordinary memory (`extend_rows`) or a ring (`MemoryRing.extend`): the same positions either way."""
    if isinstance(memory, MemoryRing):
        return memory.extend(new, span, window)
    return extend_rows(memory, new, span, window)


class BlockState(NamedTuple):
    # The core's state, each (1, B, E): (h, c) for an LSTM, (h,) for a GRU; for a QRNN (c, x_last) with
    # qrnn_window 2 (x_last: the last input, which the next segment's convolution sees) and (c,) with 1.
    rnn: tuple[Tensor, ...]
    # (m, B, E) earlier attention inputs (after lnmem), m <= M-1, or the same held in a MemoryRing;
    # None in a block without attention.
    memory: Tensor | MemoryRing | None


State = tuple[BlockState, ...]  # one entry per block, in order


def holds_ring(state: State) -> bool:
    """Whether any block's memory is a MemoryRing."""
    return any(isinstance(s.memory, MemoryRing) for s in state)


def detach_state(state: State) -> State:
    """Keep the values, drop the autograd graph: the one BPTT cut between segments."""
    def detach(memory: Tensor | MemoryRing | None) -> Tensor | MemoryRing | None:
        if isinstance(memory, MemoryRing):
            return MemoryRing(memory.rows.detach(), memory.count)  # (the count never has a graph)
        return None if memory is None else memory.detach()

    return tuple(BlockState(tuple(t.detach() for t in s.rnn), detach(s.memory)) for s in state)


def ring_state(state: State, span: int) -> State:
    """The same state with each attention memory copied into a fresh `MemoryRing` of `span` slots.

    For token-by-token inference: steps then write the memory in place. `state` itself is never written to.
    """
    out = []
    for s in state:
        memory = s.memory
        if isinstance(memory, MemoryRing):
            memory = memory.ordered(span - 1)
        if memory is not None:
            rows = memory.new_zeros(span, *memory.shape[1:])
            rows[: memory.shape[0]] = memory
            memory = MemoryRing(rows, torch.tensor(memory.shape[0], device=rows.device))
        out.append(BlockState(tuple(t.clone() for t in s.rnn), memory))  # copies: token steps may write them
    return tuple(out)


def ordered_state(state: State, span: int) -> State:
    """An independent copy of the state, every `MemoryRing` turned back into ordinary (m, B, E) memory."""
    return tuple(BlockState(tuple(t.clone() for t in s.rnn),
                            s.memory.ordered(span - 1) if isinstance(s.memory, MemoryRing) else s.memory)
                 for s in state)


def segment_start(state: State, T: int, span: int, window: str) -> State:
    """The state a segment of T tokens starts from: under the reference window every attention memory cut as
    `extend_rows` cuts it before such a segment (to its last span - T rows); the state itself under the sliding
    window. (Ordinary memories.)

    Running the segment in shorter pieces from this state, carried, shows each query exactly the positions
    one pass over the segment shows it, as long as T <= span (no piece's own cut then removes a row):
    dynamic evaluation scores a segment piece by piece this way, learning in between.
    """
    if window != "reference":
        return state
    return tuple(s if s.memory is None else BlockState(s.rnn, reference_memory(s.memory, span, T)) for s in state)
