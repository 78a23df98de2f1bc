"""A checkpoint is opened once: one object that every command takes, each of its files read once."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import TINY, write_sentences

from sharnn.checkpoint import Checkpoint
from sharnn.cli import main

RECORDING: list[str] = []  # paths opened for reading while a test records (the audit hook below appends)
WATCHED: list[Path] = []


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not WATCHED or not isinstance(args[0], (str, Path)):
        return
    mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
    if any(c in mode for c in "wax+"):
        return
    path = Path(args[0]).resolve()
    if any(path.parent == w for w in WATCHED):
        RECORDING.append(path.name)


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only while WATCHED is set


def reads(folder: Path, argv: list[str]) -> Counter[str]:
    """Run `sharnn ARGV` and count how often each file of `folder` was opened for reading."""
    RECORDING.clear()
    WATCHED[:] = [folder.resolve()]
    try:
        assert main(argv) == 0
    finally:
        WATCHED.clear()
    return Counter(RECORDING)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    text = write_sentences(tmp)
    run = tmp / "run"
    assert main(["train", "--data", str(text), "--save", str(run), *TINY, "--save-every-minutes", "none"]) == 0
    return run


ONCE = Counter({"config.json": 1, "train_config.json": 1, "model.safetensors": 1, "train_state.pt": 1})


def test_a_resume_reads_its_checkpoint_once(run: Path, tmp_path: Path, capsys) -> None:
    # The settings (flags.resolve_train_settings), the run folder's claim, the model, the training state and
    # the data's identity all come from one Checkpoint: each file of last/ is read once, and checked as it is.
    got = reads(run / "last", ["train", "--resume", str(run), "--max-steps", "4", "--save", str(tmp_path / "r"),
                               "--quiet", "--json"])
    assert got == ONCE
    capsys.readouterr()


@pytest.mark.parametrize("argv", [["eval", "{ckpt}", "--json"], ["generate", "{ckpt}", "-n", "3", "--seed", "1"],
                                  ["export", "{ckpt}", "{out}/m.onnx", "--check-bytes", "0"]])
def test_commands_read_a_checkpoint_once(run: Path, tmp_path: Path, argv: list[str], capsys, monkeypatch) -> None:
    ckpt = run / "best"
    # The export's own work (tracing the graph, seconds) reads nothing of the checkpoint: a file stands in for it.
    monkeypatch.setattr("sharnn.export._export_one", lambda m, vocab, path, T: path.write_bytes(b"onnx"))
    got = reads(ckpt, [a.format(ckpt=ckpt, out=tmp_path) for a in argv])
    assert got == ONCE - Counter({"train_state.pt": 1})  # what a command that does not train needs
    capsys.readouterr()


def test_one_object_holds_what_config_json_says(run: Path) -> None:
    ckpt = Checkpoint.open(run, prefer="last")
    assert ckpt.path == run / "last" and ckpt.run_folder == run
    assert ckpt.train_config.bptt == 16 and ckpt.model_config.emsize == 16 and ckpt.vocab.kind == "bytes"
    assert ckpt.progress["step"] == 3 and ckpt.data["splits"]["train"]["tokens"] > 0
    assert ckpt.train_state()["step"] == 3


def test_collapse_keeps_the_run_settings_and_the_data_identity(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["collapse", str(run), str(tmp_path / "small")]) == 0
    small, best = Checkpoint.open(tmp_path / "small"), Checkpoint.open(run)
    assert small.model_config.collapsed_gate and not best.model_config.collapsed_gate
    assert small.data == best.data and small.data is not None  # eval then warns about changed data as for best/
    assert small.train_config == best.train_config
    capsys.readouterr()
