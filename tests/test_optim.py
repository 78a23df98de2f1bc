"""Min-trust LAMB against a hand computation, and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from sharnn.config import TrainConfig
from sharnn.optim import Lamb, budget_horizon, decay_factor, lr_at


def lamb_by_hand(p: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, eps: float = 1e-6,
                 min_trust: float = 0.25) -> tuple[torch.Tensor, list[float]]:
    p, m, v, trusts = p.clone(), torch.zeros_like(p), torch.zeros_like(p), []
    for g in grads:
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        u = m / (v.sqrt() + eps) + wd * p
        w_norm = min(p.norm().item(), 10.0)
        u_norm = u.norm().item()
        r = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        r = max(r, min_trust)
        trusts.append(r)
        p = p - lr * r * u
    return p, trusts


@pytest.mark.parametrize("scale,expect", [
    (0.01, "min_trust"),   # small weights: the ratio |p|/|u| falls below 0.25 and is clamped up to it
    (100.0, "norm_cap"),   # large weights: |p| is clamped to 10 before the ratio
    (1.0, "plain"),
])
def test_lamb_step_matches_hand_computation(scale: float, expect: str) -> None:
    torch.manual_seed(0)
    p0 = torch.randn(3, 4) * scale
    grads = [torch.randn(3, 4) for _ in range(3)]
    param = torch.nn.Parameter(p0.clone())
    opt = Lamb([param], lr=0.01, weight_decay=0.1, min_trust=0.25)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    want, trusts = lamb_by_hand(p0, grads, lr=0.01, wd=0.1)
    assert torch.allclose(param.data, want, atol=1e-6)
    if expect == "min_trust":
        assert trusts[0] == 0.25
    if expect == "norm_cap":
        assert p0.norm() > 10
        u = (0.1 * grads[0]) / ((0.001 * grads[0] ** 2).sqrt() + 1e-6) + 0.1 * p0
        assert trusts[0] == pytest.approx(10.0 / u.norm().item(), rel=1e-5)


def test_lamb_zero_weights_use_trust_one() -> None:
    param = torch.nn.Parameter(torch.zeros(5))
    param.grad = torch.ones(5)
    Lamb([param], lr=0.1).step()
    # m = 0.1, v = 0.001: u = 0.1 / (sqrt(0.001) + 1e-6) per element; |p| = 0 -> trust 1
    assert torch.allclose(param.data, torch.full((5,), -0.1 * 0.1 / (0.001**0.5 + 1e-6)))


def test_warmup_and_cooldown() -> None:
    cfg = TrainConfig(lr=1.0, warmup=10)
    assert lr_at(1, 1, cfg) == pytest.approx(0.1)
    assert lr_at(5, 1, cfg) == pytest.approx(0.5)
    assert lr_at(10, 1, cfg) == lr_at(1000, 1, cfg) == 1.0
    cfg = TrainConfig(lr=1.0, warmup=10, cooldown=100)
    assert lr_at(100, 1, cfg) == 1.0  # cool = clamp((s - cooldown)/cooldown, 0, 1)
    assert lr_at(150, 1, cfg) == pytest.approx(0.5)
    assert lr_at(200, 1, cfg) == lr_at(500, 1, cfg) == 0.0
    assert lr_at(7, 1, TrainConfig(lr=2.0, warmup=0)) == 2.0


def test_when_divides_by_ten_after_listed_epochs() -> None:
    cfg = TrainConfig(lr=1.0, warmup=4, when=(2, 4))
    assert lr_at(100, 1, cfg) == 1.0
    assert lr_at(100, 2, cfg) == 1.0          # epoch 2 itself still runs at the full rate
    assert lr_at(100, 3, cfg) == pytest.approx(0.1)
    assert lr_at(100, 5, cfg) == pytest.approx(0.01)
    assert lr_at(2, 3, cfg) == pytest.approx(0.05)  # warm-up and --when compose: the reference lost this
    assert lr_at(100, 9, TrainConfig(lr=1.0, warmup=0, when=(-1,))) == 1.0


def test_lamb_multi_tensor_update_equals_the_loop() -> None:
    # The GPU default (foreach) must be the same optimizer as the per-parameter loop: several shapes, a zero
    # parameter (trust 1), small and large weights (min trust, norm cap), one parameter without a gradient.
    torch.manual_seed(0)
    shapes = [(3, 4), (7,), (2, 5, 3), (4, 4), (6,)]
    scales = [1.0, 0.01, 100.0, 0.0, 1.0]
    runs = {}
    for foreach in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)) * k)
                  for i, (s, k) in enumerate(zip(shapes, scales))]
        opt = Lamb(params, lr=0.02, weight_decay=0.1, foreach=foreach)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params[:-1]:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[foreach] = [p.detach().clone() for p in params]
    for a, b in zip(runs[False], runs[True]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(runs[True][0], torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(runs[True][-1], torch.randn(6, generator=torch.Generator().manual_seed(4)))  # no grad: kept


def test_decay_runs_to_the_end_of_the_budget() -> None:
    # warm-up to step 10, then down to --decay-to at one step past the horizon (step 110): the last step learns
    lin = TrainConfig(lr=1.0, warmup=10, decay="linear", decay_to=0.1)
    assert lr_at(10, 1, lin, horizon=109) == 1.0
    assert lr_at(60, 1, lin, horizon=109) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(109, 1, lin, horizon=109) == pytest.approx(0.1 + 0.9 * 0.01)
    assert lr_at(500, 1, lin, horizon=109) == pytest.approx(0.1)
    assert lr_at(5, 1, lin, horizon=109) == pytest.approx(0.5)  # the warm-up is as before
    cos = TrainConfig(lr=2.0, warmup=0, decay="cosine")
    assert [lr_at(s, 1, cos, horizon=99) for s in (0, 25, 50, 75, 100)] == pytest.approx([2.0, 1 + 2**-0.5, 1.0,
                                                                                          1 - 2**-0.5, 0.0])
    assert lr_at(50, 3, TrainConfig(lr=1.0, warmup=0, decay="linear", when=(1,)), horizon=99) == pytest.approx(0.05)
    # --decay-fraction 0.25: flat at --lr for the first 75% of the steps after the warm-up, then the line
    wsd = TrainConfig(lr=1.0, warmup=10, decay="linear", decay_fraction=0.25)
    assert lr_at(84, 1, wsd, horizon=409) == lr_at(310, 1, wsd, horizon=409) == 1.0
    assert lr_at(360, 1, wsd, horizon=409) == pytest.approx(0.5)
    assert lr_at(409, 1, wsd, horizon=409) == pytest.approx(0.01)
    # no decay: the original's flat rate whatever the horizon; an unknown horizon (no step timed yet) keeps it too
    assert lr_at(60, 1, TrainConfig(lr=1.0, warmup=10), horizon=100) == 1.0
    assert decay_factor(60, None, lin) == 1.0


def test_the_horizon_is_the_earliest_budget_and_follows_the_pace() -> None:
    cfg = TrainConfig(max_steps=1000, max_time=100.0)
    # 50 steps in 10 s: 90 s left at 5 steps/s -> 450 more; the epochs end later, --max-steps later still
    assert budget_horizon(50, cfg, seconds=10, timed_steps=50, steps_to_last_epoch_end=5000) == pytest.approx(500)
    # the pace halves: the estimate follows it
    assert budget_horizon(100, cfg, seconds=40, timed_steps=50, steps_to_last_epoch_end=5000) == pytest.approx(175)
    # a resumed run, 200 steps taken before: --max-time is this process's, paced by its own 20 steps in 4 s
    assert budget_horizon(220, cfg, seconds=4, timed_steps=20, steps_to_last_epoch_end=5000) == pytest.approx(700)
    assert budget_horizon(50, cfg, seconds=10, timed_steps=50, steps_to_last_epoch_end=30) == 80  # epochs first
    no_time = TrainConfig(max_steps=300)
    assert budget_horizon(0, no_time, seconds=0, timed_steps=0, steps_to_last_epoch_end=1e9) == 300
    assert budget_horizon(0, TrainConfig(max_time=60.0), seconds=0, timed_steps=0,
                          steps_to_last_epoch_end=777) == 777  # nothing timed yet: the epochs' end for now
