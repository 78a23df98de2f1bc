"""The SHA-RNN network: Stephen Merity, "Single Headed Attention RNN: Stop Thinking With Your Head" (2019).

Every block is LayerNorm -> LSTM -> (single-head attention, in some blocks) -> "Boom" feed-forward. The
recurrent state and the attention memory are explicit values passed in and returned, never module
attributes, so evaluation, generation, scoring and export share one `forward`.

Shape legend (sequence-first, as in BPTT batching):
    T  segment length          B  batch (parallel streams)     E  emsize
    H  nhid (Boom width)       m  memory rows                  V  vocabulary size
    M  attn_span: a query attends to itself and at most M-1 positions before it

Attention window. The reference trims the memory to M - T rows before each segment, so the first query of
a segment sees fewer positions than the last one and outputs depend on where segments are cut. Here every
query sees exactly its own last M positions (a sliding window over memory + segment), so one pass over 2T
tokens equals two passes of T with the state carried, whatever M is. For T = 1 (generation) the two rules
are the same; for the paper's T = 1024, M = 5000 they differ only in the oldest ~1000 positions of a window.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SHARNNConfig


class BlockState(NamedTuple):
    rnn: tuple[Tensor, ...]  # the core's state: (h, c) for an LSTM; each (1, B, E)
    memory: Tensor | None  # (m, B, E) earlier attention inputs (after lnmem), m <= M-1; None without attention


State = tuple[BlockState, ...]  # one entry per block, in order


class SHARNNOutput(NamedTuple):
    logits: Tensor  # (T, B, V)
    loss: Tensor | None  # mean cross-entropy in nats over the T*B targets, or None without targets
    state: State  # feed it back in to continue the sequence
    hidden: Tensor  # (T, B, E) last block's output, before the output dropout (TAR uses it)
    dropped: Tensor  # (T, B, E) the same after the output dropout (what the decoder sees; AR uses it)


def gelu(x: Tensor) -> Tensor:
    """The sigmoid approximation of GELU that the paper's code uses: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class Boom(nn.Module):
    """E -> H with GELU, then the H wide vector is cut into H/E chunks of width E that are summed.

    No second linear layer: that is the "Boom" (fewer parameters and FLOPs than a Transformer FFN).
    """

    def __init__(self, cfg: SHARNNConfig):
        super().__init__()
        self.linear1 = nn.Linear(cfg.emsize, cfg.nhid)
        self.drop = nn.Dropout(cfg.dropouth)
        self.chunks = cfg.nhid // cfg.emsize

    def forward(self, x: Tensor) -> Tensor:
        u = self.drop(gelu(self.linear1(x)))  # (T, B, H)
        return u.view(*u.shape[:-1], self.chunks, -1).sum(dim=-2)  # (T, B, E)


class Overparam(nn.Module):
    """sigmoid(f) * tanh(c) with [c, f] = Linear(E -> 2E)(z): a static vector given a trainable history.

    After training its output for the (fixed) input can be computed once and used as a constant.
    """

    def __init__(self, nhid: int):
        super().__init__()
        self.l1 = nn.Linear(nhid, 2 * nhid)
        self.nhid = nhid

    def forward(self, z: Tensor) -> Tensor:
        c, f = self.l1(z).split(self.nhid, dim=-1)
        return torch.sigmoid(f) * torch.tanh(c)


class Attention(nn.Module):
    """Single-head attention with a learned query map and gated (but otherwise unmapped) keys and values."""

    def __init__(self, cfg: SHARNNConfig):
        super().__init__()
        E = cfg.emsize
        # Gates start at 0, i.e. sigmoid(0) = 0.5 on every channel.
        self.qs = nn.Parameter(torch.zeros(1, 1, E))
        self.ks = nn.Parameter(torch.zeros(1, 1, E))
        self.vs = nn.Parameter(torch.zeros(1, 1, E))
        self.q = nn.Linear(E, E)
        self.qln = nn.LayerNorm(E, eps=1e-12)
        self.vq = Overparam(E)
        self.drop = nn.Dropout(cfg.dropouth)
        self.dropout_p = cfg.dropouth
        self.span = cfg.attn_span

    def forward(self, h: Tensor, big: Tensor, mem_len: int) -> Tensor:
        """Attend from the segment to memory + segment.

        Args:
            h: (T, B, E) queries' input (after lnmid).
            big: (m + T, B, E) keys' and values' input: memory then the segment (after lnmem).
            mem_len: m, the number of memory rows at the front of `big`.
        Returns:
            (T, B, E) the attention mix.
        """
        T, K = h.shape[0], big.shape[0]
        q = torch.sigmoid(self.qs) * self.qln(self.q(h))  # (T, B, E)
        k = torch.sigmoid(self.ks) * big  # (K, B, E)
        v = self.vq(torch.sigmoid(self.vs)) * big  # (K, B, E)
        q, v = self.drop(q), self.drop(v)
        # Query i sits at key position mem_len + i and sees keys j with i' - M < j <= i' (sliding window).
        qpos = torch.arange(T, device=h.device) + mem_len
        kpos = torch.arange(K, device=h.device)
        visible = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - self.span)  # (T, K)
        # (B, 1, T, E) layout for one head; scale 1/sqrt(E) is SDPA's default for width E.
        mix = F.scaled_dot_product_attention(
            q.permute(1, 0, 2).unsqueeze(1),
            k.permute(1, 0, 2).unsqueeze(1),
            v.permute(1, 0, 2).unsqueeze(1),
            attn_mask=visible,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return mix.squeeze(1).permute(1, 0, 2)  # (T, B, E)


class Block(nn.Module):
    """LN -> LSTM (output replaces h) -> [attention, residual] -> Boom (residual on lnff(h))."""

    def __init__(self, cfg: SHARNNConfig, use_attn: bool):
        super().__init__()
        E = cfg.emsize
        self.lnstart = nn.LayerNorm(E, eps=1e-12)
        self.rnn = nn.LSTM(E, E)
        self.drop = nn.Dropout(cfg.dropouth)
        self.attn = Attention(cfg) if use_attn else None
        if use_attn:
            self.lnmid = nn.LayerNorm(E, eps=1e-12)
            self.lnmem = nn.LayerNorm(E, eps=1e-12)
        self.lnff = nn.LayerNorm(E, eps=1e-12)
        self.lnxff = nn.LayerNorm(E, eps=1e-12)
        self.ff = Boom(cfg)
        self.span = cfg.attn_span

    def forward(self, h: Tensor, state: BlockState) -> tuple[Tensor, BlockState]:
        """(T, B, E) -> (T, B, E). Reads `state`, never mutates it; returns the next one."""
        x, (hn, cn) = self.rnn(self.lnstart(h), state.rnn)
        h = self.drop(x)  # the core's output replaces h: no residual around the RNN (as in the paper)
        memory = state.memory
        if self.attn is not None:
            assert memory is not None
            big = torch.cat([memory, self.lnmem(h)])  # (m + T, B, E)
            h = self.lnmid(h)
            h = h + self.drop(self.attn(h, big, memory.shape[0]))
            memory = big[big.shape[0] - min(big.shape[0], self.span - 1):]  # the last M-1 rows stay visible
        h, u = self.lnff(h), self.lnxff(h)
        h = h + self.drop(self.ff(u))  # residual base is lnff(h), not h
        return h, BlockState((hn, cn), memory)


class SHARNN(nn.Module):
    """Embedding -> blocks -> dropout -> tied decoder. `forward` takes and returns the recurrent state."""

    def __init__(self, cfg: SHARNNConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Embedding(cfg.vocab_size, cfg.emsize)
        self.idrop = nn.Dropout(cfg.dropouti)
        self.blocks = nn.ModuleList(Block(cfg, i in cfg.attn_layers) for i in range(cfg.nlayers))
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = nn.Linear(cfg.emsize, cfg.vocab_size)
        self.apply(self._init_weights)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight

    def _init_weights(self, module: nn.Module) -> None:
        # The reference's init: N(0, (0.1/sqrt(E))^2) for every Linear and Embedding weight, zero biases.
        # LayerNorms keep weight 1, bias 0; the LSTM keeps PyTorch's default uniform init.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.1 / math.sqrt(self.cfg.emsize))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero RNN state and empty attention memory for `batch_size` streams."""
        device = device if device is not None else self.encoder.weight.device
        E, dtype = self.cfg.emsize, self.encoder.weight.dtype
        zeros = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
        return tuple(
            BlockState((zeros(1, batch_size, E), zeros(1, batch_size, E)),
                       zeros(0, batch_size, E) if b.attn is not None else None)
            for b in self.blocks
        )

    def embed(self, tokens: Tensor) -> Tensor:
        """(T, B) ids -> (T, B, E), with embedding dropout (whole rows, `dropoute`) in training."""
        weight = self.encoder.weight
        p = self.cfg.dropoute
        if self.training and p > 0:
            # Drop whole token rows of the embedding matrix and rescale the rest (AWD-LSTM's embedded_dropout):
            # every occurrence of a dropped token in this batch gets a zero vector.
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - p) / (1 - p)
            weight = weight * keep
        return F.embedding(tokens, weight)

    def forward(self, tokens: Tensor, state: State | None = None, targets: Tensor | None = None) -> SHARNNOutput:
        """Run a segment.

        Args:
            tokens: (T, B) token ids.
            state: from `initial_state` or a previous call; None starts fresh.
            targets: (T, B) next-token ids; when given, `loss` is their mean cross-entropy in nats.
        Returns:
            SHARNNOutput with logits (T, B, V), loss, the next state, and the last block's output.
        """
        if state is None:
            state = self.initial_state(tokens.shape[1], tokens.device)
        h = self.idrop(self.embed(tokens))  # (T, B, E)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            h, s = block(h, block_state)
            new_state.append(s)
        dropped = self.drop(h)
        logits = self.decoder(dropped)  # (T, B, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return SHARNNOutput(logits, loss, tuple(new_state), h, dropped)


def detach_state(state: State) -> State:
    """Keep the values, drop the autograd graph: the one BPTT cut between segments."""
    return tuple(
        BlockState(tuple(t.detach() for t in s.rnn), None if s.memory is None else s.memory.detach())
        for s in state
    )


def count_parameters(model: nn.Module) -> int:
    """Every parameter counted once (tied weights are one tensor)."""
    return sum(p.numel() for p in model.parameters())
