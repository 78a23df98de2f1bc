"""`sharnn` as torchrun runs it in the tests (`torchrun ... tests/ranks_main.py train ...`), with two test hooks.

- SHARNN_TEST_FAIL=WHERE:RANK makes that rank fail, as a rank can on its own: WHERE is `save` (its checkpoint
  writes find the disk full), `valid` (its validation raises while the others wait for it), `step` (a
  SharnnError at its third optimizer step, while the others go on to the next collective), `kill` (the
  process is killed there, as by the out-of-memory killer: no Python, no message) or `signal` (SIGTERM reaches
  that rank alone in the middle of its third --accumulate step, after the first of its segments).
- After the command each rank prints one line to stderr, `threads: [...]`: the threads its process still runs,
  so a test can check that the process group's worker threads were joined before Python's own exit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import sharnn.train as train_module
from sharnn.cli import main
from sharnn.errors import SharnnError


def _fail_here(where: str) -> None:
    if where == "save":
        def save_checkpoint(path, *args, **kwargs):
            raise SharnnError(f"cannot write checkpoint {path}: No space left on device; "
                              "the previous checkpoint there, if any, is intact")

        train_module.save_checkpoint = save_checkpoint
    elif where == "valid":
        def evaluate(*args, **kwargs):
            raise SharnnError("validation failed on this rank")

        train_module.evaluate = evaluate
    elif where in ("step", "kill"):
        finish_step = train_module.TrainStep._finish

        def failing_step(step):
            if step.state.step == 2 and where == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if step.state.step == 2:
                raise SharnnError(f"rank {os.environ['RANK']} could not take step 3")
            return finish_step(step)

        train_module.TrainStep._finish = failing_step


def _signal_mid_step() -> None:
    loops = []
    init, detach_state = train_module.Trainer.__init__, train_module.detach_state

    def remember(loop, *args, **kwargs):
        init(loop, *args, **kwargs)
        loops.append(loop)

    def detach_and_signal(state):  # the loop calls it once a segment, before it counts the segment
        if loops[0].state.step == 2 and loops[0].state.gathered == 0:
            loops[0].stop_signal = loops[0].ranks.signalled = signal.SIGTERM  # what the loop's handler records
        return detach_state(state)

    train_module.Trainer.__init__ = remember
    train_module.detach_state = detach_and_signal


if __name__ == "__main__":
    where, _, rank = os.environ.get("SHARNN_TEST_FAIL", "").partition(":")
    if where == "signal" and rank == os.environ.get("RANK"):
        _signal_mid_step()
    elif where and rank == os.environ.get("RANK"):
        _fail_here(where)
    status = main(sys.argv[1:])
    if os.path.isdir("/proc/self/task"):
        names = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
        print("threads: " + json.dumps(names), file=sys.stderr, flush=True)
    sys.exit(status)
