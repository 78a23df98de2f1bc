"""Training flags, derived from the fields of `SHARNNConfig` and `TrainConfig`, and settings resolved from them.

Each field is a flag spelled as in the seed's parameter table (`--batch_size`, `--log-interval`), also accepted in
the other spelling (`--batch-size`); its help and default come from the field. How they are layered with a
preset, a config file and a resumed run's settings is `resume.py`'s business.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from .config import DECAYS, OPTIMIZERS, TRAIN_PRECISIONS, SHARNNConfig, TrainConfig
from .resume import RunSettings, run_settings


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
        group.add_argument(*names, help=help_text.replace("%", "%%"), **kw)  # argparse formats help with %


def show(v: Any) -> str:
    if v == ():
        return "automatic"
    if isinstance(v, tuple):
        return " ".join(map(str, v))
    return "none" if v is None else str(v)



def resolve_train_settings(args: argparse.Namespace) -> RunSettings:
    """Defaults < preset < config file < flags (`resume.run_settings`), from `sharnn train`'s parsed flags.

    With --resume, the run's saved settings take the defaults' place. Every flag's argparse default is SUPPRESS,
    so `args` holds only the flags typed."""
    flag_names = {f.name for f in fields(SHARNNConfig)} | {f.name for f in fields(TrainConfig)}
    typed = {k: v for k, v in vars(args).items() if k in flag_names}
    return run_settings(args.preset, args.config, typed)
