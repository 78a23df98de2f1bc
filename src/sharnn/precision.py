"""Inference precision: run a trained model in fp32, bf16 or int8 (`sharnn eval/score/generate --precision`).

    fp32  the weights as trained.
    bf16  every weight and activation in bfloat16: half the memory, and half the bytes a generated token
          reads. (Training's `--precision bf16` is autocast instead: master weights must stay fp32 there.)
    int8  PyTorch's own dynamic quantisation: the Linear and LSTM/GRU weights stored as int8 with a scale,
          activations quantised on the fly per call; embedding, LayerNorms and attention stay fp32. CPU only.

Both cost some accuracy; `sharnn eval --precision ...` on a validation split measures how much for a given
model (benchmarks/README.md has our numbers). Training, checkpoints and `collapse` work in fp32 only: these
models are for inference and are never saved. `collapse_checkpoint` (`sharnn collapse`) writes the one inference
form that is exact, the value gates stored as constants, as a checkpoint.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .checkpoint import Checkpoint, save_checkpoint
from .errors import SharnnError
from .model import SHARNN
from .runfolder import check_checkpoint_output

PRECISIONS = ("fp32", "bf16", "int8")


def for_inference(model: SHARNN, precision: str = "fp32") -> SHARNN:
    """An eval-mode copy of `model` in `precision`, with its value gates collapsed (exact; one matmul less
    per step). `model` itself is left as it was."""
    if precision not in PRECISIONS:
        raise SharnnError(f"unknown --precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    device = model.encoder.weight.device
    if precision == "int8" and device.type != "cpu":
        raise SharnnError("--precision int8 runs on the CPU only (PyTorch's dynamic quantisation); "
                          "use --precision bf16 on a GPU, or --device cpu")
    if model.encoder.weight.dtype != torch.float32:
        raise SharnnError("this model is already converted for inference; start from the fp32 model")
    collapsed = model.collapse()
    out = copy.deepcopy(collapsed) if collapsed is model else collapsed
    out.eval()
    if precision == "bf16":
        out.to(torch.bfloat16)
        if isinstance(out.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            out.decoder.float()  # its log-probabilities are computed in fp32 (forward casts its input)
    elif precision == "int8":
        with warnings.catch_warnings():
            # torch.ao's eager quantisation warns that it is to move to torchao; it is PyTorch's own, and works.
            warnings.simplefilter("ignore")
            out = torch.ao.quantization.quantize_dynamic(out, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)
    return out


def collapse_checkpoint(ckpt: Checkpoint, out: str, overwrite: bool = False,
                        name: str | None = None) -> tuple[SHARNN, SHARNN]:
    """Write `ckpt`'s model with its attention value gates stored as constants (same outputs, fewer parameters)
    as the checkpoint `out`, with the run's settings (eval's defaults), vocabulary and data identity. `out` may
    be new or empty, or with `overwrite` a sharnn checkpoint (never the input, a run folder or anything else).
    Returns the model and its collapsed form."""
    check_checkpoint_output(out, overwrite, ckpt.path)
    model = ckpt.model()
    small = model.collapse()
    save_checkpoint(out, small, ckpt.train_config, vocab=ckpt.vocab, data=ckpt.data,
                    progress={"collapsed_from": str(name or ckpt.path)})
    return model, small
