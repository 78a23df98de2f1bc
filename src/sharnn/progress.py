"""What training shows: log lines (`RunLog`: stderr and log.jsonl), and how long until the run stops, on a bar
(terminal) or in the log lines (anywhere else).

Training stops at the first of: the end of the epoch (each epoch has its own bar), `--max-steps`, `--max-time`.
The bar follows whichever of them is nearest, at the pace of the batches so far, and says which it is. When
stderr is not a terminal (a log file, a pipe, CI) there is no bar, whose redraws would garble the file: the
log lines carry the same estimate instead.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from .config import TrainConfig


class Eta(NamedTuple):
    until: str  # what ends first: "the epoch's end", "--max-steps N" or "--max-time S"
    done: float  # fraction of the way there, in [0, 1]
    seconds: float | None  # time left; None before the pace is known


def time_left(cfg: TrainConfig, batch: int, batches: int, step: int, gathered: int, elapsed: float,
              seconds_per_batch: float | None) -> Eta:
    """The nearest stop and the time left until it.

    Args:
        batch, batches: batches done in this epoch, and its (estimated) number of batches.
        step, gathered: optimizer steps so far (the run's, across resumes: what --max-steps counts), and segments
            gathered towards the next one (--accumulate).
        elapsed: seconds since this process started training (what --max-time counts).
        seconds_per_batch: the pace so far, None before the first batch.
    """
    pace = seconds_per_batch
    stops = [Eta("the epoch's end", batch / max(batches, 1),
                 None if pace is None else max(batches - batch, 0) * pace)]
    if cfg.max_steps is not None:
        left = max((cfg.max_steps - step) * cfg.accumulate - gathered, 0)  # batches
        stops.append(Eta(f"--max-steps {cfg.max_steps}", min(step / max(cfg.max_steps, 1), 1.0),
                         None if pace is None else left * pace))
    if cfg.max_time is not None:
        stops.append(Eta(f"--max-time {cfg.max_time:g}", min(elapsed / max(cfg.max_time, 1e-9), 1.0),
                         max(cfg.max_time - elapsed, 0.0)))
    known = [s for s in stops if s.seconds is not None]
    return min(known, key=lambda s: s.seconds) if known else stops[0]  # type: ignore[arg-type, return-value]


def describe(eta: Eta) -> str:
    left = "?" if eta.seconds is None else tqdm.format_interval(eta.seconds)
    return f"{left} left until {eta.until}"


class TrainProgress:
    """One epoch's progress: a bar on a terminal (`show` and stderr a TTY), else nothing but `log_suffix`."""

    def __init__(self, cfg: TrainConfig, epoch: int, batches: int, batch: int, step: int, started: float,
                 show: bool):
        self.cfg, self.batches, self.started, self.epoch = cfg, batches, started, epoch
        self.first_batch, self.t0 = batch, time.perf_counter()
        self.eta = time_left(cfg, batch, batches, step, 0, time.perf_counter() - started, None)
        # The status leads and the bar takes the rest of the line: it shows how far along the nearest stop is.
        self.bar = tqdm(total=1000, desc=self._status(batch, step), leave=False, file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}|", disable=not (show and sys.stderr.isatty()))

    @property
    def shown(self) -> bool:
        return not self.bar.disable

    def update(self, batch: int, step: int, gathered: int) -> None:
        """After a batch: `batch` of this epoch's batches done, `step` optimizer steps, `gathered` gathered."""
        now = time.perf_counter()
        done = batch - self.first_batch
        pace = (now - self.t0) / done if done > 0 else None
        self.eta = time_left(self.cfg, batch, self.batches, step, gathered, now - self.started, pace)
        if self.shown:
            self.bar.set_description_str(self._status(batch, step), refresh=False)
            self.bar.update(round(1000 * self.eta.done) - self.bar.n)  # tqdm redraws at most ~10 times a second

    def _status(self, batch: int, step: int) -> str:
        return f"epoch {self.epoch} | batch {batch}/{self.batches} | step {step} | {describe(self.eta)}"

    def log_suffix(self) -> str:
        """What a log line adds when there is no bar: the time left."""
        return "" if self.shown else f" | {describe(self.eta)}"

    def close(self) -> None:
        self.bar.close()


class RunLog:
    """Human log lines to stderr (above the progress bar) and the same numbers as JSON lines in the run folder."""

    def __init__(self, run_dir: Path, quiet: bool = False, write: bool = True):
        self.path = run_dir / "log.jsonl"
        self.quiet = quiet
        self.write = write  # under torchrun, rank 0 alone writes the log
        self.broken = False

    def line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def record(self, event: str, **values: Any) -> None:
        if not self.write:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": round(time.time(), 3), **values}) + "\n")
        except OSError as e:  # a full disk must not end a long run over a log line; the next save reports it
            if not self.broken:
                self.broken = True
                tqdm.write(f"warning: cannot append to {self.path} ({e.strerror}); continuing", file=sys.stderr)
