"""Shared fixtures: a tiny SHA-RNN configuration and random token ids (CPU, seconds)."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models run fastest on one thread, and a busy machine (CI shares its cores) makes several OpenMP threads
# spin against each other: one thread here and in the subprocesses tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from sharnn.config import SHARNNConfig

# Two marks. `slow`: seconds each (torchrun, killed processes, the 100 MB zip, longer trainings, ONNX export);
# part of the full suite, left out of a quick loop by `pytest -m "not slow"`. `long`: minutes, beyond the full
# suite's ~3-minute budget (repeated runs under load, the GPU check's plumbing); run with `--runlong`.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runlong", action="store_true", help="also run the tests marked long (minutes)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runlong") or "long" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="long: run with --runlong")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config() -> SHARNNConfig:
    return SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (40, 3), generator=g)
