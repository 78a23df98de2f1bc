"""Training that survives: atomic checkpoints under SIGKILL, exact resume, signals, non-finite steps, bad input,
periodic saves, and bounded memory in evaluation, generation and scoring."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sharnn.checkpoint as checkpoint_mod
import sharnn.train as train_mod
from sharnn.checkpoint import (
    link_checkpoint,
    load_model,
    load_train_state,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    step_checkpoints,
    step_name,
)
from sharnn.cli import main
from sharnn.config import SHARNNConfig, TrainConfig
from sharnn.errors import SharnnError
from sharnn.evaluate import evaluate
from sharnn.generate import generate_ids
from sharnn.model import SHARNN
from sharnn.optim import lr_at
from sharnn.runfolder import clean_run_folder
from sharnn.score import score_stream
from sharnn.train import TrainingInterrupted, train
from sharnn.vocab import BYTES

# Dropouts on (dropoute too): resume must restore the torch RNG stream exactly to pass.
MODEL = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24,
                     dropout=0.1, dropouth=0.1, dropouti=0.1, dropoute=0.1)
TINY_FLAGS = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--attn-layers", "1", "--attn-span", "24",
              "--bptt", "16", "--batch_size", "2", "--quiet"]
TIME_FIELDS = {"time", "ms_per_batch", "chars_per_s"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "fox.txt"
    p.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 100)  # 4,500 bytes: ~30 segments an epoch
    return p


def cfg_for(text_file: Path, run: Path, **kw) -> TrainConfig:
    base = {"data": str(text_file), "batch_size": 4, "bptt": 32, "lr": 2e-2, "warmup": 5, "alpha": 2.0, "beta": 1.0,
            "save": str(run), "log_interval": 5, "max_eval_bytes": 200, "save_every_minutes": None}
    return TrainConfig(**(base | kw))


def train_records(run: Path) -> list[dict]:
    """The log's train lines without their timings: what must repeat exactly."""
    out = []
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["event"] == "train":
            out.append({k: v for k, v in r.items() if k not in TIME_FIELDS})
    return out


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = load_train_state(a / "last"), load_train_state(b / "last")
    assert (sa["epoch"], sa["step"], sa["position"]) == (sb["epoch"], sb["step"], sb["position"])
    for i, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(st[k], sb["optimizer"]["state"][i][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert train_records(a) == train_records(b)
    assert len(train_records(a)) >= 3


# --- atomic checkpoints: a process killed with SIGKILL while saving -----------------------------------------------

DRIVER = r"""
import json, os, random, shutil, signal, sys, time
from pathlib import Path
import torch
from sharnn.checkpoint import link_checkpoint, save_checkpoint, step_name
from sharnn.runfolder import prune_checkpoints
from sharnn.config import SHARNNConfig
from sharnn.model import SHARNN

root, n_random = Path(sys.argv[1]), int(sys.argv[2])
model = SHARNN(SHARNNConfig(emsize=64, nhid=256, nlayers=2, attn_layers=(1,), attn_span=16))

def cycle(run, i):
    # One periodic save as training does it (--save-every, --keep 2); i marks weights, state and config.json.
    with torch.no_grad():
        model.encoder.weight[0, 0] = float(i)
    save_checkpoint(run / step_name(i), model, None, {"step": i}, {"step": i, "m": torch.full((64, 64), float(i))})
    link_checkpoint(run / step_name(i), run / "last")
    prune_checkpoints(run, 2)

def kill_before_op(k):
    # SIGKILL this process just before its k-th file-system call (fsync skipped: it only matters for power loss).
    count = [0]
    def hook(fn, name):
        def inner(*a, **kw):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return None if name == "fsync" else fn(*a, **kw)
        return inner
    for mod, name in ((os, "replace"), (os, "link"), (os, "mkdir"), (os, "fsync"), (os, "unlink"),
                      (os, "rmdir"), (shutil, "rmtree")):
        setattr(mod, name, hook(getattr(mod, name), name))

template = root / "template"
cycle(template, 1)
cycle(template, 2)

def trial(name, work, delay=None):
    run = root / name
    shutil.copytree(template, run)
    pid = os.fork()
    if pid == 0:
        try:
            work(run)
        finally:
            os._exit(0)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    return os.WIFSIGNALED(os.waitpid(pid, 0)[1])

def save_forever(run):
    i = 3
    while True:
        cycle(run, i)
        i += 1

k = 1
while trial(f"op-{k:03d}", lambda run: (kill_before_op(k), cycle(run, 3))):
    k += 1  # the k-th operation was reached and the save killed there; the loop ends when a save completes
rnd = random.Random(0)
for t in range(n_random):
    trial(f"random-{t:02d}", save_forever, delay=rnd.uniform(0.0, 0.3))
print(json.dumps({"points": k - 1}))
"""


def _check_killed_run(run: Path) -> tuple[int, bool]:
    """The run folder a killed save left: `last` and every step-* load whole and consistent. -> (step, debris)."""
    debris = any(p.name.startswith(".") for p in run.iterdir())

    def whole(ckpt: Path) -> int:
        step = load_train_state(ckpt)["step"]
        assert load_model(ckpt).encoder.weight[0, 0].item() == step == read_meta(ckpt)["progress"]["step"]
        return step

    step = whole(resolve_checkpoint(run, prefer="last"))
    for d in step_checkpoints(run):
        assert whole(d) == int(d.name.split("-")[1])
    clean_run_folder(run)  # what the next `train` does first: leftovers go, a lone .last.old comes back
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert whole(run / "last") == step
    return step, debris


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="forks a process that imported torch")
def test_checkpoint_survives_sigkill_at_any_point(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), "10"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    points = json.loads(proc.stdout)["points"]
    assert points >= 20  # every file-system call of save + link + prune was a kill point
    op_runs = sorted(tmp_path.glob("op-*"))
    assert len(op_runs) == points + 1  # the last one's save completed
    outcomes = [_check_killed_run(run) for run in op_runs]
    assert {step for step, _ in outcomes} == {2, 3}  # the old checkpoint or the new one, never a mixture
    assert sum(debris for _, debris in outcomes) >= points // 2  # the kills did land inside the save
    random_runs = sorted(tmp_path.glob("random-*"))
    assert len(random_runs) == 10
    for run in random_runs:
        _check_killed_run(run)


def test_resolve_and_clean_after_a_kill_between_the_renames(tmp_path: Path) -> None:
    model = SHARNN(MODEL)
    run = tmp_path / "run"
    save_checkpoint(run / "last", model, progress={"step": 1}, train_state={"step": 1})
    os.replace(run / "last", run / ".last.old")  # killed between the two renames: only .last.old is whole
    (run / ".last.tmp").mkdir()
    (run / ".last.tmp" / "model.safetensors").write_bytes(b"half")
    assert resolve_checkpoint(run, prefer="last") == run / ".last.old"
    assert resolve_checkpoint(run / "last") == run / ".last.old"
    clean_run_folder(run)
    assert sorted(p.name for p in run.iterdir()) == ["last"]
    assert load_train_state(run / "last")["step"] == 1


def test_link_checkpoint_shares_files(tmp_path: Path) -> None:
    model = SHARNN(MODEL)
    save_checkpoint(tmp_path / "step-000005", model, progress={"step": 5}, train_state={"step": 5})
    link_checkpoint(tmp_path / "step-000005", tmp_path / "last")
    for f in ("config.json", "model.safetensors", "train_state.pt"):
        assert os.stat(tmp_path / "last" / f).st_ino == os.stat(tmp_path / "step-000005" / f).st_ino
    shutil.rmtree(tmp_path / "step-000005")
    assert load_train_state(tmp_path / "last")["step"] == 5
    load_model(tmp_path / "last")


# --- exact resume ------------------------------------------------------------------------------------------------


def test_resume_is_exact_in_weights_and_log_lines(text_file: Path, tmp_path: Path) -> None:
    train(MODEL, cfg_for(text_file, tmp_path / "straight", max_steps=22), quiet=True)
    split = tmp_path / "split"
    train(MODEL, cfg_for(text_file, split, max_steps=12), quiet=True)  # stops inside a 5-batch log window
    assert load_train_state(split / "last")["log_sums"]["batches"] == 2
    train(MODEL, cfg_for(text_file, split, max_steps=22, resume=str(split)), quiet=True)
    assert_same_run(tmp_path / "straight", split)


def test_resume_mid_accumulation_after_sigterm(text_file: Path, tmp_path: Path, monkeypatch) -> None:
    kw = {"accumulate": 3, "log_interval": 4}
    train(MODEL, cfg_for(text_file, tmp_path / "straight", max_steps=6, **kw), quiet=True)

    calls = []
    real = train_mod.ar_tar

    def ar_tar_then_signal(out, cfg):
        calls.append(1)
        if len(calls) == 8:  # the 8th segment: the second of the third step's three
            os.kill(os.getpid(), signal.SIGTERM)
        return real(out, cfg)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_mod, "ar_tar", ar_tar_then_signal)
    split = tmp_path / "split"
    with pytest.raises(TrainingInterrupted, match=f"SIGTERM.*--resume {split}") as e:
        train(MODEL, cfg_for(text_file, split, max_steps=6, **kw), quiet=True)
    assert e.value.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) is before  # handlers only while training
    state = load_train_state(split / "last")
    assert (state["step"], state["gathered"]) == (2, 2) and state["grads"] is not None
    monkeypatch.setattr(train_mod, "ar_tar", real)
    train(MODEL, cfg_for(text_file, split, max_steps=6, resume=str(split), **kw), quiet=True)
    assert_same_run(tmp_path / "straight", split)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_at_an_epoch_boundary(text_file: Path, tmp_path: Path, accumulate: int) -> None:
    kw = {"epochs": 2, "accumulate": accumulate, "log_interval": 3}
    straight = tmp_path / "straight"
    train(MODEL, cfg_for(text_file, straight, **kw), quiet=True)
    end_of_first = next(json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()
                        if json.loads(x)["event"] == "valid")["step"]
    split = tmp_path / "split"
    train(MODEL, cfg_for(text_file, split, max_steps=end_of_first, **kw), quiet=True)
    assert load_train_state(split / "last")["step"] == end_of_first
    train(MODEL, cfg_for(text_file, split, resume=str(split), **kw), quiet=True)
    assert_same_run(straight, split)


def test_resume_inside_an_accumulation_step_takes_the_new_lr(text_file: Path, tmp_path: Path, monkeypatch) -> None:
    # Stopped inside step 3 of 3 segments each, resumed with half the --lr: the rest of step 3 runs at the new
    # rate (it used to finish at the old one, the optimizer's saved rate).
    kw = {"accumulate": 3, "log_interval": 1}
    calls = []
    real = train_mod.ar_tar

    def ar_tar_then_signal(out, cfg):
        calls.append(1)
        if len(calls) == 8:  # the second segment of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(out, cfg)

    monkeypatch.setattr(train_mod, "ar_tar", ar_tar_then_signal)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(MODEL, cfg_for(text_file, run, max_steps=4, **kw), quiet=True)
    monkeypatch.setattr(train_mod, "ar_tar", real)
    new = cfg_for(text_file, run, max_steps=4, lr=1e-2, resume=str(run), **kw)
    train(MODEL, new, quiet=True)
    after = train_records(run)[8]  # the first segment after the resume completes step 3
    assert after["step"] == 3 and after["lr"] == pytest.approx(lr_at(3, 1, new)) != pytest.approx(lr_at(3, 1, replace(new, lr=2e-2)))


def test_the_first_log_line_after_a_resume_times_this_process_only(text_file: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=9), quiet=True)  # --log-interval 5: the window holds 4 batches
    assert load_train_state(run / "last")["log_sums"]["batches"] == 4
    real = train_mod.ar_tar
    monkeypatch.setattr(train_mod, "ar_tar", lambda out, cfg: (time.sleep(0.1), real(out, cfg))[1])
    train(MODEL, cfg_for(text_file, run, max_steps=10, resume=str(run)), quiet=True)
    line = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == "train"][-1]
    assert line["step"] == 10  # one batch of this process closed the window: at least 0.1 s for it alone
    assert line["ms_per_batch"] >= 100 and line["chars_per_s"] <= 4 * 64 / 0.1, line


def test_a_lower_log_interval_on_resume_still_logs(text_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=9), quiet=True)  # the saved window holds 4 batches
    train(MODEL, cfg_for(text_file, run, max_steps=11, log_interval=2, resume=str(run)), quiet=True)
    assert [r["step"] for r in train_records(run)] == [5, 10]  # 4 + 1 batches: past 2, so a line at once


def test_the_epoch_end_partial_step_is_a_step_like_any_other(text_file: Path, tmp_path: Path) -> None:
    # --accumulate 4 over an epoch whose segments are not a multiple of 4: the last step is partial, and its
    # periodic save (--save-every 1 --keep) happens like every other step's.
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, epochs=1, accumulate=4, log_interval=1, save_every=1, keep=100),
          quiet=True)
    segments = len(train_records(run))
    steps = -(-segments // 4)
    assert segments % 4 and load_train_state(run / "last")["step"] == steps
    assert [p.name for p in step_checkpoints(run)] == [step_name(s) for s in range(1, steps + 1)]


# --- SIGINT / SIGTERM in a real process ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_signals_stop_cleanly_and_resume(text_file: Path, tmp_path: Path) -> None:
    procs = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):  # two runs at once: one interpreter start-up of waiting
            run = tmp_path / sig.name
            cmd = [sys.executable, "-m", "sharnn.cli", "train", "--data", str(text_file), "--save", str(run),
                   *TINY_FLAGS, "--log-interval", "1", "--max-eval-bytes", "200"]  # no budget: runs until stopped
            procs[sig] = (run, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.time() + 60
        for sig, (run, proc) in procs.items():
            log = run / "log.jsonl"
            while not (log.is_file() and '"event": "train"' in log.read_text()):  # inside the training loop
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
            proc.send_signal(sig)
        results = {sig: proc.communicate(timeout=60) for sig, (_, proc) in procs.items()}
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for sig, (run, proc) in procs.items():
        out, err = results[sig]
        assert proc.returncode == 128 + sig, err  # 143 for SIGTERM, 130 for SIGINT
        assert "Traceback" not in err
        assert err.strip().startswith(f"sharnn: stopped by {sig.name} at epoch 1, step ")
        assert f"--resume {run}" in err and out == ""
        step = load_train_state(run / "last")["step"]
        assert step >= 1
        res = train(replace(MODEL, emsize=16), TrainConfig(data=str(text_file), save=str(run), resume=str(run),
                                                          bptt=16, batch_size=2, max_steps=step + 2,
                                                          max_eval_bytes=200), quiet=True)
        assert res.steps == step + 2


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="the run-folder lock uses fcntl")
def test_a_run_folder_is_locked_while_a_trainer_holds_it(text_file: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sharnn.cli", "train", "--data", str(text_file), "--save", str(run), *TINY_FLAGS,
           "--log-interval", "1", "--max-eval-bytes", "200"]  # no budget: it trains until it is killed
    holder = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        log = run / "log.jsonl"
        while not (log.is_file() and '"event": "train"' in log.read_text()):
            assert holder.poll() is None and time.time() < deadline, holder.communicate()
            time.sleep(0.05)
        for extra in ([], ["--overwrite"], ["--resume", str(tmp_path / "elsewhere")]):
            t0 = time.perf_counter()
            if extra[:1] == ["--resume"]:
                save_checkpoint(tmp_path / "elsewhere" / "last", SHARNN(MODEL), TrainConfig(), {"step": 0},
                                {"epoch": 1, "step": 0})
            assert main(["train", "--data", str(text_file), "--save", str(run), *TINY_FLAGS, "--max-steps", "1",
                         "--max-eval-bytes", "200", *extra]) == 2
            one_error_line(capsys, f"{run} is in use by another training",
                           f"pid {holder.pid} on host {socket.gethostname()}")
            assert time.perf_counter() - t0 < 5  # at once, not after loading anything
        holder.kill()  # SIGKILL: no handler runs, the lock file stays behind, unlocked
        holder.communicate(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (run / ".lock").is_file()
    assert main(["train", "--data", str(text_file), "--save", str(run), *TINY_FLAGS, "--max-steps", "1",
                 "--max-eval-bytes", "200"]) == 0
    assert not (run / ".lock").exists()  # a trainer that ends lets go and tidies up


def test_a_second_signal_stops_at_once(text_file: Path, tmp_path: Path, monkeypatch) -> None:
    real = train_mod.ar_tar
    calls = []

    def ar_tar_then_two_signals(out, cfg):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(out, cfg)

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(train_mod, "ar_tar", ar_tar_then_two_signals)
    with pytest.raises(KeyboardInterrupt):
        train(MODEL, cfg_for(text_file, tmp_path / "run", max_steps=10), quiet=True)
    assert signal.getsignal(signal.SIGINT) is before
    assert len(calls) == 3 and not (tmp_path / "run" / "last").exists()


# --- non-finite losses and gradients ---------------------------------------------------------------------------


def _nan_on(calls_wanted: set[int] | int, monkeypatch) -> None:
    """Make the loss NaN (and so every gradient) on the given segments, or on every segment from an index on."""
    calls = []
    real = train_mod.ar_tar

    def poisoned(out, cfg):
        calls.append(1)
        n = len(calls)
        bad = n in calls_wanted if isinstance(calls_wanted, set) else n >= calls_wanted
        return real(out, cfg) + (out.hidden.sum() * float("nan") if bad else 0.0)

    monkeypatch.setattr(train_mod, "ar_tar", poisoned)


def test_nonfinite_steps_are_skipped(text_file: Path, tmp_path: Path, monkeypatch) -> None:
    _nan_on({5, 6, 7}, monkeypatch)
    run = tmp_path / "run"
    res = train(MODEL, cfg_for(text_file, run, max_steps=10), quiet=True)
    assert res.steps == 10 and res.skipped_steps == 3
    assert all(torch.isfinite(w).all() for w in load_file(str(run / "last" / "model.safetensors")).values())
    events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [e["in_a_row"] for e in events if e["event"] == "nonfinite"] == [1, 2, 3]
    assert load_train_state(run / "last")["nonfinite_run"] == 0


def test_too_many_nonfinite_steps_stop_with_the_weights_from_before(text_file: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    train(MODEL, cfg_for(text_file, tmp_path / "good", max_steps=4), quiet=True)
    _nan_on(5, monkeypatch)  # segments 5, 6, 7, ... all non-finite
    run = tmp_path / "bad"
    with pytest.raises(SharnnError, match="3 optimizer steps in a row had a non-finite .* weights from step 4"):
        train(MODEL, cfg_for(text_file, run, max_steps=50, nonfinite_limit=3), quiet=True)
    good = load_file(str(tmp_path / "good" / "last" / "model.safetensors"))
    saved = load_file(str(run / "last" / "model.safetensors"))
    assert all(torch.equal(good[k], saved[k]) for k in good)
    state = load_train_state(run / "last")
    assert state["step"] == 4 and state["nonfinite_run"] == 3 and state["carried"] is None


def test_weights_that_turn_non_finite_are_never_saved(text_file: Path, tmp_path: Path, monkeypatch) -> None:
    # An update with a finite gradient (here: forced) makes the weights NaN after step 5; the losses then are
    # NaN and those steps are skipped until the limit. last/ must not take the NaN weights, and the message
    # must not call them the weights "before the trouble".
    real = train_mod.build_optimizer

    def poisoning(params, cfg):
        opt = real(params, cfg)
        step, calls = opt.step, []

        def poisoned_step(*a, **kw):
            out = step(*a, **kw)
            calls.append(1)
            if len(calls) == 5:
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].fill_(float("nan"))
            return out

        opt.step = poisoned_step
        return opt

    monkeypatch.setattr(train_mod, "build_optimizer", poisoning)
    run = tmp_path / "run"
    with pytest.raises(SharnnError, match="weights themselves are not finite.*not overwritten: it holds the "
                                          "weights from step 4") as e:
        train(MODEL, cfg_for(text_file, run, max_steps=50, nonfinite_limit=3, save_every=2), quiet=True)
    assert "before the trouble" not in str(e.value)
    assert all(torch.isfinite(w).all() for w in load_file(str(run / "last" / "model.safetensors")).values())
    assert load_train_state(run / "last")["step"] == 4
    events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [e["name"] for e in events if e["event"] == "unsaved"] == ["last"]


# --- periodic checkpoints ----------------------------------------------------------------------------------------


def test_save_every_keeps_the_last_k(text_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=9, save_every=2, keep=2), quiet=True)
    assert [p.name for p in step_checkpoints(run)] == ["step-000006", "step-000008"]
    assert [load_train_state(p)["step"] for p in step_checkpoints(run)] == [6, 8]
    assert load_train_state(run / "last")["step"] == 9 and (run / "best").is_dir()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    saves = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == "save"]
    assert [s["step"] for s in saves] == [2, 4, 6, 8, 9]
    # any of them resumes
    res = train(MODEL, cfg_for(text_file, tmp_path / "again", max_steps=10, resume=str(run / "step-000006")),
                quiet=True)
    assert res.steps == 10


def test_save_every_minutes(text_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=3, save_every_minutes=1e-6), quiet=True)
    saves = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == "save"]
    assert [s["step"] for s in saves] == [1, 2, 3]  # after every step; the budget's end saves no second step-3


def test_keep_needs_periodic_saves() -> None:
    with pytest.raises(SharnnError, match="--keep"):
        TrainConfig(keep=2, save_every_minutes=None)


# --- bad input: one clear line (exit 2), and never after training has started -----------------------------------


@pytest.fixture(scope="module")
def base_run(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--data", str(text_file), "--save", str(run), *TINY_FLAGS, "--max-steps", "2",
                 "--max-eval-bytes", "200"]) == 0
    return run


def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("sharnn: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_empty_and_too_short_corpus(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main(["train", "--data", str(empty), "--save", str(tmp_path / "r"), *TINY_FLAGS]) == 2
    one_error_line(capsys, "is empty")
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 400)  # 360 train bytes: 16 streams of 22, less than one segment of 64 each
    assert main(["train", "--data", str(short), "--save", str(tmp_path / "r"), *TINY_FLAGS,
                 "--batch_size", "16", "--bptt", "64"]) == 2
    one_error_line(capsys, "too few for 16 streams")


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "cp1252"])
def test_non_utf8_text_trains_as_bytes(encoding: str, tmp_path: Path, capsys) -> None:
    p = tmp_path / "text.txt"
    p.write_bytes(("Ça déçoit: «zèbre» ÿ ñ — " * 120).encode(encoding, errors="replace"))
    assert main(["train", "--data", str(p), "--save", str(tmp_path / "r"), *TINY_FLAGS, "--max-steps", "2",
                 "--sample", "20", "--json", "--max-eval-bytes", "200"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_resume_from_another_width_or_vocabulary(base_run: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path), "--resume", str(base_run), "--save", str(tmp_path / "r"),
                 *TINY_FLAGS, "--emsize", "32", "--nhid", "64"]) == 2
    one_error_line(capsys, "--emsize 32 conflicts with the checkpoint")
    with pytest.raises(SharnnError, match="conflicts with the checkpoint"):  # the library call checks it too
        train(replace(MODEL, emsize=32, nhid=64), TrainConfig(data=str(text_file), resume=str(base_run),
              save=str(tmp_path / "r2"), bptt=16, batch_size=2), model_overrides={"emsize": 32})
    words = tmp_path / "words"
    words.mkdir()
    for name in ("train", "valid", "test"):
        (words / f"{name}.txt").write_text("the cat sat on the mat\n" * (300 if name == "train" else 40))
    assert main(["train", "--data", str(words), "--tokens", "words", "--resume", str(base_run),
                 "--save", str(tmp_path / "r"), *TINY_FLAGS]) == 2
    one_error_line(capsys, "another vocabulary")


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_a_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the format still parses, only the checksum can tell
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("case,damage,fragment", [
    ("weights truncated", lambda c: _truncate(c / "model.safetensors"), "truncated or corrupt"),
    ("weights bit flip", lambda c: _flip_a_byte(c / "model.safetensors"), "is corrupt: its SHA-256"),
    ("state truncated", lambda c: _truncate(c / "train_state.pt"), "train_state.pt is truncated or corrupt"),
    ("state bit flip", lambda c: _flip_a_byte(c / "train_state.pt"), "is corrupt: its SHA-256"),
    ("config garbage", lambda c: (c / "config.json").write_text("{nope"), "config.json is unreadable or corrupt"),
    ("weights missing", lambda c: (c / "model.safetensors").unlink(), "no model.safetensors"),
])
def test_damaged_checkpoint_on_resume(case: str, damage, fragment: str, base_run: Path, text_file: Path,
                                      tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    damage(run / "last")
    assert main(["train", "--data", str(text_file), "--resume", str(run), "--save", str(run), *TINY_FLAGS]) == 2
    one_error_line(capsys, fragment)


@pytest.mark.parametrize("where", ["weights", "train state"])
def test_disk_full_while_saving(where: str, base_run: Path, text_file: Path, tmp_path: Path, monkeypatch,
                                capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = load_train_state(run / "last")["step"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "weights":
        monkeypatch.setattr(checkpoint_mod, "st_save_file", full)
    else:
        monkeypatch.setattr(checkpoint_mod.torch, "save", full)
    assert main(["train", "--data", str(text_file), "--resume", str(run), "--save", str(run), *TINY_FLAGS,
                 "--max-steps", str(before + 2), "--save-every", "1", "--max-eval-bytes", "200"]) == 2
    one_error_line(capsys, "cannot write checkpoint", os.strerror(errno.ENOSPC), "is intact")
    monkeypatch.undo()
    assert load_train_state(run / "last")["step"] == before
    load_model(run / "last")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_unwritable_save_folder_fails_at_start(text_file: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    t0 = time.perf_counter()
    assert main(["train", "--data", str(text_file), "--save", str(blocker / "run"), *TINY_FLAGS]) == 2
    one_error_line(capsys, "pass a writable --save")
    assert time.perf_counter() - t0 < 5
    if os.geteuid() != 0:  # root writes anywhere; a read-only folder only stops others
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["train", "--data", str(text_file), "--save", str(ro / "run"), *TINY_FLAGS]) == 2
        one_error_line(capsys, "pass a writable --save")


# --- bounded memory in evaluation, generation and scoring --------------------------------------------------------


def test_attention_memory_never_grows_past_its_span() -> None:
    torch.manual_seed(0)
    model = SHARNN(MODEL).eval()
    span = MODEL.attn_span
    prompt = list(np.random.default_rng(0).integers(0, 256, 100))  # a prompt longer than the span
    for i, (_, state, _) in enumerate(generate_ids(model, prompt, 60, seed=0)):
        assert state[1].memory.rows.shape[0] == span  # the preallocated ring never grows
        assert model.ordered_state(state)[1].memory.shape[0] == span - 1
    assert i == 59
    state = None
    with torch.no_grad():
        for _ in range(5):  # evaluation's carried state, segment after segment
            state = model(torch.randint(0, 256, (17, 3)), state).state
            assert state[1].memory.shape[0] <= span - 1


def test_eval_and_score_stream_a_long_file(tmp_path: Path, monkeypatch) -> None:
    big = tmp_path / "big.bin"
    n = 120_000
    big.write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    ids = np.memmap(big, dtype=np.uint8, mode="r")
    model = SHARNN(replace(MODEL, emsize=8, nhid=8)).eval()
    # tracemalloc sees NumPy's allocations, not torch's: the ways data becomes a tensor are watched as well.
    largest = [0]
    for name in ("from_numpy", "tensor", "as_tensor"):
        real = getattr(torch, name)

        def watched(data, *args, real=real, **kwargs):
            out = real(data, *args, **kwargs)
            largest[0] = max(largest[0], out.numel())
            return out

        monkeypatch.setattr(torch, name, watched)
    evaluate(model, ids[:4096], 16, 64)  # first calls import lazily: not what is measured
    score_stream(model, BYTES, io.BytesIO(bytes(ids[:4096])), read_bytes=1024)
    largest[0] = 0
    tracemalloc.start()
    try:
        res = evaluate(model, ids, 16, 256)
        _, eval_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with open(big, "rb") as f:
            score = score_stream(model, BYTES, f, read_bytes=8192)
        _, score_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.predictions == n - 16 and score.tokens == n
    # The whole file as int64 would be 8 bytes a token; both stay far below one byte a token.
    assert eval_peak < n // 2 and score_peak < n, (eval_peak, score_peak)
    assert 0 < largest[0] < n // 4, largest  # no tensor of the whole file either
