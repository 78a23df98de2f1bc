"""ONNX export: onnxruntime streams tokens through the exported step and segment models, state carried from one
to the other, with PyTorch's log-probabilities (within 1e-4), for every core and a collapsed value gate."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sharnn.checkpoint import save_checkpoint
from sharnn.cli import main
from sharnn.config import SHARNNConfig
from sharnn.export import CHECK_TOLERANCE, check_cuts, segment_path, state_names, stream
from sharnn.model import SHARNN

pytestmark = pytest.mark.slow  # every test here runs the ONNX exporter: seconds each

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'sharnn[onnx]'")
pytest.importorskip("onnxscript", reason="onnxscript is not installed: pip install 'sharnn[onnx]'")

CONFIG = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)


def scrambled(cfg: SHARNNConfig, seed: int = 0) -> SHARNN:
    """A model whose gates and attention are far from their initial values: peaked, order-dependent weights."""
    torch.manual_seed(seed)
    model = SHARNN(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def torch_logprobs(model: SHARNN, ids: torch.Tensor, cuts: list[int]) -> np.ndarray:
    """PyTorch's log-probabilities over `ids` (L, B) with ordinary memory, cut as given, state carried."""
    out, state, pos = [], None, 0
    with torch.no_grad():
        for n in cuts:
            o = model(ids[pos : pos + n], state)
            out.append(o.logits.log_softmax(-1))
            state, pos = o.state, pos + n
    return torch.cat(out).numpy()


# One block (with attention) keeps the export quick; the LSTM model has two, as the tiny fixture does.
ONE_BLOCK = replace(CONFIG, nlayers=1, attn_layers=(0,))
VARIANTS = {  # the GRU's checkpoint is stored collapsed, with the original code's window rule for segments
    "LSTM": CONFIG,
    "GRU collapsed, reference window": replace(ONE_BLOCK, model="GRU", attn_window="reference"),
    "QRNN": replace(ONE_BLOCK, model="QRNN"),
}
STATE = {  # the inputs after `tokens`, and their shapes
    "LSTM": {"block0.h": [1, "batch", 16], "block0.c": [1, "batch", 16], "block1.h": [1, "batch", 16],
             "block1.c": [1, "batch", 16], "block1.memory": [24, "batch", 16], "block1.count": []},
    "GRU collapsed, reference window": {"block0.h": [1, "batch", 16], "block0.memory": [24, "batch", 16],
                                        "block0.count": []},
    "QRNN": {"block0.c": [1, "batch", 16], "block0.x": [1, "batch", 16], "block0.memory": [24, "batch", 16],
             "block0.count": []},
}


# The LSTM variant runs in the full suite; the GRU and QRNN exports (~7 s each) with the long tests (.ci/run runs
# them after the suite), to keep the suite near its 3 minutes.
@pytest.mark.parametrize("variant", [v if v == "LSTM" else pytest.param(v, marks=pytest.mark.long) for v in VARIANTS])
def test_onnxruntime_streams_like_pytorch(variant: str, tmp_path: Path, capsys) -> None:
    model = scrambled(VARIANTS[variant])
    if "collapsed" in variant:
        model = model.collapse()
        assert model.cfg.collapsed_gate
    save_checkpoint(tmp_path / "ckpt", model)
    out = tmp_path / "model.onnx"
    check = ["--check-bytes", "0"] if "GRU" in variant else []  # the command's own check, or none
    assert main(["export", str(tmp_path / "ckpt"), str(out), "--segment", "8", *check]) == 0
    printed = capsys.readouterr().out
    assert ("matches PyTorch over 300 tokens" in printed) == (not check)
    paths = [out, segment_path(out, 8)]
    assert paths[1].name == "model.segment8.onnx" and all(p.stat().st_size > 0 for p in paths)

    sessions = {n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for n, p in zip((1, 8), paths)}
    names = state_names(model)
    for n, s in sessions.items():
        assert (s.get_inputs()[0].name, s.get_inputs()[0].shape) == ("tokens", [n, "batch"])
        assert [i.name for i in s.get_inputs()[1:]] == names
        assert [o.name for o in s.get_outputs()] == ["logprobs", *(f"next.{n}" for n in names)]
        meta = s.get_modelmeta().custom_metadata_map
        assert meta["sharnn.tokens_per_call"] == str(n) and meta["sharnn.vocab"] == '{"type": "bytes"}'
        assert f'"model": "{model.cfg.model}"' in meta["sharnn.config"]
        if variant in STATE:
            assert {i.name: i.shape for i in s.get_inputs()[1:]} == STATE[variant]
    # 300 tokens through the 24-row memory (it wraps a dozen times), 3 streams (the export example had 2),
    # segments and steps alternating: the state goes from each model to the other.
    ids = torch.randint(0, 256, (300, 3), generator=torch.Generator().manual_seed(1))
    cuts = check_cuts(300, 8)
    assert 8 in cuts and cuts.count(1) > 100
    got = stream(sessions, ids.numpy(), cuts)
    want = torch_logprobs(model, ids, cuts)
    assert got.shape == want.shape == (300, 3, 256)
    assert np.abs(got - want).max() < CHECK_TOLERANCE
    assert np.abs(want - want[:, :1]).max() > 0.1  # the streams differ: a batch mix-up would show


def test_export_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    save_checkpoint(tmp_path / "ckpt", SHARNN(CONFIG))
    cases = {
        ("--segment", "1"): "--segment must be at least 2",
        ("--check-bytes", "-1"): "--check-bytes must be at least 0",
    }
    for flags, message in cases.items():
        assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "m.onnx"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "none" / "m.onnx")]) == 2
    assert "folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == "sharnn: error: this needs onnxscript, which is not installed: pip install 'sharnn[onnx]'\n"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == ("sharnn: error: this needs onnxruntime, which is not installed: "
                                       "pip install 'sharnn[onnx]' (or pass --check-bytes 0)\n")
    assert not (tmp_path / "m.onnx").exists()


def test_check_cuts_hand_the_state_both_ways() -> None:
    assert check_cuts(20, 8) == [8] + [1] * 7 + [1] * 5  # the last 5 cannot fill a segment
    assert check_cuts(40, 8) == [8] + [1] * 7 + [8] + [1] * 7 + [8] + [1] * 2
    assert check_cuts(5, None) == [1] * 5
