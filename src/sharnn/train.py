"""The training loop: build, train epoch by epoch with the paper's variable BPTT, validate, keep the best.

Reads top to bottom: `train()` sets up (data, model, optimizer, resume), runs `_run_epochs`, then measures
the best checkpoint on valid and test. Small helpers (`ar_tar`, `resolve_device`, ...) are importable by tests.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import (
    load_model,
    load_train_config,
    load_train_state,
    load_vocab,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import SHARNNConfig, TrainConfig
from .data import Corpus, Streams, load_corpus, train_segments
from .errors import SharnnError
from .evaluate import EvalResult, evaluate
from .generate import generate
from .model import SHARNN, BlockState, SHARNNOutput, State, count_parameters, detach_state
from .optim import build_optimizer, lr_at, set_lr

LN2 = math.log(2)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SharnnError(f"--device {name} was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_writable(folder: Path) -> None:
    """Fail now, not after hours of training, if checkpoints cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise SharnnError(f"cannot write to the save folder {folder}: {e.strerror}; pass a writable --save") from None


class RunLog:
    """Human log lines to stderr (above the progress bar) and the same numbers as JSON lines in the run folder."""

    def __init__(self, run_dir: Path, quiet: bool = False):
        self.path = run_dir / "log.jsonl"
        self.quiet = quiet

    def line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def record(self, event: str, **values: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": round(time.time(), 3), **values}) + "\n")


def train(model_cfg: SHARNNConfig, cfg: TrainConfig, quiet: bool = False,
          model_overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train as `cfg` says; returns where the run went and its final valid/test numbers.

    With `cfg.resume`, the architecture, weights, optimizer, schedule position, RNG streams, data position and
    carried state come from the checkpoint; run settings (lr, budgets, ...) come from `cfg`, and so do the
    non-architecture model settings in `model_overrides` (dropouts, attention span) when given.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.save)
    check_writable(run_dir)
    corpus = load_corpus(cfg.data)
    log = RunLog(run_dir, quiet)
    seed_everything(cfg.seed)  # before the model is built: its initial weights come from this seed

    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        ckpt = resolve_checkpoint(cfg.resume, prefer="last")
        model = load_model(ckpt, device)
        if model_overrides:
            new_cfg = replace(model.cfg, **{k: v for k, v in model_overrides.items() if k != "vocab_size"})
            if new_cfg != model.cfg:
                rebuilt = SHARNN(new_cfg).to(device)
                rebuilt.load_state_dict(model.state_dict())
                model = rebuilt
        resume_state = load_train_state(ckpt, device)
        old_cfg = load_train_config(ckpt)
        if load_vocab(ckpt) != corpus.vocab:
            raise SharnnError(
                f"checkpoint {ckpt} was trained with another vocabulary ({model.cfg.vocab_size} symbols) than the "
                f"corpus {corpus.name} ({corpus.vocab_size}); resume on the same kind of corpus"
            )
        if old_cfg is not None and old_cfg.seed != cfg.seed:
            resume_state.pop("rng", None)  # a new --seed on resume asks for fresh randomness (paper's 2nd pass)
        if old_cfg is not None and old_cfg.batch_size != cfg.batch_size:
            # Stream boundaries move with the batch size: the saved position and carried state mean nothing now.
            log.line(f"--batch_size changed ({old_cfg.batch_size} -> {cfg.batch_size}): epoch restarts at its start")
            resume_state.update(position=0, carried=None)
        log.line(f"resuming from {ckpt} at epoch {resume_state['epoch']}, step {resume_state['step']}")
    else:
        model = SHARNN(replace(model_cfg, vocab_size=corpus.vocab_size)).to(device)

    # Fail on data that is too small before any training happens.
    train_streams = Streams(corpus.train, cfg.batch_size, min_len=cfg.bptt + 1, what="train split")
    eval_bsz = cfg.eval_batch_size or cfg.batch_size
    Streams(_eval_ids(corpus.valid, cfg), eval_bsz, what="valid split")
    Streams(_eval_ids(corpus.test, cfg), cfg.test_batch_size, what="test split")

    optimizer = build_optimizer(model.parameters(), cfg)
    rng = np.random.default_rng(cfg.seed)
    if resume_state is not None:
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except (ValueError, KeyError) as e:
            raise SharnnError(f"cannot resume: the saved optimizer state does not fit --optimizer {cfg.optimizer} ({e})") from None
        if "rng" in resume_state:
            _set_rng_state(rng, resume_state["rng"])

    n_params = count_parameters(model)
    log.line(f"SHA-RNN: {n_params:,} parameters | corpus {corpus.name}: train {len(corpus.train):,} "
             f"valid {len(corpus.valid):,} test {len(corpus.test):,} tokens | device {device}")
    log.record("start", params=n_params, model=model.cfg.to_dict(), train=cfg.to_dict(), device=str(device))

    loop = _Loop(model, optimizer, cfg, corpus, train_streams, rng, device, run_dir, log, resume_state)
    loop.run()

    # Final numbers come from the best checkpoint, as the paper reports them.
    best_dir = run_dir / "best"
    final_model = load_model(best_dir, device) if (best_dir / "config.json").is_file() else model
    valid = evaluate(final_model, _eval_ids(corpus.valid, cfg), eval_bsz, cfg.bptt, device, progress=not quiet,
                     what="valid")
    test = evaluate(final_model, _eval_ids(corpus.test, cfg), cfg.test_batch_size, cfg.bptt, device,
                    progress=not quiet, what="test")
    log.record("final", valid_bpc=valid.bpc, test_bpc=test.bpc, valid_loss=valid.loss, test_loss=test.loss)
    text = b""
    if cfg.sample:
        prompt = corpus.vocab.decode(corpus.test[:64])
        text = prompt + generate(final_model, prompt, cfg.sample, temperature=0.8, seed=cfg.seed,
                                 vocab=corpus.vocab).data
    return TrainResult(run_dir, loop.step, loop.epochs_done, loop.seconds, loop.chars_per_s,
                       loop.best_bpc, valid, test, text)


def _eval_ids(ids: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    return ids[: cfg.max_eval_bytes] if cfg.max_eval_bytes else ids


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(rng: np.random.Generator, s: dict[str, Any]) -> None:
    rng.bit_generator.state = s["numpy"]
    torch.set_rng_state(s["torch"].cpu())
    random.setstate(_as_tuple(s["python"]))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class _Loop:
    """The epoch/step loop and the bookkeeping it carries (step, epoch, position, best bpc)."""

    def __init__(self, model: SHARNN, optimizer: torch.optim.Optimizer, cfg: TrainConfig, corpus: Corpus,
                 streams: Streams, rng: np.random.Generator, device: torch.device, run_dir: Path, log: RunLog,
                 resume: dict[str, Any] | None):
        self.model, self.optimizer, self.cfg, self.corpus = model, optimizer, cfg, corpus
        self.streams, self.rng, self.device, self.run_dir, self.log = streams, rng, device, run_dir, log
        self.step = 0  # optimizer steps taken, across epochs and resumes
        self.epoch = 1  # 1-based, as in the paper's logs
        self.position = 0  # where the next segment of this epoch starts
        self.best_bpc = math.inf
        self.carried: State | None = None
        if resume is not None:
            self.step, self.epoch, self.position = resume["step"], resume["epoch"], resume["position"]
            self.best_bpc = resume["best_bpc"]
            self.carried = _state_from_list(resume.get("carried"))
        self.epochs_done = 0
        self.seconds = 0.0
        self.chars = 0
        self.start_time = time.perf_counter()

    @property
    def chars_per_s(self) -> float:
        return self.chars / self.seconds if self.seconds > 0 else 0.0

    def out_of_budget(self) -> bool:
        cfg = self.cfg
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return True
        return cfg.max_time is not None and time.perf_counter() - self.start_time >= cfg.max_time

    def run(self) -> None:
        cfg = self.cfg
        stopped = False
        while self.epoch <= cfg.epochs and not stopped:
            stopped = self._train_epoch()
            if not stopped:
                # Move to the next epoch first, so that checkpoints written now resume at its start.
                self.epochs_done += 1
                self.epoch, self.position, self.carried = self.epoch + 1, 0, None
                self.validate(f"end of epoch {self.epoch - 1:3d}")
                self.save("last")
        if stopped:
            self.log.line(f"stopping at step {self.step}: budget reached (--max-steps/--max-time)")
            self.validate(f"validation at epoch {self.epoch:3d}")
            self.save("last")

    def _train_epoch(self) -> bool:
        """Train from the current position to the end of the epoch; True if a budget stopped it early."""
        cfg, model, opt = self.cfg, self.model, self.optimizer
        model.train()
        state = self.carried
        est_batches = max(1, (self.streams.n - 1) // cfg.bptt)
        bar = tqdm(total=est_batches, desc=f"epoch {self.epoch}", unit="batch", leave=False, file=sys.stderr,
                   disable=True if self.log.quiet else None, initial=min(self.position // cfg.bptt, est_batches))
        window_loss, window_batches, window_chars, window_start = 0.0, 0, 0, time.perf_counter()
        micro = 0
        opt.zero_grad(set_to_none=True)
        for pos, seq_len in train_segments(self.streams, cfg.bptt, self.rng, start=self.position):
            if micro == 0:
                set_lr(opt, lr_at(self.step + 1, self.epoch, cfg))
            x, y = self.streams.segment(pos, seq_len, self.device)
            t0 = time.perf_counter()
            out = model(x, state, targets=y)
            loss = (out.loss + ar_tar(out, cfg)) / cfg.accumulate  # accumulate = mean over segments
            loss.backward()
            state = detach_state(out.state)
            micro += 1
            self.position = pos + seq_len
            if micro == cfg.accumulate:
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                micro = 0
                self.step += 1
            self.carried = state
            window_loss += out.loss.item()
            window_batches += 1
            window_chars += y.numel()
            self.chars += y.numel()
            self.seconds += time.perf_counter() - t0
            bar.update(1)
            if window_batches == cfg.log_interval:
                self._log_window(window_loss, window_batches, window_chars, window_start, est_batches)
                window_loss, window_batches, window_chars, window_start = 0.0, 0, 0, time.perf_counter()
            if micro == 0 and cfg.eval_interval and self.step % cfg.eval_interval == 0:
                self.validate(f"validation at epoch {self.epoch:3d}")
                model.train()
            if micro == 0 and self.out_of_budget():
                bar.close()
                return True
        if micro:  # an epoch that ends mid-accumulation still applies what it gathered, scaled to a mean
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(cfg.accumulate / micro)
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.step += 1
        bar.close()
        return False

    def _log_window(self, loss_sum: float, batches: int, chars: int, start: float, est_batches: int) -> None:
        elapsed = time.perf_counter() - start
        loss = loss_sum / batches
        lr = self.optimizer.param_groups[0]["lr"]
        batch = min(self.position // self.cfg.bptt, est_batches)
        self.log.line(
            f"| epoch {self.epoch:3d} | {batch:5d}/{est_batches:5d} batches | lr {lr:.3g} | "
            f"ms/batch {1000 * elapsed / batches:7.1f} | loss {loss:5.3f} | bpc {loss / LN2:6.3f} | "
            f"chars/s {chars / elapsed:8.0f}"
        )
        self.log.record("train", epoch=self.epoch, step=self.step, batch=batch, lr=lr,
                        ms_per_batch=1000 * elapsed / batches, loss=loss, bpc=loss / LN2,
                        chars_per_s=chars / elapsed)

    def validate(self, label: str) -> float:
        cfg = self.cfg
        ids = _eval_ids(self.corpus.valid, cfg)
        res = evaluate(self.model, ids, cfg.eval_batch_size or cfg.batch_size, cfg.bptt, self.device,
                       progress=not self.log.quiet, what="valid")
        improved = res.bpc < self.best_bpc
        if improved:
            self.best_bpc = res.bpc
        self.log.line("-" * 89)
        self.log.line(
            f"| {label} | step {self.step} | "
            f"time {res.seconds:5.1f}s | valid loss {res.loss:5.3f} | valid bpc {res.bpc:6.4f} | "
            f"valid ppl {res.ppl:8.3f}{' | new best, saved' if improved else ''}"
        )
        self.log.line("-" * 89)
        self.log.record("valid", epoch=self.epoch, step=self.step, loss=res.loss, bpc=res.bpc, ppl=res.ppl,
                        best=improved)
        if improved:
            self.save("best")
        return res.bpc

    def save(self, name: str) -> None:
        progress = {"epoch": self.epoch, "step": self.step, "position": self.position, "best_bpc": self.best_bpc}
        train_state = {
            **progress,
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(self.rng),
            "carried": _state_to_list(self.carried),
        }
        save_checkpoint(self.run_dir / name, self.model, self.cfg, progress, train_state, vocab=self.corpus.vocab)


def _state_to_list(state: State | None) -> list[dict[str, Any]] | None:
    if state is None:
        return None
    return [{"rnn": list(s.rnn), "memory": s.memory} for s in state]


def _state_from_list(saved: list[dict[str, Any]] | None) -> State | None:
    if saved is None:
        return None
    return tuple(BlockState(tuple(s["rnn"]), s["memory"]) for s in saved)
