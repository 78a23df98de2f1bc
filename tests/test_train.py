"""The training loop: learning happens, budgets, accumulation, resume, evaluation and AR/TAR."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sharnn.checkpoint import load_model, load_train_state
from sharnn.cli import main
from sharnn.config import SHARNNConfig, TrainConfig
from sharnn.data import load_corpus
from sharnn.errors import SharnnError
from sharnn.evaluate import evaluate
from sharnn.model import SHARNN
from sharnn.train import ar_tar, train

MODEL = SHARNNConfig(emsize=32, nhid=64, nlayers=2, attn_layers=(1,), attn_span=32,
                     dropout=0.1, dropouth=0.1, dropouti=0.1, dropoute=0.0)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "rep.txt"
    p.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    return p


@pytest.fixture
def short_file(text_file: Path) -> Path:
    """A few steps an epoch, for tests that run several epochs."""
    p = text_file.with_name("short.txt")
    p.write_bytes(text_file.read_bytes()[:4000])
    return p


def cfg_for(text_file: Path, run: Path, **kw) -> TrainConfig:
    base = {"data": str(text_file), "batch_size": 4, "bptt": 32, "lr": 2e-2, "warmup": 10, "alpha": 0.0, "beta": 0.0,
            "save": str(run), "log_interval": 1000}
    return TrainConfig(**(base | kw))


def test_learning_drives_bpc_down(text_file: Path, tmp_path: Path) -> None:
    model_cfg = replace(MODEL, dropout=0.0, dropouth=0.0, dropouti=0.0)
    res = train(model_cfg, cfg_for(text_file, tmp_path / "run", max_steps=100), quiet=True)
    assert res.steps == 100
    assert res.valid.bpc < 1.0 and res.test.bpc < 1.0  # from ~8 bits at the start
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"start", "valid", "final"} <= {r["event"] for r in log}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


@pytest.mark.slow
def test_epochs_and_best_checkpoint(short_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = train(MODEL, cfg_for(short_file, run, epochs=2), quiet=True)
    assert res.epochs_done == 2
    state = load_train_state(run / "last")
    assert state["epoch"] == 3 and state["position"] == 0  # resumes at the start of the next epoch
    best = load_train_state(run / "best")
    assert best["best_bpc"] == pytest.approx(res.best_valid_bpc)
    assert res.valid.bpc == pytest.approx(res.best_valid_bpc, abs=1e-6)  # final numbers use the best weights
    valid_events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()
                    if json.loads(x)["event"] == "valid"]
    assert len(valid_events) == 2


def test_accumulate_averages_segments(text_file: Path, tmp_path: Path) -> None:
    # One step of accumulate=2 equals one step on the mean of the two segments' gradients.
    cfg = cfg_for(text_file, tmp_path / "acc", max_steps=1, accumulate=2, optimizer="sgd", nonmono=0, lr=1.0,
                  warmup=0, clip=0.0)
    model_cfg = replace(MODEL, dropout=0.0, dropouth=0.0, dropouti=0.0)
    train(model_cfg, cfg, quiet=True)
    after = load_model(tmp_path / "acc" / "last")

    torch.manual_seed(cfg.seed)
    ref = SHARNN(model_cfg)
    import numpy as np

    from sharnn.data import Streams, train_segments
    streams = Streams(load_corpus(str(text_file)).train, 4)
    segs = train_segments(streams, 32, np.random.default_rng(cfg.seed))
    state = None
    for _ in range(2):
        pos, n = next(segs)
        x, y = streams.segment(pos, n)
        out = ref(x, state, targets=y)
        (out.loss / 2).backward()
        state = tuple(type(s)(tuple(t.detach() for t in s.rnn), None if s.memory is None else s.memory.detach())
                      for s in out.state)
    with torch.no_grad():
        for p in ref.parameters():
            p -= 1.0 * p.grad
    for (name, p), q in zip(ref.named_parameters(), after.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_max_time_budget_stops(text_file: Path, tmp_path: Path) -> None:
    # Ten epochs of this text take several seconds: the half-second budget must end the run long before.
    res = train(MODEL, cfg_for(text_file, tmp_path / "t", max_time=0.5, epochs=10), quiet=True)
    assert 0 < res.steps and res.epochs_done < 10
    assert (tmp_path / "t" / "last" / "train_state.pt").is_file()


def test_sample_follows_the_test_prompt(text_file: Path, tmp_path: Path) -> None:
    res = train(MODEL, cfg_for(text_file, tmp_path / "s", max_steps=2, sample=40, max_eval_bytes=500), quiet=True)
    prompt = bytes(load_corpus(str(text_file)).test[:64])
    assert res.sample.startswith(prompt) and len(res.sample) == len(prompt) + 40


@pytest.mark.slow
def test_when_is_applied_in_training(short_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "w"
    train(MODEL, cfg_for(short_file, run, epochs=2, when=(1,), warmup=0, log_interval=5), quiet=True)
    lrs = {r["epoch"]: r["lr"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
           if r["event"] == "train"}
    assert lrs[1] == pytest.approx(2e-2) and lrs[2] == pytest.approx(2e-3)
    assert load_train_state(run / "epoch-001")["epoch"] == 2  # saved before the drop, resumable


def test_resume_refuses_other_vocabulary_and_missing_state(text_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(MODEL, cfg_for(text_file, run, max_steps=2), quiet=True)
    (run / "last" / "train_state.pt").unlink()
    (run / "best" / "train_state.pt").unlink()
    with pytest.raises(SharnnError, match="cannot be resumed"):
        train(MODEL, cfg_for(text_file, tmp_path / "r2", max_steps=4, resume=str(run)), quiet=True)


def test_eval_independent_of_segment_length(text_file: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SHARNN(replace(MODEL, attn_span=16))
    ids = load_corpus(str(text_file)).valid
    a = evaluate(model, ids, 3, 7)
    b = evaluate(model, ids, 3, 50)
    assert a.predictions == b.predictions
    assert a.loss == pytest.approx(b.loss, rel=1e-5)


def test_ar_tar_penalties(tiny_config: SHARNNConfig, ids: torch.Tensor) -> None:
    model = SHARNN(tiny_config).train()
    out = model(ids)
    cfg = TrainConfig(alpha=2.0, beta=1.0)
    want = 2.0 * out.dropped.pow(2).mean() + 1.0 * (out.hidden[1:] - out.hidden[:-1]).pow(2).mean()
    assert torch.allclose(ar_tar(out, cfg), want)
    assert ar_tar(out, TrainConfig(alpha=0.0, beta=0.0)) == 0.0


def test_alpha_beta_change_training(text_file: Path, tmp_path: Path) -> None:
    train(MODEL, cfg_for(text_file, tmp_path / "off", max_steps=3), quiet=True)
    train(MODEL, cfg_for(text_file, tmp_path / "on", max_steps=3, alpha=2.0, beta=1.0), quiet=True)
    a, b = _weights(tmp_path / "off"), _weights(tmp_path / "on")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_asgd_switch_rule_and_averaging() -> None:
    from sharnn.optim import averaged_weights, should_switch_to_asgd

    assert not should_switch_to_asgd([3.0, 2.0], 2.5, nonmono=2)  # too little history
    assert should_switch_to_asgd([3.0, 2.0, 1.9], 3.5, nonmono=2)  # worse than the best before the last two
    assert not should_switch_to_asgd([3.0, 2.0, 1.9], 2.5, nonmono=2)
    assert not should_switch_to_asgd([3.0, 2.0, 1.9], 1.8, nonmono=2)
    assert not should_switch_to_asgd([3.0, 2.0, 1.9], 9.9, nonmono=0)  # 0 = never
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.ASGD([p], lr=1.0, t0=0, lambd=0.0)
    for g in (1.0, 3.0, 5.0):  # p: -1, -4, -9; torch's ASGD averages from its second iterate: -6.5
        p.grad = torch.full((3,), g)
        opt.step()
    with averaged_weights([p], opt):
        assert torch.allclose(p.data, torch.full((3,), -6.5))
    assert torch.allclose(p.data, torch.full((3,), -9.0))


@pytest.mark.slow
def test_sgd_switches_to_asgd_and_resumes(short_file: Path, tmp_path: Path, monkeypatch) -> None:
    import sharnn.train as train_module
    from sharnn.evaluate import EvalResult

    real_evaluate = train_module.evaluate
    losses = iter([1.5, 2.0, 1.6])  # epoch 3 (1.6) is worse than the best before the last one (1.5): switch

    def fake_validation(model, ids, *args, **kw):
        if kw.get("what") == "valid" and (loss := next(losses, None)) is not None:
            return EvalResult(loss, 100, 0.0)
        return real_evaluate(model, ids, *args, **kw)

    monkeypatch.setattr(train_module, "evaluate", fake_validation)
    run = tmp_path / "sgd"
    cfg = cfg_for(short_file, run, optimizer="sgd", nonmono=1, lr=0.5, warmup=0, epochs=4)
    train(MODEL, cfg, quiet=True)
    events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "asgd" for e in events)
    state = load_train_state(run / "last")
    assert state["asgd"] and "ax" in state["optimizer"]["state"][0]
    res = train(MODEL, replace(cfg, epochs=5, resume=str(run)), quiet=True)
    assert res.epochs_done == 1


@pytest.mark.slow
def test_bf16_learns_like_fp32(text_file: Path, tmp_path: Path) -> None:
    model_cfg = replace(MODEL, dropout=0.0, dropouth=0.0, dropouti=0.0)
    fp32 = train(model_cfg, cfg_for(text_file, tmp_path / "a", max_steps=100), quiet=True)
    bf16 = train(model_cfg, cfg_for(text_file, tmp_path / "b", max_steps=100, precision="bf16"), quiet=True)
    assert bf16.valid.bpc < 1.0 and fp32.valid.bpc < 1.0  # both from ~8 bits; bf16 trains as well


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(
        text_file: Path, tmp_path: Path, monkeypatch, native: bool) -> None:
    # --precision auto (the tiny preset's) trains exactly as bf16 on a CPU with AVX-512 BF16 or AMX, exactly
    # as fp32 on one without (where bf16 is emulated and slow), and the run's log says which it used.
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    weights = {}
    for precision in ("auto", "bf16" if native else "fp32"):
        train(MODEL, cfg_for(text_file, tmp_path / precision, max_steps=2, precision=precision), quiet=True)
        weights[precision] = load_file(str(tmp_path / precision / "last" / "model.safetensors"))
        start = json.loads((tmp_path / precision / "log.jsonl").read_text().splitlines()[0])
        assert start["event"] == "start" and start["precision"] == ("bf16" if native else "fp32")
    (a, b) = weights.values()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SharnnError, match="unknown --precision 'bf8'; use fp32, bf16, fp16, auto"):
        cfg_for(text_file, tmp_path / "x", precision="bf8")


@pytest.mark.parametrize("parts", ["", "boom,decoder"])
def test_fp32_parts_reach_the_training_forward(text_file: Path, tmp_path: Path, parts: str) -> None:
    # --fp32-parts is a setting of the training step's forward (sharnn.config.Compute): under bf16 autocast the
    # parts named compute in float32 during training, the others in bf16.
    from sharnn.model import Boom

    seen: dict[str, set[torch.dtype]] = {"boom": set(), "decoder": set()}

    def record(module: torch.nn.Module, args: tuple, out: object) -> None:
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor):  # training's forward, not validation's
            if isinstance(module, Boom):
                seen["boom"].add(out.dtype)
            elif isinstance(module, torch.nn.Linear) and out.shape[-1] == 256:  # the decoder
                seen["decoder"].add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        train(MODEL, cfg_for(text_file, tmp_path / "run", max_steps=2, precision="bf16", fp32_parts=parts,
                             max_eval_bytes=200), quiet=True)
    finally:
        handle.remove()
    want = torch.float32 if parts else torch.bfloat16
    assert seen == {"boom": {want}, "decoder": {want}}


def test_a_bf16_runs_numbers_are_float32_and_eval_reproduces_them(text_file: Path, tmp_path: Path, capsys) -> None:
    # Training in bf16 autocast; validation (which picks best/) and the final valid/test numbers in float32, so
    # `sharnn eval` (float32) gives exactly what the run printed, and best/ was chosen on that number too.
    run = tmp_path / "run"
    res = train(MODEL, cfg_for(text_file, run, max_steps=12, precision="bf16", eval_interval=4), quiet=True)
    got = {}
    for split in ("valid", "test"):
        assert main(["eval", str(run), "--split", split, "--json", "--device", "cpu"]) == 0
        got[split] = json.loads(capsys.readouterr().out)["bpc"]
    assert got == {"valid": res.valid.bpc, "test": res.test.bpc}
    assert res.best_valid_bpc == res.valid.bpc  # the validation that chose best/ measured what eval measures
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (and bf16 would have given another number)
        blurred = evaluate(load_model(run / "best"), load_corpus(str(text_file)).valid, 4, 32)
    assert blurred.bpc != res.valid.bpc


def test_the_run_records_its_data_and_notices_when_it_changes(text_file: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=2, max_eval_bytes=200), quiet=True)
    raw = text_file.read_bytes()
    n = len(raw) - 2 * (len(raw) // 20)  # the split rule: the last 10% halved into valid and test
    parts = {"train": raw[:n], "valid": raw[n : n + len(raw) // 20], "test": raw[n + len(raw) // 20 :]}
    for ckpt in ("best", "last"):
        data = json.loads((run / ckpt / "config.json").read_text())["data"]
        assert data["name"] == str(text_file)
        assert data["splits"] == {k: {"tokens": len(v), "dtype": "uint8", "sha256": hashlib.sha256(v).hexdigest()}
                                  for k, v in parts.items()}
    start = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["data"] == data

    def evaluate_cli(*extra: str) -> str:
        assert main(["eval", str(run), "--split", "test", "--json", "--device", "cpu", *extra]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["bpc"] > 0
        return err

    assert evaluate_cli() == ""  # the same data: nothing to say
    text_file.write_bytes(raw[:-5] + b"CHANGED"[:5])  # the same name, another test split (as python-stdlib would be
    err = evaluate_cli()  # on another Python version)
    assert err.count("\n") == 1 and err.startswith("sharnn: warning: the data") and "test 900 tokens" in err, err
    assert "valid" not in err.split(":", 2)[2]  # only the split evaluated is checked
    other = tmp_path / "other.txt"
    other.write_bytes(raw[:-5] + b"CHANGED"[:5])
    assert evaluate_cli("--data", str(other)) == ""  # other data, asked for: no warning
    assert evaluate_cli("--data", str(tmp_path / "." / text_file.name)) != ""  # the same file by another path

    train(MODEL, cfg_for(text_file, run, max_steps=3, max_eval_bytes=200, resume=str(run)), quiet=True)
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "test 900 tokens" in warnings[0]
    assert json.loads((run / "last" / "config.json").read_text())["data"]["splits"]["test"]["sha256"] != \
        data["splits"]["test"]["sha256"]  # the resumed run records the data it trains with now


def test_checkpoints_without_a_data_record_still_evaluate(text_file: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=1, max_eval_bytes=200), quiet=True)
    meta = json.loads((run / "best" / "config.json").read_text())
    del meta["data"]  # as written before data identities were recorded
    (run / "best" / "config.json").write_text(json.dumps(meta))
    text_file.write_bytes(text_file.read_bytes()[::-1])
    assert main(["eval", str(run), "--split", "valid", "--json", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["split"] == "valid" and err == ""


def test_resume_refuses_another_optimizer_and_takes_new_weight_decay(text_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "opt"
    train(MODEL, cfg_for(text_file, run, max_steps=2), quiet=True)
    with pytest.raises(SharnnError, match="--optimizer lamb using --optimizer adam"):
        train(MODEL, cfg_for(text_file, run, max_steps=4, optimizer="adam", resume=str(run)), quiet=True)
    train(MODEL, cfg_for(text_file, run, max_steps=4, wdecay=0.5, resume=str(run)), quiet=True)
    assert load_train_state(run / "last")["optimizer"]["param_groups"][0]["weight_decay"] == 0.5


def test_new_run_never_replaces_an_old_one_silently(text_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=2, save_every=1, keep=2), quiet=True)
    with pytest.raises(SharnnError, match="already holds a run .*--resume.*--overwrite"):
        train(MODEL, cfg_for(text_file, run, max_steps=2), quiet=True)
    train(MODEL, cfg_for(text_file, run, max_steps=1, overwrite=True), quiet=True)
    assert not list(run.glob("step-*"))  # the old run's checkpoints are gone, not mixed with the new ones
    assert load_train_state(run / "last")["step"] == 1
    starts = [x for x in (run / "log.jsonl").read_text().splitlines() if '"event": "start"' in x]
    assert len(starts) == 1


@pytest.mark.slow
def test_fp16_with_loss_scaler_learns_skips_overflows_and_resumes_exactly(text_file: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    # GRU: PyTorch's CPU LSTM has no float16 kernel (the LSTM is refused below); the scaler logic is the same.
    import functools

    import sharnn.train as train_module

    model_cfg = replace(MODEL, model="GRU", dropout=0.0, dropouth=0.0, dropouti=0.0)
    # Start from an absurd loss scale: the first steps' scaled fp16 gradients overflow. The scaler must skip
    # them and halve the scale, without calling it trouble (no state reset, no non-finite events).
    huge = functools.partial(torch.amp.GradScaler, init_scale=2.0**40)
    monkeypatch.setattr(train_module.torch.amp, "GradScaler", huge)
    res = train(model_cfg, cfg_for(text_file, tmp_path / "fp16", max_steps=100, precision="fp16",
                                   log_interval=10), quiet=True)
    assert res.valid.bpc < 1.5  # from ~8 bits
    events = [json.loads(x) for x in (tmp_path / "fp16" / "log.jsonl").read_text().splitlines()]
    assert not any(e["event"] == "nonfinite" for e in events)
    scales = [e["loss_scale"] for e in events if e["event"] == "train"]
    assert scales[0] < 2.0**40 and scales[-1] < 2.0**20  # halved on every overflow
    assert load_train_state(tmp_path / "fp16" / "last")["scaler"]["scale"] == scales[-1]
    # Exact resume carries the scale too: 10 steps straight == 6 + 4 resumed.
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(model_cfg, cfg_for(text_file, straight, max_steps=10, precision="fp16"), quiet=True)
    train(model_cfg, cfg_for(text_file, split, max_steps=6, precision="fp16"), quiet=True)
    train(model_cfg, cfg_for(text_file, split, max_steps=10, precision="fp16", resume=str(split)), quiet=True)
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_lstm_on_cpu_is_refused(text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(SharnnError, match="fp16 with the LSTM core needs a GPU.*bf16"):
        train(MODEL, cfg_for(text_file, tmp_path / "r", max_steps=2, precision="fp16"), quiet=True)


# --- resume with changed run settings, and the automatic adaptive softmax ----------------------------------------


def test_a_new_seed_on_resume_starts_fresh_streams(text_file: Path, tmp_path: Path) -> None:
    # The paper's second pass resumes with another --seed: new dropout masks and segment lengths from there on,
    # themselves repeatable; the same seed continues the old streams exactly (test_robust's exact resume).
    train(MODEL, cfg_for(text_file, tmp_path / "first", max_steps=3), quiet=True)
    ends = {}
    for name, seed in (("same", 1111), ("new", 7), ("new-again", 7)):
        run = tmp_path / name
        run.mkdir()
        for f in (tmp_path / "first" / "last").iterdir():
            (run / "last").mkdir(exist_ok=True)
            (run / "last" / f.name).write_bytes(f.read_bytes())
        train(MODEL, cfg_for(text_file, run, max_steps=6, seed=seed, resume=str(run)), quiet=True)
        ends[name] = _weights(run)
    assert TrainConfig().seed == 1111  # the first run's seed
    assert all(torch.equal(ends["new"][k], ends["new-again"][k]) for k in ends["new"])
    assert not all(torch.equal(ends["new"][k], ends["same"][k]) for k in ends["new"])


def test_resume_with_another_global_batch_restarts_the_epoch(text_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=5), quiet=True)
    assert load_train_state(run / "last")["position"] > 4 * 32  # well into the epoch, 4 streams
    train(MODEL, cfg_for(text_file, run, max_steps=6, batch_size=2, resume=str(run)), quiet=True)
    state = load_train_state(run / "last")
    assert state["step"] == 6 and state["position"] <= 32  # one segment from the epoch's start
    assert state["carried"][0]["rnn"][0].shape[1] == 2  # the new streams' own state


def test_a_large_vocabulary_gets_the_adaptive_softmax(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(80_000)]  # above the 75,000 symbols where it starts
    corpus = tmp_path / "words"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(" ".join(words[i : i + 20]) for i in range(0, len(words), 20)))
    for split in ("valid", "test"):
        (corpus / f"{split}.txt").write_text(" ".join(words[:400]) + "\n")
    model_cfg = SHARNNConfig(emsize=64, nhid=64, nlayers=1)  # the last cluster is emsize / 4³ wide
    cfg = TrainConfig(data=str(corpus), tokens="words", batch_size=2, bptt=8, max_steps=1, test_batch_size=2,
                      save=str(tmp_path / "run"))
    train(model_cfg, cfg, quiet=True)
    model = load_model(tmp_path / "run" / "last")
    assert model.cfg.adaptive_cutoffs == (2800, 20000, 76000) and not model.cfg.tied
    assert isinstance(model.decoder, torch.nn.AdaptiveLogSoftmaxWithLoss)


def test_a_budget_stop_right_after_a_validation_does_not_repeat_it(text_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(MODEL, cfg_for(text_file, run, max_steps=6, eval_interval=3, save_every=3, max_eval_bytes=400), quiet=True)
    events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "valid"] == [3, 6]
    assert [e["step"] for e in events if e["event"] == "save"] == [3, 6]


def test_train_state_reads_the_names_older_checkpoints_used() -> None:
    from sharnn.train import TrainState

    old = TrainState.from_dict({"step": 5, "micro": 2, "window": {"loss": 1.5, "batches": 3}})
    assert (old.step, old.gathered) == (5, 2)
    assert old.log_sums == {"loss": 1.5, "batches": 3, "finite": 0, "chars": 0}
    assert TrainState.from_dict(old.to_dict()) == old and "micro" not in old.to_dict()
