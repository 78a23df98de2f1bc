"""Training progress: the time left until the nearest stop (epoch end, --max-steps, --max-time), as a bar on a
terminal and in plain log lines elsewhere."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from sharnn.config import SHARNNConfig, TrainConfig
from sharnn.progress import time_left
from sharnn.train import train

MODEL = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)


def test_the_nearest_stop_wins() -> None:
    cfg = TrainConfig()
    # 100 of 400 batches at 0.5 s each: 150 s to the epoch's end.
    assert time_left(cfg, 100, 400, 100, 0, 60.0, 0.5) == ("the epoch's end", 0.25, 150.0)
    # --max-steps 150 with 2 segments per step, one gathered: (150 - 120) * 2 - 1 = 59 batches.
    steps = TrainConfig(max_steps=150, accumulate=2)
    assert time_left(steps, 100, 400, 120, 1, 60.0, 0.5) == ("--max-steps 150", 0.8, 29.5)
    # With --max-time 90 too, after 60 s: 30 s left, but the steps end 0.5 s earlier ...
    both = TrainConfig(max_steps=150, accumulate=2, max_time=90)
    assert time_left(both, 100, 400, 120, 1, 60.0, 0.5).until == "--max-steps 150"
    # ... until the pace slows down.
    assert time_left(both, 100, 400, 120, 1, 60.0, 1.0) == ("--max-time 90", 60 / 90, 30.0)
    # Before the first batch the pace is unknown: only the time budget has an estimate.
    assert time_left(cfg, 0, 400, 0, 0, 0.0, None) == ("the epoch's end", 0.0, None)
    assert time_left(TrainConfig(max_time=90), 0, 400, 0, 0, 0.0, None).seconds == 90


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_bar_on_a_terminal_plain_lines_elsewhere(tmp_path: Path, monkeypatch, capsys, terminal: bool) -> None:
    text = tmp_path / "fox.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 100)
    err = Terminal()
    if terminal:
        monkeypatch.setattr(sys, "stderr", err)
    cfg = TrainConfig(data=str(text), batch_size=4, bptt=32, warmup=2, save=str(tmp_path / "run"), log_interval=3,
                      max_steps=7, max_eval_bytes=200, save_every_minutes=None)
    train(MODEL, cfg)
    out = err.getvalue() if terminal else capsys.readouterr().err
    log_lines = [x for x in out.replace("\r", "\n").splitlines() if x.startswith("| epoch")]
    assert len(log_lines) == 2
    if terminal:  # the bar is redrawn in place (\r) and names the stop it counts down to; log lines stay plain
        assert "\r" in out and "epoch 1 | batch" in out and "left until --max-steps 7" in out
        assert not any("left until" in x for x in log_lines)
    else:  # no bar, no carriage returns: the log lines carry the estimate
        assert "\r" not in out
        assert all(x.endswith("left until --max-steps 7") for x in log_lines)
