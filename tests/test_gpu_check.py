"""benchmarks/gpu_check.py, the one command a GPU session runs, works end to end (here on the CPU, tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long
def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--scale",
                           "tiny", "--out", str(tmp_path), "--repeats", "1", "--sections", "smoke", "speed",
                           "quality"], capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    failed = [r for r in rows if "FAILED" in str(r.get("result", ""))]
    assert not failed, failed
    sections = {r["section"] for r in rows}
    assert {"smoke", "speed", "quality"} <= sections
    assert sum(r["section"] == "smoke" and r.get("result") == "ok" for r in rows) >= 20
    assert (tmp_path / "gpu_check.md").read_text().startswith("# sharnn GPU check")
