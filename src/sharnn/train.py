"""The training loop: build, train epoch by epoch with the paper's variable BPTT, validate, keep the best.

Reads top to bottom: `train()` sets up (data, model, optimizer, resume), runs `Trainer.run`, then measures
the best checkpoint on valid and test. Small helpers (`ar_tar`, ...) are importable by tests.

What survives what (the README's "What we guarantee"):
- Resume is exact: a checkpoint holds every RNG stream, the data position, the carried state and memory, the
  optimizer, the gradients gathered so far in an unfinished `--accumulate` step and the log's sums, so N steps,
  a stop and M more give the same weights and log lines as N+M straight (on CPU).
- SIGINT/SIGTERM finish the current batch, save `last/` and raise `TrainingInterrupted` (the CLI exits 130 or
  143: 128 + the signal's number); a second signal stops at once. Handlers live only while the loop runs.
- A non-finite loss or gradient skips its optimizer step (weights and optimizer untouched, recurrent state
  reset); `--nonfinite-limit` of them in a row stop the run with the pre-trouble weights saved in `last/`.
  Non-finite weights are never saved: `last/` then keeps its latest finite save, and the message says so.
- Checkpoints are atomic (see checkpoint.py); `--save-every`/`--save-every-minutes` add periodic ones.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    Checkpoint,
    link_checkpoint,
    load_model,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_from_list,
    state_to_list,
    step_name,
)
from .config import Compute, SHARNNConfig, TrainConfig, auto_cutoffs
from .data import SPLIT_NAMES, Corpus, Streams, data_warning, load_corpus, train_segments
from .distributed import Dist, PeerFailed, init_from_env, release_frames
from .errors import SharnnError
from .evaluate import LN2, EvalResult, autocast, evaluate, training_precision
from .generate import generate
from .model import SHARNN, SHARNNOutput, count_parameters
from .optim import (
    averaged_weights,
    budget_horizon,
    build_asgd,
    build_optimizer,
    lr_at,
    set_lr,
    should_switch_to_asgd,
)
from .progress import RunLog, TrainProgress
from .resume import check_resumable, plan_resume, resumed_model_config
from .runfolder import (
    checkpoint_bytes_needed,
    claim_run_folder,
    clean_run_folder,
    hold_run_folder,
    prune_checkpoints,
)
from .runtime import resolve_device, seed_everything, set_tf32
from .state import State, detach_state


class TrainingInterrupted(SharnnError):
    """SIGINT or SIGTERM stopped training after a resumable checkpoint was saved. Not a mistake: the CLI prints
    the message (how to resume) and exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    all_ranks = True  # decided by all ranks together: every rank raises it at the same point

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs_done: int
    seconds: float
    train_chars_per_s: float
    best_valid_bpc: float
    valid: EvalResult | None
    test: EvalResult | None
    sample: bytes = b""
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    metric: str = "bpc"  # what the corpus's results are reported in: bpc, or ppl for word-level corpora


def ar_tar(out: SHARNNOutput, cfg: TrainConfig) -> torch.Tensor | float:
    """AWD-LSTM's activation regularisers on the last block's output.

    AR  = alpha * mean(dropped^2)              (the output after dropout, as the decoder sees it)
    TAR = beta  * mean((h[t+1] - h[t])^2)      (the output before dropout)
    """
    penalty: torch.Tensor | float = 0.0
    if cfg.alpha:
        penalty = penalty + cfg.alpha * out.dropped.pow(2).mean()
    if cfg.beta and out.hidden.shape[0] > 1:
        penalty = penalty + cfg.beta * (out.hidden[1:] - out.hidden[:-1]).pow(2).mean()
    return penalty


def train(model_cfg: SHARNNConfig, cfg: TrainConfig, quiet: bool = False,
          model_overrides: dict[str, Any] | None = None, checkpoint: Checkpoint | None = None) -> TrainResult:
    """Train as `cfg` says; returns where the run went and its final valid/test numbers.

    With `cfg.resume`, the architecture, weights, optimizer, schedule position, RNG streams, data position and
    carried state come from the checkpoint (`checkpoint`, when the caller has opened it already); run settings
    (lr, budgets, ...) come from `cfg`, and so do the non-architecture model settings in `model_overrides`
    (dropouts, attention span) when given. (The CLI builds `cfg` from the run's saved settings with the typed
    flags on top: `resume.run_settings`; `resume.py` holds the rules.) Every setting that differs from the
    run's is logged in one line and in the log's start event.

    The --save folder is locked for the run (`RunLock`): a second trainer of it is refused.

    Raises `TrainingInterrupted` when SIGINT/SIGTERM stopped the run (after saving `last/`), and `SharnnError`
    when too many steps in a row were non-finite (after saving the weights from before them, if they are
    finite).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ranks, device_name = init_from_env(cfg.device)  # under torchrun: join its process group
    try:
        if cfg.resume and checkpoint is None:
            checkpoint = Checkpoint.open(cfg.resume, prefer="last")
        return _train(model_cfg, cfg, quiet, model_overrides, ranks, resolve_device(device_name),
                      checkpoint if cfg.resume else None)
    except BaseException as e:
        if ranks.enabled:
            release_frames(e)  # the model and its DDP wrapper hold the process group: let them go with the frames
            if getattr(e, "all_ranks", False):  # raised everywhere at once (a signal, too many bad steps)
                e.quiet = not ranks.is_main  # type: ignore[attr-defined]  # rank 0 says it, once
            elif not ranks.first_to_fail(e) or isinstance(e, PeerFailed):
                ranks.leave()  # a consequence of another rank's failure, which that rank reports
        raise
    finally:
        ranks.close()


def _train(model_cfg: SHARNNConfig, cfg: TrainConfig, quiet: bool, model_overrides: dict[str, Any] | None,
           ranks: Dist, device: torch.device, ckpt: Checkpoint | None) -> TrainResult:
    run_dir = Path(cfg.save)
    if ckpt is not None:  # refuse an architecture change before any work
        model_cfg = resumed_model_config(ckpt, model_overrides or {})
    # Rank 0 holds the run folder's lock while the run lasts; a folder made for a run that fails before writing
    # anything goes again.
    with hold_run_folder(run_dir) if ranks.is_main else contextlib.nullcontext():
        if ranks.is_main:
            clean_run_folder(run_dir)  # what a killed save may have left
            claim_run_folder(run_dir, cfg, resumed=ckpt)
        ranks.barrier()
        return _run(model_cfg, cfg, quiet, ckpt, ranks, device, run_dir)


def _run(model_cfg: SHARNNConfig, cfg: TrainConfig, quiet: bool, ckpt: Checkpoint | None, ranks: Dist,
         device: torch.device, run_dir: Path) -> TrainResult:
    corpus = load_corpus(cfg.data, tokens=cfg.tokens)
    log = RunLog(run_dir, quiet or not ranks.is_main, write=ranks.is_main)
    seed_everything(cfg.seed)  # before the model is built: its initial weights come from this seed
    resumed = None
    if ckpt is not None:
        model, saved, resumed = _resume_model(ckpt, model_cfg, corpus, cfg, ranks, device, log)
    else:
        model, saved = _new_model(model_cfg, corpus, device, log), None
    # The data's identity is hashed once (rank 0 saves it with every checkpoint); a resume compares it with the run's.
    if ranks.is_main and ckpt is not None and (warning := data_warning(ckpt.data, corpus, SPLIT_NAMES, str(ckpt.path))):
        log.line(f"warning: {warning}")
        log.record("warning", message=warning)
    if device.type == "cuda":
        set_tf32(cfg.tf32)

    train_streams = _streams(corpus, cfg, ranks)
    if cfg.precision == "fp16" and device.type == "cpu" and model.cfg.model == "LSTM":
        raise SharnnError("--precision fp16 with the LSTM core needs a GPU (PyTorch's CPU LSTM has no float16 "
                          "kernel); on a CPU use --precision bf16")

    optimizer, rng = _optimizer_and_rng(model, cfg, saved)
    if ranks.enabled:  # same initial weights everywhere (DDP also broadcasts rank 0's), but each rank its own dropout
        torch.manual_seed(cfg.seed + 7919 * ranks.rank + 104729 * (saved or {}).get("step", 0))
    n_params = count_parameters(model)
    precision = training_precision(device, cfg.precision)
    log.line(f"SHA-RNN: {n_params:,} parameters | corpus {corpus.name}: train {len(corpus.train):,} "
             f"valid {len(corpus.valid):,} test {len(corpus.test):,} tokens | device {device}, {precision}")
    if ranks.enabled:
        log.line(f"distributed: {ranks.world} ranks x batch {cfg.batch_size} = global batch "
                 f"{ranks.world * cfg.batch_size} streams ({'nccl' if device.type == 'cuda' else 'gloo'})")
    log.record("start", params=n_params, model=model.cfg.to_dict(), train=cfg.to_dict(), device=str(device),
               precision=precision,
               world=ranks.world, global_batch=ranks.world * cfg.batch_size,
               data=corpus.identity if ranks.is_main else None,
               **({"resumed": resumed} if resumed is not None else {}))
    if ranks.is_main and (need := checkpoint_bytes_needed(n_params, cfg)) > (free := shutil.disk_usage(run_dir).free):
        log.line(f"warning: {run_dir} has {free / 1e9:.2f} GB free, but this run's checkpoints may need about "
                 f"{need / 1e9:.2f} GB; a save that finds the disk full stops training (the last good one stays)")

    loop = Trainer(model, optimizer, cfg, corpus, train_streams, rng, device, run_dir, log, saved, ranks)
    with _stop_on_signals(loop):
        loop.run()
    loop.step.forward_model = model  # drop the DDP wrapper: it holds the process group
    ranks.finish()  # all ranks together, then the group goes: rank 0's final measurement needs no other rank
    state = loop.state
    result = TrainResult(run_dir, state.step, loop.epochs_done, loop.seconds, loop.chars_per_s, state.best_bpc, None, None,
                         b"", state.nonfinite_total)
    if not ranks.is_main:  # rank 0 measures the result
        return result
    return _final_measurement(result, model, corpus, cfg, device, log, quiet)


def _streams(corpus: Corpus, cfg: TrainConfig, ranks: Dist) -> Streams:
    """This rank's training streams; refused, as every split too small for its streams, before any training."""
    train_streams = Streams(corpus.train, cfg.batch_size, min_len=cfg.bptt + 1, what="train split",
                            rank=ranks.rank, world=ranks.world)
    Streams(_eval_ids(corpus.valid, cfg), cfg.eval_batch_size or cfg.batch_size, what="valid split")
    Streams(_eval_ids(corpus.test, cfg), cfg.test_batch_size, what="test split")
    return train_streams


def _resume_model(ckpt: Checkpoint, model_cfg: SHARNNConfig, corpus: Corpus, cfg: TrainConfig, ranks: Dist,
                  device: torch.device, log: RunLog) -> tuple[SHARNN, dict[str, Any], dict[str, Any]]:
    """The checkpoint's weights in a model built with the run's settings, its saved training state fitted to this
    run (the rules: `resume.py`), and what the log's start event records about the resume."""
    model = ckpt.model(device, config=model_cfg)
    saved = ckpt.train_state(device)
    check_resumable(ckpt, cfg, corpus, saved)
    plan = plan_resume(ckpt, cfg, model.cfg, saved, ranks.world)
    if plan.fresh_rng:
        saved.pop("rng", None)  # a new --seed on resume asks for fresh randomness (the paper's second pass)
    log.line(plan.line)
    if not plan.same_streams:
        # Stream boundaries move with the global batch: the saved position and carried state mean nothing now.
        old_global = (ckpt.train_config or cfg).batch_size * saved.get("world", 1)
        log.line(f"global batch changed ({old_global} -> {cfg.batch_size * ranks.world} streams): "
                 "the epoch restarts at its start")
        saved.update(position=0, carried=None, gathered=0)
    else:  # the same global streams, perhaps over another number of ranks: take this rank's share
        carried = ranks.shard_state(state_from_list(saved.get("carried")), cfg.batch_size)
        saved["carried"] = state_to_list(carried)
    return model, saved, plan.record


def _new_model(model_cfg: SHARNNConfig, corpus: Corpus, device: torch.device, log: RunLog) -> SHARNN:
    mcfg = replace(model_cfg, vocab_size=corpus.vocab_size)
    if not mcfg.adaptive_cutoffs and (cutoffs := auto_cutoffs(mcfg.vocab_size)):
        mcfg = replace(mcfg, adaptive_cutoffs=cutoffs, tied=False)
        log.line(f"{mcfg.vocab_size:,} symbols: adaptive softmax with cutoffs {list(cutoffs)} (untied decoder); "
                 "--adaptive-cutoffs 0 turns it off")
    return SHARNN(mcfg).to(device)


def _optimizer_and_rng(model: SHARNN, cfg: TrainConfig,
                       saved: dict[str, Any] | None) -> tuple[torch.optim.Optimizer, np.random.Generator]:
    """The optimizer (its saved moments on resume) and the generator of segment lengths (its saved position)."""
    optimizer = build_optimizer(model.parameters(), cfg)
    if saved is not None and saved.get("asgd") and cfg.optimizer == "sgd":
        optimizer = build_asgd(model.parameters(), cfg, cfg.lr)  # the run had switched: its state is ASGD's
    rng = np.random.default_rng(cfg.seed)
    if saved is None:
        return optimizer, rng
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError) as e:
        raise SharnnError(f"cannot resume: the saved optimizer state does not fit --optimizer {cfg.optimizer} ({e})") from None
    for group in optimizer.param_groups:  # loading brings the old run's settings; this run's flags win
        group["weight_decay"] = cfg.wdecay
    if "rng" in saved:
        set_rng_state(rng, saved["rng"])
    return optimizer, rng


def _final_measurement(result: TrainResult, model: SHARNN, corpus: Corpus, cfg: TrainConfig, device: torch.device,
                       log: RunLog, quiet: bool) -> TrainResult:
    """Valid and test bpc of the best checkpoint, as the paper reports them, and the sample text.

    Measured in float32 whatever --precision trained in, as every validation is: `sharnn eval` (float32)
    reproduces these numbers."""
    best_dir = result.run_dir / "best"
    final_model = load_model(best_dir, device) if (best_dir / "config.json").is_file() else model
    valid = evaluate(final_model, _eval_ids(corpus.valid, cfg), cfg.eval_batch_size or cfg.batch_size, cfg.bptt,
                     device, progress=not quiet, what="valid")
    test = evaluate(final_model, _eval_ids(corpus.test, cfg), cfg.test_batch_size, cfg.bptt, device,
                    progress=not quiet, what="test")
    log.record("final", valid_bpc=valid.bpc, test_bpc=test.bpc, valid_loss=valid.loss, test_loss=test.loss)
    text = b""
    if cfg.sample:
        prompt = corpus.vocab.decode(corpus.test[:64])
        text = prompt + generate(final_model, prompt, cfg.sample, temperature=0.8, seed=cfg.seed,
                                 vocab=corpus.vocab).data
    return replace(result, valid=valid, test=test, sample=text, metric=corpus.vocab.metric)


def _eval_ids(ids: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    return ids[: cfg.max_eval_bytes] if cfg.max_eval_bytes else ids


@contextlib.contextmanager
def _stop_on_signals(loop: Trainer) -> Iterator[None]:
    """While the loop runs, SIGINT/SIGTERM ask it to stop after the current batch and save; a second signal
    stops at once (KeyboardInterrupt). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python delivers signals to the main thread only
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if loop.stop_signal is not None:
            raise KeyboardInterrupt
        loop.stop_signal = loop.ranks.signalled = signum
        if not loop.log.quiet:  # os.write: safe wherever the main thread was interrupted
            os.write(2, f"\nsharnn: got {signal.Signals(signum).name}; finishing this batch, then saving a "
                        "resumable checkpoint (send it again to stop at once, without saving)\n".encode())

    previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def new_log_sums() -> dict[str, float]:
    """The sums of the training log since its last line (--log-interval)."""
    return {"loss": 0.0, "batches": 0, "finite": 0, "chars": 0}


@dataclass
class TrainState:
    """Where a run stands: besides the weights, the optimizer and the RNG streams, all a resume needs to go on
    exactly as if it had never stopped. `to_dict` is what train_state.pt holds (with the optimizer, RNG streams,
    loss scaler and gathered gradients beside it); `from_dict` reads it back, older files' missing fields at
    their defaults."""

    epoch: int = 1  # 1-based, as in the paper's logs
    step: int = 0  # optimizer steps taken, across epochs and resumes
    position: int = 0  # where the next segment of this epoch starts
    best_bpc: float = math.inf
    carried: State | None = None  # the RNN state and attention memory the next segment starts from
    gathered: int = 0  # segments whose gradients are gathered for the next optimizer step (--accumulate)
    bad_in_step: bool = False  # a non-finite loss among them
    nonfinite_run: int = 0  # skipped optimizer steps in a row
    nonfinite_total: int = 0
    log_sums: dict[str, float] = field(default_factory=new_log_sums)  # since the last log line
    val_history: list[float] = field(default_factory=list)  # end-of-epoch validation losses (SGD -> ASGD)
    asgd: bool = False  # switched to averaged SGD

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return d | {"carried": state_to_list(self.carried), "log_sums": dict(self.log_sums),
                    "val_history": list(self.val_history)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        d = {_OLD_NAMES.get(k, k): v for k, v in d.items()}  # files written before the renames
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        return cls(**kw | {"carried": state_from_list(d.get("carried")),
                           "log_sums": new_log_sums() | dict(d.get("log_sums", {}))})


_OLD_NAMES = {"micro": "gathered", "window": "log_sums"}  # train_state.pt's keys before they were renamed


class NonFiniteLimit(Exception):
    """--nonfinite-limit optimizer steps in a row were skipped: the trainer saves what it can and stops."""


class MetricsLog:
    """The training log (--log-interval): the sums since the last log line live in `TrainState.log_sums`, so that a
    resumed run goes on with the same lines; its speed counts only the batches this process timed."""

    def __init__(self, state: TrainState, cfg: TrainConfig, log: RunLog, world: int):
        self.state, self.cfg, self.log, self.world = state, cfg, log, world
        self.chars = 0  # tokens trained on by this process's run, all ranks together
        self.start_clock()

    def start_clock(self) -> None:
        """Time the log's sums from now. Sums resumed from a checkpoint hold batches timed by the process that
        saved it: the speed counts only the batches since this clock started."""
        self.started = time.perf_counter()
        self.base = (self.state.log_sums["batches"], self.state.log_sums["chars"])

    def count(self, loss: float | None, tokens: int) -> None:
        """Add a segment (all ranks' tokens together); loss None: it was not finite."""
        w = self.state.log_sums
        w["batches"] += 1
        if loss is not None:
            w["loss"] += loss
            w["finite"] += 1
        w["chars"] += tokens * self.world
        self.chars += tokens * self.world

    def due(self) -> bool:
        return self.state.log_sums["batches"] >= self.cfg.log_interval  # >=: a resume may lower --log-interval

    def emit(self, est_batches: int, lr: float, loss_scale: float | None, suffix: str = "") -> None:
        """The log line (and log.jsonl record) of the sums, which then start again."""
        w, state = self.state.log_sums, self.state
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        batches, chars = w["batches"] - self.base[0], w["chars"] - self.base[1]
        loss = w["loss"] / w["finite"] if w["finite"] else math.nan
        batch = min(state.position // self.cfg.bptt, est_batches)
        self.log.line(
            f"| epoch {state.epoch:3d} | {batch:5d}/{est_batches:5d} batches | lr {lr:.3g} | "
            f"ms/batch {1000 * elapsed / batches:7.1f} | loss {loss:5.3f} | bpc {loss / LN2:6.3f} | "
            f"chars/s {chars / elapsed:8.0f}{suffix}"
        )
        self.log.record("train", epoch=state.epoch, step=state.step, batch=batch, lr=lr,
                        ms_per_batch=1000 * elapsed / batches, loss=loss, bpc=loss / LN2, chars_per_s=chars / elapsed,
                        **({"loss_scale": loss_scale} if loss_scale is not None else {}))
        state.log_sums = new_log_sums()
        self.start_clock()


class TrainStep:
    """The training step: forward and backward on a segment, state carried, and every --accumulate segments the
    optimizer step (gradients unscaled from the fp16 loss scale, clipped), or its skip when any rank saw a
    non-finite loss or gradient. `optimizer` is the trainer's (it changes when SGD switches to averaged SGD)."""

    def __init__(self, model: SHARNN, cfg: TrainConfig, streams: Streams, state: TrainState, ranks: Dist,
                 device: torch.device, log: RunLog, saved: dict[str, Any] | None):
        self.model, self.cfg, self.streams, self.state, self.ranks, self.device, self.log = (
            model, cfg, streams, state, ranks, device, log)
        self.optimizer: torch.optim.Optimizer | None = None
        # What the step calls: the model itself, or its DistributedDataParallel wrapper (which averages gradients
        # over the ranks during backward). Evaluation and saving use the model itself.
        self.forward_model: torch.nn.Module = model
        if ranks.enabled:
            ids = [device.index] if device.type == "cuda" else None
            # An adaptive softmax skips the clusters that a batch has no targets in.
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=model.cfg.uses_adaptive_softmax)
        # fp16 gradients underflow without a loss scale; the scaler grows it while steps are finite and halves it
        # (skipping that step) when a scaled gradient overflows. Disabled, it passes everything through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.precision = training_precision(device, cfg.precision)  # `auto` resolved once, not every segment
        self.compute = Compute(fp32_parts=cfg.fp32_part_set)  # --fp32-parts: what stays float32 under autocast
        if saved is not None and saved.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(saved["scaler"])

    def segment(self, pos: int, seq_len: int, metrics: MetricsLog) -> bool:
        """Forward and backward on one segment, carrying the state; the optimizer step when the segment completes
        one (`--accumulate`), counted in the log's `metrics`. True if a step was applied."""
        cfg, state = self.cfg, self.state
        x, y = self.streams.segment(pos, seq_len, self.device)
        # Under DDP, gradients are averaged over the ranks only on the segment that completes a step. The epoch's
        # last segment always does: a partial step at the epoch's end is applied too.
        completes_step = state.gathered + 1 >= cfg.accumulate or pos + seq_len >= self.streams.n - 1
        no_sync = self.ranks.enabled and not completes_step
        with self.forward_model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
            with autocast(self.device, self.precision):
                out = self.forward_model(x, state.carried, targets=y, recompute=cfg.checkpoint_activations,
                                         compute=self.compute)
                loss = (out.loss + ar_tar(out, cfg)) / cfg.accumulate  # accumulate = mean over segments
            self.scaler.scale(loss).backward()
        carried = detach_state(out.state)
        state.gathered += 1
        state.position = pos + seq_len
        checks = [out.loss.detach(), loss.detach()]
        completes = state.gathered >= cfg.accumulate
        if completes:
            checks.append(self.unscaled_grad_norm())
        # The loop's one host sync per batch: the loss for the log, and whether anything is non-finite. Under fp16
        # an overflowing gradient with finite losses is the loss scaler's business (it skips that update and
        # lowers the scale), not trouble in the model.
        values = torch.stack([c.float() for c in checks]).tolist()
        finite = all(math.isfinite(v) for v in (values[:2] if self.scaler.is_enabled() else values))
        state.bad_in_step |= not finite
        stepped = completes and self.apply()
        # After a skipped step the state starts afresh: the one that produced non-finite values would poison the rest.
        state.carried = None if completes and not stepped else carried
        metrics.count(values[0] if finite else None, y.numel())
        return stepped

    def finish_epoch(self) -> bool:
        """An epoch that ends mid-accumulation still applies what it gathered, as a mean. True if applied."""
        norm = self.unscaled_grad_norm(scale=self.cfg.accumulate / self.state.gathered)
        self.state.bad_in_step |= not math.isfinite(norm.item()) and not self.scaler.is_enabled()
        return self.apply()

    def unscaled_grad_norm(self, scale: float = 1.0) -> torch.Tensor:
        """The gathered gradients' global norm (clipped to --clip when set), after undoing the fp16 loss scale and
        multiplying them by `scale`; non-finite when any gradient is."""
        self.scaler.unscale_(self.optimizer)
        if scale != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.clip:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)
        if not params:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))

    def apply(self) -> bool:
        """The optimizer step with the gathered gradients, or its skip when any rank saw something non-finite."""
        self.state.bad_in_step = self.ranks.any(self.state.bad_in_step, device=self.device)[0]  # all skip, or none
        return self._finish()

    def _finish(self) -> bool:
        """Apply the gathered gradients, or skip them if any loss or gradient was non-finite. True if applied.
        Raises NonFiniteLimit on the --nonfinite-limit'th skipped step in a row."""
        opt, state = self.optimizer, self.state
        assert opt is not None
        state.gathered = 0
        if not state.bad_in_step:
            self.scaler.step(opt)  # opt.step(), unless an fp16 gradient overflowed (then the scale drops)
            self.scaler.update()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            state.nonfinite_run = 0
            return True
        self.scaler.update()  # closes this step's unscale_ (the next step may unscale again)
        opt.zero_grad(set_to_none=True)
        state.bad_in_step = False
        state.carried = None
        state.nonfinite_run += 1
        state.nonfinite_total += 1
        limit = self.cfg.nonfinite_limit
        self.log.line(f"warning: non-finite loss or gradient at epoch {state.epoch}, position {state.position}: "
                      f"update skipped, recurrent state reset ({state.nonfinite_run} in a row of at most {limit}, "
                      f"{state.nonfinite_total} in all)")
        self.log.record("nonfinite", epoch=state.epoch, step=state.step, position=state.position,
                        in_a_row=state.nonfinite_run, total=state.nonfinite_total)
        if state.nonfinite_run >= limit:
            raise NonFiniteLimit
        return False

    def restore_grads(self, grads: list[torch.Tensor | None] | None) -> None:
        """The gradients gathered in an unfinished --accumulate step, as a checkpoint saved them."""
        params = list(self.model.parameters())
        if grads is None or len(grads) != len(params):
            raise SharnnError("cannot resume: the checkpoint's gathered gradients do not fit the model")
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.device)


class CheckpointPolicy:
    """When and what to save: `last/` on the schedule (--save-every, --save-every-minutes; with --keep K as
    `step-NNNNNN/` too, the newest K kept), and whatever the trainer asks for (best/, last/, epoch-N/). Non-finite
    weights are never saved. Under torchrun every rank calls `save` (the carried state is gathered); rank 0 writes.
    `optimizer` is the trainer's (it changes when SGD switches to averaged SGD)."""

    def __init__(self, model: SHARNN, cfg: TrainConfig, corpus: Corpus, state: TrainState, rng: np.random.Generator,
                 scaler: torch.amp.GradScaler, ranks: Dist, run_dir: Path, log: RunLog):
        self.model, self.cfg, self.corpus, self.state, self.rng, self.scaler = model, cfg, corpus, state, rng, scaler
        self.ranks, self.run_dir, self.log = ranks, run_dir, log
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_save_time = time.perf_counter()
        self.last_saved_at = -1  # the step of the latest save of last/

    def due(self) -> bool:
        """Whether a periodic save is due after this optimizer step."""
        cfg = self.cfg
        if cfg.save_every and self.state.step % cfg.save_every == 0:
            return True
        return (cfg.save_every_minutes is not None
                and time.perf_counter() - self.last_save_time >= 60 * cfg.save_every_minutes)

    def save_periodic(self) -> None:
        """`last/`, and with --keep K also `step-NNNNNN/` (last/ then shares its files), the newest K kept."""
        if self.cfg.keep:
            name = step_name(self.state.step)
            if self.save(name) and self.ranks.is_main:
                link_checkpoint(self.run_dir / name, self.run_dir / "last")
                prune_checkpoints(self.run_dir, self.cfg.keep)
        else:
            self.save("last")

    def save(self, name: str) -> bool:
        """Write the checkpoint `name`; returns whether it was written (never with non-finite weights: every rank
        sees the same weights, so all skip together, and the checkpoint there stays as it was)."""
        state = self.state
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            self.log.line(f"warning: the weights are not finite at step {state.step}: {name}/ not written "
                          "(its previous contents stay)")
            self.log.record("unsaved", name=name, epoch=state.epoch, step=state.step, reason="non-finite weights")
            return False
        if name == "last":
            self.last_saved_at = state.step  # on every rank: they decide together whether to save again
        carried = self.ranks.gather_state(state.carried)  # all ranks' streams: resumable on any number of ranks
        # Inside an --accumulate step, the gradients gathered so far, averaged over the ranks (a collective too).
        grads = self.ranks.mean_grads(list(self.model.parameters())) if state.gathered else None
        if self.ranks.is_main:
            self._write(name, carried, grads)
        if name != "best":
            self.last_save_time = time.perf_counter()
            if self.ranks.is_main:
                self.log.record("save", name=name, epoch=state.epoch, step=state.step, position=state.position)
        return True

    def _write(self, name: str, carried: State | None, grads: list[torch.Tensor | None] | None) -> None:
        state = self.state
        assert self.optimizer is not None
        summary = {"epoch": state.epoch, "step": state.step, "position": state.position, "best_bpc": state.best_bpc}
        saved = state.to_dict() | {
            "carried": state_to_list(carried),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.rng),
            "world": self.ranks.world,
            "grads": grads,  # inside an --accumulate step (gathered > 0): the gradients gathered so far
            "scaler": self.scaler.state_dict(),  # {} unless fp16
        }
        save_checkpoint(self.run_dir / name, self.model, self.cfg, summary, saved, vocab=self.corpus.vocab,
                        data=self.corpus.identity)

    def last_saved(self) -> str:
        """What `last/` holds, in words."""
        try:
            return f"it holds the weights from step {read_meta(self.run_dir / 'last')['progress']['step']}"
        except (SharnnError, KeyError, TypeError):
            return "no checkpoint of this run was saved"


class Validator:
    """Validation: the valid split's bpc, in float32 whatever --precision trains in (the number that picks best/
    is the one `sharnn eval` gives), measured by rank 0 (the others take its number: all must agree on "best"),
    with the averaged weights once SGD has switched to averaged SGD; a new best is saved as best/. Whether to
    switch is a separate question (`asgd_due`), which the trainer asks at the end of an epoch."""

    def __init__(self, model: SHARNN, cfg: TrainConfig, corpus: Corpus, state: TrainState, ranks: Dist,
                 device: torch.device, log: RunLog, checkpoints: CheckpointPolicy):
        self.model, self.cfg, self.corpus, self.state, self.ranks = model, cfg, corpus, state, ranks
        self.device, self.log, self.checkpoints = device, log, checkpoints
        self.validated_at = -1  # the step of the latest validation

    def validate(self, label: str, optimizer: torch.optim.Optimizer) -> EvalResult:
        cfg, state, ranks = self.cfg, self.state, self.ranks
        self.validated_at = state.step
        # After the switch to averaged SGD, the averaged weights are the model: evaluate and keep those.
        with averaged_weights(self.model.parameters(), optimizer):
            if ranks.is_main:
                res = evaluate(self.model, _eval_ids(self.corpus.valid, cfg), cfg.eval_batch_size or cfg.batch_size,
                               cfg.bptt, self.device, progress=not self.log.quiet, what="valid")
            loss = ranks.from_main(res.loss if ranks.is_main else 0.0, self.device)
            if not ranks.is_main:
                res = EvalResult(loss, 0, 0.0)
            improved = res.bpc < state.best_bpc
            if improved:
                state.best_bpc = res.bpc
                self.checkpoints.save("best")
        self.log.line("-" * 89)
        self.log.line(
            f"| {label} | step {state.step} | "
            f"time {res.seconds:5.1f}s | valid loss {res.loss:5.3f} | valid bpc {res.bpc:6.4f} | "
            f"valid ppl {res.ppl:8.3f}{' | new best, saved' if improved else ''}"
        )
        self.log.line("-" * 89)
        self.log.record("valid", epoch=state.epoch, step=state.step, loss=res.loss, bpc=res.bpc, ppl=res.ppl, best=improved)
        return res

    def asgd_due(self, loss: float) -> bool:
        """AWD-LSTM's switch from SGD to averaged SGD: an end-of-epoch validation `loss` no better than the best of
        the earlier ones but the last --nonmono."""
        cfg, state = self.cfg, self.state
        return cfg.optimizer == "sgd" and not state.asgd and should_switch_to_asgd(state.val_history, loss, cfg.nonmono)


class Trainer:
    """The epoch/step loop, which only orchestrates: `run` goes epoch by epoch, `_train_epoch` segment by segment
    through the training step (`TrainStep`), then takes the decisions all ranks take together (`_after_batch`):
    log (`MetricsLog`), validate (`Validator`), save (`CheckpointPolicy`), stop for the budget or a signal.
    Where the run stands is `self.state`, a `TrainState`, which the pieces share."""

    def __init__(self, model: SHARNN, optimizer: torch.optim.Optimizer, cfg: TrainConfig, corpus: Corpus,
                 streams: Streams, rng: np.random.Generator, device: torch.device, run_dir: Path, log: RunLog,
                 saved: dict[str, Any] | None, ranks: Dist | None = None):
        self.model, self.cfg, self.streams, self.rng, self.device, self.run_dir, self.log = (
            model, cfg, streams, rng, device, run_dir, log)  # rng: the generator of segment lengths
        self.ranks = ranks = ranks or Dist()
        self.state = state = TrainState.from_dict(saved) if saved is not None else TrainState()
        state.asgd = isinstance(optimizer, torch.optim.ASGD)
        self.step = TrainStep(model, cfg, streams, state, ranks, device, log, saved)
        self.metrics = MetricsLog(state, cfg, log, ranks.world)
        self.checkpoints = CheckpointPolicy(model, cfg, corpus, state, rng, self.step.scaler, ranks, run_dir, log)
        self.validator = Validator(model, cfg, corpus, state, ranks, device, log, self.checkpoints)
        self.use_optimizer(optimizer)
        # --decay runs to the step where the budget ends; all ranks agree on it (their clocks differ a little).
        self.first_step = state.step
        self.horizon = self._horizon(seconds=0.0)
        if state.gathered:
            self.step.restore_grads(saved["grads"])  # type: ignore[index]
            # The rest of an unfinished step runs on this run's schedule: a --lr given on resume applies to it too.
            set_lr(optimizer, lr_at(state.step + 1, state.epoch, cfg, self.horizon))
        self.stop_signal: int | None = None  # set by the SIGINT/SIGTERM handler
        self.epochs_done = 0
        self.seconds = 0.0
        self.start_time = time.perf_counter()
        self.saved_at_epoch_start = False  # the epoch-end validation and save just happened, nothing since

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer the step takes and the checkpoints save (a new one when SGD switches to averaged SGD)."""
        self.optimizer = self.step.optimizer = self.checkpoints.optimizer = optimizer

    @property
    def chars_per_s(self) -> float:
        return self.metrics.chars / self.seconds if self.seconds > 0 else 0.0

    def out_of_budget(self) -> bool:
        cfg = self.cfg
        if cfg.max_steps is not None and self.state.step >= cfg.max_steps:
            return True
        return cfg.max_time is not None and time.perf_counter() - self.start_time >= cfg.max_time

    def run(self) -> None:
        state = self.state
        try:
            reason = None
            while state.epoch <= self.cfg.epochs:
                reason = self._stop_reason() or self._train_epoch()
                if reason:
                    break
                self._end_epoch()
        except NonFiniteLimit:
            self._stop_nonfinite()
        if reason == "budget":
            self.log.line(f"stopping at step {state.step}: budget reached (--max-steps/--max-time)")
            if not self.saved_at_epoch_start:  # unless --eval-interval / --save-every just did it at this step
                if self.validator.validated_at != state.step:
                    self.validator.validate(f"validation at epoch {state.epoch:3d}", self.optimizer)
                if self.checkpoints.last_saved_at != state.step:
                    self.checkpoints.save("last")
        if self.stop_signal is not None:  # also when it came during a validation after the last batch
            if reason == "signal" and not self.saved_at_epoch_start:  # else last/ was just saved
                self.checkpoints.save("last")
            self._interrupted()

    def _end_epoch(self) -> None:
        """Move to the next epoch first, so that checkpoints written now resume at its start; then validate (and
        perhaps switch to averaged SGD) and save."""
        state, cfg = self.state, self.cfg
        self.epochs_done += 1
        state.epoch, state.position, state.carried, state.log_sums = state.epoch + 1, 0, None, new_log_sums()
        res = self.validator.validate(f"end of epoch {state.epoch - 1:3d}", self.optimizer)
        if self.validator.asgd_due(res.loss):
            self.use_optimizer(build_asgd(self.model.parameters(), cfg, self.optimizer.param_groups[0]["lr"]))
            state.asgd = True
            self.log.line(f"switching to averaged SGD: validation has not improved for {cfg.nonmono} epochs")
            self.log.record("asgd", epoch=state.epoch, step=state.step)
        state.val_history.append(res.loss)
        self.checkpoints.save("last")
        if state.epoch - 1 in cfg.when:  # as the reference did: keep the model from before the LR drops
            self.checkpoints.save(f"epoch-{state.epoch - 1:03d}")
        self.saved_at_epoch_start = True

    def _train_epoch(self) -> str | None:
        """Train from the current position to the end of the epoch.

        Returns None at the epoch's end, or why it stopped early: 'budget' (--max-steps/--max-time, checked
        after each optimizer step) or 'signal' (SIGINT/SIGTERM, checked after each batch).
        """
        cfg, state = self.cfg, self.state
        self.model.train()
        est_batches = max(1, (self.streams.n - 1) // cfg.bptt)
        bar = TrainProgress(cfg, state.epoch, est_batches, min(state.position // cfg.bptt, est_batches), state.step,
                            self.start_time, show=not self.log.quiet)
        self.metrics.start_clock()
        try:
            for pos, seq_len in train_segments(self.streams, cfg.bptt, self.rng, start=state.position):
                self.saved_at_epoch_start = False
                t0 = time.perf_counter()
                if state.gathered == 0:
                    set_lr(self.optimizer, lr_at(state.step + 1, state.epoch, cfg, self.horizon))
                stepped = self.step.segment(pos, seq_len, self.metrics)
                self.seconds += time.perf_counter() - t0
                bar.update(min(state.position // cfg.bptt, est_batches), state.step, state.gathered)
                if self.metrics.due():
                    scale = self.step.scaler.get_scale() if self.step.scaler.is_enabled() else None
                    self.metrics.emit(est_batches, self.optimizer.param_groups[0]["lr"], scale, bar.log_suffix())
                if reason := self._after_batch(stepped):
                    return reason
            if state.gathered:  # a step like any other: validate, save, budget
                return self._after_batch(self.step.finish_epoch())
            return None
        finally:
            bar.close()

    def _after_batch(self, stepped: bool) -> str | None:
        """The decisions every rank takes together (one all-reduce under torchrun, none otherwise): validate and
        save on their schedules, stop for the budget or a signal. Returns why training stops, if it does."""
        *flags, seconds = self.ranks.maximum(
            stepped and self.checkpoints.due(), stepped and self.out_of_budget(), self.stop_signal is not None,
            time.perf_counter() - self.start_time, device=self.device)
        save_due, over, signalled = map(bool, flags)
        if stepped:
            self.horizon = self._horizon(seconds)
            if self.cfg.eval_interval and self.state.step % self.cfg.eval_interval == 0:
                self.validator.validate(f"validation at epoch {self.state.epoch:3d}", self.optimizer)
                self.model.train()
            if save_due:
                self.checkpoints.save_periodic()
            if over:
                return "budget"
        if signalled:
            self.stop_signal = self.stop_signal or signal.SIGTERM  # another rank got it
            return "signal"
        return None

    def _horizon(self, seconds: float) -> float:
        """The step at which the budget ends (optim.budget_horizon), `seconds` into this process's run."""
        cfg, state = self.cfg, self.state
        per_epoch = (self.streams.n - 1) / cfg.bptt / cfg.accumulate
        to_end = (cfg.epochs - state.epoch + 1) * per_epoch - state.position / cfg.bptt / cfg.accumulate
        return budget_horizon(state.step, cfg, seconds=seconds, timed_steps=state.step - self.first_step,
                              steps_to_last_epoch_end=to_end)

    def _stop_reason(self) -> str | None:
        signalled, over = self.ranks.any(self.stop_signal is not None, self.state.gathered == 0 and self.out_of_budget(),
                                         device=self.device)
        if signalled:
            self.stop_signal = self.stop_signal or signal.SIGTERM  # another rank got it
            return "signal"
        return "budget" if over else None

    def _stop_nonfinite(self) -> None:
        """--nonfinite-limit skipped steps in a row: save the weights from before the trouble (if they are finite)
        and stop with a message saying what `last/` holds."""
        state, last = self.state, self.run_dir / "last"
        stopped = (f"stopped: {state.nonfinite_run} optimizer steps in a row had a non-finite loss or gradient "
                   f"(epoch {state.epoch}, after step {state.step}). ")
        # No bad update was applied, so these are the weights from before the trouble, unless an update with a
        # finite gradient made them non-finite (save refuses those).
        if self.checkpoints.save("last"):
            error = SharnnError(f"{stopped}None of them was applied: {last} holds the weights from step "
                                f"{state.step}, before the trouble, and resumes after the bad batches; try it with "
                                "a lower --lr or a smaller --clip")
        else:
            error = SharnnError(f"{stopped}The weights themselves are not finite (an update with a finite "
                                f"gradient made them so), so {last} was not overwritten: "
                                f"{self.checkpoints.last_saved()}; resume from it with a lower --lr or a smaller --clip")
        error.all_ranks = True  # type: ignore[attr-defined]  # every rank counted the same bad steps
        raise error

    def _interrupted(self) -> None:
        name = signal.Signals(self.stop_signal).name  # type: ignore[arg-type]
        state = self.state
        where = f"epoch {state.epoch}, step {state.step}" + (f" (+{state.gathered} gathered segments)" if state.gathered else "")
        self.log.line(f"stopped by {name} at {where}; saved {self.run_dir / 'last'}")
        self.log.record("interrupted", signal=name, epoch=state.epoch, step=state.step)
        raise TrainingInterrupted(
            f"stopped by {name} at {where}; a resumable checkpoint is in {self.run_dir / 'last'}. "
            f"To continue, run the same command with --resume {self.run_dir}",
            self.stop_signal,  # type: ignore[arg-type]
        )
