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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config() -> SHARNNConfig:
    return SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (40, 3), generator=g)
