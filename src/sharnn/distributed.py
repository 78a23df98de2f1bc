"""Several processes with PyTorch's own engine: `torchrun --nproc_per_node N sharnn train ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; we join its process group (NCCL on GPUs, gloo on CPU) and wrap
the model in DistributedDataParallel. Each rank trains its own contiguous share of the streams (global batch =
per-rank batch x ranks) with its own carried state; rank 0 alone evaluates, logs and writes checkpoints. The
few decisions a rank cannot make alone (stop for a signal or a time budget, save now) are taken together with
one small all-reduce per optimizer step.

Ending, in success and in failure:
- A finished run: every rank meets at a barrier, lets go of everything that holds the process group (the DDP
  wrapper), and destroys it, all before rank 0's final evaluation, which needs no other rank. The group's
  worker threads are thus joined while Python is fully alive; a group left for the interpreter's exit to tear
  down can abort the process there ("terminate called without an active exception").
- An error on one rank: the first rank to fail marks it in the rendezvous store (torchrun's, which outlives a
  rank), hands its message to torchrun's error file, destroys its group and exits with its status. The other
  ranks find their next collective broken, or find the mark while they wait for rank 0; they print nothing
  (the failed rank's message is the run's) and leave as torchrun ends the remaining workers. A rank that is
  killed leaves no mark: an error that may be the echo of that (not one of ours) waits for torchrun first.
- Rank 0's validation, which the others wait for, is shared through the store rather than a collective, so
  a long one cannot run into the collective timeout (30 minutes with gloo).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from .errors import SharnnError
from .runtime import resolve_device
from .state import BlockState, State

POLL_S = 0.05  # how often a rank waiting for rank 0 looks at the store
# torchrun sends SIGTERM to the other workers as soon as one fails, and SIGKILL 30 s later: a rank that stops
# because of another's failure waits at most that long for it.
TEARDOWN_WAIT_S = 30.0
# A rank that crashed (killed, out of memory) leaves no mark in the store; torchrun notices within its monitor
# interval (0.1 s; 5 s in older versions) and ends the others. A rank whose own error may be the echo of such
# a crash waits this long for that before it reports the error as the run's.
CRASH_GRACE_S = 6.0


class PeerFailed(SharnnError):
    """Another rank failed first; this rank stopped because of it. The message is the other rank's."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # The rendezvous store (torchrun's): a side channel for failures and for results rank 0 computes alone.
    store: dist.Store | None = None
    signalled: int | None = None  # a signal the training loop caught (torchrun's teardown may already have come)
    owns_group: bool = False  # made by init_from_env (not by a program that called train), so ours to destroy
    _shared: int = 0  # values shared by `from_main` so far (the same count on every rank)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- collective helpers; each is a no-op in a single process ---------------------------------------------

    def any(self, *flags: bool, device: torch.device) -> list[bool]:
        """Each flag OR-ed over all ranks (one all-reduce)."""
        return [bool(v) for v in self.maximum(*map(float, flags), device=device)]

    def maximum(self, *values: float, device: torch.device) -> list[float]:
        """Each value's maximum over all ranks (one all-reduce); flags count as 0 and 1."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def from_main(self, value: float, device: torch.device) -> float:
        """Rank 0's `value` on every rank, after rank 0 computed it alone (a validation).

        Not a collective: that would time out (30 minutes with gloo) under a validation that takes longer. The
        others wait on the store for as long as rank 0 takes, and stop if a rank fails meanwhile.
        """
        if not self.enabled:
            return value
        if self.store is None:  # a process group made before ours: no store to wait on
            t = torch.tensor([value], dtype=torch.float64, device=device)
            dist.broadcast(t, src=0)
            return float(t.item())
        self._shared += 1
        key = f"from_main/{self._shared}"
        if self.is_main:
            self.store.set(key, repr(float(value)))  # repr round-trips a float exactly
            return value
        pause = POLL_S
        while True:
            try:
                if self.store.check([key]):
                    return float(self.store.get(key))
                if self.store.check(["failed"]):
                    raise PeerFailed(self.store.get("failed").decode())
            except dist.DistError:  # the store went down with a failed rank 0
                raise PeerFailed("rank 0 stopped") from None
            time.sleep(pause)
            pause = min(2 * pause, 1.0)  # a long validation: a look a second

    def gather_state(self, state: State | None) -> State | None:
        """Every rank's carried state joined along the batch dimension, in rank order (the global streams)."""
        if not self.enabled or state is None:
            return state

        def cat(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts, dim=1)

        return tuple(BlockState(tuple(cat(t) for t in s.rnn), None if s.memory is None else cat(s.memory))
                     for s in state)

    def shard_state(self, state: State | None, per_rank: int) -> State | None:
        """This rank's columns of a global carried state."""
        if not self.enabled or state is None:
            return state
        cols = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return tuple(BlockState(tuple(t[:, cols].contiguous() for t in s.rnn),
                                None if s.memory is None else s.memory[:, cols].contiguous())
                     for s in state)

    def mean_grads(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The parameters' gradients averaged over the ranks (what the step they belong to would use)."""
        if not self.enabled:
            return [p.grad for p in params]
        out: list[torch.Tensor | None] = []
        for p in params:
            t = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            dist.all_reduce(t)
            out.append(t / self.world)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # --- the end -------------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Every rank arrives here, then the process group goes (see the top). Call with nothing holding it."""
        self.barrier()
        self.close()

    def close(self) -> None:
        """Destroy the process group (once; later calls do nothing)."""
        if self.owns_group and dist.is_initialized():
            gc.collect()  # a DDP wrapper caught in a reference cycle would keep the group, and its threads, alive
            dist.destroy_process_group()

    def first_to_fail(self, e: BaseException) -> bool:
        """Mark this rank's failure. True if no rank failed before: `e` is the run's error, which this rank reports
        (its own line, and torchrun's error file). False if another rank failed first: `e` is the consequence."""
        if not self.enabled or self.store is None:
            return True
        try:
            if self.store.check(["failed"]):
                return False
            if not isinstance(e, SharnnError) and _under_torchrun() and self.signalled is None:
                # Not one of our own errors: perhaps a collective broken by another rank's crash. torchrun is about
                # to end this rank for that (its SIGTERM's default action, not the training loop's handler).
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(CRASH_GRACE_S)
                if self.store.check(["failed"]):
                    return False
            first = self.store.add("failures", 1) == 1
            if first:
                self.store.set("failed", f"rank {self.rank} failed: {_one_line(e)}")
        except dist.DistError:  # the store went down with a failed rank 0
            return False
        if first:
            _report_to_torchrun(e)
        return first

    def leave(self) -> NoReturn:
        """Stop this rank after another rank failed first. It prints nothing (the failed rank reports) and ends as
        torchrun ends the remaining workers: by its SIGTERM. Never through Python's normal exit, which would tear
        down a process group whose collective just broke (that can hang, or abort the process)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if _under_torchrun():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self.signalled == signal.SIGTERM:  # torchrun's SIGTERM came while training, and was caught there
                os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + TEARDOWN_WAIT_S
            while time.monotonic() < deadline:
                time.sleep(POLL_S)
        else:
            reason = "another rank failed"
            try:
                if self.store is not None and self.store.check(["failed"]):
                    reason = self.store.get("failed").decode()
            except dist.DistError:
                pass
            os.write(2, f"sharnn: rank {self.rank} stopped: {reason}\n".encode())
        os._exit(1)


def launched_rank() -> int:
    """This process's rank as torchrun started it (RANK; 0 without torchrun), before any process group exists:
    what decides who prints the settings a run starts with."""
    return int(os.environ.get("RANK", "0"))


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if isinstance(e, SharnnError) and text else f"{type(e).__name__}: {' '.join(text)}"


def _report_to_torchrun(e: BaseException) -> None:
    """Write `e` to the error file torchrun gives each worker, so that its summary shows this rank's message.

    The file torchrun's own `record` writes: a user's mistake (SharnnError) with its one line where the traceback
    would go, anything else with its traceback (torchrun prints that part).
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    if isinstance(e, SharnnError):
        line = f"sharnn: error: {_one_line(e)}"
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    else:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)


def release_frames(e: BaseException) -> None:
    """Drop the local variables of the finished frames `e` passed through (the model, its DDP wrapper, ...), so
    that the process group can really go when it is destroyed; the message and the traceback's lines stay."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]


def init_from_env(device_name: str) -> tuple[Dist, str]:
    """Join torchrun's process group if there is one; returns it and the device name this rank should use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device_name).type == "cuda"  # one clear error when there is no GPU to use
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    if dist.is_initialized():  # by the program that called train(): use its group
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device_name
    # DDP imports torch._dynamo, and importing it while a process group exists leaves references to the group
    # behind (torch 2.13): the group, and its worker threads, would then outlive destroy_process_group (see the top).
    importlib.import_module("torch._dynamo")

    # The same rendezvous init_process_group does by itself (env://: torchrun's store), done here to keep the store.
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=dist.PrefixStore("default_pg", store),
                            rank=rank, world_size=world)
    return Dist(rank, world, local_rank, dist.PrefixStore("sharnn", store), owns_group=True), device_name
