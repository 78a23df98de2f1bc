"""What commands write: only what they made; an existing target replaced only with --overwrite; never one of
their own inputs (by any name), and never a folder sharnn did not write, not even with --overwrite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import sharnn.export as export_mod
from sharnn.checkpoint import is_checkpoint, load_model, save_checkpoint
from sharnn.cli import main
from sharnn.config import SHARNNConfig, TrainConfig
from sharnn.errors import SharnnError
from sharnn.model import SHARNN
from sharnn.outputs import refuse_input_as_output

CONFIG = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)
TINY = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--attn-layers", "1", "--attn-span", "24",
        "--bptt", "16", "--batch_size", "2", "--max-steps", "2", "--max-eval-bytes", "200", "--quiet"]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "runs" / "A" / "best", SHARNN(CONFIG), TrainConfig(bptt=16, batch_size=2),
                           train_state={"step": 0})


@pytest.fixture
def text(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 80)
    return p


def one_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("sharnn: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def state_dict_file(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    p = tmp_path / "sd.pt"
    torch.save(SHARNN(CONFIG).state_dict(), p)
    return p


# --- collapse and import-reference: the checkpoint folder OUT -----------------------------------------------------


@pytest.mark.parametrize("command", ["collapse", "import-reference"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_a_folder_sharnn_did_not_write_is_never_replaced(command: str, overwrite: list[str], ckpt: Path,
                                                         tmp_path: Path, capsys) -> None:
    source = str(ckpt) if command == "collapse" else str(state_dict_file(tmp_path))
    mine = user_folder(tmp_path / "d")
    assert main([command, source, str(mine), *overwrite]) == 2
    one_line(capsys, "is not a sharnn checkpoint", "never replaced")
    assert (mine / "notes.txt").read_text() == "mine"
    # A run folder is sharnn's, but a checkpoint never takes its place: last/ and the log stay.
    run = save_checkpoint(tmp_path / "runs" / "B" / "last", SHARNN(CONFIG)).parent
    (run / "log.jsonl").write_text('{"event": "start"}\n')
    assert main([command, source, str(run), *overwrite]) == 2
    one_line(capsys, "is a run folder")
    assert is_checkpoint(run / "last") and (run / "log.jsonl").is_file()


@pytest.mark.parametrize("command", ["collapse", "import-reference"])
def test_a_checkpoint_is_replaced_only_with_overwrite(command: str, ckpt: Path, tmp_path: Path, capsys) -> None:
    source = str(ckpt) if command == "collapse" else str(state_dict_file(tmp_path))
    out = tmp_path / "out"
    out.mkdir()  # an empty folder takes the checkpoint: nothing is lost
    assert main([command, source, str(out)]) == 0
    capsys.readouterr()
    save_checkpoint(out, SHARNN(SHARNNConfig(emsize=8, nhid=8, nlayers=1)))  # another checkpoint there
    assert main([command, source, str(out)]) == 2
    one_line(capsys, "already holds a checkpoint", "--overwrite")
    assert load_model(out).cfg.emsize == 8
    assert main([command, source, str(out), "--overwrite"]) == 0
    assert load_model(out).cfg.emsize == 16
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_collapse_never_replaces_its_input(ckpt: Path, tmp_path: Path, capsys) -> None:
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    for out in (ckpt, link, ckpt / ".." / "best"):  # the same folder by its name, a symbolic link, `..`
        assert main(["collapse", str(ckpt), str(out), "--overwrite"]) == 2
        one_line(capsys, "is the input")
    assert main(["collapse", str(ckpt.parent), str(ckpt.parent), "--overwrite"]) == 2  # the run folder holding it
    one_line(capsys, "holds the input")
    assert (ckpt / "train_state.pt").is_file() and not load_model(ckpt).cfg.collapsed_gate


def test_import_reference_never_replaces_its_input(tmp_path: Path, capsys) -> None:
    sd = state_dict_file(tmp_path)
    assert main(["import-reference", str(sd), str(sd), "--overwrite"]) == 2
    one_line(capsys, "is the input")
    assert main(["import-reference", str(sd), str(tmp_path), "--overwrite"]) == 2
    one_line(capsys, "holds the input")
    assert torch.load(sd, weights_only=True)


# --- export: the file OUT -----------------------------------------------------------------------------------------


def test_export_replaces_a_file_only_with_overwrite(ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    pytest.importorskip("onnxscript")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"mine")
    seg = export_mod.segment_path(out, 8)
    calls = []
    monkeypatch.setattr(export_mod, "_export_one", lambda m, vocab, path, T: calls.append(path) or path.write_bytes(b"onnx"))
    assert main(["export", str(ckpt), str(out), "--check-bytes", "0"]) == 2
    one_line(capsys, "exists; pass --overwrite")
    assert out.read_bytes() == b"mine" and not calls
    assert main(["export", str(ckpt), str(out), "--check-bytes", "0", "--segment", "8", "--overwrite"]) == 0
    assert out.read_bytes() == seg.read_bytes() == b"onnx"
    assert all(p.parent.parent == tmp_path != p.parent for p in calls)  # written beside, then renamed into place
    assert main(["export", str(ckpt), str(ckpt / "model.safetensors"), "--check-bytes", "0", "--overwrite"]) == 2
    one_line(capsys, "lies inside the input")


def test_a_failed_export_leaves_nothing(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnxscript")
    out = tmp_path / "model.onnx"
    model = load_model(ckpt)

    def half_then_fail(m, vocab, path: Path, T: int) -> None:
        path.write_bytes(b"half")
        if T > 1:
            raise SharnnError("disk full")

    monkeypatch.setattr(export_mod, "_export_one", half_then_fail)
    with pytest.raises(SharnnError, match="disk full"):
        export_mod.export_onnx(model, out, segment=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # neither file, no temporary folder


# --- compress and decompress: never the input, by any name ------------------------------------------------------


def test_decompress_and_compress_never_replace_their_input(ckpt: Path, text: Path, tmp_path: Path,
                                                           capsys) -> None:
    pytest.importorskip("constriction")
    packed = tmp_path / "text.shz"
    assert main(["compress", str(ckpt), str(text), str(packed), "--quiet", "--streams", "2"]) == 0
    capsys.readouterr()
    data = packed.read_bytes()
    hard, soft = tmp_path / "hard.shz", tmp_path / "soft.shz"
    os.link(packed, hard)
    soft.symlink_to(packed)
    for out in (packed, hard, soft, tmp_path / "." / "text.shz"):
        assert main(["decompress", str(ckpt), str(packed), str(out), "--overwrite", "--quiet"]) == 2
        one_line(capsys, "is the input")
        assert main(["compress", str(ckpt), str(out), str(packed), "--overwrite", "--quiet"]) == 2
        one_line(capsys, "is the input")
    assert packed.read_bytes() == data
    assert main(["decompress", str(ckpt), str(packed), str(ckpt / "config.json"), "--overwrite", "--quiet"]) == 2
    one_line(capsys, "lies inside the input")
    assert is_checkpoint(ckpt)


def test_refuse_input_as_output_by_any_name(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_text("x")
    refuse_input_as_output(tmp_path / "b", a)  # a new name: fine
    os.link(a, tmp_path / "b")
    with pytest.raises(SharnnError, match="is the input"):
        refuse_input_as_output(tmp_path / "b", a)


# --- train --save: the run folder -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["best", "last", "step-000002", "log.jsonl"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_train_never_replaces_what_it_did_not_write(name: str, overwrite: list[str], text: Path, tmp_path: Path,
                                                    capsys) -> None:
    run = tmp_path / "run"
    if name == "log.jsonl":
        run.mkdir()
        (run / name).write_text("my own notes\n")
    else:
        user_folder(run / name)
    assert main(["train", "--data", str(text), "--save", str(run), *TINY, *overwrite]) == 2
    one_line(capsys, f"{run / name} is in the way", "sharnn did not write it")
    assert (run / name / "notes.txt").read_text() == "mine" if name != "log.jsonl" else (
        (run / name).read_text() == "my own notes\n")


def test_overwrite_deletes_only_the_old_runs_checkpoints(text: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(text), "--save", str(run), *TINY]) == 0
    (run / "notes.txt").write_text("mine")
    save_checkpoint(run / "collapsed", SHARNN(CONFIG))  # a checkpoint of the user's, not one training writes
    assert main(["train", "--data", str(text), "--save", str(run), *TINY]) == 2
    one_line(capsys, "already holds a run (best, last)", "--overwrite")
    assert main(["train", "--data", str(text), "--save", str(run), *TINY, "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and is_checkpoint(run / "collapsed")
    starts = [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if e["event"] == "start"]
    assert len(starts) == 1  # the old run's log went with its checkpoints


def test_resume_into_another_runs_folder_needs_overwrite(text: Path, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    for run in (a, b):
        assert main(["train", "--data", str(text), "--save", str(run), *TINY]) == 0
    before = (b / "last" / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(a), "--save", str(b), "--max-steps", "3", "--quiet"]) == 2
    one_line(capsys, f"{b} already holds a run")
    assert (b / "last" / "model.safetensors").read_bytes() == before
    assert main(["train", "--resume", str(a), "--save", str(b), "--max-steps", "3", "--quiet", "--overwrite"]) == 0
    assert json.loads((b / "last" / "config.json").read_text())["progress"]["step"] == 3


def test_a_run_that_fails_to_start_leaves_no_folder(text: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "missing.txt", *TINY]) == 2  # the default --save, runs/sharnn
    capsys.readouterr()
    assert main(["train", "--data", str(text), "--save", "new/deeper/run", *TINY, "--batch_size", "999"]) == 2
    one_line(capsys, "too few for 999 streams")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_save_pretrained_replaces_a_checkpoint_but_no_other_folder(tmp_path: Path) -> None:
    from sharnn import SHARNN as Pretrained

    model = Pretrained(CONFIG)
    mine = user_folder(tmp_path / "mine")
    with pytest.raises(SharnnError, match="is not a sharnn checkpoint"):
        model.save_pretrained(mine)
    assert (mine / "notes.txt").read_text() == "mine"
    model.save_pretrained(tmp_path / "pre")
    model.save_pretrained(tmp_path / "pre")  # its own kind: replaced, as Hugging Face's save_pretrained does
    assert is_checkpoint(tmp_path / "pre")
