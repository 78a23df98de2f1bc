"""What GPUs run, checked on the CPU: the conditions a GPU creates (cuDNN's flattened weights), the attention
kernels chosen per device, the static token step a CUDA graph replays, and the mixed-precision settings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import sharnn.model as model_mod
from sharnn.checkpoint import load_model, save_checkpoint
from sharnn.config import DEFAULT_COMPUTE, Compute, SHARNNConfig, TrainConfig
from sharnn.errors import SharnnError
from sharnn.evaluate import training_precision
from sharnn.generate import TokenStep, generate_ids
from sharnn.model import SHARNN, Attention
from sharnn.runtime import set_tf32, tf32_enabled
from sharnn.state import MemoryRing, visible_keys


def flatten_like_cudnn(model: SHARNN) -> None:
    """Make each LSTM/GRU's parameters views of one flat buffer, as `flatten_parameters` does on a GPU."""
    for block in model.blocks:
        params = list(block.rnn.parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for p in params:
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


@pytest.mark.parametrize("core", ["LSTM", "GRU"])
def test_checkpoint_saves_flattened_rnn_weights(tiny_config: SHARNNConfig, tmp_path: Path, core: str) -> None:
    torch.manual_seed(0)
    model = SHARNN(replace(tiny_config, model=core)).eval()
    flatten_like_cudnn(model)
    rnn = model.blocks[0].rnn
    assert all(p.untyped_storage().data_ptr() == rnn.weight_ih_l0.untyped_storage().data_ptr()
               for p in rnn.parameters())
    with pytest.raises(RuntimeError, match="None is covering the entire storage"):  # the crash GPUs had
        safetensors.torch.save_model(model, str(tmp_path / "plain.safetensors"))
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt").eval()
    x = torch.randint(0, 256, (9, 2))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    # The tied embedding and decoder are stored once, under the name safetensors' own save_model kept.
    names = safetensors.torch.load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert "decoder.weight" in names and "encoder.weight" not in names
    assert loaded.decoder.weight is loaded.encoder.weight


# --- attention: the two computations agree ---------------------------------------------------------------------


@pytest.mark.parametrize("window", ["sliding", "reference"])
@pytest.mark.parametrize("T,mem", [(6, 0), (5, 9), (4, 30), (1, 7), (1, 40)])
def test_plain_and_fused_attention_agree(tiny_config: SHARNNConfig, window: str, T: int, mem: int) -> None:
    torch.manual_seed(1)
    attn = Attention(replace(tiny_config, dropouth=0.0))
    with torch.no_grad():
        for p in (attn.qs, attn.ks, attn.vs):
            p.normal_()
    h = torch.randn(T, 2, 16, requires_grad=True)
    big = torch.randn(mem + T, 2, 16, requires_grad=True)
    visible = visible_keys(T, mem + T, mem, 12, window, h.device)
    results = {}
    for kernel in ("plain", "fused"):
        out = attn(h, big, visible, kernel)
        grads = torch.autograd.grad(out.square().sum(), (h, big, attn.q.weight))
        results[kernel] = (out, *grads)
    for a, b in zip(results["plain"], results["fused"]):
        assert torch.allclose(a, b, atol=1e-5)


def test_attention_takes_the_path_its_kernel_rule_picks(tiny_config: SHARNNConfig, monkeypatch) -> None:
    # The rule's numbers are measurements (fused_attention_wins' docstring, benchmarks/attention.py); what a test
    # can hold the code to is that forward follows the rule, asked about the dtype its products compute in.
    asked, taken = [], []
    fused, plain = model_mod.attend_fused, model_mod.attend
    monkeypatch.setattr(model_mod, "attend_fused", lambda *a: taken.append("fused") or fused(*a))
    monkeypatch.setattr(model_mod, "attend", lambda *a: taken.append("plain") or plain(*a))
    attn = Attention(replace(tiny_config, dropouth=0.0)).eval()
    h, keys = torch.randn(5, 2, 16), torch.randn(9, 2, 16)
    for verdict in (True, False):
        monkeypatch.setattr(model_mod, "fused_attention_wins",
                            lambda device, T, K, dtype, v=verdict: asked.append((T, K, dtype)) or v)
        attn(h, keys, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn(h, keys, None)
    assert taken == ["fused", "fused", "plain", "plain"]
    assert asked == [(5, 9, torch.float32), (5, 9, torch.bfloat16)] * 2  # under autocast: autocast's dtype
    attn(h, keys, None, "plain")  # a caller's choice (Compute.attention) overrides the rule
    attn(h, keys, None, "fused")
    assert taken[-2:] == ["plain", "fused"] and len(asked) == 4
    # ... and the model passes its Compute down to every attention block.
    model = SHARNN(replace(tiny_config, dropouth=0.0)).eval()
    model(torch.randint(0, 256, (5, 2)), compute=Compute(attention="fused"))
    assert taken[-1] == "fused" and len(asked) == 4


def test_attention_weights_are_what_forward_mixes(tiny_config: SHARNNConfig) -> None:
    torch.manual_seed(2)
    attn = Attention(replace(tiny_config, attn_span=6)).eval()
    with torch.no_grad():
        for p in (attn.qs, attn.ks, attn.vs):
            p.normal_()
    h, big = torch.randn(5, 2, 16), torch.randn(12, 2, 16)
    visible = visible_keys(5, 12, 7, 6, "sliding", h.device)
    w = attn.weights(h, big, visible)  # (B, T, K)
    assert w.shape == (2, 5, 12) and torch.allclose(w.sum(-1), torch.ones(2, 5))
    assert torch.equal(w[0] > 0, visible)
    v = attn.value_gate() * big
    assert torch.allclose(torch.einsum("btk,kbe->tbe", w, v), attn(h, big, visible), atol=1e-6)


# --- the static token step (what a CUDA graph replays) -----------------------------------------------------------


def test_token_step_is_static_and_equals_ordinary_steps(tiny_config: SHARNNConfig) -> None:
    torch.manual_seed(3)
    model = SHARNN(replace(tiny_config, attn_span=8)).eval()
    with torch.no_grad():
        start = model(torch.randint(0, 256, (5, 2))).state
        kept = [t.clone() for s in start for t in s.rnn]
        step = TokenStep(model, model.ring_state(start))
        addresses = [t.data_ptr() for t in step._buffers()]
        plain = start
        for t in torch.randint(0, 256, (20, 1, 2)):  # past the 8-slot ring's wrap, twice
            logits = step(t)
            ref = model(t, plain)
            plain = ref.state
            assert logits.shape == (2, 256) and torch.allclose(logits, ref.logits[-1], atol=1e-5)
            assert [b.data_ptr() for b in step._buffers()] == addresses  # written in place, never reallocated
        ring = step.state[1].memory
        assert isinstance(ring, MemoryRing) and int(ring.count) == 25
        assert torch.allclose(model.ordered_state(step.state)[1].memory, plain[1].memory, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(kept, [t for s in start for t in s.rnn]))  # caller's untouched


def test_generation_state_is_a_copy_of_the_steps(tiny_config: SHARNNConfig) -> None:
    # A yielded state is the step's buffers; ordered_state gives a copy the next step cannot change.
    model = SHARNN(tiny_config).eval()
    it = generate_ids(model, [1, 2, 3], 3, seed=0)
    _, state, _ = next(it)
    copy = model.ordered_state(state)
    before = [t.clone() for t in copy[0].rnn]
    next(it)
    assert all(torch.equal(a, b) for a, b in zip(before, copy[0].rnn))
    assert not all(torch.equal(a, b) for a, b in zip(before, state[0].rnn))


# --- mixed precision ------------------------------------------------------------------------------------------


def dtypes_under_bf16(model: SHARNN, x: torch.Tensor, compute: Compute = DEFAULT_COMPUTE) -> dict[str, torch.dtype]:
    seen: dict[str, torch.dtype] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: seen.setdefault(name, o.dtype) and None)
             for name, m in (("boom", model.blocks[1].ff), ("attention", model.blocks[1].attn),
                             ("decoder", model.decoder))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, compute=compute)
    for h in hooks:
        h.remove()
    seen["logits"] = out.logits.dtype
    return seen


def test_fp32_parts_compute_in_float32_under_autocast(tiny_config: SHARNNConfig) -> None:
    torch.manual_seed(4)
    model = SHARNN(tiny_config)
    x = torch.randint(0, 256, (7, 2))
    assert set(dtypes_under_bf16(model, x).values()) == {torch.bfloat16}
    seen = dtypes_under_bf16(model, x, Compute(fp32_parts={"boom", "decoder"}))
    assert seen["boom"] == seen["decoder"] == torch.float32 and seen["attention"] == torch.bfloat16
    assert dtypes_under_bf16(model, x, Compute(fp32_parts={"attention"}))["attention"] == torch.float32
    assert set(dtypes_under_bf16(model, x).values()) == {torch.bfloat16}  # a setting of the call, not the model
    with pytest.raises(ValueError, match="unknown parts"):
        Compute(fp32_parts={"lstm"})
    with pytest.raises(ValueError, match="unknown attention kernel"):
        Compute(attention="flash")


def test_cpu_without_bf16_lstm_keeps_the_core_in_fp32(tiny_config: SHARNNConfig, monkeypatch) -> None:
    # oneDNN's bf16 LSTM exists only on CPUs with native bf16: elsewhere the core runs in float32 and the rest
    # of the block in bf16, instead of failing ("could not create a primitive descriptor").
    monkeypatch.setattr(model_mod, "_cpu_bf16_lstm", lambda: False)
    model = SHARNN(tiny_config)
    seen = {}
    model.blocks[0].rnn.register_forward_hook(lambda m, i, o: seen.setdefault("core", o[0].dtype) and None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 256, (6, 2)), targets=torch.randint(0, 256, (6, 2)))
    out.loss.backward()
    assert seen["core"] == torch.float32 and out.logits.dtype == torch.bfloat16


def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch) -> None:
    cuda = torch.device("cuda")
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert training_precision(cuda, "auto") == expected
    assert training_precision(cuda, "fp16") == "fp16" and training_precision(torch.device("cpu"), "fp32") == "fp32"


def test_fp32_parts_setting() -> None:
    assert TrainConfig(precision="bf16", fp32_parts="core, decoder").fp32_part_set == {"core", "decoder"}
    with pytest.raises(SharnnError, match="choose from core, attention, boom, decoder"):
        TrainConfig(precision="bf16", fp32_parts="core,lstm")
    with pytest.raises(SharnnError, match="mixed precision"):
        TrainConfig(fp32_parts="core")


def test_set_tf32_sets_matmuls_and_cudnn() -> None:
    before = tf32_enabled()
    try:
        set_tf32(True)
        assert tf32_enabled()
        set_tf32(False)
        assert not tf32_enabled()
        cudnn = torch.backends.cudnn
        if hasattr(cudnn, "fp32_precision"):
            assert cudnn.fp32_precision == "ieee" and cudnn.rnn.fp32_precision == "ieee"
        else:
            assert not cudnn.allow_tf32
    finally:
        set_tf32(before)


def test_rnn_weights_stay_parameters_after_flattening(tiny_config: SHARNNConfig) -> None:
    # The training step still sees the same Parameter objects (the optimizer holds them) after flattening.
    model = SHARNN(tiny_config)
    ids = [id(p) for p in model.parameters()]
    flatten_like_cudnn(model)
    assert [id(p) for p in model.parameters()] == ids
    assert all(isinstance(p, nn.Parameter) for p in model.blocks[0].rnn.parameters())


def test_the_bf16_lstm_probe_leaves_the_random_streams_alone() -> None:
    # It builds a small LSTM once per process; drawing its weights from the run's stream would make the first run
    # in a process differ from the next with the same seed.
    model_mod._cpu_bf16_lstm.cache_clear()
    before = torch.get_rng_state()
    model_mod._cpu_bf16_lstm()
    assert torch.equal(torch.get_rng_state(), before)


def test_inference_commands_set_tf32_as_asked(tmp_path, capsys) -> None:
    from sharnn.cli import main

    cfg = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_span=24)
    save_checkpoint(tmp_path / "ckpt", SHARNN(cfg))
    before = tf32_enabled()
    try:
        for flag, want in (("--no-tf32", False), ("--tf32", True)):
            assert main(["generate", str(tmp_path / "ckpt"), "--length", "2", "--device", "cpu", flag]) == 0
            assert tf32_enabled() is want
    finally:
        set_tf32(before)
