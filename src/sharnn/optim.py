"""Optimizers and the learning-rate schedule.

LAMB with a *minimum trust ratio* is written here because no library has this variant: the SHA-RNN paper's
LAMB (after You et al. 2019, via the cybertronai pytorch-lamb code) has no bias correction, clamps the weight
norm to [0, 10] and never lets the trust ratio fall below `min_trust` (0.25).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .config import TrainConfig
from .errors import SharnnError


class Lamb(Optimizer):
    """Min-trust LAMB.

    For each parameter p with gradient g:
        m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2          (no bias correction)
        u = m / (sqrt(v) + eps) + weight_decay * p
        r = clamp(|p|, 0, 10) / |u|   (1 if either norm is 0);  r = max(r, min_trust)
        p = p - lr * r * u
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        min_trust: float = 0.25,
        foreach: bool | None = None,
    ):
        """foreach: update all parameters of a group with multi-tensor ops (few kernel launches: what makes a
        GPU step fast) instead of one parameter at a time. Same numbers; it holds one update-sized buffer
        for the whole group at once, so None (the default) uses it on GPUs only."""
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError("invalid LAMB hyper-parameters")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "min_trust": min_trust,
                    "foreach": foreach}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            foreach = group.get("foreach")
            if foreach is None:
                foreach = any(p.is_cuda for p in params)
            # The multi-tensor ops want one device and dtype per list.
            by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in params:
                by_kind.setdefault((p.device, p.dtype), []).append(p)
            for same in by_kind.values():
                (self._update_foreach if foreach else self._update_each)(same, group)
        return loss

    def _update_each(self, params: list[Tensor], group: dict) -> None:
        b1, b2 = group["betas"]
        for p in params:
            g, state = p.grad, self.state[p]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            u = m / (v.sqrt() + group["eps"])
            if group["weight_decay"]:
                u.add_(p, alpha=group["weight_decay"])
            w_norm = p.norm().clamp(0, 10)
            u_norm = u.norm()
            # Kept on the device (no .item()) so a GPU step never waits for the host.
            trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            trust = trust.clamp(min=group["min_trust"])
            p.add_(u * trust, alpha=-group["lr"])

    def _update_foreach(self, params: list[Tensor], group: dict) -> None:
        """`_update_each` with torch._foreach_* ops: the same arithmetic, a handful of launches per group."""
        b1, b2 = group["betas"]
        grads = [p.grad for p in params]
        ms = [self.state[p]["exp_avg"] for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, grads, alpha=1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"])
        us = torch._foreach_div(ms, denom)
        del denom
        if group["weight_decay"]:
            torch._foreach_add_(us, params, alpha=group["weight_decay"])
        w_norm = torch.stack(torch._foreach_norm(params)).clamp(0, 10)
        u_norm = torch.stack(torch._foreach_norm(us))
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        trust = trust.clamp(min=group["min_trust"])
        torch._foreach_mul_(us, list(trust.unbind()))
        torch._foreach_add_(params, us, alpha=-group["lr"])


def build_optimizer(params: Iterable[Tensor], cfg: TrainConfig) -> Optimizer:
    """The optimizer `cfg.optimizer` names, with `cfg.lr` and `cfg.wdecay`."""
    params = list(params)
    # On a GPU: PyTorch's fused kernels (one launch for the whole update) for the optimizers that have them,
    # and multi-tensor ops for LAMB (Lamb's foreach default).
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if cfg.optimizer == "lamb":
        return Lamb(params, lr=cfg.lr, weight_decay=cfg.wdecay, min_trust=0.25)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.wdecay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wdecay, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.wdecay, **fused)
    raise SharnnError(f"unknown optimizer {cfg.optimizer!r}")


def lr_at(step: int, epoch: int, cfg: TrainConfig, horizon: float | None = None) -> float:
    """Learning rate for optimizer step `step` (1-based, counted across epochs) in epoch `epoch` (1-based).

    lr * (min(step, warmup)/warmup - cool), cool = clamp((step - cooldown)/cooldown, 0, 1) with --cooldown,
    then divided by 10 once for every --when epoch that has already ended. The reference set the per-step
    schedule *after* the --when division and so undid it; here both always apply. With --decay, also times
    `decay_factor(step, horizon, cfg)`: down to the end of the budget, which ends at step `horizon`.
    """
    warm = min(step, cfg.warmup) / cfg.warmup if cfg.warmup > 0 else 1.0
    cool = 0.0
    if cfg.cooldown:
        cool = min(max((step - cfg.cooldown) / cfg.cooldown, 0.0), 1.0)
    divisions = sum(1 for w in cfg.when if 0 < w < epoch)
    return cfg.lr * max(warm - cool, 0.0) * decay_factor(step, horizon, cfg) * 0.1**divisions


def decay_factor(step: int, horizon: float | None, cfg: TrainConfig) -> float:
    """--decay: the share of the peak rate left at `step` when the budget ends at step `horizon`.

    From 1 at the end of the warm-up (or, with --decay-fraction f, for the last f of the steps after it: a
    warm-up, stable, decay schedule) to --decay-to at the horizon, along a line or a half cosine (nanoGPT's),
    and --decay-to after it. The line ends one step past the horizon, so the last step still learns a little
    with --decay-to 0. 1 when --decay is none or the horizon is not known yet (a time budget before any step
    was timed).
    """
    if cfg.decay == "none" or horizon is None:
        return 1.0
    length = cfg.decay_fraction * (horizon + 1 - cfg.warmup)  # steps the decay takes, at the end
    done = min(max((step - (horizon + 1 - length)) / max(length, 1.0), 0.0), 1.0)
    left = 1.0 - done if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return cfg.decay_to + (1.0 - cfg.decay_to) * left


def budget_horizon(step: int, cfg: TrainConfig, *, seconds: float, timed_steps: int,
                   steps_to_last_epoch_end: float) -> float:
    """The optimizer step at which the run stops: the earliest of --max-steps, --epochs and --max-time.

    A time budget's step count is estimated from the pace so far (`timed_steps` steps in `seconds`, everything
    this process did since it started: steps, validations, saves) and so kept current as the pace changes.

    Args:
        step: optimizer steps taken so far (across resumes).
        seconds: time this process has used of --max-time.
        timed_steps: steps this process took in that time.
        steps_to_last_epoch_end: steps left until the end of epoch --epochs, at the current epoch's pace.
    """
    ends = [step + steps_to_last_epoch_end]
    if cfg.max_steps is not None:
        ends.append(cfg.max_steps)
    if cfg.max_time is not None and timed_steps > 0 and seconds > 0:
        ends.append(step + timed_steps / seconds * max(cfg.max_time - seconds, 0.0))
    return min(ends)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- SGD -> averaged SGD (AWD-LSTM's non-monotonically triggered ASGD) -------------------------------------------


def should_switch_to_asgd(previous: list[float], current: float, nonmono: int) -> bool:
    """AWD-LSTM's trigger: validation is worse than the best of all but the last `nonmono` earlier checks."""
    return nonmono > 0 and len(previous) > nonmono and current > min(previous[:-nonmono])


def build_asgd(params: Iterable[Tensor], cfg: TrainConfig, lr: float) -> torch.optim.ASGD:
    """Averaging from the first step after the switch (t0=0) and no learning-rate decay (lambd=0)."""
    return torch.optim.ASGD(params, lr=lr, t0=0, lambd=0.0, weight_decay=cfg.wdecay)


class WeightSnapshot:
    """The values some parameters hold at one moment, kept to put back later: what the averaged-SGD swap, dynamic
    evaluation (its pull toward the trained weights, and their return) and the compressor's adaptation use."""

    def __init__(self, params: Iterable[Tensor]):
        self.params = list(params)
        self.values = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the values back into the parameters, in place."""
        for p, v in zip(self.params, self.values):
            p.copy_(v)


class averaged_weights:
    """Context manager: inside it the model holds ASGD's averaged weights ('ax'); outside, the live ones.

    The optimizer's state is left as it is, so a checkpoint written inside holds the averaged weights with a
    consistent optimizer (what AWD-LSTM keeps as its best model). A no-op for any other optimizer, so
    evaluation and saving can always use it.
    """

    def __init__(self, params: Iterable[Tensor], optimizer: Optimizer):
        self.pairs = []
        if isinstance(optimizer, torch.optim.ASGD):
            self.pairs = [(p, optimizer.state[p]["ax"]) for p in params if "ax" in optimizer.state.get(p, {})]
        self.live: WeightSnapshot | None = None

    @torch.no_grad()
    def __enter__(self) -> averaged_weights:  # noqa: PYI034
        self.live = WeightSnapshot(p for p, _ in self.pairs)
        for p, ax in self.pairs:
            p.copy_(ax)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.restore()
        self.live = None
