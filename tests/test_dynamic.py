"""Dynamic evaluation: scores depend only on the past, lr 0 is static evaluation, the weights come back."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_sentences

from sharnn.checkpoint import save_checkpoint
from sharnn.cli import main
from sharnn.config import SHARNNConfig, TrainConfig
from sharnn.dynamic import (
    DynamicConfig,
    DynamicEval,
    dynamic_evaluate,
    dynamic_score_stream,
    dynamic_search,
    gradient_stats,
    search_grid,
)
from sharnn.errors import SharnnError
from sharnn.evaluate import evaluate
from sharnn.model import SHARNN
from sharnn.score import score_stream
from sharnn.vocab import BYTES

TEXT = np.frombuffer(b"Colourless green ideas sleep furiously; the cat sat on the mat. " * 30, dtype=np.uint8)


@pytest.fixture
def model(tiny_config: SHARNNConfig) -> SHARNN:
    torch.manual_seed(0)
    return SHARNN(tiny_config).eval()


@pytest.fixture
def rms(model: SHARNN) -> list[torch.Tensor]:
    return gradient_stats(model, TEXT, 3, 16, 2000)


def weights(model: SHARNN) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_zero_is_static_evaluation_exactly(model: SHARNN, rms: list[torch.Tensor]) -> None:
    static = evaluate(model, TEXT, 3, 16)
    dyn = dynamic_evaluate(model, TEXT, 3, DynamicConfig(lr=0.0, decay=0.5, bptt=16), rms)
    assert dyn.loss == static.loss and dyn.segment_losses == static.segment_losses
    assert dyn.predictions == static.predictions


def sharpen_attention(model: SHARNN) -> SHARNN:
    """Larger attention weights, so that what a query sees (the window) shows in the loss."""
    with torch.no_grad():
        attn = model.blocks[1].attn
        attn.vs.normal_()
        attn.qs.normal_()
        for p in attn.parameters():
            p.mul_(3)
    return model


@pytest.mark.parametrize("window", ["sliding", "reference"])
def test_lr_zero_is_static_evaluation_under_both_windows(model: SHARNN, window: str) -> None:
    # Static evaluation walks segments of 16; dynamic evaluation takes a step every 4 tokens. It walks the same
    # segments, in pieces, each seeing what one pass over its segment shows it: under the reference window (whose
    # outputs depend on the cut) too, so lr 0 gives the static number up to float rounding.
    sharpen_attention(model).set_attn_window(window)
    rms = gradient_stats(model, TEXT, 3, 4, 2000)
    static = evaluate(model, TEXT, 3, 16)
    dyn = dynamic_evaluate(model, TEXT, 3, DynamicConfig(lr=0.0, decay=0.5, bptt=4), rms, bptt=16)
    assert dyn.predictions == static.predictions and len(dyn.segment_losses) == len(static.segment_losses)
    assert dyn.loss == pytest.approx(static.loss, rel=1e-6, abs=0)
    assert dyn.segment_losses == pytest.approx(static.segment_losses, rel=1e-5, abs=0)
    cut = evaluate(model, TEXT, 3, 4).loss - static.loss  # what walking in segments of 4 would have measured
    if window == "reference":
        assert abs(cut) > 50 * abs(dyn.loss - static.loss) and abs(cut) > 1e-5
    else:
        assert abs(cut) < 1e-6
    learn = dynamic_evaluate(model, TEXT, 3, DynamicConfig(lr=3e-4, decay=0.0, bptt=4), rms, bptt=16)
    assert learn.segment_losses[0] != pytest.approx(static.segment_losses[0], rel=1e-6)  # steps inside a segment


def test_a_segment_longer_than_the_span_under_the_reference_window_is_refused(model: SHARNN) -> None:
    model.set_attn_window("reference")  # span 24: a query of a 32-token segment sees up to 55 positions
    rms = gradient_stats(model, TEXT, 3, 8, 500)
    with pytest.raises(SharnnError, match="--bptt 24 or less, --dynamic-bptt 32, or --attn-window sliding"):
        dynamic_evaluate(model, TEXT, 3, DynamicConfig(lr=0.0, bptt=8), rms, bptt=32)
    assert dynamic_evaluate(model, TEXT, 3, DynamicConfig(lr=0.0, bptt=32), rms, bptt=32).loss == \
        evaluate(model, TEXT, 3, 32).loss  # whole segments: exactly
    with pytest.raises(SharnnError, match="--attn-window sliding"):
        dynamic_score_stream(model, BYTES, io.BytesIO(TEXT[:100].tobytes()), DynamicConfig(bptt=8), rms)


@pytest.mark.parametrize("window", ["sliding", "reference"])
def test_document_lr_zero_is_the_static_score_under_both_windows(tiny_config: SHARNNConfig, window: str) -> None:
    # `score --document` reads segments of 1024 tokens; `--dynamic` steps every 32 inside them, from the memory one
    # pass would see (a span of 1100 > 1024: the reference window's segments can be reproduced).
    torch.manual_seed(1)
    m = sharpen_attention(SHARNN(replace(tiny_config, attn_span=1100, attn_window=window)).eval())
    doc = TEXT.tobytes()[:2500]
    rms = gradient_stats(m, TEXT, 1, 32, 200)
    static = score_stream(m, BYTES, io.BytesIO(doc))
    zero = dynamic_score_stream(m, BYTES, io.BytesIO(doc), DynamicConfig(lr=0.0, bptt=32), rms)
    assert zero.tokens == static.tokens and abs(zero.logprob - static.logprob) < 1e-4  # nats, over 2,500 bytes
    cut = score_stream(m, BYTES, io.BytesIO(doc), chunk=32).logprob - static.logprob
    assert (abs(cut) > 1e-3) == (window == "reference")  # the cut matters to the reference window only


def test_learning_helps_on_repetitive_text_and_weights_come_back(model: SHARNN, rms: list[torch.Tensor]) -> None:
    before = weights(model)
    static = evaluate(model, TEXT, 3, 16)
    dyn = dynamic_evaluate(model, TEXT, 3, DynamicConfig(lr=3e-4, decay=0.001, bptt=16), rms)
    assert dyn.loss < static.loss - 0.05  # the text repeats: learning from it must pay
    assert dyn.segment_losses[0] == static.segment_losses[0]  # nothing learned before the first segment is scored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_come_back_after_an_error(model: SHARNN, rms: list[torch.Tensor]) -> None:
    before = weights(model)
    dyn = DynamicEval(model, DynamicConfig(lr=1e-2), rms)
    with pytest.raises(RuntimeError), dyn:
        out = model(torch.from_numpy(TEXT[:33].astype(np.int64)).view(-1, 1)[:-1],
                    targets=torch.from_numpy(TEXT[1:33].astype(np.int64)).view(-1, 1))
        dyn.learn(out.loss)
        assert not torch.equal(model.encoder.weight, before["encoder.weight"])
        raise RuntimeError("interrupted")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_segment_score_depends_only_on_earlier_segments(model: SHARNN, rms: list[torch.Tensor]) -> None:
    B, T, k = 3, 16, 4
    cfg = DynamicConfig(lr=3e-4, decay=0.01, bptt=T)
    a = dynamic_evaluate(model, TEXT, B, cfg, rms)
    changed = TEXT.copy().reshape(B, -1)
    changed[:, k * T + 1 :] = np.random.default_rng(0).integers(0, 256, changed[:, k * T + 1 :].shape)  # targets of
    b = dynamic_evaluate(model, changed.reshape(-1), B, cfg, rms)  # segment k onward
    assert a.segment_losses[:k] == b.segment_losses[:k]
    assert a.segment_losses[k] != b.segment_losses[k]


def test_document_tokens_depend_only_on_the_past(model: SHARNN, rms: list[torch.Tensor]) -> None:
    # Change one byte in the middle of a segment: every byte before it, in its own segment too, scores the same.
    # (Learning from a segment before scoring it would change them.)
    cfg = DynamicConfig(lr=3e-4, decay=0.01, bptt=16)
    text = TEXT[:400].tobytes()
    p = 16 * 10 + 7
    changed = text[:p] + b"#" + text[p + 1 :]
    a = dynamic_score_stream(model, BYTES, io.BytesIO(text), cfg, rms, per_token=True)
    b = dynamic_score_stream(model, BYTES, io.BytesIO(changed), cfg, rms, per_token=True)
    assert a.token_logprobs[:p] == b.token_logprobs[:p]
    assert a.token_logprobs[p] != b.token_logprobs[p]
    static = score_stream(model, BYTES, io.BytesIO(text), chunk=16)
    assert a.logprob > static.logprob  # learning helped
    zero = dynamic_score_stream(model, BYTES, io.BytesIO(text), replace(cfg, lr=0.0), rms)
    assert zero.logprob == pytest.approx(static.logprob, abs=1e-6)


def test_decay_pulls_back_toward_the_trained_weights(model: SHARNN) -> None:
    flat = [torch.full_like(p, 2e-3) for p in model.parameters()]  # every weight of average rms: lambda = decay
    dyn = DynamicEval(model, DynamicConfig(lr=0.0, decay=0.25), flat)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    out = model(torch.zeros(2, 1, dtype=torch.long), targets=torch.zeros(2, 1, dtype=torch.long))
    dyn.learn(out.loss)
    for p, p0 in zip(model.parameters(), start):
        torch.testing.assert_close(p - p0, torch.full_like(p, 0.75))
    # A weight whose rms is far above the mean is pulled all the way back, never past it.
    lopsided = [torch.full_like(p, 1e-9) for p in model.parameters()]
    lopsided[0] = torch.full_like(lopsided[0], 1.0)
    assert DynamicEval(model, DynamicConfig(decay=0.5), lopsided).decay_rates[0].max() == 1.0


def test_step_is_normalised_by_the_training_rms(model: SHARNN) -> None:
    x = torch.from_numpy(TEXT[:17].astype(np.int64)).view(-1, 1)
    out = model(x[:-1], targets=x[1:])
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    rms = [g.abs() + 1.0 for g in grads]
    start = [p.detach().clone() for p in model.parameters()]
    dyn = DynamicEval(model, DynamicConfig(lr=0.1, decay=0.0, eps=1e-5), rms)
    dyn.learn(model(x[:-1], targets=x[1:]).loss)
    for p, p0, g, r in zip(model.parameters(), start, grads, rms):
        torch.testing.assert_close(p0 - p, 0.1 * g / (r + 1e-5))


def test_steps_are_bounded_where_training_gradients_were_tiny(model: SHARNN) -> None:
    # Training rms ~0 everywhere: the step is normalised by the running rms of this text's gradients instead, so its
    # first step moves no weight by more than lr (Adam's first step), not by lr * g / eps.
    tiny = [torch.full_like(p, 1e-12) for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    dyn = DynamicEval(model, DynamicConfig(lr=1e-3, decay=0.0), tiny)
    x = torch.from_numpy(TEXT[:17].astype(np.int64)).view(-1, 1)
    dyn.learn(model(x[:-1], targets=x[1:]).loss)
    moved = max(float((p.detach() - p0).abs().max()) for p, p0 in zip(model.parameters(), start))
    assert 0.5e-3 < moved <= 1e-3 * (1 + 1e-4)


def test_gradient_stats_and_config_checks(model: SHARNN) -> None:
    rms = gradient_stats(model, TEXT, 2, 8, 100)
    assert [r.shape for r in rms] == [p.shape for p in model.parameters()]
    assert all((r >= 0).all() for r in rms) and rms[0].max() > 0
    with pytest.raises(SharnnError, match="do not match"):
        DynamicEval(model, DynamicConfig(), rms[1:])
    for bad in ({"lr": -1.0}, {"decay": float("nan")}, {"bptt": 0}, {"stats_tokens": 0}):
        with pytest.raises(SharnnError):
            DynamicConfig(**bad)


def test_search_returns_the_grid_best_first(model: SHARNN) -> None:
    grid = search_grid(DynamicConfig(lr=3e-4, decay=0.001, bptt=16))
    assert len(grid) == 11 and {c.bptt for c in grid} == {8, 16, 32}
    asked = []
    wild = replace(grid[0], lr=1e30)  # diverges: its loss is nan, and it must sort last, not anywhere
    points = dynamic_search(model, TEXT[:600], 2, [wild] + grid[:3] + grid[-1:],
                            lambda b: asked.append(b) or gradient_stats(model, TEXT, 2, b, 500), report=lambda p: None)
    assert asked == [16, 32]  # statistics computed once per segment length
    losses = [p.result.loss for p in points]
    assert losses[:4] == sorted(losses[:4]) and len(points) == 5
    assert points[-1].cfg == wild and not np.isfinite(points[-1].result.loss)


# --- command line ---------------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(model: SHARNN, tmp_path: Path) -> Path:
    text = write_sentences(tmp_path)
    return save_checkpoint(tmp_path / "ckpt", model, TrainConfig(data=str(text), bptt=16, batch_size=2,
                                                                 test_batch_size=2))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("window", ["sliding", "reference"])
def test_eval_dynamic_prints_the_static_number_eval_gives(ckpt: Path, window: str, capsys) -> None:
    # The checkpoint's bptt is 16; --dynamic-bptt 4 steps inside those segments. The static number printed beside
    # the dynamic one is plain `sharnn eval`'s, and lr 0 reproduces it, under either window.
    plain = run_json(capsys, "eval", str(ckpt), "--json", "--attn-window", window)
    zero = run_json(capsys, "eval", str(ckpt), "--dynamic", "--dynamic-lr", "0", "--dynamic-bptt", "4",
                    "--dynamic-stats-tokens", "64", "--json", "--attn-window", window)
    assert zero["bpc"] == plain["bpc"] and zero["bptt"] == 16
    assert zero["dynamic"]["bpc"] == pytest.approx(plain["bpc"], rel=1e-6, abs=0)


def test_eval_dynamic_cli(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--dynamic-stats-tokens", "300", "--dynamic-bptt", "16"]
    zero = run_json(capsys, "eval", str(ckpt), "--dynamic", "--dynamic-lr", "0", "--json", *flags)
    assert zero["dynamic"]["bpc"] == zero["bpc"]  # lr 0, same segments: static exactly
    assert zero["dynamic"]["stats_tokens"] == 300 and zero["dynamic"]["bptt"] == 16
    learn = run_json(capsys, "eval", str(ckpt), "--dynamic", "--dynamic-lr", "3e-4", "--json", *flags)
    assert learn["bpc"] == zero["bpc"] and learn["dynamic"]["bpc"] < learn["bpc"]
    decayed = run_json(capsys, "eval", str(ckpt), "--dynamic", "--dynamic-lr", "3e-4", "--dynamic-decay", "1",
                       "--json", *flags)
    assert decayed["dynamic"]["decay"] == 1.0 and decayed["dynamic"]["bpc"] != learn["dynamic"]["bpc"]
    fewer = run_json(capsys, "eval", str(ckpt), "--dynamic", "--dynamic-lr", "3e-4", "--json",
                     "--dynamic-stats-tokens", "32", "--dynamic-bptt", "16")
    assert fewer["dynamic"]["bpc"] != learn["dynamic"]["bpc"]  # other statistics, other steps
    assert main(["eval", str(ckpt), "--dynamic", *flags]) == 0
    line = capsys.readouterr().out
    assert "static bpc" in line and "dynamic bpc" in line and "%" in line


def test_eval_dynamic_search_cli(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(ckpt), "--dynamic-search", "--dynamic-stats-tokens", "64", "--dynamic-bptt", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("valid, 2 streams: static bpc")
    assert sum("--dynamic-lr" in line for line in out) == 12  # 11 settings, then the best
    assert out[-1].startswith("best: --dynamic-lr")


def test_score_document_dynamic_cli(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_bytes(TEXT[:300].tobytes())
    static = run_json(capsys, "score", str(ckpt), "--document", str(doc), "--json")
    dyn = run_json(capsys, "score", str(ckpt), "--document", str(doc), "--json", "--dynamic",
                   "--dynamic-stats-tokens", "64", "--data", str(tmp_path / "text.txt"))
    assert dyn["tokens"] == static["tokens"] and dyn["bpc"] < static["bpc"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "CKPT", "--dynamic", "--precision", "bf16"], "runs in fp32"),
    (["score", "CKPT", "--dynamic"], "add --document"),
    (["score", "CKPT", "--document", "--data", "x"], "add --dynamic"),
    (["eval", "CKPT", "--dynamic", "--dynamic-lr", "-1"], "not negative"),
    (["eval", "CKPT", "--dynamic-lr", "1e-3", "--dynamic-bptt", "8"], "--dynamic-lr, --dynamic-bptt set up dynamic"),
    (["score", "CKPT", "--document", "--dynamic-decay", "1"], "--dynamic-decay set up dynamic"),
])
def test_dynamic_cli_mistakes(ckpt: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(ckpt) if a == "CKPT" else a for a in argv]) == 2
    assert message in capsys.readouterr().err
