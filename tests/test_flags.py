"""Every training flag does something: a seeded 3-step run with the flag changed differs from the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, write_sentences
from safetensors.torch import load_file

from sharnn.cli import main
from sharnn.config import TrainConfig
from sharnn.data import load_corpus
from sharnn.errors import SharnnError
from sharnn.optim import lr_at
from sharnn.runtime import resolve_device


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentences(tmp_path_factory.mktemp("corpus"))


def run(corpus: Path, out: Path, *flags: str) -> tuple[dict, dict[str, torch.Tensor]]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--data", str(corpus), "--save", str(out), *TINY, "--log-interval", "1", *flags]) == 0
    return json.loads(buf.getvalue()), load_file(str(out / "last" / "model.safetensors"))


@pytest.fixture(scope="module")
def baseline(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return run(corpus, tmp_path_factory.mktemp("base"))[1]


@pytest.mark.parametrize("flags", [
    ["--lr", "1e-2"], ["--clip", "0.01"], ["--clip", "0"], ["--wdecay", "0.5"], ["--seed", "7"],
    ["--warmup", "0"], ["--cooldown", "1"], ["--accumulate", "2"], ["--bptt", "9"], ["--batch_size", "3"],
    ["--dropout", "0.5"], ["--dropouth", "0.5"], ["--dropouti", "0.5"], ["--dropoute", "0.5"],
    ["--alpha", "2"], ["--beta", "1"], ["--attn-span", "3"], ["--optimizer", "adam"], ["--optimizer", "adamw"],
    ["--optimizer", "sgd", "--nonmono", "0"], ["--attn-layers", "0"], ["--nlayers", "3"], ["--precision", "bf16"],
    ["--decay", "linear"], ["--decay", "cosine"], ["--decay", "linear", "--decay-to", "0.9"],
    ["--decay", "linear", "--decay-fraction", "0.9"],
])
def test_flag_changes_training(corpus: Path, tmp_path: Path, baseline: dict[str, torch.Tensor], flags: list[str]) -> None:
    _, weights = run(corpus, tmp_path / "run", *flags)
    differs = weights.keys() != baseline.keys() or any(
        weights[k].shape != baseline[k].shape or not torch.equal(weights[k], baseline[k]) for k in baseline
    )
    assert differs, f"{flags} left the weights unchanged"
    # ... and it is this flag that acted: its value is what the run recorded, and schedule flags set the very
    # learning rate each step used.
    ckpt = tmp_path / "run" / "last"
    settings = json.loads((ckpt / "train_config.json").read_text()) | json.loads((ckpt / "config.json").read_text())["model"]
    for name, value in zip(flags[::2], flags[1::2]):
        recorded = settings[name.lstrip("-").replace("-", "_")]
        assert str(recorded) == value or recorded == [int(value)] if isinstance(recorded, list) else (
            str(recorded) == value or float(recorded) == float(value)), (name, recorded)
    cfg = TrainConfig.from_dict({k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})
    lrs = [(e["step"], e["lr"]) for e in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
           if e["event"] == "train"]
    assert len(lrs) == 3 * cfg.accumulate  # a log line per segment (--log-interval 1)
    if cfg.accumulate == 1:
        # --max-steps 3 is the budget that ends first: --decay runs to it
        assert [lr for _, lr in lrs] == pytest.approx([lr_at(step, 1, cfg, cfg.max_steps) for step, _ in lrs])


def test_seed_repeats(corpus: Path, tmp_path: Path, baseline: dict[str, torch.Tensor]) -> None:
    _, weights = run(corpus, tmp_path / "again")
    assert all(torch.equal(weights[k], baseline[k]) for k in baseline)


def test_untied_has_its_own_decoder(corpus: Path, tmp_path: Path) -> None:
    _, weights = run(corpus, tmp_path / "untied", "--no-tied")
    assert "decoder.weight" in weights and "encoder.weight" in weights


def test_reporting_flags(corpus: Path, tmp_path: Path) -> None:
    res, _ = run(corpus, tmp_path / "r", "--max-steps", "6", "--log-interval", "2", "--eval-interval", "2",
                 "--sample", "40", "--max-eval-bytes", "200")
    events = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "train" for e in events) == 3  # a line every 2 of 6 batches
    assert [e["step"] for e in events if e["event"] == "valid"] == [2, 4, 6]  # the budget's end: already done
    prompt = bytes(load_corpus(str(corpus)).test[:64]).decode()  # the sample follows the test split's first bytes
    assert res["sample"].startswith(prompt) and len(res["sample"]) > len(prompt)


def test_eval_and_test_streams(corpus: Path, tmp_path: Path) -> None:
    from sharnn.checkpoint import load_model
    from sharnn.data import load_corpus
    from sharnn.evaluate import evaluate

    res, _ = run(corpus, tmp_path / "s", "--test-batch-size", "5", "--eval-batch-size", "3")
    model = load_model(tmp_path / "s")
    c = load_corpus(str(corpus))
    assert res["test_bpc"] == pytest.approx(evaluate(model, c.test, 5, 16).bpc, rel=1e-6)
    assert res["valid_bpc"] == pytest.approx(evaluate(model, c.valid, 3, 16).bpc, rel=1e-6)


def test_threads_flag(corpus: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()  # the tests run with one thread (conftest)
    try:
        run(corpus, tmp_path / "t", "--threads", "2")
        assert torch.get_num_threads() == 2 != before
    finally:
        torch.set_num_threads(before)


def test_cuda_without_gpu_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SharnnError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(SharnnError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto").type == "cpu"


def test_checkpoint_activations_trains_the_same_weights(corpus: Path, tmp_path: Path,
                                                        baseline: dict[str, torch.Tensor], monkeypatch) -> None:
    # Recomputing blocks in the backward pass saves memory and must not change a single number: the dropout
    # masks are replayed. (It does run: every block of every forward goes through torch's checkpoint.)
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, weights = run(corpus, tmp_path / "ckpt", "--checkpoint-activations")
    assert calls
    assert all(torch.allclose(weights[k], baseline[k], atol=1e-6) for k in baseline)


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--clip", "inf"), ("--wdecay", "nan"), ("--alpha", "inf"),
                                        ("--max-time", "inf"), ("--save-every-minutes", "nan"),
                                        ("--dropout", "nan"), ("--lr", "-inf")])
def test_non_finite_numbers_are_refused(corpus: Path, tmp_path: Path, flag: str, value: str, capsys) -> None:
    # NaN passes every range check (nan <= 0 is False): --lr nan used to train, turning every weight to NaN.
    assert main(["train", "--data", str(corpus), "--save", str(tmp_path / "run"), *TINY, f"{flag}={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sharnn: error: {flag} must be a finite number, got {float(value)}"]
    assert not (tmp_path / "run").exists()
    toml = tmp_path / "bad.toml"
    toml.write_text(f"{flag.lstrip('-').replace('-', '_')} = {value}\n")  # TOML spells nan and inf too
    assert main(["train", "--data", str(corpus), "--save", str(tmp_path / "run"), *TINY, "--config", str(toml)]) == 2
    assert "must be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("when", ["0", "-2"])
def test_when_counts_epochs_from_one(when: str) -> None:
    # The original divides after `epoch in args.when` for epoch in 1..epochs: 0 never matched there, nor here.
    with pytest.raises(SharnnError, match=f"--when {when}: epochs count from 1"):
        TrainConfig(when=(2, int(when)))
    assert TrainConfig(when=(-1,)).when == (-1,) and lr_at(1, 2, TrainConfig(when=(1,), warmup=0)) == pytest.approx(2e-4)
