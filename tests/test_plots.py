"""Learning curves from log.jsonl (finished, interrupted, resumed and killed runs) and the attention picture:
the weights drawn are the ones the model's forward pass mixed its values with."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import sharnn.model as model_mod
import sharnn.train as train_mod
from sharnn.attention_map import attention_over_text, token_label
from sharnn.checkpoint import save_checkpoint
from sharnn.cli import main
from sharnn.config import Compute, SHARNNConfig, TrainConfig
from sharnn.curves import read_curves
from sharnn.model import SHARNN
from sharnn.train import TrainingInterrupted, train
from sharnn.vocab import BYTES

pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install 'sharnn[plot]'")
from sharnn.plots import attention_figure

MODEL = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run, and the same run stopped by its budget, then by SIGTERM, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("runs")
    text = tmp / "fox.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 100)

    def cfg(run: Path, **kw) -> TrainConfig:
        base = {"data": str(text), "batch_size": 4, "bptt": 32, "lr": 2e-2, "warmup": 5, "save": str(run),
                "log_interval": 2, "eval_interval": 4, "max_eval_bytes": 200, "save_every_minutes": None,
                "max_steps": 16}
        return TrainConfig(**(base | kw))

    train(MODEL, cfg(tmp / "straight"), quiet=True)
    split = tmp / "split"
    train(MODEL, cfg(split, max_steps=6), quiet=True)
    calls, real = [], train_mod.ar_tar

    def ar_tar_then_signal(out, c):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(out, c)

    train_mod.ar_tar = ar_tar_then_signal
    try:
        with pytest.raises(TrainingInterrupted):
            train(MODEL, cfg(split, resume=str(split)), quiet=True)
    finally:
        train_mod.ar_tar = real
    train(MODEL, cfg(split, resume=str(split)), quiet=True)
    return {"straight": tmp / "straight", "split": split}


def test_curves_of_a_finished_and_a_resumed_run(runs: dict[str, Path]) -> None:
    straight, split = read_curves(runs["straight"]), read_curves(runs["split"])
    assert (straight.processes, straight.interrupted) == (1, 0)
    assert (split.processes, split.interrupted) == (3, 1)
    assert set(straight.final) == {"valid_bpc", "test_bpc"} and split.final
    for c in (straight, split):
        steps = [p.step for p in c.train]
        assert steps == sorted(set(steps)) and steps[-1] == 16  # each step once, in order, to the end
        assert all(a.seconds <= b.seconds for a, b in zip(c.train, c.train[1:]))
        assert [p.step for p in c.lr] == steps and c.valid
    assert [p.step for p in split.train] == [p.step for p in straight.train] == list(range(2, 17, 2))


def test_time_between_processes_is_left_out(runs: dict[str, Path], tmp_path: Path) -> None:
    # An hour between the interruption and the resume: the curve's time axis counts only training.
    lines = [json.loads(x) for x in (runs["split"] / "log.jsonl").read_text().splitlines()]
    starts = [i for i, r in enumerate(lines) if r["event"] == "start"]
    for r in lines[starts[2]:]:
        r["time"] += 3600
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    paused, original = read_curves(tmp_path), read_curves(runs["split"])
    assert [p.seconds for p in paused.train] == pytest.approx([p.seconds for p in original.train])
    assert paused.train[-1].seconds < lines[-1]["time"] - lines[0]["time"] - 3600 + 1


def test_a_killed_process_is_replaced_by_its_resume(tmp_path: Path) -> None:
    # Killed at step 20 after saving at step 10: the resumed process redoes 15 and 20, and its values count.
    rec = [("start", None, None, 0), ("train", 5, 3.0, 1), ("train", 10, 2.5, 2), ("save", 10, None, 2),
           ("train", 15, 2.2, 3), ("valid", 15, 2.3, 3.5), ("train", 20, 2.0, 4),
           ("start", None, None, 100), ("train", 15, 2.1, 101), ("train", 20, 1.9, 102), ("train", 25, 1.8, 103)]
    lines = [json.dumps({"event": event, "time": t, **({"step": step} if step else {}),
                         **({"bpc": bpc, "lr": 0.001} if bpc else {})}) + "\n" for event, step, bpc, t in rec]
    (tmp_path / "log.jsonl").write_text("".join(lines) + '{"event": "train", "ti')  # killed while writing a line
    c = read_curves(tmp_path)
    assert [(p.step, p.value) for p in c.train] == [(5, 3.0), (10, 2.5), (15, 2.1), (20, 1.9), (25, 1.8)]
    assert c.valid == [] and c.unreadable == 1 and c.processes == 2
    assert [p.seconds for p in c.train] == [1, 2, 4 + 1, 4 + 2, 4 + 3]  # the first process ran 4 s


@pytest.mark.parametrize("suffix,magic", [(".png", PNG), (".svg", b"<svg")])
def test_plot_command_writes_the_image_asked_for(runs: dict[str, Path], tmp_path: Path, suffix: str,
                                                 magic: bytes, capsys) -> None:
    out = tmp_path / f"curves{suffix}"
    assert main(["plot", str(runs["straight"]), str(runs["split"] / "log.jsonl"), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert len(data) > 1000 and magic in data[:400]
    assert "3 process(es)" in capsys.readouterr().out
    assert main(["plot", str(runs["straight"]), "-o", str(out)]) == 2  # replaced only when asked
    assert f"{out} exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == data
    assert main(["plot", str(runs["straight"]), "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != data


def test_plot_errors_are_one_line(runs: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    cases = {
        (str(runs["straight"]), "-o", str(tmp_path / "c.jpg")): "give -o a name ending in .png or .svg",
        (str(tmp_path), "-o", str(tmp_path / "c.png")): "has no log.jsonl",
    }
    for args, message in cases.items():
        assert main(["plot", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert main(["plot", str(runs["straight"]), "-o", str(tmp_path / "c.png")]) == 2
    assert "pip install 'sharnn[plot]'" in capsys.readouterr().err


# --- attention ----------------------------------------------------------------------------------------------------


def peaked_model() -> SHARNN:
    torch.manual_seed(0)
    model = SHARNN(MODEL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (3.0 if ".attn." in name else 0.5))  # attention far from uniform
    return model.eval()


def test_the_weights_drawn_are_the_models(monkeypatch) -> None:
    model = peaked_model()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    maps, uses = attention_over_text(model, ids, start=200, heatmap=16, chunk=50)
    fig = attention_figure(maps, uses, ids.tolist(), BYTES, MODEL.attn_span)
    drawn = torch.tensor(fig.subfigs[0].axes[0].images[0].get_array())  # read back from the figure

    # What the forward pass itself mixes the values with: its plain kernel's weights, recorded as it runs.
    seen = []
    real = model_mod.attention_weights
    monkeypatch.setattr(model_mod, "attention_weights", lambda *a: seen.append(real(*a)) or seen[-1])
    plain = Compute(attention="plain")
    with torch.no_grad():
        state = model(ids[:200, None], compute=plain).state
        seen.clear()
        model(ids[200:216, None], state, compute=plain)
    w = seen[0][0]  # (16 queries, 23 memory rows + 16)
    assert w.shape == (16, 39)
    assert drawn.shape == (16, 1 + 32)  # "older", then the 16 keys before the window and the window itself
    assert torch.allclose(drawn[:, 1:], w[:, 7:], atol=1e-6)
    assert torch.allclose(drawn[:, 0], w[:, :7].sum(-1), atol=1e-6)
    assert drawn[:, 0].max() > 0.01 and drawn[:, 1:].max() > 0.1  # peaked (uniform: 1/39), and some weight beyond the window

    # The distances come from the same weights: query i sits 23 + i keys in.
    d = (23 + torch.arange(16))[:, None] - torch.arange(39)[None, :]
    assert torch.allclose(torch.tensor(uses[0].mean_distance[200:216]), (w * d.clamp(min=0)).sum(-1), atol=1e-4)
    assert uses[0].mean_distance[0] == 0 and uses[0].mean_distance.max() <= MODEL.attn_span - 1
    assert uses[0].by_distance.sum() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("suffix,magic", [(".png", PNG), (".svg", b"<svg")])
def test_attention_command_writes_the_image_asked_for(tmp_path: Path, suffix: str, magic: bytes, capsys) -> None:
    save_checkpoint(tmp_path / "ckpt", peaked_model(), vocab=BYTES)
    text = tmp_path / "text.txt"
    text.write_bytes(b"Stop thinking with your head.\nOne head is enough. " * 20)
    out = tmp_path / f"attention{suffix}"
    heatmap = "--heatmap" if suffix == ".svg" else "--window"  # the flag, and its older spelling
    args = ["attention", str(tmp_path / "ckpt"), "--text", str(text), "-o", str(out), heatmap, "12",
            "--at", "100", "--max-bytes", "400", "--device", "cpu"]
    assert main(args) == 0
    data = out.read_bytes()
    assert len(data) > 1000 and magic in data[:400]
    assert "400 tokens, heat-map of positions 100-111" in capsys.readouterr().out
    assert main([*args[:-8], "--max-bytes", "400", "--at", "395", "--overwrite"]) == 2  # no room for the window
    assert "--at 395 leaves no room" in capsys.readouterr().err
    before = out.read_bytes()
    assert main([*args[:-8], "--max-bytes", "400", "--at", "0"]) == 2  # an image there is replaced only when asked
    assert f"{out} exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args[:-8], "--max-bytes", "400", "--at", "0", "--overwrite"]) == 0
    assert out.read_bytes() != before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tick_labels_show_bytes() -> None:
    assert [token_label(BYTES, t) for t in b"a \n\xff"] == ["a", "␣", "\\n", "\\xff"]
