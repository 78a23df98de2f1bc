"""Where the single head looks (`sharnn attention`): the attention weights of every attention block over a text.

The weights are the model's own: a forward hook on each `Attention` module hands its inputs to
`Attention.weights`, the function whose output `Attention.forward` mixes the values with. The text runs as
evaluation runs it (batch 1, segments, state and memory carried), so each query sees the memory it would see
there: up to attn_span positions back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .errors import SharnnError
from .model import SHARNN
from .runtime import attention_bytes, require_memory
from .segments import Segment, walk


class AttentionMap(NamedTuple):
    """The weights of `heatmap` consecutive queries on the keys just before and among them, for a heat-map."""

    block: int
    start: int  # text position of the first query
    key_start: int  # text position of the first key column
    weights: np.ndarray  # (W, C) query i (position start + i) on key j (position key_start + j)
    older: np.ndarray  # (W,) the weight of each query on keys before key_start


class AttentionUse(NamedTuple):
    """How far back one block's attention reaches, over a whole text."""

    block: int
    mean_distance: np.ndarray  # (L,) per query position t: sum over keys k of weight * (t - k), in positions
    by_distance: np.ndarray  # (M,) weight at distance d (0 = the query itself), averaged over all L queries


def attention_blocks(model: SHARNN) -> list[int]:
    return [i for i, b in enumerate(model.blocks) if b.attn is not None]


def heatmap_start(tokens: int, heatmap: int, at: int | None, text: str = "the text") -> int:
    """The text position of the heat-map's first query (`sharnn attention --at`; by default the last `heatmap`
    tokens read), refused in one line when the heat-map's `heatmap` queries (--heatmap) do not fit."""
    if tokens < heatmap:
        raise SharnnError(f"{text} holds {tokens} tokens, fewer than --heatmap {heatmap}")
    start = tokens - heatmap if at is None else at
    if not 0 <= start <= tokens - heatmap:
        raise SharnnError(f"--at {start} leaves no room for --heatmap {heatmap} in the {tokens} tokens read; "
                          f"use 0 to {tokens - heatmap}")
    return start


@torch.no_grad()
def attention_over_text(model: SHARNN, ids: Tensor | list[int], start: int, heatmap: int, chunk: int = 256,
                        before: int | None = None) -> tuple[list[AttentionMap], list[AttentionUse]]:
    """Run `ids` (L,) through the model and gather each attention block's weights.

    Args:
        ids: (L,) token ids.
        start, heatmap: the heat-map's queries are positions start .. start + heatmap - 1 (run as one segment);
            its keys are the `before` (default: `heatmap`) positions before them and the queries themselves.
        chunk: segment length for the rest of the text.
    Returns:
        one AttentionMap and one AttentionUse per attention block, in block order.
    """
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.encoder.weight.device)
    L, M = ids.shape[0], model.cfg.attn_span
    assert 0 <= start and start + heatmap <= L
    require_memory(attention_bytes(model.cfg, 1, rows=2 * (M + chunk + heatmap)),
                   f"attn_span {M:,}: the attention memory and its statistics", ids.device)
    blocks = attention_blocks(model)
    mean_distance = {i: torch.zeros(L) for i in blocks}
    by_distance = {i: torch.zeros(M + chunk + heatmap) for i in blocks}
    maps: dict[int, AttentionMap] = {}
    pos = 0  # text position of the current segment's first token

    def hook(i: int) -> Any:
        def record(module: Any, args: tuple[Any, ...], output: Tensor) -> None:
            h, keys, visible = args[:3]  # Attention.forward's
            assert visible is None or visible.dim() == 2, "the walk carries ordinary memory: keys in order"
            w = module.weights(h, keys, visible)[0].float().cpu()  # (T, K)
            T, K = w.shape
            mem_len = K - T  # the memory rows before the segment's own
            dist = (mem_len + torch.arange(T)[:, None]) - torch.arange(K)[None, :]  # (T, K) query - key position
            mean_distance[i][pos : pos + T] = (w * dist.clamp(min=0)).sum(-1)
            by_distance[i].scatter_add_(0, dist.clamp(min=0).reshape(-1), w.reshape(-1))  # future keys have w 0
            if pos == start and T == heatmap:
                shown = min(heatmap if before is None else before, mem_len)  # key columns before the first query
                first = mem_len - shown
                maps[i] = AttentionMap(i, start, start - shown, w[:, first:].numpy(), w[:, :first].sum(-1).numpy())
        return record

    handles = [model.blocks[i].attn.register_forward_hook(hook(i)) for i in blocks]  # type: ignore[union-attr]
    was_training = model.training
    model.eval()
    try:
        cuts = [(a, min(a + chunk, start) - a) for a in range(0, start, chunk)]
        cuts += [(start, heatmap)] + [(a, min(a + chunk, L) - a) for a in range(start + heatmap, L, chunk)]

        def segments() -> Iterator[Segment]:
            nonlocal pos  # read by the hooks while the model runs the segment
            for pos, n in cuts:
                yield ids[pos : pos + n, None], None

        for _ in walk(model, segments(), loss=False):
            pass
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    uses = [AttentionUse(i, mean_distance[i].numpy(), (by_distance[i][:M] / L).numpy()) for i in blocks]
    return [maps[i] for i in blocks], uses


def token_label(vocab: Any, token: int) -> str:
    """A tick label for one token: printable ASCII as is, space as ␣, newline as \\n, other bytes in hex."""
    data = vocab.decode([token]) if vocab is not None else bytes([token])
    if vocab is not None and vocab.kind == "words":
        return data.decode("utf-8", errors="replace")
    if data == b" ":
        return "␣"
    return data.decode() if len(data) == 1 and data.isascii() and data.decode().isprintable() else repr(data)[2:-1]
