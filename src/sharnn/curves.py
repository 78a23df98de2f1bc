"""Learning curves read from a run's `log.jsonl` (written by train.RunLog): bpc and learning rate against the
optimizer step and against the time spent training.

A run folder's log holds one `start` line per process: the first one, and one more per `--resume` into the same
folder. Time counts only while a process ran (from its `start` to its last line), so the hours between an
interruption and its resume are left out. A process that was killed after its last save repeats the steps after
that save: the resumed process's points replace the ones logged from its first step on.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

from .errors import SharnnError


class Point(NamedTuple):
    step: int  # optimizer steps so far
    seconds: float  # training time so far: the processes' running times added up
    value: float  # bpc (or the learning rate)


class Curves(NamedTuple):
    name: str
    train: list[Point]  # bpc over each log window (--log-interval batches)
    valid: list[Point]  # validation bpc
    lr: list[Point]  # the learning rate at each train point
    processes: int  # 1, plus one per resume into the same folder
    interrupted: int  # how many processes ended with SIGINT/SIGTERM (and a saved checkpoint)
    final: dict[str, float]  # the final valid/test bpc of the best checkpoint, when the run finished
    unreadable: int  # lines that were not JSON (a process killed while writing one)


def log_path(run: str | os.PathLike) -> Path:
    """The log.jsonl of a run folder (or the file itself); SharnnError when there is none."""
    p = Path(run)
    path = p / "log.jsonl" if p.is_dir() else p
    if not path.is_file():
        raise SharnnError(f"{run} has no log.jsonl: pass a run folder written by sharnn train (its --save)")
    return path


def read_curves(run: str | os.PathLike, name: str | None = None) -> Curves:
    """Read a run folder's log.jsonl (finished, interrupted, resumed, or still running) into curves."""
    path = log_path(run)
    records: list[dict[str, Any]] = []
    unreadable = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                unreadable += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("time"), (int, float)):
                records.append(rec)
    train: list[Point] = []
    valid: list[Point] = []
    lr: list[Point] = []
    processes = interrupted = 0
    final: dict[str, float] = {}
    before = 0.0  # running time of the earlier processes
    began = last = None  # this process's first and latest line
    first_point = False  # the next step-bearing line is this process's first one
    for rec in records:
        event, t = rec.get("event"), float(rec["time"])
        if event == "start":
            if began is not None and last is not None:
                before += last - began
            began, last = t, t
            processes += 1
            first_point = True
            continue
        if began is None:  # a log whose start line was cut off: count from its first line
            began, processes = t, 1
        last = t
        if event == "interrupted":
            interrupted += 1
        elif event == "final":
            final = {k: float(v) for k, v in rec.items() if k in ("valid_bpc", "test_bpc")}
        if event not in ("train", "valid") or not isinstance(rec.get("step"), int):
            continue
        step, seconds = rec["step"], before + t - began
        if first_point:  # a resumed process redoes the steps its checkpoint did not hold
            first_point = False
            train, valid, lr = ([p for p in pts if p.step < step] for pts in (train, valid, lr))
        value = rec.get("bpc")
        if event == "train":
            if isinstance(value, (int, float)) and math.isfinite(value):
                train.append(Point(step, seconds, float(value)))
            if isinstance(rec.get("lr"), (int, float)):
                lr.append(Point(step, seconds, float(rec["lr"])))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            valid.append(Point(step, seconds, float(value)))
    return Curves(name or str(run), train, valid, lr, processes, interrupted, final, unreadable)


def curve_unit(runs: list[str]) -> str:
    """bpc for byte and character runs, "bits per token" when any run is word-level (from its checkpoints)."""
    from .checkpoint import load_vocab

    for run in runs:
        try:
            if load_vocab(run).kind == "words":
                return "bits per token"
        except SharnnError:  # no checkpoint yet (or a bare log.jsonl): bytes
            pass
    return "bpc"
