"""The network's contracts: causality, state carry, attention window, parameter count, init."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sharnn.config import SHARNNConfig
from sharnn.errors import SharnnError
from sharnn.model import SHARNN, Attention, Boom, count_parameters, gelu
from sharnn.state import detach_state, extend_rows, visible_keys


def run_in_segments(model: SHARNN, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, outs, i = None, [], 0
    for n in sizes:
        out = model(x[i : i + n], state)
        state, i = out.state, i + n
        outs.append(out.logits)
    return torch.cat(outs)


@pytest.mark.parametrize("span", [1000, 24, 7, 1])
def test_state_carry_matches_one_pass(tiny_config: SHARNNConfig, ids: torch.Tensor, span: int) -> None:
    # span 1000: nothing trimmed; 24 and 7: memory trimmed at the span limit; 1: attention sees only itself.
    torch.manual_seed(0)
    model = SHARNN(replace(tiny_config, attn_span=span)).eval()
    whole = model(ids).logits
    for sizes in ([20, 20], [13, 1, 26], [5] * 8):
        assert torch.allclose(run_in_segments(model, ids, sizes), whole, atol=1e-5), sizes


def test_memory_never_exceeds_span(tiny_config: SHARNNConfig, ids: torch.Tensor) -> None:
    model = SHARNN(tiny_config).eval()
    state = None
    for chunk in ids.split(9):
        state = model(chunk, state).state
        assert state[1].memory.shape[0] <= tiny_config.attn_span - 1
        assert state[0].memory is None  # block 0 has no attention
    assert state[1].memory.shape[0] == tiny_config.attn_span - 1


@pytest.mark.parametrize("with_memory", [False, True])
def test_causality(tiny_config: SHARNNConfig, ids: torch.Tensor, with_memory: bool) -> None:
    torch.manual_seed(1)
    model = SHARNN(tiny_config).eval()
    state = model(ids[:15]).state if with_memory else None
    x = ids[15:35].clone()
    base = model(x, state).logits
    t = 11
    x[t] = (x[t] + 1) % 256
    changed = model(x, state).logits
    assert torch.equal(changed[:t], base[:t])
    assert not torch.allclose(changed[t:], base[t:])


def test_attention_window_limits_what_a_query_sees(tiny_config: SHARNNConfig) -> None:
    # With span M, the output at position t must not depend on inputs to the attention older than t-M+1.
    torch.manual_seed(2)
    cfg = replace(tiny_config, attn_span=4)
    attn = Attention(cfg).eval()
    h = torch.randn(10, 2, 16)
    big = torch.randn(10, 2, 16)
    seen = extend_rows(big[:0], big, cfg.attn_span, "sliding")  # the memory's rule: which keys each query sees
    out = attn(h, seen.keys, seen.visible)
    big2 = big.clone()
    big2[0] += 5.0  # only visible to queries 0..3
    out2 = attn(h, big2, seen.visible)
    assert torch.equal(out[4:], out2[4:])
    assert not torch.allclose(out[:4], out2[:4])


@pytest.mark.parametrize("T,mem", [(5, 3), (1, 7)])  # a segment (SDPA), a single query (the batched-bmm path)
def test_attention_matches_hand_computation(tiny_config: SHARNNConfig, T: int, mem: int) -> None:
    torch.manual_seed(3)
    attn = Attention(tiny_config).eval()
    with torch.no_grad():
        attn.qs.normal_()
        attn.ks.normal_()
        attn.vs.normal_()
    h, big = torch.randn(T, 2, 16), torch.randn(mem + T, 2, 16)
    out = attn(h, big, visible_keys(T, mem + T, mem, tiny_config.attn_span, "sliding", h.device))
    q = torch.sigmoid(attn.qs) * attn.qln(attn.q(h))
    k = torch.sigmoid(attn.ks) * big
    v = attn.vq(torch.sigmoid(attn.vs)) * big
    mask = torch.ones(T, mem + T, dtype=torch.bool).tril(diagonal=mem)  # memory all visible, causal on the segment
    for b in range(2):
        scores = q[:, b] @ k[:, b].T / math.sqrt(16)  # (T, mem + T)
        w = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        assert torch.allclose(out[:, b], w @ v[:, b], atol=1e-6)


def test_boom_overparam_gelu() -> None:
    cfg = SHARNNConfig(emsize=4, nhid=12, nlayers=1, attn_layers=())
    boom = Boom(cfg).eval()
    x = torch.randn(3, 2, 4)
    u = gelu(boom.linear1(x))
    assert torch.allclose(boom(x), u[..., :4] + u[..., 4:8] + u[..., 8:])
    assert torch.allclose(gelu(torch.tensor(1.0)), torch.sigmoid(torch.tensor(1.702)))
    # Overparam's formula is held to the original code's outputs by tests/test_reference_golden.py (its value
    # gate runs through it), not restated here.


@pytest.mark.parametrize("vocab,attn,expected", [
    (205, (2,), 53_773_517),          # SHA-RNN.md: about 53.8M
    (205, (0, 1, 2, 3), 63_247_565),  # about 63.3M with attention in every block
    (256, (2,), 53_825_792),          # our byte vocabulary
])
def test_paper_parameter_count(vocab: int, attn: tuple[int, ...], expected: int) -> None:
    with torch.device("meta"):
        model = SHARNN(SHARNNConfig(vocab_size=vocab, attn_layers=attn))
    assert count_parameters(model) == expected
    assert [b.attn is not None for b in model.blocks] == [i in attn for i in range(4)]


def test_init_and_tying(tiny_config: SHARNNConfig) -> None:
    torch.manual_seed(0)
    model = SHARNN(SHARNNConfig(emsize=64, nhid=128, nlayers=2, attn_layers=(1,)))
    assert model.decoder.weight is model.encoder.weight
    assert abs(model.encoder.weight.std().item() - 0.1 / 8) < 2e-3
    assert torch.all(model.blocks[0].ff.linear1.bias == 0)
    assert torch.all(model.blocks[1].lnmem.weight == 1) and torch.all(model.blocks[1].attn.qs == 0)
    untied = SHARNN(replace(tiny_config, tied=False))
    assert untied.decoder.weight is not untied.encoder.weight
    assert count_parameters(untied) == count_parameters(SHARNN(tiny_config)) + 256 * 16


def test_loss_is_mean_cross_entropy(tiny_config: SHARNNConfig, ids: torch.Tensor) -> None:
    model = SHARNN(tiny_config).eval()
    out = model(ids[:-1], targets=ids[1:])
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 256), ids[1:].reshape(-1))
    assert torch.allclose(out.loss, ref)
    assert out.hidden.shape == out.dropped.shape == (39, 3, 16)


def test_forward_does_not_mutate_state(tiny_config: SHARNNConfig, ids: torch.Tensor) -> None:
    model = SHARNN(tiny_config).eval()
    state = model(ids[:10]).state
    snapshot = [t.clone() for s in state for t in (*s.rnn, *([s.memory] if s.memory is not None else []))]
    model(ids[10:20], state)
    after = [t for s in state for t in (*s.rnn, *([s.memory] if s.memory is not None else []))]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


def test_detach_state_cuts_graph(tiny_config: SHARNNConfig, ids: torch.Tensor) -> None:
    model = SHARNN(tiny_config).train()
    state = model(ids[:10]).state
    assert state[1].memory.requires_grad
    d = detach_state(state)
    assert not d[1].memory.requires_grad and not d[0].rnn[0].requires_grad
    assert torch.equal(d[1].memory, state[1].memory)


def test_dropoute_drops_whole_tokens(tiny_config: SHARNNConfig) -> None:
    torch.manual_seed(0)
    model = SHARNN(replace(tiny_config, dropoute=0.5, dropouti=0.0)).train()
    x = torch.arange(256).repeat(2, 1).T.contiguous()  # (256, 2): every token twice, in both streams
    e = model.embed(x)
    zero_rows = (e.abs().sum(-1) == 0)  # (256, 2)
    assert torch.equal(zero_rows[:, 0], zero_rows[:, 1])  # a dropped token is dropped everywhere
    assert 60 < zero_rows[:, 0].sum() < 196
    kept = ~zero_rows[:, 0]
    assert torch.allclose(e[kept, 0], 2 * model.encoder.weight[kept])  # the rest rescaled by 1/(1-p)
    model.eval()
    assert torch.equal(model.embed(x)[:, 0], model.encoder.weight)


def test_config_errors_and_round_trip(tiny_config: SHARNNConfig) -> None:
    assert SHARNNConfig.from_dict(tiny_config.to_dict()) == tiny_config
    with pytest.raises(SharnnError, match="multiple of emsize"):
        SHARNNConfig(emsize=16, nhid=40)
    with pytest.raises(SharnnError, match="unknown SHARNNConfig keys"):
        SHARNNConfig.from_dict({"emsize": 16, "bogus": 1})
    with pytest.raises(SharnnError, match="out of range"):
        SHARNNConfig(nlayers=2, attn_layers=(2,))
    with pytest.raises(SharnnError, match="unknown --model"):
        SHARNNConfig(model="Transformer")


@pytest.mark.parametrize("nlayers,expected", [(1, ()), (2, (0,)), (3, (1,)), (4, (2,)), (6, (4,))])
def test_attention_defaults_to_the_second_to_last_block(nlayers: int, expected: tuple[int, ...]) -> None:
    # The original: `use_attn = idx == num_layers - 2`, so no attention block at all when there is one block.
    cfg = SHARNNConfig(emsize=4, nhid=8, nlayers=nlayers)
    assert cfg.attn_layers == expected  # resolved at construction: what config.json stores is explicit
    assert cfg.to_dict()["attn_layers"] == list(expected)
    assert SHARNNConfig.from_dict(cfg.to_dict() | {"attn_layers": None}) == cfg  # JSON null: the default
    model = SHARNN(cfg)
    assert [i for i, b in enumerate(model.blocks) if b.attn is not None] == list(expected)
    # An explicit list (--attn-layers, a preset, an older checkpoint) is kept as it is.
    assert SHARNNConfig(emsize=4, nhid=8, nlayers=6, attn_layers=(0, 5)).attn_layers == (0, 5)
    assert SHARNNConfig.from_dict({"nlayers": 4, "attn_layers": [1]}).attn_layers == (1,)
    with pytest.raises(SharnnError, match="list of whole numbers"):  # "none" is not read as "no attention"
        SHARNNConfig.from_dict({"nlayers": 4, "attn_layers": "none"})


def test_regularisers_are_off_by_default_as_in_the_original() -> None:
    # The original's argparse lists --alpha 2 --beta 1 --dropoute 0.1, but its loop never applies them.
    from sharnn.config import TrainConfig
    from sharnn.train import ar_tar

    assert SHARNNConfig().dropoute == 0.0
    model = SHARNN(SHARNNConfig(emsize=16, nhid=32, nlayers=2)).train()
    x = torch.randint(0, 256, (7, 3))
    assert torch.equal(model.embed(x), model.encoder.weight[x])  # no embedding rows dropped in training
    out = model(x, targets=x)
    assert ar_tar(out, TrainConfig()) == 0.0
    assert float(ar_tar(out, TrainConfig(alpha=2.0, beta=1.0)).detach()) > 0.0  # the flags still act when set


@pytest.mark.parametrize("mem_len,T", [(0, 6), (5, 4), (11, 1), (30, 3)])
def test_folded_gates_equal_plain_attention(tiny_config: SHARNNConfig, monkeypatch, mem_len: int, T: int) -> None:
    # The fast path (gates folded into the query and the output, no mask for a single query) must give the
    # plain formula's numbers.
    torch.manual_seed(4)
    attn = Attention(replace(tiny_config, attn_span=12)).eval()
    with torch.no_grad():
        attn.qs.normal_()
        attn.ks.normal_()
        attn.vs.normal_()
    h, big = torch.randn(T, 2, 16), torch.randn(mem_len + T, 2, 16)
    visible = visible_keys(T, mem_len + T, mem_len, 12, "sliding", h.device)
    fast = attn(h, big, visible)
    monkeypatch.setattr(Attention, "folds_gates", property(lambda self: False))
    plain = attn(h, big, visible)
    assert torch.allclose(fast, plain, atol=1e-6)


def test_autocast_keeps_residual_stream_and_state_in_fp32(tiny_config: SHARNNConfig, ids: torch.Tensor) -> None:
    # Mixed precision: matmuls in bf16, but what is carried (the residual stream from block to block, the RNN
    # state and memory from segment to segment) stays fp32, so rounding does not pile up.
    model = SHARNN(tiny_config).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids[:-1], targets=ids[1:])
        again = model(ids[:5], out.state)
    for o in (out, again):
        assert o.hidden.dtype == torch.float32
        assert all(t.dtype == torch.float32 for s in o.state for t in s.rnn)
        assert o.state[1].memory.dtype == torch.float32
    out.loss.backward()
    assert model.encoder.weight.grad is not None and model.encoder.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("window", ["sliding", "reference"])
@pytest.mark.parametrize("core", ["LSTM", "QRNN"])
def test_ring_segments_equal_ordinary_memory(tiny_config: SHARNNConfig, window: str, core: str) -> None:
    # The memory's two implementations: segments over a ring (what ONNX export runs) attend over the slots as they
    # lie and write into them, shapes independent of the count; the numbers are ordinary memory's, for any cuts
    # (also longer than the span, and before and after the ring wraps), under both window rules.
    torch.manual_seed(0)
    model = SHARNN(replace(tiny_config, attn_span=12, model=core, attn_window=window)).eval()
    x = torch.randint(0, 256, (80, 2))
    plain, ring, pos = None, model.ring_state(model.initial_state(2)), 0
    with torch.no_grad():
        for n in [5, 1, 1, 3, 7, 1, 20, 4, 1, 1, 9, 27]:
            a, b = model(x[pos : pos + n], plain), model(x[pos : pos + n], ring)
            assert torch.allclose(a.logits, b.logits, atol=1e-5), (pos, n)
            plain, ring, pos = a.state, b.state, pos + n
            assert b.state[1].memory.rows.shape == (12, 2, 16) and int(b.state[1].memory.count) == pos
    assert torch.allclose(model.ordered_state(ring)[1].memory, plain[1].memory, atol=1e-5)
