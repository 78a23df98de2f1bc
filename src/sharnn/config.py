"""Configuration: `SHARNNConfig` (what shapes the network) and `TrainConfig` (one training run).

Names follow the seed's parameter table (`emsize`, `nhid`, `bptt`, `dropouth`, ...). Defaults live here, once;
the CLI derives its flags and `--help` from these fields. Precedence when a run is set up:
dataclass defaults < `--preset NAME` < `--config FILE.toml` < explicit flags.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import SharnnError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ADAPTIVE_ABOVE = 75_000  # vocabularies larger than this get an adaptive softmax unless told otherwise


def auto_cutoffs(vocab_size: int) -> tuple[int, ...]:
    """The reference's split points (its SplitCrossEntropyLoss): WikiText-103 sized, or One Billion Word sized."""
    if vocab_size <= ADAPTIVE_ABOVE:
        return ()
    base = (4200, 35000, 180000) if vocab_size > 500_000 else (2800, 20000, 76000)
    return tuple(c for c in base if c < vocab_size)


# Recurrent cores the table lists (`--model`); model.py's `Block` builds the one named.
RNN_CORES = ("LSTM", "GRU", "QRNN")
OPTIMIZERS = ("lamb", "adam", "adamw", "sgd")
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # --precision of training (autocast; auto: by the hardware)
DECAYS = ("none", "linear", "cosine")  # --decay: the learning rate after the warm-up
ATTN_WINDOWS = ("sliding", "reference")
# The parts of the network mixed-precision training may keep in float32 (--fp32-parts; Compute.fp32_parts).
FP32_PARTS = ("core", "attention", "boom", "decoder")
ATTENTION_KERNELS = ("auto", "fused", "plain")  # Compute.attention


@dataclass(frozen=True)
class Compute:
    """How the network computes, not what: passed to `SHARNN.forward` by whoever runs it, never saved.

    attention: "auto" (sharnn.model.fused_attention_wins decides, by device, shapes and dtype), "fused" (PyTorch's
        scaled_dot_product_attention) or "plain" (two matrix products: what ONNX export needs, every runtime has
        them). The same numbers up to float rounding.
    fp32_parts: the parts computed in float32 even under autocast (`--fp32-parts`), any of FP32_PARTS.
    """

    attention: str = "auto"
    fp32_parts: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {self.attention!r}; choose from {', '.join(ATTENTION_KERNELS)}")
        object.__setattr__(self, "fp32_parts", frozenset(self.fp32_parts))  # a set or tuple given: stored frozen
        unknown = self.fp32_parts - set(FP32_PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(FP32_PARTS)}")


DEFAULT_COMPUTE = Compute()  # what `SHARNN.forward` does unless told: the kernel rule, nothing kept in float32


def valid_device(name: str) -> bool:
    """auto, cpu, cuda or cuda:N (sharnn.runtime.resolve_device turns it into a device)."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


def _doc(text: str, shown: str | None = None, shapes: bool = False, flag: bool = True, **kw: Any) -> Any:
    """A dataclass field whose help text the CLI shows.

    shown: describes a default that is not a plain value. shapes: the setting shapes the weights (a checkpoint's
    value is final: --resume keeps it, and a flag that disagrees is refused). flag: the CLI offers it as a flag
    (not those the data or a command sets).
    """
    meta = {"help": text, "shapes": shapes, "flag": flag, **({"shown": shown} if shown else {})}
    return field(metadata=meta, **kw)


def default_attn_layers(nlayers: int) -> tuple[int, ...]:
    """The original's placement: one attention block, the second to last (`idx == num_layers - 2`), so none
    at all in a one-block model."""
    return (nlayers - 2,) if nlayers >= 2 else ()


@dataclass(frozen=True)
class SHARNNConfig:
    """Everything that shapes the network. Names follow the paper's parameter table."""

    vocab_size: int = _doc("vocabulary size: 256 for raw bytes", shapes=True, flag=False, default=256)
    model: str = _doc("recurrent core: LSTM, GRU or QRNN", shapes=True, default="LSTM")
    qrnn_window: int = _doc(
        "with --model QRNN: inputs each gate sees, 1 (x_t) or 2 (x_t and x_t-1, carried across segments)",
        shapes=True, default=2,
    )
    emsize: int = _doc("E: embedding and block width", shapes=True, default=1024)
    nhid: int = _doc("H: Boom feed-forward width, a multiple of emsize", shapes=True, default=4096)
    nlayers: int = _doc("number of blocks", shapes=True, default=4)
    attn_layers: tuple[int, ...] | None = _doc(
        "blocks (0-based) with single-head attention",
        shown="block nlayers-2, the second to last, as the original; no attention when nlayers is 1", shapes=True, default=None,
    )
    attn_span: int = _doc("M: positions each query may attend to (itself and M-1 before it)", default=5000)
    attn_window: str = _doc(
        "which positions a query sees: sliding (its own last M, wherever segments are cut) or reference (the "
        "original's rule: memory trimmed to M minus the segment length before each segment, then all of it and "
        "the segment up to the query)", default="sliding",
    )
    dropout: float = _doc("dropout on the final hidden state, before the decoder", default=0.1)
    dropouth: float = _doc("dropout inside blocks (RNN output, attention, Boom)", default=0.1)
    dropouti: float = _doc("dropout on the embedding output", default=0.1)
    dropoute: float = _doc(
        "fraction of embedding rows (whole tokens) dropped in training. The table lists 0.1 (the original's "
        "argparse default), but the original's model never applied it: its results, the paper's too, are with 0, "
        "our default",
        default=0.0,
    )
    wdrop: float = _doc(
        "DropConnect on the RNN hidden-to-hidden weights in training (QRNN: on its input-to-gates weights)",
        default=0.0,
    )
    tied: bool = _doc("tie decoder and embedding weights", shapes=True, default=True)
    adaptive_cutoffs: tuple[int, ...] = _doc(
        "adaptive softmax cluster cutoffs (ids sorted by frequency); empty: automatic, used above "
        "75,000 symbols; 0: never", shapes=True, default=()
    )
    collapsed_gate: bool = _doc(
        "attention value gate stored as a constant (set by `sharnn collapse`; same outputs)", shapes=True, flag=False,
        default=False
    )

    def __post_init__(self) -> None:
        _refuse_non_finite(self)
        if self.vocab_size < 2:
            raise SharnnError(f"vocab_size={self.vocab_size} must be at least 2")
        if self.emsize < 1 or self.nhid < 1 or self.nlayers < 1:
            raise SharnnError("emsize, nhid and nlayers must be positive")
        if self.nhid % self.emsize:
            raise SharnnError(
                f"nhid={self.nhid} must be a multiple of emsize={self.emsize}: the Boom layer sums "
                f"nhid/emsize chunks of width emsize; pick e.g. --nhid {4 * self.emsize}"
            )
        if self.attn_layers is None:  # resolved here, so that saved configs (and checkpoints) are explicit
            object.__setattr__(self, "attn_layers", default_attn_layers(self.nlayers))
        if self.model not in RNN_CORES:
            raise SharnnError(f"unknown --model {self.model!r}; choose one of {', '.join(RNN_CORES)}")
        if self.qrnn_window not in (1, 2):
            raise SharnnError(f"--qrnn-window must be 1 or 2, got {self.qrnn_window}")
        bad = [i for i in self.attn_layers if not 0 <= i < self.nlayers]
        if bad:
            raise SharnnError(f"attn_layers {bad} out of range for nlayers={self.nlayers} (0..{self.nlayers - 1}); "
                              "a preset or config file sets --attn-layers for its own depth: give --attn-layers for "
                              f"this one too (the original's choice: {self.nlayers - 2 if self.nlayers > 1 else 'none'})")
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise SharnnError(f"attn_layers {list(self.attn_layers)} lists a block twice")
        if self.uses_adaptive_softmax:
            c = self.adaptive_cutoffs
            if list(c) != sorted(set(c)) or c[0] < 1 or c[-1] >= self.vocab_size:
                raise SharnnError(f"--adaptive-cutoffs {list(c)} must increase strictly within 1..{self.vocab_size - 1}")
            if self.tied:
                raise SharnnError("an adaptive softmax has its own output weights: use it with --no-tied")
        if self.attn_span < 1:
            raise SharnnError(f"attn_span={self.attn_span} must be at least 1")
        if self.attn_window not in ATTN_WINDOWS:
            raise SharnnError(f"unknown --attn-window {self.attn_window!r}; use {' or '.join(ATTN_WINDOWS)}")
        for name in ("dropout", "dropouth", "dropouti", "dropoute", "wdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SharnnError(f"--{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def weight_settings(cls) -> frozenset[str]:
        """The settings that shape the weights: on --resume they come from the checkpoint, whatever is asked."""
        return frozenset(f.name for f in fields(cls) if f.metadata.get("shapes"))

    @property
    def uses_adaptive_softmax(self) -> bool:
        return bool(self.adaptive_cutoffs) and self.adaptive_cutoffs != (0,)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"attn_layers": list(self.attn_layers), "adaptive_cutoffs": list(self.adaptive_cutoffs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SHARNNConfig:
        """Inverse of `to_dict`; unknown keys are an error, JSON lists become tuples."""
        return cls(**_checked_kwargs(cls, d))


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, schedule, optimizer, budgets, where to save."""

    data: str = _doc(
        "corpus: an enwik8 folder from `sharnn data`, any file or folder of bytes, or 'python-stdlib'",
        default="data/enwik8/",
    )
    tokens: str = _doc(
        "auto (what the corpus folder's meta.json says, else bytes), bytes, words (awd-lstm word level) or chars",
        default="auto",
    )
    batch_size: int = _doc("parallel streams per batch", default=16)
    bptt: int = _doc("mean segment length (varied per batch as in the paper)", default=1024)
    lr: float = _doc("peak learning rate", default=2e-3)
    clip: float = _doc("gradient clipping by global norm (0 = off)", default=0.25)
    epochs: int = _doc("epoch limit", default=8000)
    warmup: int = _doc("linear warm-up, in optimizer steps (0 = off)", default=800)
    cooldown: int | None = _doc("linear cool-down length in optimizer steps (none = off)", default=None)
    decay: str = _doc("after the warm-up, lower the learning rate to the end of the budget (the earliest of "
                      "--max-steps, --max-time, --epochs; a time budget's steps estimated from the pace so far): "
                      "none (the original's flat rate), linear or cosine", default="none")
    decay_to: float = _doc("with --decay: the fraction of --lr reached at the end of the budget", default=0.0)
    decay_fraction: float = _doc("with --decay: the share of the steps after the warm-up that the decay takes, at "
                                 "the end (1: all of them; 0.2: the rate stays at --lr for the first four fifths)", default=1.0)
    accumulate: int = _doc("segments averaged per optimizer step", default=1)
    wdecay: float = _doc("weight decay", default=1.2e-6)
    # A plain run behaves like the original, whose loop never added either penalty; the flags turn them on.
    alpha: float = _doc("AR: weight of the L2 penalty on the final block's dropped output. The table lists 2 (the "
                        "original's argparse default), but the original's training loop never applied it: its "
                        "results, the paper's too, are with 0, our default", default=0.0)
    beta: float = _doc("TAR: weight of the L2 penalty on the final block's step-to-step change. The table lists 1 "
                       "(the original's argparse default), but the original's training loop never applied it: its "
                       "results, the paper's too, are with 0, our default", default=0.0)
    optimizer: str = _doc("lamb, adam, adamw or sgd", default="lamb")
    nonmono: int = _doc("with sgd: switch to averaged SGD once validation is worse than the best before the last N epochs (0 = never)", default=5)
    seed: int = _doc("random seed", default=1111)
    when: tuple[int, ...] = _doc("epochs after which the learning rate is divided by 10", default=(-1,))
    log_interval: int = _doc("batches between log lines", default=10)
    save: str = _doc("run folder: best/ and last/ checkpoints and the logs", default="runs/sharnn")
    resume: str | None = _doc("checkpoint (or run folder) to continue: its saved settings are the base, the "
                              "flags given override them, --save defaults to its run folder", default=None)
    overwrite: bool = _doc("start over in a --save folder that already holds a run (its checkpoints and log are "
                           "deleted, nothing else)", default=False)
    save_every: int | None = _doc("also save a resumable checkpoint (last/) every N optimizer steps", default=None)
    save_every_minutes: float | None = _doc(
        "also save a resumable checkpoint (last/) every N minutes of training (none = off)", default=30.0
    )
    keep: int = _doc(
        "keep the newest K periodic checkpoints as step-NNNNNN/ folders besides last/ (0 = last/ only)", default=0
    )
    nonfinite_limit: int = _doc(
        "stop after this many optimizer steps in a row with a non-finite loss or gradient (each one is skipped)",
        default=10,
    )
    device: str = _doc("auto, cpu or cuda (--cuda is short for --device cuda)", default="auto")
    max_steps: int | None = _doc("stop after this many optimizer steps (CPU budget)", default=None)
    max_time: float | None = _doc("stop after this many seconds of training (CPU budget)", default=None)
    eval_interval: int | None = _doc("also validate every N optimizer steps, not only per epoch", default=None)
    eval_batch_size: int | None = _doc("validation streams (default: batch_size, as the paper)", default=None)
    test_batch_size: int = _doc("test streams (the paper's measurement: 8)", default=8)
    max_eval_bytes: int | None = _doc("validate and test on only the first N tokens of each split (quick checks)", default=None)
    sample: int = _doc("after training, generate this many bytes of sample text (0 = none)", default=0)
    threads: int | None = _doc("CPU threads for torch (default: torch's choice)", default=None)
    precision: str = _doc("fp32; bf16 (autocast: matmuls in bfloat16 on CPU or GPU, weights stay fp32); fp16 "
                          "(autocast in float16 with a dynamic loss scaler: GPUs without bf16); or auto (bf16 where "
                          "the hardware computes it natively: CPUs with AVX-512 BF16 or AMX, recent GPUs; else "
                          "fp32)", default="fp32")
    tf32: bool = _doc("on CUDA GPUs, float32 matmuls and cuDNN's LSTM/GRU use TensorFloat-32 tensor cores "
                      "(float32 range, 10-bit products; --no-tf32: full float32); no effect on CPUs", default=True)
    fp32_parts: str = _doc(
        "with --precision bf16 or fp16: parts that still compute in float32, comma-separated, from core (the "
        "LSTM/GRU/QRNN), attention, boom, decoder (default: none)", default="")
    checkpoint_activations: bool = _doc(
        "keep only each block's input in the forward pass and recompute the rest in the backward: less memory "
        "for long segments, for one more forward pass per step", default=False)

    def __post_init__(self) -> None:
        _refuse_non_finite(self)
        positive = ("batch_size", "bptt", "epochs", "accumulate", "log_interval", "test_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise SharnnError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.bptt < 5:
            raise SharnnError(f"--bptt {self.bptt} is too short: segments are at least 5 tokens")
        for name in ("max_steps", "eval_interval", "eval_batch_size", "max_eval_bytes", "cooldown", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SharnnError(f"--{name} must be at least 1 (or left unset), got {v}")
        if self.save_every is not None and self.save_every < 1:
            raise SharnnError(f"--save-every must be at least 1 (or left unset), got {self.save_every}")
        if self.save_every_minutes is not None and self.save_every_minutes <= 0:
            raise SharnnError(f"--save-every-minutes must be positive (or none), got {self.save_every_minutes}")
        if self.keep < 0 or self.nonfinite_limit < 1:
            raise SharnnError("--keep must not be negative and --nonfinite-limit must be at least 1")
        if self.keep and self.save_every is None and self.save_every_minutes is None:
            raise SharnnError("--keep keeps periodic checkpoints: also give --save-every or --save-every-minutes")
        if self.max_time is not None and self.max_time <= 0:
            raise SharnnError(f"--max-time must be positive, got {self.max_time}")
        if self.precision not in TRAIN_PRECISIONS:
            raise SharnnError(f"unknown --precision {self.precision!r}; use {', '.join(TRAIN_PRECISIONS)}")
        if self.fp32_parts and self.precision == "fp32":
            raise SharnnError("--fp32-parts applies to mixed precision: use it with --precision bf16 or fp16")
        unknown = [p for p in self.fp32_part_set if p not in FP32_PARTS]
        if unknown:
            raise SharnnError(f"unknown --fp32-parts {', '.join(unknown)}; choose from {', '.join(FP32_PARTS)}")
        if self.tokens not in ("auto", "bytes", "words", "chars"):
            raise SharnnError(f"unknown --tokens {self.tokens!r}; use auto, bytes, words or chars")
        if self.decay not in DECAYS:
            raise SharnnError(f"unknown --decay {self.decay!r}; use none, linear or cosine")
        if not 0.0 <= self.decay_to <= 1.0:
            raise SharnnError(f"--decay-to is a fraction of --lr between 0 and 1, got {self.decay_to}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise SharnnError(f"--decay-fraction is a share of the steps, above 0 and at most 1, got "
                              f"{self.decay_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise SharnnError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.nonmono < 0:
            raise SharnnError(f"--nonmono must not be negative, got {self.nonmono}")
        if not valid_device(self.device):
            raise SharnnError(f"unknown --device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.lr <= 0 or self.clip < 0 or self.warmup < 0 or self.wdecay < 0:
            raise SharnnError("--lr must be positive; --clip, --warmup and --wdecay must not be negative")
        if self.alpha < 0 or self.beta < 0:
            raise SharnnError("--alpha and --beta must not be negative")
        if self.sample < 0:
            raise SharnnError("--sample must not be negative")
        if bad := [w for w in self.when if w < 1 and w != -1]:
            # The original's loop counts epochs from 1 (`for epoch in range(1, args.epochs + 1)`), as we do: an
            # epoch 0 or below never ends, so --when would never act on it.
            raise SharnnError(f"--when {bad[0]}: epochs count from 1, so it would never act; give the epochs after "
                              "which to divide the learning rate by 10 (1 or more), or -1 for never")

    @property
    def fp32_part_set(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.fp32_parts.split(",") if p.strip())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"when": list(self.when)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**_checked_kwargs(cls, d))


def _refuse_non_finite(cfg: Any) -> None:
    """NaN or an infinity in any number setting (a flag, a TOML `nan`/`inf`) is refused: it would pass every
    range check and turn the weights to NaN at the first step."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise SharnnError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")


def _checked_kwargs(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    types = {f.name: str(f.type) for f in fields(cls)}
    if extra := set(d) - set(types):
        raise SharnnError(f"unknown {cls.__name__} keys: {sorted(extra)}")
    return {k: _checked_value(k, types[k], v) for k, v in d.items()}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_value(name: str, type_text: str, v: Any) -> Any:
    """A setting's value checked against its field's annotation ("int", "float | None", "tuple[int, ...]")."""
    base = type_text.split("|")[0].strip()
    # "none"/"off" spell an unset number; a list field takes only JSON null (`attn_layers = "none"` would read as
    # "no attention", which is [] instead).
    spelled_none = not base.startswith("tuple") and isinstance(v, str) and v.lower() in ("none", "off", "")
    if v is None or ("None" in type_text and spelled_none):
        if "None" in type_text:
            return None
        raise SharnnError(f"setting {name} must be a {base}, not empty")
    if base.startswith("tuple"):
        items = [v] if _is_int(v) else v
        if not isinstance(items, (list, tuple)) or not all(_is_int(i) for i in items):
            raise SharnnError(f"setting {name} must be a list of whole numbers, got {v!r}")
        return tuple(items)
    if base == "float" and _is_int(v):
        return float(v)
    ok = {"bool": lambda: isinstance(v, bool), "int": lambda: _is_int(v), "float": lambda: isinstance(v, float),
          "str": lambda: isinstance(v, str)}[base]()
    if not ok:
        raise SharnnError(f"setting {name} must be a {base}, got {v!r}")
    return v


# --- presets and config files ------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("sharnn.presets").iterdir()
                  if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The flat key -> value mapping of a built-in preset (`sharnn/presets/NAME.toml`)."""
    if name not in preset_names():
        raise SharnnError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    text = resources.files("sharnn.presets").joinpath(f"{name}.toml").read_text()
    return _flatten(tomllib.loads(text), f"preset {name}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A user's TOML (or JSON) file of settings, flat or in [model] / [train] tables."""
    p = Path(path)
    if not p.is_file():
        raise SharnnError(f"config file {p} not found")
    try:
        raw = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SharnnError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {e}") from None
    return _flatten(raw, f"config file {p}")


def _flatten(raw: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SharnnError(f"{where} must hold a table of settings, not a {type(raw).__name__}")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k in ("model", "train"):
            out.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        else:
            out[k.replace("-", "_")] = v
    known = {f.name for f in fields(SHARNNConfig)} | {f.name for f in fields(TrainConfig)}
    if extra := set(out) - known:
        raise SharnnError(f"{where}: unknown settings {sorted(extra)}")
    return out


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat settings dict into (model kwargs, train kwargs)."""
    model_names = {f.name for f in fields(SHARNNConfig)}
    m = {k: v for k, v in settings.items() if k in model_names}
    t = {k: v for k, v in settings.items() if k not in model_names}
    return m, t


__all__ = [
    "SHARNNConfig",
    "TrainConfig",
    "load_config_file",
    "load_preset",
    "preset_names",
    "replace",
    "split_settings",
]
