"""Where and how computations run: the device, the random seeds, float32 matmul precision on GPUs.

Shared by training and by the inference commands (eval, generate, score), none of which needs the other.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .config import SHARNNConfig, valid_device
from .errors import SharnnError


def resolve_device(name: str) -> torch.device:
    """auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N; one clear error otherwise."""
    if not valid_device(name):
        raise SharnnError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SharnnError(f"--device {name} was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_tf32(enabled: bool) -> None:
    """Let float32 matmuls and cuDNN's RNNs on CUDA GPUs use TensorFloat-32 tensor cores (or not).

    TF32 keeps float32's range with a 10-bit mantissa in the products (sums stay float32): on an H200 the paper's
    training step took 0.193 s against 0.341 s in full float32 (issue #11). PyTorch's own defaults differ between
    the two (matmuls off, cuDNN on); this sets both, so `--no-tf32` means float32 everywhere. No effect on CPUs.
    """
    value = "tf32" if enabled else "ieee"
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 is an error there
        matmul.fp32_precision = value
        cudnn.fp32_precision = value
        for part in ("rnn", "conv"):  # their own defaults ("tf32") override the parent's
            if hasattr(getattr(cudnn, part, None), "fp32_precision"):
                getattr(cudnn, part).fp32_precision = value
    else:
        matmul.allow_tf32 = enabled
        cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether CUDA float32 matmuls currently run in TF32 (what set_tf32 set, or PyTorch's default)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def memory_of(device: torch.device | str) -> int | None:
    """Total memory of `device` in bytes (physical RAM for the CPU), or None where it cannot be told."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):  # no sysconf on Windows
        return None


def require_memory(need: int, what: str, device: torch.device | str) -> None:
    """Refuse, in one line, to allocate more than the device holds.

    Nothing in a checkpoint's weights bounds its attention span, and a crafted file can ask for any model size:
    without this, a damaged config.json (attn_span 10^12) would end in an allocation's traceback.
    """
    have = memory_of(device)
    if have is not None and need > have:
        raise SharnnError(f"{what} needs {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of "
                          f"{torch.device(device)}; the checkpoint's config.json is damaged, or the model needs a bigger "
                          "machine")


def attention_bytes(cfg: SHARNNConfig, batch: int, rows: int | None = None, element_size: int = 4) -> int:
    """Bytes of attention memory for `batch` streams: `rows` (default attn_span) per stream and attention block."""
    return len(cfg.attn_layers) * (cfg.attn_span if rows is None else rows) * batch * cfg.emsize * element_size
