"""The built-in presets as shipped: what `sharnn train --preset NAME` builds, with the README's parameter counts."""

from __future__ import annotations

import pytest
import torch

from sharnn.cli import build_parser
from sharnn.flags import resolve_train_settings
from sharnn.model import SHARNN, count_parameters


def built(*argv: str) -> tuple[SHARNN, object]:
    model_cfg, train_cfg, *_ = resolve_train_settings(build_parser().parse_args(["train", *argv]))
    with torch.device("meta"):  # shapes only: no memory, no time
        return SHARNN(model_cfg), train_cfg


@pytest.mark.parametrize("argv,params,attn,batch", [
    (["--preset", "tiny"], 873_968, (0,), 16),                       # README: "a ~0.9M-parameter SHA-RNN"
    (["--preset", "paper"], 53_825_792, (2,), 16),                   # README table, 256 byte symbols
    (["--preset", "paper-all-attn"], 63_299_840, (0, 1, 2, 3), 8),  # README table
    (["--preset", "paper", "--model", "QRNN"], 45_416_704, (2,), 16),  # README: "45.4M vs 53.8M"
])
def test_presets_as_shipped(argv: list[str], params: int, attn: tuple[int, ...], batch: int) -> None:
    model, train = built(*argv)
    assert count_parameters(model) == params
    assert model.cfg.attn_layers == attn and train.batch_size == batch
    # The paper's regularisers: the original never applied --dropoute, --alpha, --beta or --wdrop.
    assert model.cfg.dropoute == model.cfg.wdrop == 0 and train.alpha == train.beta == 0


def test_tiny_preset_runs_without_a_download() -> None:
    _, train = built("--preset", "tiny")
    assert train.data == "python-stdlib" and train.max_time is not None


def test_a_preset_with_another_depth_says_what_to_do(capsys) -> None:
    from sharnn.cli import main

    assert main(["train", "--preset", "paper", "--nlayers", "2", "--save", "/nonexistent/never-used"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --attn-layers for this one too (the original's choice: 0)" in err[0], err


@pytest.mark.parametrize("preset", ["paper", "paper-all-attn"])
def test_paper_presets_keep_the_originals_schedule_and_precision(preset: str) -> None:
    # The short-run tuning (a schedule to the budget's end, bf16 where native) is the tiny preset's alone.
    _, train = built("--preset", preset)
    assert (train.decay, train.precision, train.warmup, train.lr) == ("none", "fp32", 800, 2e-3)
