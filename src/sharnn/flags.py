"""Training flags, derived from the fields of `SHARNNConfig` and `TrainConfig`, and settings resolved from them.

Each field is a flag spelled as in the seed's parameter table (`--batch_size`, `--log-interval`), also accepted in
the other spelling (`--batch-size`); its help and default come from the field. Precedence when a run is set up:
dataclass defaults < `--preset NAME` < `--config FILE` < flags.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from .config import (
    DECAYS,
    OPTIMIZERS,
    TRAIN_PRECISIONS,
    SHARNNConfig,
    TrainConfig,
    load_config_file,
    load_preset,
    split_settings,
)
from .errors import SharnnError


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "off", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


# text flags with a fixed set of values
CHOICES = {"optimizer": OPTIMIZERS, "decay": DECAYS, "precision": TRAIN_PRECISIONS}


def add_field_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field of `cls` (a config dataclass), with its help text and default from the field."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if not f.metadata.get("flag", True):  # set by the data or by a command, not by the user
            continue
        under, hyphen = f"--{f.name}", f"--{f.name.replace('_', '-')}"
        # The table spells batch_size with an underscore and log-interval with a hyphen; accept both everywhere.
        names = [under, hyphen] if f.name == "batch_size" else list(dict.fromkeys([hyphen, under]))
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        default = f.default
        help_text = f"{f.metadata.get('help', '')} (default: {f.metadata.get('shown') or show(default)})"
        t = str(f.type)
        if t == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif t.startswith("tuple"):
            kw.update(nargs="+", type=int, metavar="N")
        elif "None" in t:
            base = int if t.startswith("int") else float if t.startswith("float") else str
            kw.update(type=_none_or(base), metavar=base.__name__.upper())
        else:
            kw["type"] = type(default)
            if f.name in CHOICES:
                kw["choices"] = list(CHOICES[f.name])
        group.add_argument(*names, help=help_text, **kw)


def show(v: Any) -> str:
    if v == ():
        return "automatic"
    if isinstance(v, tuple):
        return " ".join(map(str, v))
    return "none" if v is None else str(v)



def resolve_train_settings(args: argparse.Namespace) -> tuple[SHARNNConfig, TrainConfig, dict[str, Any]]:
    """Defaults < preset < config file < flags. Returns the configs and the model settings the user gave.

    With --resume, the run's saved settings take the defaults' place: its train_config.json and its model's
    config, then --preset, --config and the flags typed (every flag's argparse default is SUPPRESS, so `args`
    holds only those). `--save` defaults to the run folder the checkpoint sits in; `--overwrite` is never
    inherited."""
    flag_names = {f.name for f in fields(SHARNNConfig)} | {f.name for f in fields(TrainConfig)}
    typed = {k: v for k, v in vars(args).items() if k in flag_names}
    given: dict[str, Any] = {}
    if args.preset:
        given.update(load_preset(args.preset))
    if args.config:
        given.update(load_config_file(args.config))
    given.update(typed)
    settings = _saved_run_settings(given["resume"], "save" in given) if given.get("resume") else {}
    settings.update(given)
    model_kw, train_kw = split_settings(settings)
    try:
        model_cfg = SHARNNConfig.from_dict(model_kw)
        train_cfg = TrainConfig.from_dict(train_kw)
    except TypeError as e:  # a config file value of the wrong kind
        raise SharnnError(f"bad setting: {e}") from None
    return model_cfg, train_cfg, split_settings(given)[0]


def _saved_run_settings(resume: str, save_given: bool) -> dict[str, Any]:
    """The settings a resumed run starts from: its model's and its run's, saved with the checkpoint."""
    from .checkpoint import load_train_config, read_meta, resolve_checkpoint, run_folder_of

    ckpt = resolve_checkpoint(resume, prefer="last")
    settings = dict(read_meta(ckpt).get("model") or {})
    saved = load_train_config(ckpt)
    if saved is not None:
        settings.update({k: v for k, v in saved.to_dict().items() if k not in ("resume", "overwrite")})
    folder = run_folder_of(ckpt)
    if folder is not None:
        settings["save"] = str(folder)
    elif not save_given:
        raise SharnnError(f"{ckpt} is not inside a run folder (best/, last/, step-*/ of a --save folder); "
                          "pass --save DIR for the resumed run")
    return settings
