"""The SHA-RNN network: Stephen Merity, "Single Headed Attention RNN: Stop Thinking With Your Head" (2019).

Every block is LayerNorm -> LSTM (or GRU, or QRNN: `--model`) -> (single-head attention, in some blocks) ->
"Boom" feed-forward. The recurrent state and the attention memory are explicit values passed in and returned,
never module attributes, so training, evaluation, generation and scoring share one `forward`; their types and
the memory's two implementations (ordinary rows, a ring) live in sharnn.state. How to compute (attention kernel,
parts kept in float32) is an argument of `forward` too (sharnn.config.Compute), never a flag set on a module.

Shape legend (sequence-first, as in BPTT batching):
    T  segment length          B  batch (parallel streams)     E  emsize
    H  nhid (Boom width)       m  memory rows                  V  vocabulary size
    M  attn_span: a query attends to itself and at most M-1 positions before it

Attention window (`attn_window`). "sliding", the default: every query sees exactly its own last M positions (a
sliding window over memory + segment), so one pass over 2T tokens equals two passes of T with the state
carried, whatever M is. "reference": what the original code does: before each segment the memory is trimmed
to M - T rows, every query sees all of it plus the segment up to itself, so the first query of a segment sees
fewer positions than the last one and outputs depend on where segments are cut. For T = 1 (generation) the two
rules are the same; for the paper's T = 1024, M = 5000 they differ only in the oldest ~1000 positions of a window.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .config import DEFAULT_COMPUTE, Compute, SHARNNConfig
from .state import BlockState, State, extend, ordered_state, ring_state, segment_start


class SHARNNOutput(NamedTuple):
    logits: Tensor | None  # (T, B, V); None when an adaptive softmax computed the loss from the targets
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


def attention_weights(q: Tensor, k: Tensor, visible: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(E)) over the visible keys, in float32.

    Args:
        q: (T, B, E) queries; k: (K, B, E) keys; visible: (T, K), (K,) or (B, 1, K) bool, or None for all.
    Returns:
        (B, T, K) attention weights, each row summing to 1.
    """
    scores = torch.bmm(q.transpose(0, 1), k.permute(1, 2, 0)).float() * (q.shape[-1] ** -0.5)  # (B, T, K)
    if visible is not None:
        scores = scores.masked_fill_(~visible, float("-inf"))  # in place: the scaling's backward needs no input
    return scores.softmax(dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, drop: nn.Module) -> Tensor:
    """The paper's attention, written out: weights = softmax(q k^T / sqrt(E)), dropout on them, weights @ v.

    Two plain matrix products. For a 1024-wide head they are far faster than fused attention kernels, which
    are built for heads of at most 256 (see `fused_attention_wins`). Returns (T, B, E).
    """
    w = drop(attention_weights(q, k, visible)).to(v.dtype)  # (B, T, K)
    return torch.bmm(w, v.transpose(0, 1)).transpose(0, 1)


def attend_fused(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, dropout_p: float) -> Tensor:
    """The same as `attend` through PyTorch's scaled_dot_product_attention (fused kernels where they exist)."""
    heads = [t.transpose(0, 1).unsqueeze(1) for t in (q, k, v)]  # (B, 1, T or K, E): one head
    if visible is not None and visible.dim() == 3:  # (B, 1, K), a mask per stream -> (B, 1 head, 1, K)
        visible = visible.unsqueeze(1)
    # Scale 1/sqrt(E) is SDPA's default for width E.
    return F.scaled_dot_product_attention(*heads, attn_mask=visible, dropout_p=dropout_p).squeeze(1).transpose(0, 1)


def fused_attention_wins(device: torch.device, T: int, K: int, dtype: torch.dtype) -> bool:
    """Whether SDPA beats two plain matmuls for T queries over K keys computed in `dtype`; measured, not assumed
    (benchmarks/attention.py).

    CUDA (H200, bf16, batch 16, 1024 queries, E 1024, ~6000 keys): plain 5.5 ms forward + backward against
    SDPA's 27 ms (its memory-efficient kernel, the only one that takes a 1024-wide head, is slow in backward),
    and 1.35 against 2.98 ms without gradients: plain everywhere. CPU (2-core AMD EPYC, fp32, batch 16, 256
    queries, E 256, ~5000 keys): SDPA's flash kernel never forms the T x K weights, 221 ms against 703 without
    gradients and 1.57 s against 1.78 s with them; a single query is two mat-vecs either way, and plain is as
    fast in fp32 (2.3 ms) and ~4x faster for bf16 weights on CPUs with native bf16 (benchmarks/README.md).
    In bf16 on a CPU with AVX-512 BF16, forward + backward, batch 16: plain wins while the T x K weights are
    small (128 x 383 keys, E 232: 13.4 against 20.6 ms; 128 x 1152, E 256: 63 against 74 ms), SDPA once they
    are large (256 x 2304: 264 against 229 ms; 256 x 5256: 890 against 688 ms).
    """
    if device.type != "cpu" or T == 1:
        return False
    return dtype != torch.bfloat16 or T * K > 2**18


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matrix product of x computes in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Attention(nn.Module):
    """Single-head attention with a learned query map and gated (but otherwise unmapped) keys and values."""

    def __init__(self, cfg: SHARNNConfig):
        super().__init__()
        E = cfg.emsize
        # Gates start at 0, i.e. sigmoid(0) = 0.5 on every channel.
        self.qs = nn.Parameter(torch.zeros(1, 1, E))
        self.ks = nn.Parameter(torch.zeros(1, 1, E))
        self.q = nn.Linear(E, E)
        self.qln = nn.LayerNorm(E, eps=1e-12)
        if cfg.collapsed_gate:
            # Inference form: Overparam(sigmoid(vs)) depends on no input, so it is stored as one vector.
            self.vgate = nn.Parameter(torch.ones(1, 1, E))
        else:
            self.vs = nn.Parameter(torch.zeros(1, 1, E))
            self.vq = Overparam(E)
        self.drop = nn.Dropout(cfg.dropouth)
        self.dropout_p = cfg.dropouth

    def value_gate(self) -> Tensor:
        """(1, 1, E) the values' gate: Overparam(sigmoid(vs)), or its stored constant once collapsed."""
        return self.vgate if hasattr(self, "vgate") else self.vq(torch.sigmoid(self.vs))

    @property
    def folds_gates(self) -> bool:
        """Whether the key and value gates can be applied outside the attention (no dropout on the values)."""
        return not (self.training and self.dropout_p > 0)

    def project(self, h: Tensor, kv_in: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Queries, keys and values from the segment h (T, B, E) and memory + segment `kv_in` (K, B, E).

        Returns q, k, v and the value gate still to apply to the output (None when already in v).
        """
        q = self.drop(torch.sigmoid(self.qs) * self.qln(self.q(h)))  # (T, B, E)
        if not self.folds_gates:
            return q, torch.sigmoid(self.ks) * kv_in, self.drop(self.value_gate() * kv_in), None
        # Without dropout on v, both gates are per-channel scalings that fold out of the attention:
        # q . (g_k * kv_in) = (q * g_k) . kv_in, and w @ (g_v * kv_in) = g_v * (w @ kv_in). The (m + T)-row memory
        # is then read once, never rescaled into new tensors: what makes a generated token cheap.
        return q * torch.sigmoid(self.ks), kv_in, kv_in, self.value_gate()

    def forward(self, h: Tensor, kv_in: Tensor, visible: Tensor | None, kernel: str = "auto") -> Tensor:
        """Attend from the segment to memory + segment.

        Args:
            h: (T, B, E) queries' input (after lnmid).
            kv_in: (K, B, E) keys' and values' input: memory, then the segment's T rows (after lnmem).
            visible: which keys each query may see (sharnn.state.extend gives them), None for all.
            kernel: "auto", "fused" or "plain" (sharnn.config.Compute.attention).
        Returns:
            (T, B, E) the attention mix.
        """
        q, k, v, out_gate = self.project(h, kv_in)
        fused = kernel == "fused" or (
            kernel == "auto" and fused_attention_wins(h.device, h.shape[0], kv_in.shape[0], matmul_dtype(q)))
        if fused:
            mix = attend_fused(q, k, v, visible, self.dropout_p if self.training else 0.0)
        else:
            mix = attend(q, k, v, visible, self.drop)
        return mix if out_gate is None else mix * out_gate

    def weights(self, h: Tensor, kv_in: Tensor, visible: Tensor | None) -> Tensor:
        """(B, T, K) the attention weights `forward` mixes the values with (before any dropout on them)."""
        q, k, _, _ = self.project(h, kv_in)
        return attention_weights(q, k, visible)


def forget_mult(f: Tensor, z: Tensor, c0: Tensor) -> Tensor:
    """The QRNN's fo-pooling recurrence c_t = f_t * c_{t-1} + (1 - f_t) * z_t, all t at once.

    Args:
        f: (T, B, E) forget gates in [0, 1].
        z: (T, B, E) candidate values.
        c0: (1, B, E) the cell before the segment.
    Returns:
        (T, B, E) every c_t.

    A two-level scan rather than T Python steps: time is cut into n chunks of K ~ sqrt(T) steps; the K steps
    run in every chunk side by side from a zero cell, keeping the running product of the gates; then n steps
    carry each chunk's last cell into the next, and c_t = local_t + product_t * carry. That is ~2 sqrt(T)
    small ops instead of T, on CPU and GPU alike. Only products of numbers in [0, 1] and sums appear: no
    division by a cumulative product and no logarithm, so tiny gates cannot produce inf or nan (a product
    that underflows to 0 is the right limit).
    """
    T, B, E = f.shape
    K = math.isqrt(T - 1) + 1  # ceil(sqrt(T))
    n = -(-T // K)
    b = (1 - f) * z
    if n * K > T:  # identity steps (f = 1, b = 0) after the end change nothing before it
        f = torch.cat([f, f.new_ones(n * K - T, B, E)])
        b = torch.cat([b, b.new_zeros(n * K - T, B, E)])
    # unbind, not indexing in the loops: the backward of each index would fill a zero tensor of the full size.
    fk, bk = f.reshape(n, K, B, E).unbind(1), b.reshape(n, K, B, E).unbind(1)  # K tensors (n, B, E)
    local, prod = [bk[0]], [fk[0]]
    for k in range(1, K):  # inside every chunk at once, from a zero cell
        local.append(torch.addcmul(bk[k], fk[k], local[-1]))
        prod.append(fk[k] * prod[-1])
    ends, decays = local[-1].unbind(0), prod[-1].unbind(0)  # per chunk (B, E): its last cell and total decay
    carry = [c0[0]]  # the cell each chunk starts from, (B, E)
    for j in range(n - 1):
        carry.append(torch.addcmul(ends[j], decays[j], carry[-1]))
    c = torch.addcmul(torch.stack(local, 1), torch.stack(prod, 1), torch.stack(carry)[:, None])  # (n,K,B,E)
    return c.reshape(n * K, B, E)[:T]


class QRNN(nn.Module):
    """Quasi-recurrent core with fo-pooling (Bradbury et al. 2016, "Quasi-Recurrent Neural Networks").

        [z, f, o] = Linear([x_t, x_{t-1}])        a causal convolution over time (window 1: x_t alone)
        c_t = f_t * c_{t-1} + (1 - f_t) * z_t      z = tanh(.), f = o = sigmoid(.)
        h_t = o_t * c_t

    The matmul runs once for the whole segment; only the elementwise `forget_mult` runs along time. State
    (c, x_last) for window 2, (c,) for window 1, each (1, B, E): x_last is the previous segment's last input,
    so segments joined by the state equal one long segment. DropConnect (`wdrop`) masks `linear.weight`, as
    AWD-LSTM did for its QRNN: there is no hidden-to-hidden matrix.
    """

    def __init__(self, cfg: SHARNNConfig):
        super().__init__()
        self.window = cfg.qrnn_window
        self.linear = nn.Linear(self.window * cfg.emsize, 3 * cfg.emsize)  # [x_t, x_{t-1}] -> [z, f, o]
        self.wdrop = cfg.wdrop

    def forward(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(T, B, E) from `state` -> (T, B, E) outputs h and the next state."""
        if self.window == 2:
            x_prev = torch.cat([state[1], x[:-1]])  # (T, B, E): x_{t-1}, the first one from the last segment
            inputs = torch.cat([x, x_prev], dim=-1)  # (T, B, 2E)
        else:
            inputs = x
        if self.training and self.wdrop > 0:
            weight = F.dropout(self.linear.weight, self.wdrop)  # a fresh mask per call; the parameter stays whole
            zfo = F.linear(inputs, weight, self.linear.bias)
        else:
            zfo = self.linear(inputs)  # the module itself, so an int8 replacement (sharnn.precision) works too
        z, f, o = zfo.chunk(3, dim=-1)
        c = forget_mult(torch.sigmoid(f), torch.tanh(z), state[0])  # (T, B, E)
        h = torch.sigmoid(o) * c
        # Copies, not views: a carried view would keep the whole segment's tensors alive.
        last = (c[-1:].clone(), x[-1:].clone())
        return h, last[: self.window]


class Block(nn.Module):
    """LN -> recurrent core (output replaces h) -> [attention, residual] -> Boom (residual on lnff(h))."""

    def __init__(self, cfg: SHARNNConfig, use_attn: bool):
        super().__init__()
        E = cfg.emsize
        self.lnstart = nn.LayerNorm(E, eps=1e-12)
        # The core. LSTM and GRU are PyTorch's, with the reference checkpoint's names (rnn.weight_ih_l0, ...).
        self.rnn: nn.Module = QRNN(cfg) if cfg.model == "QRNN" else getattr(nn, cfg.model)(E, E)
        self.rnn_state_len = {"LSTM": 2, "GRU": 1, "QRNN": cfg.qrnn_window}[cfg.model]  # len(BlockState.rnn)
        self.wdrop = cfg.wdrop
        self.drop = nn.Dropout(cfg.dropouth)
        self.attn = Attention(cfg) if use_attn else None
        if use_attn:
            self.lnmid = nn.LayerNorm(E, eps=1e-12)
            self.lnmem = nn.LayerNorm(E, eps=1e-12)
        self.lnff = nn.LayerNorm(E, eps=1e-12)
        self.lnxff = nn.LayerNorm(E, eps=1e-12)
        self.ff = Boom(cfg)
        self.span = cfg.attn_span

    def run_rnn(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The core on (T, B, E) from BlockState.rnn -> (T, B, E) output and the next BlockState.rnn."""
        if isinstance(self.rnn, QRNN):  # it masks its own weight for wdrop
            return self.rnn(x, state)
        lstm = self.rnn_state_len == 2  # also true of an int8 LSTM (sharnn.precision), not an nn.LSTM subclass
        hx = state if lstm else state[0]
        if self.training and self.wdrop > 0:
            return rnn_with_weights(x, hx, self._dropconnect_weights(), lstm)
        if x.shape[0] == 1 and not torch.is_grad_enabled() and self._float_core:
            return rnn_cell_step(x, hx, self.rnn, lstm)
        y, new = self.rnn(x, hx)
        return y, tuple(new) if lstm else (new,)

    @property
    def _float_core(self) -> bool:
        """Whether the core is PyTorch's float LSTM/GRU, whose weights the cell ops can take (not int8)."""
        return isinstance(self.rnn, (nn.LSTM, nn.GRU))

    def _dropconnect_weights(self) -> list[Tensor]:
        """The core's weights with a fresh DropConnect mask on weight_hh_l0 (AWD-LSTM's WeightDrop).

        The parameters themselves stay unmasked, so a checkpoint never holds a masked matrix. The weights come
        back as views of one new buffer in the parameters' order (w_ih, w_hh, b_ih, b_hh), the layout cuDNN
        takes as is; separate tensors would make it warn ("RNN module weights are not part of single
        contiguous chunk of memory") and repack them on every call.
        """
        named = self.rnn.named_parameters()
        ws = [F.dropout(w, self.wdrop) if name == "weight_hh_l0" else w for name, w in named]
        flat = torch.cat([w.reshape(-1) for w in ws])
        return [v.view_as(w) for v, w in zip(flat.split([w.numel() for w in ws]), ws)]

    def forward(self, h: Tensor, state: BlockState, window: str, compute: Compute) -> tuple[Tensor, BlockState]:
        """(T, B, E) -> (T, B, E). Reads `state` and returns the next one; never mutates it, except for the
        slots of a MemoryRing (which is what a ring is for). `window`: the attention window rule; `compute`: how
        to compute it (sharnn.config.Compute)."""
        # Under autocast the matmuls (core, attention, Boom) return bf16/fp16; the residual stream, the
        # LayerNorms and the carried state stay in the block input's dtype (fp32 in mixed-precision training),
        # so rounding does not pile up over blocks and segments. A no-op when everything has one dtype.
        dtype, fp32 = h.dtype, compute.fp32_parts
        with full_precision(h, "core" in fp32 or not autocast_takes_core(h, self.rnn)):
            x, rnn_state = self.run_rnn(self.lnstart(h), state.rnn)
        rnn_state = tuple(t.to(dtype) for t in rnn_state)
        h = self.drop(x.to(dtype))  # the core's output replaces h: no residual around the RNN (as in the paper)
        memory = state.memory
        if self.attn is not None:
            assert memory is not None
            seen = extend(memory, self.lnmem(h), self.span, window)  # keys: memory, then the segment
            h, memory = self.lnmid(h), seen.memory
            with full_precision(h, "attention" in fp32):
                h = h + self.drop(self.attn(h, seen.keys, seen.visible, compute.attention).to(dtype))
        h, u = self.lnff(h), self.lnxff(h)
        with full_precision(h, "boom" in fp32):
            h = h + self.drop(self.ff(u).to(dtype))  # residual base is lnff(h), not h
        return h, BlockState(rnn_state, memory)


# --- fast paths and mixed-precision helpers for the blocks: the same numbers as the plain path ----------------


def rnn_with_weights(x: Tensor, hx: Tensor | tuple[Tensor, ...], weights: list[Tensor],
                     lstm: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One-layer LSTM/GRU over (T, B, E) with the given weights (w_ih, w_hh, b_ih, b_hh) instead of the module's.

    torch.lstm / torch.gru are the ops nn.LSTM / nn.GRU call; DropConnect gives them masked copies.
    """
    run = torch.lstm if lstm else torch.gru
    y, *new = run(x, hx, weights, has_biases=True, num_layers=1, dropout=0.0, train=True, bidirectional=False,
                  batch_first=False)
    return y, tuple(new)


def rnn_cell_step(x: Tensor, hx: Tensor | tuple[Tensor, ...], rnn: nn.Module,
                  lstm: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One step (T = 1) of an nn.LSTM / nn.GRU through the plain cell op: same weights, same numbers.

    The sequence kernels pay a fixed cost per call (oneDNN's ~1.6x a cell step on CPU; cuDNN's setup on GPUs),
    which is all there is to pay for one token; and the cell is a fixed set of kernels a CUDA graph can replay.
    """
    p = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    if lstm:
        h1, c1 = torch.lstm_cell(x[0], (hx[0][0], hx[1][0]), *p)
        return h1[None], (h1[None], c1[None])
    h1 = torch.gru_cell(x[0], hx[0], *p)
    return h1[None], (h1[None],)


def full_precision(x: Tensor, wanted: bool) -> Any:
    """A context that turns autocast off on x's device (the part inside computes in float32), if `wanted`."""
    if wanted and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return nullcontext()


def autocast_takes_core(x: Tensor, core: nn.Module) -> bool:
    """Whether autocast can run this recurrent core in 16 bits here.

    PyTorch's CPU autocast sends nn.LSTM to oneDNN's bf16 LSTM, which exists only on CPUs with native bf16
    (AVX-512 BF16 or AMX); elsewhere the call fails. There the core stays in float32, as a GRU's does anyway
    (autocast leaves CPU GRUs alone). The rest of the block still runs in bf16.
    """
    return (x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or not isinstance(core, nn.LSTM)
            or _cpu_bf16_lstm())


@functools.cache
def _cpu_bf16_lstm() -> bool:
    """Try oneDNN's bf16 LSTM once. The probe's weights draw from a forked RNG: the run's streams stay as they were."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                nn.LSTM(8, 8)(torch.zeros(2, 1, 8))
            return True
        except RuntimeError:
            return False


class SHARNN(nn.Module):
    """Embedding -> blocks -> dropout -> tied decoder. `forward` takes and returns the recurrent state."""

    def __init__(self, cfg: SHARNNConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Embedding(cfg.vocab_size, cfg.emsize)
        self.idrop = nn.Dropout(cfg.dropouti)
        self.blocks = nn.ModuleList(Block(cfg, i in cfg.attn_layers) for i in range(cfg.nlayers))
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder: nn.Module
        if cfg.uses_adaptive_softmax:
            # Large vocabularies (WikiText-103's 267k words): PyTorch's adaptive softmax gives the frequent words
            # a small full softmax and the rare ones smaller clusters, so training never forms all V scores.
            self.decoder = nn.AdaptiveLogSoftmaxWithLoss(cfg.emsize, cfg.vocab_size, list(cfg.adaptive_cutoffs),
                                                         div_value=4.0)
        else:
            self.decoder = nn.Linear(cfg.emsize, cfg.vocab_size)
        self.apply(self._init_weights)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight  # type: ignore[union-attr]

    def _init_weights(self, module: nn.Module) -> None:
        # The reference's init: N(0, (0.1/sqrt(E))^2) for every Linear and Embedding weight, zero biases.
        # LayerNorms keep weight 1, bias 0; the recurrent cores keep PyTorch's default uniform init.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.1 / math.sqrt(self.cfg.emsize))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, QRNN):  # `apply` visits it after its Linear: back to PyTorch's default init
            module.linear.reset_parameters()

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero RNN state and empty attention memory for `batch_size` streams."""
        device = device if device is not None else self.encoder.weight.device
        E, dtype = self.cfg.emsize, self.encoder.weight.dtype
        zeros = lambda *s: torch.zeros(*s, device=device, dtype=dtype)
        return tuple(
            BlockState(tuple(zeros(1, batch_size, E) for _ in range(b.rnn_state_len)),
                       zeros(0, batch_size, E) if b.attn is not None else None)
            for b in self.blocks
        )

    def ring_state(self, state: State) -> State:
        """The state with each attention memory copied into a fresh MemoryRing (sharnn.state.ring_state)."""
        return ring_state(state, self.cfg.attn_span)

    def ordered_state(self, state: State) -> State:
        """An independent copy, every MemoryRing back to ordinary memory (sharnn.state.ordered_state)."""
        return ordered_state(state, self.cfg.attn_span)

    def segment_start(self, state: State, T: int) -> State:
        """The state a segment of T tokens starts from under this model's window (sharnn.state.segment_start)."""
        return segment_start(state, T, self.cfg.attn_span, self.cfg.attn_window)

    def set_attn_window(self, window: str) -> None:
        """Switch the attention window rule ("sliding" or "reference"): a setting of the config, which `forward`
        passes to the blocks; the weights do not change."""
        self.cfg = replace(self.cfg, attn_window=window)  # validated by SHARNNConfig

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

    def forward(self, tokens: Tensor, state: State | None = None, targets: Tensor | None = None,
                recompute: bool = False, compute: Compute = DEFAULT_COMPUTE) -> SHARNNOutput:
        """Run a segment.

        Args:
            tokens: (T, B) token ids.
            state: from `initial_state` or a previous call; None starts fresh. Never written to, except a
                MemoryRing's slots (sharnn.state): a ring is written in place for segments of any length, and the
                state returned shares its rows; `ordered_state` gives a copy to keep.
            targets: (T, B) next-token ids; when given, `loss` is their mean cross-entropy in nats.
            recompute: activation checkpointing (training with autograd): keep only each block's input and
                recompute the block in the backward pass, with the same dropout masks. Same numbers, less memory.
            compute: how to compute (attention kernel, parts kept in float32 under autocast): a caller's choice
                that changes no more than rounding (sharnn.config.Compute).
        Returns:
            SHARNNOutput with logits (T, B, V), loss, the next state, and the last block's output.
        """
        if state is None:
            state = self.initial_state(tokens.shape[1], tokens.device)
        h = self.idrop(self.embed(tokens))  # (T, B, E)
        new_state = []
        recompute = recompute and torch.is_grad_enabled()
        window = self.cfg.attn_window
        for block, block_state in zip(self.blocks, state):
            if recompute:
                # Non-reentrant: handles the state's nested tuples and restores the RNG for the dropout masks.
                h, s = torch.utils.checkpoint.checkpoint(block, h, block_state, window, compute, use_reentrant=False)
            else:
                h, s = block(h, block_state, window, compute)
            new_state.append(s)
        dropped = self.drop(h)
        loss = None
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            flat = dropped.reshape(-1, dropped.shape[-1]).float()
            if targets is not None:  # the loss without the full distribution: logits stay None
                return SHARNNOutput(None, self.decoder(flat, targets.reshape(-1)).loss, tuple(new_state), h, dropped)
            logits = self.decoder.log_prob(flat).view(*dropped.shape[:-1], -1)  # log-probabilities, (T, B, V)
        else:
            with full_precision(dropped, "decoder" in compute.fp32_parts):
                logits = self.decoder(dropped)  # (T, B, V)
            if targets is not None:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return SHARNNOutput(logits, loss, tuple(new_state), h, dropped)

    def like(self, cfg: SHARNNConfig) -> SHARNN:
        """A new network of this class for `cfg` (a subclass that holds more, e.g. a vocabulary, passes it on)."""
        return type(self)(cfg)

    def collapse(self) -> SHARNN:
        """A copy whose attention value gates are stored constants: same outputs, fewer parameters."""
        if self.cfg.collapsed_gate:
            return self
        new = self.like(replace(self.cfg, collapsed_gate=True)).to(self.encoder.weight.device)
        state = {k: v for k, v in self.state_dict().items() if ".attn.vq." not in k and not k.endswith(".attn.vs")}
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                if block.attn is not None:
                    state[f"blocks.{i}.attn.vgate"] = block.attn.value_gate().detach().clone()
        new.load_state_dict(state)
        return new.train(self.training)


def count_parameters(model: nn.Module) -> int:
    """Every parameter counted once (tied weights are one tensor)."""
    return sum(p.numel() for p in model.parameters())


def parameter_count(cfg: SHARNNConfig) -> int:
    """The parameters a network of `cfg` would have, counted without allocating them (PyTorch's meta device)."""
    with torch.device("meta"):
        return count_parameters(SHARNN(cfg))
