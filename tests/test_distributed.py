"""torchrun with 2 CPU processes (gloo): the same weights as one process with the combined batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FLAGS = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--attn-layers", "1", "--attn-span", "24",
         "--bptt", "16", "--dropout", "0", "--dropouth", "0", "--dropouti", "0", "--dropoute", "0",
         "--warmup", "2", "--quiet", "--json", "--log-interval", "2", "--max-eval-bytes", "2000"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("ddp") / "text.txt"
    p.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 300)
    return p


def sharnn(*args: str, ranks: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd = (launcher if ranks > 1 else [sys.executable]) + ["-m", "sharnn.cli", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    return json.loads(lines[0])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_two_ranks_match_one_process_with_combined_batch(corpus: Path, tmp_path: Path) -> None:
    common = ["--data", str(corpus), *FLAGS, "--max-steps", "6", "--accumulate", "2"]
    two = sharnn(*common, "--batch_size", "2", "--save", str(tmp_path / "two"), ranks=2)
    one = sharnn(*common, "--batch_size", "4", "--save", str(tmp_path / "one"))
    assert two["steps"] == one["steps"] == 6
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"))
    start = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert start["world"] == 2 and start["global_batch"] == 4  # stated in the log


def test_resume_on_another_number_of_ranks(corpus: Path, tmp_path: Path) -> None:
    common = ["--data", str(corpus), *FLAGS]
    sharnn(*common, "--batch_size", "2", "--max-steps", "3", "--save", str(tmp_path / "r"), ranks=2)
    sharnn(*common, "--batch_size", "4", "--max-steps", "6", "--save", str(tmp_path / "r"),
           "--resume", str(tmp_path / "r"))
    sharnn(*common, "--batch_size", "4", "--max-steps", "6", "--save", str(tmp_path / "straight"))
    assert_close(weights(tmp_path / "r"), weights(tmp_path / "straight"))


def test_epoch_ending_inside_an_accumulation(corpus: Path, tmp_path: Path) -> None:
    # 2 epochs of a short corpus with --accumulate 3: epochs end mid-accumulation, and that partial step must
    # be averaged over the ranks too (else the ranks' weights drift apart).
    small = tmp_path / "small.txt"
    small.write_bytes(corpus.read_bytes()[:3000])
    common = ["--data", str(small), *FLAGS, "--epochs", "2", "--accumulate", "3"]
    sharnn(*common, "--batch_size", "2", "--save", str(tmp_path / "two"), ranks=2)
    sharnn(*common, "--batch_size", "4", "--save", str(tmp_path / "one"))
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"))
