"""A training run's settings, and what a resume may change: the rules in one place, beside the checkpoint.

Settings are layered: the dataclass defaults (with `--resume`: the run's saved settings, its model's config and
its train_config.json) < `--preset` < `--config` < the flags typed. On resume:

- a setting that shapes the weights (`SHARNNConfig.weight_settings`) comes from the checkpoint; one that
  disagrees is refused; every other setting may change, and the run says in one line which did;
- a new `--seed` starts fresh random streams (the paper's second pass); the saved ones are not used;
- `--optimizer` may not change (the saved moments belong to the optimizer that made them), and `--epochs` and
  `--max-steps` (which count from the run's start) must leave something to train;
- the corpus must have the checkpoint's vocabulary;
- a different global batch (streams x ranks) restarts the epoch at its start, as stream boundaries move;
- `--save` defaults to the checkpoint's run folder, and `--overwrite` is never inherited.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, NamedTuple

from .checkpoint import Checkpoint
from .config import SHARNNConfig, TrainConfig, load_config_file, load_preset, split_settings
from .data import Corpus
from .errors import SharnnError
from .outputs import same_file

NOT_INHERITED = ("resume", "overwrite")  # how this command starts, not what the run is


class RunSettings(NamedTuple):
    """What a `sharnn train` command asks for, resolved."""

    model: SHARNNConfig
    train: TrainConfig
    model_given: dict[str, Any]  # the model settings given (preset, config file, flags): what a resume may change
    checkpoint: Checkpoint | None  # the run resumed (`--resume`), opened once


def run_settings(preset: str | None = None, config_file: str | None = None,
                 typed: dict[str, Any] | None = None) -> RunSettings:
    """Defaults (or the resumed run's saved settings) < preset < config file < typed flags."""
    given: dict[str, Any] = {}
    if preset:
        given.update(load_preset(preset))
    if config_file:
        given.update(load_config_file(config_file))
    given.update(typed or {})
    ckpt = Checkpoint.open(given["resume"], prefer="last") if given.get("resume") else None
    settings = saved_settings(ckpt, "save" in given) if ckpt is not None else {}
    settings.update(given)
    model_kw, train_kw = split_settings(settings)
    try:
        model_cfg = SHARNNConfig.from_dict(model_kw)
        train_cfg = TrainConfig.from_dict(train_kw)
    except TypeError as e:  # a config file value of the wrong kind
        raise SharnnError(f"bad setting: {e}") from None
    return RunSettings(model_cfg, train_cfg, split_settings(given)[0], ckpt)


def saved_settings(ckpt: Checkpoint, save_given: bool) -> dict[str, Any]:
    """The settings a resumed run starts from: its model's and its run's, saved with the checkpoint; `--save`
    its run folder (a checkpoint outside one needs `--save`)."""
    settings = ckpt.model_config.to_dict()
    if ckpt.train_config is not None:
        settings.update({k: v for k, v in ckpt.train_config.to_dict().items() if k not in NOT_INHERITED})
    if ckpt.run_folder is not None:
        settings["save"] = str(ckpt.run_folder)
    elif not save_given:
        raise SharnnError(f"{ckpt.path} is not inside a run folder (best/, last/, step-*/ of a --save folder); "
                          "pass --save DIR for the resumed run")
    return settings


def resumed_model_config(ckpt: Checkpoint, overrides: dict[str, Any]) -> SHARNNConfig:
    """The checkpoint's model settings with the run settings the user gave (dropouts, span, window).

    A setting that shapes the weights (`SHARNNConfig.weight_settings`) comes from the checkpoint: one that
    disagrees is refused."""
    saved = ckpt.model_config
    names = {f.name for f in fields(SHARNNConfig)} - {"vocab_size"}
    wanted = {k: v for k, v in overrides.items() if k in names}
    new_cfg = SHARNNConfig.from_dict(saved.to_dict() | wanted)
    clash = sorted(k for k in wanted if k in SHARNNConfig.weight_settings() and getattr(new_cfg, k) != getattr(saved, k))
    if clash:
        k = clash[0]
        raise SharnnError(f"--{k.replace('_', '-')} {shown(getattr(new_cfg, k))} conflicts with the checkpoint "
                          f"{ckpt.path} ({shown(getattr(saved, k))}): on --resume the architecture comes from the "
                          "checkpoint; drop the setting")
    return new_cfg


def check_resumable(ckpt: Checkpoint, cfg: TrainConfig, corpus: Corpus, saved: dict[str, Any]) -> None:
    """Refuse a resume that cannot go on: another vocabulary, nothing left to train, another optimizer."""
    if ckpt.vocab != corpus.vocab:
        raise SharnnError(f"checkpoint {ckpt.path} was trained with another vocabulary "
                          f"({ckpt.model_config.vocab_size} symbols) than the corpus {corpus.name} "
                          f"({corpus.vocab_size}); resume on the same kind of corpus")
    if saved["epoch"] > cfg.epochs:
        raise SharnnError(f"{ckpt.path} has finished epoch {saved['epoch'] - 1}, so --epochs {cfg.epochs} leaves "
                          "nothing to train; to go on, pass a larger --epochs (it counts from the run's start)")
    if cfg.max_steps is not None and saved["step"] >= cfg.max_steps:
        raise SharnnError(f"{ckpt.path} is at step {saved['step']}, so --max-steps {cfg.max_steps} leaves nothing "
                          "to train; to go on, pass a larger --max-steps (it counts from the run's start)")
    old = ckpt.train_config
    if old is not None and old.optimizer != cfg.optimizer:
        raise SharnnError(f"cannot resume a run trained with --optimizer {old.optimizer} using "
                          f"--optimizer {cfg.optimizer}: its saved moments belong to the former; keep it")


class ResumePlan(NamedTuple):
    """How a checked resume goes on: what it says, and what of the saved state it keeps."""

    line: str  # the log line: where from, and which settings changed
    record: dict[str, Any]  # the log's start event's "resumed"
    fresh_rng: bool  # a new --seed: the saved random streams are not used
    same_streams: bool  # the global batch is the run's: the data position and carried state go on


def plan_resume(ckpt: Checkpoint, cfg: TrainConfig, model_cfg: SHARNNConfig, saved: dict[str, Any],
                world: int) -> ResumePlan:
    """Every setting that differs from the run's, in words and for the log; whether the streams carry on."""
    old = ckpt.train_config
    changed = changed_settings(old, cfg, ckpt.model_config, model_cfg)
    said = [f"{k} {shown(a)} -> {shown(b)}" for k, (a, b) in changed.items()]
    if "seed" in changed:
        said[list(changed).index("seed")] += " (fresh random streams: the saved ones are not used)"
    line = (f"resuming from {ckpt.path} at epoch {saved['epoch']}, step {saved['step']}; "
            + ("the checkpoint records no run settings: all come from this command" if old is None
               else f"changed: {', '.join(said)}" if said else "settings as the run saved them"))
    record = {"checkpoint": str(ckpt.path), "epoch": saved["epoch"], "step": saved["step"],
              "changed": {k: [_jsonable(a), _jsonable(b)] for k, (a, b) in changed.items()}}
    old_global = (old.batch_size if old else cfg.batch_size) * saved.get("world", 1)
    return ResumePlan(line, record, "seed" in changed, old_global == cfg.batch_size * world)


def changed_settings(old_cfg: TrainConfig | None, cfg: TrainConfig, old_model: SHARNNConfig,
                     model_cfg: SHARNNConfig) -> dict[str, tuple[Any, Any]]:
    """{setting: (the run's value, this run's)} for every model and run setting a resume changes. `resume` and
    `overwrite` say how this command starts, not what the run is; paths that name the same file are the same."""
    changed = {}
    pairs = [(f.name, getattr(old_model, f.name), getattr(model_cfg, f.name)) for f in fields(SHARNNConfig)]
    if old_cfg is not None:
        pairs += [(f.name, getattr(old_cfg, f.name), getattr(cfg, f.name)) for f in fields(TrainConfig)
                  if f.name not in NOT_INHERITED]
    for name, a, b in pairs:
        if a != b and not (name in ("data", "save") and same_file(a, b)):
            changed[name] = (a, b)
    return changed


def shown(value: Any) -> str:
    """A setting's value as a flag would spell it."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
