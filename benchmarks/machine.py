"""The machine a benchmark ran on, in words, for the tables (imported by the scripts beside it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# CPU features that decide speeds here: AVX-512, native bf16 (AVX-512 BF16, AMX).
FEATURES = ("avx512f", "avx512_bf16", "amx_bf16")


def cpu_name() -> str:
    """The CPU's model name, core count and which of FEATURES it has, from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in FEATURES if f in flags]
    return f"{names[0] if names else 'unknown CPU'} ({os.cpu_count()} cores; {', '.join(extras) or 'AVX2 only'})"
