"""Several processes with PyTorch's own engine: `torchrun --nproc_per_node N sharnn train ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; we join its process group (NCCL on GPUs, gloo on CPU) and wrap
the model in DistributedDataParallel. Each rank trains its own contiguous share of the streams (global batch =
per-rank batch x ranks) with its own carried state; rank 0 alone evaluates, logs and writes checkpoints. The
few decisions a rank cannot make alone (stop for a signal or a time budget, save now) are taken together with
one small all-reduce per optimizer step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SharnnError
from .model import BlockState, State


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- collective helpers; each is a no-op in a single process ---------------------------------------------

    def any(self, *flags: bool, device: torch.device) -> list[bool]:
        """Each flag OR-ed over all ranks (one all-reduce)."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def broadcast(self, value: float, device: torch.device) -> float:
        """Rank 0's value on every rank."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(t, src=0)
        return float(t.item())

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


def init_from_env(device_name: str) -> tuple[Dist, str]:
    """Join torchrun's process group if there is one; returns it and the device name this rank should use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise SharnnError("--device cuda under torchrun, but PyTorch sees no CUDA GPU; use --device cpu")
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank), device_name


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
