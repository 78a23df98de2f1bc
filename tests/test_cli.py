"""The command line: bad input is one clean error line (exit 2), a tiny train/eval round trip, flag precedence."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharnn.cli import build_parser, main
from sharnn.flags import resolve_train_settings

SENTENCES = (
    b"The quick brown fox jumps over the lazy dog. ",
    b"A single headed attention RNN reads one byte at a time. ",
    b"Stop thinking with your head, she said, and the model learned to count. ",
    b"Pack my box with five dozen liquor jugs! ",
)


def tiny_flags(tmp_path: Path) -> list[str]:
    return ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--attn-layers", "1", "--attn-span", "24",
            "--bptt", "16", "--batch_size", "2", "--max-steps", "2", "--quiet", "--save", str(tmp_path / "run")]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """About 20 KB of English sentences."""
    out, i = bytearray(), 0
    while len(out) < 20_000:
        out += SENTENCES[i % len(SENTENCES)] + SENTENCES[(i * 7 + 3) % len(SENTENCES)]
        i += 1
    p = tmp_path / "text.txt"
    p.write_bytes(bytes(out[:20_000]))
    return p


def assert_one_error_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("sharnn: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- bad input: exit status 2, one line, no traceback -------------------------------------------------------


def _bad_train_cases(tmp_path: Path, text_file: Path) -> dict[str, tuple[list[str], str]]:
    tiny_corpus = tmp_path / "tiny.txt"
    tiny_corpus.write_bytes(b"not nearly enough text for sixteen streams. " * 12)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("emsize = = 16\n")
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text("[model]\nemsize = 16\nhidden_size = 64\n")
    data = ["--data", str(text_file)]
    return {
        "missing data": (["--data", "/nonexistent"], "/nonexistent does not exist"),
        "corpus smaller than a batch": (
            ["--data", str(tiny_corpus), "--batch_size", "16", "--bptt", "64"], "too few for 16 streams"),
        "nhid not a multiple": (data + ["--nhid", "40"], "must be a multiple of emsize=16"),
        "unknown preset": (data + ["--preset", "huge"], "unknown preset 'huge'"),
        "qrnn window": (data + ["--model", "QRNN", "--qrnn-window", "3"], "--qrnn-window must be 1 or 2"),
        "qrnn window on lstm": (data + ["--qrnn-window", "1"], "applies to --model QRNN only"),
        "unknown model": (data + ["--model", "Transformer"], "unknown --model"),
        "wdrop": (data + ["--wdrop", "1"], "--wdrop must be in [0, 1)"),
        "negative nonmono": (data + ["--optimizer", "sgd", "--nonmono", "-1"], "--nonmono must not be negative"),
        "bad TOML": (data + ["--config", str(bad_toml)], "not valid TOML"),
        "unknown config key": (data + ["--config", str(unknown_key)], "hidden_size"),
        "missing config": (data + ["--config", str(tmp_path / "none.toml")], "not found"),
        "attn layer out of range": (data + ["--attn-layers", "5"], "out of range"),
        "bptt too short": (data + ["--bptt", "3"], "--bptt 3 is too short"),
    }


@pytest.mark.parametrize("case", [
    "missing data", "corpus smaller than a batch", "nhid not a multiple", "unknown preset", "qrnn window", "qrnn window on lstm",
    "unknown model", "wdrop", "negative nonmono", "bad TOML", "unknown config key", "missing config", "attn layer out of range", "bptt too short",
])
def test_train_bad_input(case: str, tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra, fragment = _bad_train_cases(tmp_path, text_file)[case]
    assert main(["train", *tiny_flags(tmp_path), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err, fragment)


# Config-file values of the wrong kind: one clear line, never a traceback or a silent misreading.


@pytest.mark.parametrize("name,content", [
    pytest.param("seed.toml", 'seed = "abc"\n', id="seed.toml"),
    pytest.param("when.toml", 'when = ["3"]\n', id="when.toml"),
    pytest.param("tied.toml", 'tied = "no"\n', id="tied.toml"),
    pytest.param("list.json", "[1, 2]\n", id="list.json"),
    pytest.param("lr.toml", 'lr = "fast"\n', id="lr.toml"),
])
def test_config_file_value_of_wrong_kind(name: str, content: str, tmp_path: Path, text_file: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / name
    cfg.write_text(content)
    try:
        status = main(["train", *tiny_flags(tmp_path), "--data", str(text_file), "--config", str(cfg)])
    except Exception as e:  # noqa: BLE001 - any exception here is the bug under test
        pytest.fail(f"{type(e).__name__}: {e}")
    assert status == 2
    assert_one_error_line(capsys.readouterr().err, str(cfg) if name.endswith(".json") else "")


def test_eval_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "some-folder").mkdir()
    (tmp_path / "some-folder" / "notes.txt").write_text("hello")
    assert main(["eval", str(tmp_path / "some-folder")]) == 2
    assert_one_error_line(capsys.readouterr().err, "is not a sharnn checkpoint")
    assert main(["eval", str(tmp_path / "absent")]) == 2
    assert_one_error_line(capsys.readouterr().err, "does not exist")


@pytest.mark.parametrize("content", ["{this is not json", '{"format": "something-else"}', "[1, 2, 3]"])
def test_eval_garbage_config_json(tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(content)
    assert main(["eval", str(ckpt), "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, str(ckpt))


@pytest.mark.slow
def test_error_from_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sharnn.cli", "train", "--data", "/nonexistent", *tiny_flags(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "/nonexistent does not exist")


# --- the happy path -----------------------------------------------------------------------------------------


def test_tiny_train_then_eval(tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", str(text_file), *tiny_flags(tmp_path),
            "--max-steps", "5", "--max-eval-bytes", "2000", "--log-interval", "2", "--threads", "1", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 5
    assert Path(result["run_dir"]) == run
    for key in ("valid_bpc", "test_bpc", "best_valid_bpc"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert 0 < result["test_bpc"] < 10

    for name in ("best", "last"):
        for f in ("config.json", "model.safetensors", "train_state.pt", "train_config.json"):
            assert (run / name / f).is_file(), f"{name}/{f}"
    events = [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"start", "train", "valid", "final"} <= set(events)

    # Defaults come from the run: the training data, test_batch_size 8 and bptt 16 give the run's own test bpc
    # (the 1,000-byte test split is under --max-eval-bytes 2000, so the run measured all of it too).
    assert main(["eval", str(run), "--split", "test", "--json", "--device", "cpu"]) == 0
    test = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert test["split"] == "test" and test["batch_size"] == 8 and test["bptt"] == 16
    assert test["data"] == str(text_file)
    assert math.isfinite(test["bpc"]) and test["bpc"] == pytest.approx(result["test_bpc"], abs=1e-4)
    assert Path(test["checkpoint"]) == run / "best"

    assert main(["eval", str(run / "best"), "--split", "valid", "--batch_size", "3", "--bptt", "7", "--json",
                 "--device", "cpu"]) == 0
    valid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (valid["split"], valid["batch_size"], valid["bptt"]) == ("valid", 3, 7)
    assert isinstance(valid["bpc"], float) and math.isfinite(valid["bpc"])
    assert valid["predictions"] == (1000 // 3 - 1) * 3

    # The plain-text report is one line on stdout.
    assert main(["eval", str(run / "last"), "--split", "valid", "--device", "cpu"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("valid: loss ") and "bpc" in out


# --- settings precedence and spellings ----------------------------------------------------------------------


def settings(*argv: str):
    model, train, given, _ = resolve_train_settings(build_parser().parse_args(["train", *argv]))
    return model, train, given


def test_flags_override_preset() -> None:
    model, train, given = settings("--preset", "paper", "--emsize", "16", "--nhid", "32", "--bptt", "64")
    assert (model.emsize, model.nhid, train.bptt) == (16, 32, 64)
    assert (model.nlayers, model.attn_layers, model.dropoute) == (4, (2,), 0.0)  # from the preset
    assert (train.seed, train.epochs, train.alpha) == (5512, 32, 0.0)  # from the preset
    assert given["emsize"] == 16 and "vocab_size" not in given


def test_defaults_without_preset() -> None:
    model, train, given = settings()
    assert (model.emsize, train.seed, train.batch_size, train.epochs) == (1024, 1111, 16, 8000)
    assert given == {}


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_overrides_preset_and_flags_override_config(tmp_path: Path, suffix: str) -> None:
    cfg = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        cfg.write_text("seed = 7\n[model]\nemsize = 32\nnhid = 64\n[train]\nepochs = 3\nbatch-size = 4\n")
    else:
        cfg.write_text(json.dumps({"seed": 7, "model": {"emsize": 32, "nhid": 64},
                                   "train": {"epochs": 3, "batch_size": 4}}))
    model, train, _ = settings("--preset", "paper", "--config", str(cfg), "--epochs", "5")
    assert (model.emsize, model.nhid) == (32, 64)  # config over preset
    assert (train.seed, train.batch_size) == (7, 4)  # config over preset
    assert train.epochs == 5  # flag over config
    assert model.nlayers == 4 and train.lr == 2e-3 and train.alpha == 0.0  # preset where the config is silent
    # The order of the flags on the command line does not matter: a flag still beats the config file.
    model, train, _ = settings("--emsize", "64", "--nhid", "128", "--config", str(cfg), "--preset", "paper")
    assert (model.emsize, model.nhid, train.seed) == (64, 128, 7)


@pytest.mark.parametrize("flag", ["--batch_size", "--batch-size"])
def test_batch_size_spellings(flag: str) -> None:
    assert settings(flag, "3")[1].batch_size == 3


@pytest.mark.parametrize("flag", ["--log-interval", "--log_interval"])
def test_log_interval_spellings(flag: str) -> None:
    assert settings(flag, "7")[1].log_interval == 7


def test_attention_block_follows_nlayers(tmp_path: Path, text_file: Path, capsys) -> None:
    # As the original: the second to last block, whatever nlayers is; a preset keeps its explicit list.
    assert settings("--nlayers", "2")[0].attn_layers == (0,)
    assert settings("--nlayers", "6")[0].attn_layers == (4,)
    assert settings("--nlayers", "1")[0].attn_layers == ()
    assert settings("--nlayers", "6", "--attn-layers", "1", "3")[0].attn_layers == (1, 3)
    assert settings("--preset", "paper-all-attn")[0].attn_layers == (0, 1, 2, 3)
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "block nlayers-2" in help_text and "no attention when nlayers is 1" in help_text
    # A plain run with 2 blocks trains (it used to stop: "attn_layers [2] out of range"), and its checkpoint
    # says where the attention went.
    flags = [f for f in tiny_flags(tmp_path) if f not in ("--attn-layers", "1")]
    assert main(["train", "--data", str(text_file), *flags, "--max-eval-bytes", "200", "--json"]) == 0
    saved = json.loads((tmp_path / "run" / "last" / "config.json").read_text())["model"]
    assert saved["nlayers"] == 2 and saved["attn_layers"] == [0]
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_list_and_optional_flags() -> None:
    model, train, _ = settings("--nlayers", "3", "--attn-layers", "0", "2", "--when", "3", "5",
                               "--max-time", "none", "--max_steps", "9", "--no-tied", "--cuda")
    assert model.attn_layers == (0, 2) and model.tied is False
    assert train.when == (3, 5) and train.max_time is None and train.max_steps == 9
    assert train.device == "cuda"


# --- resume: the run's own settings, the flags typed on top --------------------------------------------------

RUN_A = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--attn-layers", "1", "--attn-span", "24",
         "--seed", "7", "--bptt", "16", "--batch_size", "2", "--lr", "0.01", "--warmup", "2", "--epochs", "5",
         "--max-eval-bytes", "200"]


def log_events(run: Path, event: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if e["event"] == event]


def test_resume_continues_the_run_it_names(tmp_path: Path, text_file: Path, monkeypatch, capsys) -> None:
    # The reproduction: a resume without the run's flags trained with every default (seed 1111, bptt
    # 1024, batch 16, ...) into runs/sharnn. It must take the run's settings, the typed flags on top.
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "text.txt", *RUN_A, "--max-steps", "3", "--save", "runs/A", "--quiet"]) == 0
    assert main(["train", "--data", "text.txt", *RUN_A, "--max-steps", "6", "--save", "runs/B", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "runs/A/last", "--max-steps", "6", "--data", "text.txt"]) == 0
    err = capsys.readouterr().err
    saved = json.loads(Path("runs/A/last/train_config.json").read_text())
    assert {k: saved[k] for k in ("seed", "bptt", "batch_size", "lr", "warmup", "epochs", "save", "max_steps")} == {
        "seed": 7, "bptt": 16, "batch_size": 2, "lr": 0.01, "warmup": 2, "epochs": 5, "save": "runs/A",
        "max_steps": 6}
    assert not Path("runs/sharnn").exists()
    printed = json.loads(next(x for x in err.splitlines() if x.startswith("settings: "))[len("settings: "):])
    assert printed["model"]["emsize"] == 16 and printed["train"]["bptt"] == 16  # the model's real settings
    said = [x for x in err.splitlines() if x.startswith("resuming from")]
    assert said == ["resuming from runs/A/last at epoch 1, step 3; changed: max_steps 3 -> 6"]
    assert "global batch changed" not in err
    assert log_events(Path("runs/A"), "start")[-1]["resumed"]["changed"] == {"max_steps": [3, 6]}
    # 3 steps, then 3 more resumed: the weights of 6 straight, so every setting and random stream carried on.
    a, b = load_file("runs/A/last/model.safetensors"), load_file("runs/B/last/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", "--resume", "runs/A/last", "--quiet"]) == 2  # the run's own --max-steps 6 is spent
    assert_one_error_line(capsys.readouterr().err, "at step 6, so --max-steps 6 leaves nothing", "larger --max-steps")

    # Without --data (the run's corpus), with a config file layered over the run and a new seed said out loud.
    Path("lr.toml").write_text("lr = 0.004\n")
    assert main(["train", "--resume", "runs/A", "--config", "lr.toml", "--seed", "125", "--max-steps", "8"]) == 0
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if x.startswith("resuming from")]
    assert said == [("resuming from runs/A/last at epoch 1, step 6; changed: lr 0.01 -> 0.004, seed 7 -> 125 "
                    "(fresh random streams: the saved ones are not used), max_steps 6 -> 8")]
    saved = json.loads(Path("runs/A/last/train_config.json").read_text())
    assert (saved["lr"], saved["seed"], saved["bptt"], saved["max_steps"]) == (0.004, 125, 16, 8)
    assert log_events(Path("runs/A"), "start")[-1]["resumed"]["changed"] == {
        "lr": [0.01, 0.004], "seed": [7, 125], "max_steps": [6, 8]}
    assert not Path("runs/sharnn").exists()

    # A checkpoint outside any run folder has no folder to go back to: --save says where.
    import shutil

    shutil.copytree("runs/A/last", "loose")
    assert main(["train", "--resume", "loose", "--max-steps", "9", "--quiet"]) == 2
    assert_one_error_line(capsys.readouterr().err, "not inside a run folder", "pass --save")
    assert main(["train", "--resume", "loose", "--max-steps", "9", "--quiet", "--save", "runs/C"]) == 0
    assert json.loads(Path("runs/C/last/config.json").read_text())["progress"]["step"] == 9


def test_resume_past_the_last_epoch_says_how_to_go_on(tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_bytes(SENTENCES[0] * 40)  # 1,800 bytes: one epoch is about 50 steps of 2 x 16 bytes
    run = tmp_path / "run"
    flags = tiny_flags(tmp_path)
    del flags[flags.index("--max-steps") : flags.index("--max-steps") + 2]  # no budget: the epoch ends it
    assert main(["train", "--data", str(short), *flags, "--epochs", "1", "--max-eval-bytes", "200"]) == 0
    steps = json.loads((run / "last" / "config.json").read_text())["progress"]["step"]
    assert main(["train", "--resume", str(run), "--quiet", "--max-steps", str(steps + 1)]) == 2
    assert_one_error_line(capsys.readouterr().err, "has finished epoch 1, so --epochs 1 leaves nothing to train",
                          "pass a larger --epochs")
    assert main(["train", "--resume", str(run), "--quiet", "--epochs", "2", "--max-steps", str(steps + 2)]) == 0
    assert json.loads((run / "last" / "config.json").read_text())["progress"]["step"] == steps + 2
