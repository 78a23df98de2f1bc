"""The recurrent cores (`--model LSTM|GRU|QRNN`, `--qrnn-window`) and DropConnect (`--wdrop`)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, write_sentences
from safetensors.torch import load_file

from sharnn.checkpoint import load_model, load_train_state, save_checkpoint, state_from_list, state_to_list
from sharnn.cli import main
from sharnn.config import SHARNNConfig, TrainConfig
from sharnn.errors import SharnnError
from sharnn.generate import generate
from sharnn.model import QRNN, SHARNN, Block, forget_mult
from sharnn.state import detach_state
from sharnn.train import train

# (model, qrnn_window): every core, the QRNN with both windows
CORES = [("LSTM", 2), ("GRU", 2), ("QRNN", 2), ("QRNN", 1)]
CORE_IDS = ["LSTM", "GRU", "QRNN", "QRNN-w1"]
STATE_LEN = {"LSTM": 2, "GRU": 1}


def with_core(cfg: SHARNNConfig, core: tuple[str, int], **kw) -> SHARNNConfig:
    return replace(cfg, model=core[0], qrnn_window=core[1], **kw)


def forget_mult_loop(f: torch.Tensor, z: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """The recurrence as written in the paper, one step at a time."""
    c, out = c0[0], []
    for t in range(f.shape[0]):
        c = f[t] * c + (1 - f[t]) * z[t]
        out.append(c)
    return torch.stack(out)


# --- the QRNN's recurrence ----------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 50, 257])
def test_forget_mult_matches_plain_loop(T: int) -> None:
    g = torch.Generator().manual_seed(T)
    # Gates across the whole range, saturated ones included: sigmoid(8 * N(0, 1)) has many near 0 and 1.
    f = torch.sigmoid(8 * torch.randn(T, 2, 5, generator=g, dtype=torch.float64))
    f[0, 0, 0], f[-1, 1, 1] = 0.0, 1.0
    z = torch.randn(T, 2, 5, generator=g, dtype=torch.float64)
    c0 = torch.randn(1, 2, 5, generator=g, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (f, z, c0)]
    ref_args = [t.clone().requires_grad_() for t in (f, z, c0)]
    out, ref = forget_mult(*args), forget_mult_loop(*ref_args)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(T, 2, 5, generator=g, dtype=torch.float64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(args, ref_args):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_forget_mult_stable_with_tiny_gates() -> None:
    # In float32, products of gates like 1e-20 underflow after two steps; a formulation that divides by
    # cumulative products or takes their logarithm would give inf/nan here.
    T = 300
    g = torch.Generator().manual_seed(0)
    tiny = torch.rand(T, 3, 4, generator=g) < 0.5
    f = torch.where(tiny, torch.tensor(1e-20), torch.rand(T, 3, 4, generator=g))
    f.requires_grad_()
    z = torch.randn(T, 3, 4, generator=g, requires_grad=True)
    c0 = torch.randn(1, 3, 4, generator=g)
    out = forget_mult(f, z, c0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(f.grad).all() and torch.isfinite(z.grad).all()
    assert torch.allclose(out, forget_mult_loop(f, z, c0), atol=1e-5)


@pytest.mark.parametrize("window", [1, 2])
def test_qrnn_follows_its_equations(tiny_config: SHARNNConfig, window: int) -> None:
    torch.manual_seed(0)
    qrnn = QRNN(replace(tiny_config, model="QRNN", qrnn_window=window))
    x = torch.randn(6, 2, 16)
    state = (torch.randn(1, 2, 16), torch.randn(1, 2, 16))[:window]
    h, (c_last, *rest) = qrnn(x, state)
    W, b = qrnn.linear.weight, qrnn.linear.bias
    c, x_prev = state[0][0], state[-1][0]
    for t in range(6):
        inp = torch.cat([x[t], x_prev], -1) if window == 2 else x[t]
        z, f, o = (inp @ W.T + b).chunk(3, -1)
        c = torch.sigmoid(f) * c + (1 - torch.sigmoid(f)) * torch.tanh(z)
        assert torch.allclose(h[t], torch.sigmoid(o) * c, atol=1e-6)
        x_prev = x[t]
    assert torch.allclose(c_last[0], c, atol=1e-6)
    assert len(rest) == window - 1
    if window == 2:
        assert torch.equal(rest[0], x[-1:])  # the last input, for the next segment's convolution


# --- every core: state, memory, carry, causality, generation, checkpoints, resume -------------------------


@pytest.mark.parametrize("core", CORES, ids=CORE_IDS)
def test_state_layout_and_round_trips(tiny_config: SHARNNConfig, ids: torch.Tensor,
                                      core: tuple[str, int]) -> None:
    model = SHARNN(with_core(tiny_config, core)).train()
    n = STATE_LEN.get(core[0], core[1])
    assert all(len(s.rnn) == n for s in model.initial_state(3))
    state = model(ids[:10]).state
    assert all(len(s.rnn) == n and all(t.shape == (1, 3, 16) for t in s.rnn) for s in state)
    assert state[1].memory is not None and state[1].memory.shape == (10, 3, 16)  # attention block
    d = detach_state(state)
    assert not any(t.requires_grad for s in d for t in s.rnn)
    back = state_from_list(state_to_list(d))  # what train.py writes into train_state.pt and reads back
    assert all(torch.equal(a, b) for s, r in zip(d, back) for a, b in zip(s.rnn, r.rnn))


@pytest.mark.parametrize("core", CORES, ids=CORE_IDS)
def test_state_carry_matches_one_pass(tiny_config: SHARNNConfig, ids: torch.Tensor,
                                      core: tuple[str, int]) -> None:
    torch.manual_seed(0)
    model = SHARNN(with_core(tiny_config, core)).eval()
    whole = model(ids).logits
    state, outs, i = None, [], 0
    for n in (13, 1, 26):  # test_model.py tries more cuts and spans with the LSTM; here each core's own state
        out = model(ids[i : i + n], state)
        state, i = out.state, i + n
        outs.append(out.logits)
    assert torch.allclose(torch.cat(outs), whole, atol=1e-5)


@pytest.mark.parametrize("core", CORES, ids=CORE_IDS)
def test_causality(tiny_config: SHARNNConfig, ids: torch.Tensor, core: tuple[str, int]) -> None:
    torch.manual_seed(1)
    model = SHARNN(with_core(tiny_config, core)).eval()
    state = model(ids[:15]).state
    x = ids[15:35].clone()
    base = model(x, state).logits
    x[11] = (x[11] + 1) % 256
    changed = model(x, state).logits
    assert torch.equal(changed[:11], base[:11])
    assert not torch.allclose(changed[11:], base[11:])


@pytest.mark.parametrize("core", CORES, ids=CORE_IDS)
def test_generation_matches_one_pass(tiny_config: SHARNNConfig, core: tuple[str, int]) -> None:
    # Greedy generation runs one token at a time with the state carried; one pass over prompt + output must
    # pick the same next tokens.
    torch.manual_seed(2)
    model = SHARNN(with_core(tiny_config, core))
    prompt = b"the cat sat"
    g = generate(model, prompt, 12, temperature=0)
    ids = torch.tensor(list(prompt + g.data)).unsqueeze(1)
    logits = model.eval()(ids).logits[:, 0]
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == list(g.data) + [int(g.logits.argmax())]
    assert generate(model, prompt, 12, seed=5).data == generate(model, prompt, 12, seed=5).data


@pytest.mark.parametrize("core", CORES, ids=CORE_IDS)
def test_checkpoint_round_trip(tiny_config: SHARNNConfig, ids: torch.Tensor, tmp_path: Path,
                               core: tuple[str, int]) -> None:
    torch.manual_seed(3)
    model = SHARNN(with_core(tiny_config, core, wdrop=0.3)).eval()
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    names = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    if core[0] == "QRNN":
        assert loaded.blocks[0].rnn.linear.weight.shape == (48, 16 * core[1])  # [z, f, o] from the window
        assert {"blocks.0.rnn.linear.weight", "blocks.0.rnn.linear.bias"} <= names
    else:  # the reference checkpoint's names
        assert {f"blocks.0.rnn.{w}_{k}_l0" for w in ("weight", "bias") for k in ("ih", "hh")} <= names


def test_qrnn_keeps_pytorch_default_init() -> None:
    # Like the LSTM, the QRNN's weights are not drawn from the N(0, (0.1/sqrt(E))^2) of the other Linears.
    torch.manual_seed(0)
    model = SHARNN(SHARNNConfig(emsize=64, nhid=128, nlayers=1, attn_layers=(), model="QRNN"))
    w, b = model.blocks[0].rnn.linear.weight, model.blocks[0].rnn.linear.bias
    bound = 1 / (2 * 64) ** 0.5  # kaiming-uniform bound of nn.Linear for fan_in 2E
    assert w.abs().max() <= bound and w.std() > 0.5 * bound
    assert b.abs().max() <= bound and b.abs().sum() > 0
    assert abs(model.blocks[0].ff.linear1.weight.std().item() - 0.1 / 8) < 2e-3


MODEL = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24, dropoute=0.0)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "rep.txt"
    p.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 100)
    return p


@pytest.mark.parametrize("core,wdrop", [(("GRU", 2), 0.3), (("QRNN", 2), 0.3), (("LSTM", 2), 0.3)],
                         ids=["GRU", "QRNN", "LSTM-wdrop"])
def test_resume_is_exact(text_file: Path, tmp_path: Path, core: tuple[str, int], wdrop: float) -> None:
    # Carried state (h; c and x_last) and the RNG that draws the DropConnect masks come back on resume.
    model_cfg = with_core(MODEL, core, wdrop=wdrop)

    def cfg(run: Path, steps: int, **kw) -> TrainConfig:
        return TrainConfig(data=str(text_file), batch_size=4, bptt=16, lr=2e-2, warmup=5, save=str(run),
                           max_steps=steps, max_eval_bytes=400, log_interval=1000, **kw)

    train(model_cfg, cfg(tmp_path / "straight", 7), quiet=True)
    train(model_cfg, cfg(tmp_path / "split", 4), quiet=True)
    saved = load_train_state(tmp_path / "split" / "last")
    assert saved["step"] == 4 and len(saved["carried"][0]["rnn"]) == STATE_LEN.get(core[0], core[1])
    res = train(model_cfg, cfg(tmp_path / "split", 7, resume=str(tmp_path / "split")), quiet=True)
    assert res.steps == 7
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- DropConnect (--wdrop) ---------------------------------------------------------------------------------


def core_block(model: str, wdrop: float) -> Block:
    torch.manual_seed(0)
    return Block(SHARNNConfig(emsize=16, nhid=32, nlayers=1, attn_layers=(), model=model, wdrop=wdrop), False)


@pytest.mark.parametrize("model", ["LSTM", "GRU", "QRNN"])
def test_wdrop_is_dropconnect_on_the_right_weights(model: str) -> None:
    block = core_block(model, 0.5).train()
    x = torch.randn(7, 2, 16)
    state = tuple(torch.randn(1, 2, 16) for _ in range(block.rnn_state_len))
    torch.manual_seed(9)
    y, new = block.run_rnn(x, state)
    # The same mask again (the core's first random draw), applied by hand to a plain copy of the core.
    name = "linear.weight" if model == "QRNN" else "weight_hh_l0"
    torch.manual_seed(9)
    masked = F.dropout(block.rnn.get_parameter(name).detach(), 0.5)
    assert 0.3 < (masked == 0).float().mean() < 0.7
    plain = core_block(model, 0.0).eval()
    plain.load_state_dict(block.state_dict())
    with torch.no_grad():
        plain.rnn.get_parameter(name).copy_(masked)
    y_ref, new_ref = plain.run_rnn(x, state)
    assert torch.allclose(y, y_ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(new, new_ref))
    # The parameter itself is never masked (so checkpoints never hold a mask); eval applies no mask.
    assert (block.rnn.get_parameter(name) != 0).all()
    block.eval()
    plain.load_state_dict(block.state_dict())
    assert torch.equal(block.run_rnn(x, state)[0], plain.run_rnn(x, state)[0])


@pytest.mark.parametrize("model", ["LSTM", "GRU", "QRNN"])
def test_wdrop_fresh_mask_and_gradients(model: str) -> None:
    block = core_block(model, 0.5).train()
    x = torch.randn(7, 2, 16)
    state = tuple(torch.zeros(1, 2, 16) for _ in range(block.rnn_state_len))
    y1, _ = block.run_rnn(x, state)
    y2, _ = block.run_rnn(x, state)
    assert not torch.allclose(y1, y2)  # a new mask per call (per training batch)
    y2.sum().backward()
    name = "linear.weight" if model == "QRNN" else "weight_hh_l0"
    grad = block.rnn.get_parameter(name).grad
    assert grad is not None and 0.3 < (grad == 0).float().mean() < 0.7  # dropped weights get no gradient


@pytest.mark.parametrize("model", ["LSTM", "GRU"])
def test_dropconnect_weights_are_one_buffer(tiny_config: SHARNNConfig, model: str) -> None:
    # cuDNN takes an RNN's weights without repacking (and without its "not part of single contiguous chunk of
    # memory" warning) only as consecutive views of one buffer in the parameters' order.
    block = SHARNN(replace(tiny_config, model=model, wdrop=0.5)).train().blocks[0]
    ws = block._dropconnect_weights()
    params = list(block.rnn.parameters())
    storage = ws[0].untyped_storage().data_ptr()
    offset = 0
    for w, p in zip(ws, params, strict=True):
        assert w.shape == p.shape and w.is_contiguous() and w.untyped_storage().data_ptr() == storage
        assert w.storage_offset() == offset
        offset += p.numel()
    assert torch.equal(ws[0], params[0]) and not torch.equal(ws[1], params[1])  # only weight_hh_l0 is masked


# --- flags and settings ------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentences(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def baselines() -> dict[tuple[str, ...], dict[str, torch.Tensor]]:
    return {}  # weights of the runs without the flag, by the base flags, shared across the cases


def run_cli(corpus: Path, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert main(["train", "--data", str(corpus), "--save", str(out), *TINY, *flags]) == 0
    json.loads(buf.getvalue())
    return load_file(str(out / "last" / "model.safetensors"))


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("base,flags", [
    ([], ["--model", "GRU"]),
    ([], ["--model", "QRNN"]),
    ([], ["--wdrop", "0.5"]),
    (["--model", "GRU"], ["--wdrop", "0.5"]),
    (["--model", "QRNN"], ["--wdrop", "0.5"]),
    (["--model", "QRNN"], ["--qrnn-window", "1"]),
])
def test_flag_changes_training(corpus: Path, tmp_path: Path, baselines: dict, base: list[str],
                               flags: list[str]) -> None:
    if tuple(base) not in baselines:
        baselines[tuple(base)] = run_cli(corpus, tmp_path / "base", *base)
    before = baselines[tuple(base)]
    after = run_cli(corpus, tmp_path / "flag", *base, *flags)
    assert differs(before, after), f"{flags} left the weights unchanged"
    if "--wdrop" in flags:  # same parameters, none of them saved masked
        assert before.keys() == after.keys()
        assert all((w != 0).all() for k, w in after.items() if "rnn" in k and "weight" in k)


def test_core_settings_are_checked() -> None:
    cfg = SHARNNConfig(model="QRNN", qrnn_window=1, wdrop=0.2)
    assert SHARNNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SharnnError, match="unknown --model"):
        SHARNNConfig(model="RNN_TANH")
    with pytest.raises(SharnnError, match="--wdrop must be in"):
        SHARNNConfig(wdrop=1.0)
    with pytest.raises(SharnnError, match="--wdrop must be in"):
        SHARNNConfig(wdrop=-0.1)
    with pytest.raises(SharnnError, match="--qrnn-window must be 1 or 2"):
        SHARNNConfig(model="QRNN", qrnn_window=3)
