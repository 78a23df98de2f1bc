"""The one segment walk: where segments are cut, and that every reader cuts a text where `sharnn eval` does."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sharnn.checkpoint import save_checkpoint
from sharnn.cli import main
from sharnn.config import SHARNNConfig, TrainConfig
from sharnn.evaluate import evaluate
from sharnn.model import SHARNN
from sharnn.score import score_stream
from sharnn.segments import cut, cut_stream, walk
from sharnn.state import MemoryRing
from sharnn.vocab import BYTES

DOC = b"A document of several lines, longer than the attention span.\nIt keeps going for a while. " * 4


@pytest.fixture
def reference(tiny_config: SHARNNConfig) -> SHARNN:
    """Under the reference window a segment's length changes the numbers: where a text is cut shows."""
    torch.manual_seed(0)
    return SHARNN(replace(tiny_config, attn_window="reference")).eval()


@pytest.mark.parametrize("sizes", [[49], [1] * 49, [7] * 7, [3, 20, 26], [8, 8, 33]])
def test_a_stream_is_cut_where_the_text_in_memory_is_cut(sizes: list[int]) -> None:
    ids = torch.arange(1, 50)
    want = list(cut(torch.cat([torch.tensor([0]), ids])[:, None], 8))
    got = list(cut_stream(torch.split(ids, sizes), 0, 8))
    assert [x.tolist() for x, _ in got] == [x.tolist() for x, _ in want]
    assert [y.tolist() for _, y in got] == [y.tolist() for _, y in want]
    assert [len(x) for x, _ in want] == [8] * 6 + [1]


def test_walk_carries_the_state_and_numbers_its_pieces(tiny_config: SHARNNConfig) -> None:
    torch.manual_seed(0)
    model = SHARNN(tiny_config).eval()
    ids = torch.randint(0, 256, (41, 2))
    steps = list(walk(model, cut(ids, 16)))
    assert [(s.start, s.segment, len(s.x)) for s in steps] == [(0, 0, 16), (16, 1, 16), (32, 2, 8)]
    with torch.no_grad():
        one = model(ids[:-1], targets=ids[1:]).logits
    assert torch.allclose(torch.cat([s.out.logits for s in steps]), one, atol=1e-5)  # sliding: cuts change nothing
    learned = []
    pieces = list(walk(model, cut(ids, 16), adapt=lambda loss: learned.append(loss.requires_grad), adapt_every=6))
    assert [(s.start, s.segment) for s in pieces] == [(0, 0), (6, 0), (12, 0), (16, 1), (22, 1), (28, 1), (32, 2),
                                                       (38, 2)]
    assert learned == [True] * 8  # each piece learned from, with a graph, after it was scored


def test_walk_reads_a_ring_in_order_and_leaves_it_alone(tiny_config: SHARNNConfig) -> None:
    # A state from generation holds MemoryRings, which a segment would write in place: the walk reads a text on
    # ordinary memory, so the caller's ring stays as it was, and an adapted piece's second pass (the one learned
    # from) sees the same memory as the pass that scored it.
    torch.manual_seed(0)
    model = SHARNN(replace(tiny_config, attn_span=12)).eval()
    with torch.no_grad():
        start = model(torch.randint(0, 256, (20, 1))).state
    ids = torch.randint(0, 256, (25, 1))
    ring = model.ring_state(start)
    kept = [t.clone() for s in ring for t in (*s.rnn, *(s.memory if s.memory is not None else ()))]
    losses: dict[str, list[float]] = {"plain": [], "ring": []}
    for name, state in (("plain", start), ("ring", ring)):
        for step in walk(model, cut(ids, 8), state, adapt=lambda loss, n=name: losses[n].append(float(loss.detach())),
                         adapt_every=3):
            assert not isinstance(step.out.state[1].memory, MemoryRing)
    assert losses["ring"] == pytest.approx(losses["plain"], abs=1e-5) and len(losses["ring"]) == 9
    after = [t for s in ring for t in (*s.rnn, *(s.memory if s.memory is not None else ()))]
    assert all(torch.equal(a, b) for a, b in zip(kept, after))


@pytest.mark.parametrize("read_bytes", [7, 100, 1 << 20])
def test_a_document_is_scored_in_evals_segments_wherever_the_reads_fall(reference: SHARNN, read_bytes: int) -> None:
    ev = evaluate(reference, np.frombuffer(b"\n" + DOC, dtype=np.uint8), 1, 16)
    doc = score_stream(reference, BYTES, io.BytesIO(DOC), chunk=16, read_bytes=read_bytes)
    assert doc.tokens == ev.predictions and doc.bpc == pytest.approx(ev.bpc, rel=1e-6)


def test_score_document_walks_the_checkpoints_bptt(reference: SHARNN, tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", reference, TrainConfig(bptt=16, batch_size=2))
    (tmp_path / "doc.txt").write_bytes(DOC)
    assert main(["score", str(ckpt), "--document", str(tmp_path / "doc.txt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["logprob"]
    assert got == pytest.approx(score_stream(reference, BYTES, io.BytesIO(DOC), chunk=16).logprob, abs=1e-6)
    assert abs(got - score_stream(reference, BYTES, io.BytesIO(DOC)).logprob) > 1e-3  # 1024-token segments differ


def test_a_model_that_knows_nothing_scores_eight_bits_a_byte(tiny_config: SHARNNConfig) -> None:
    # Every byte equally likely: log2(256) = 8 bits each, by evaluation and by scoring alike (nats would say 5.55).
    model = SHARNN(tiny_config).eval()
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
    assert evaluate(model, np.frombuffer(DOC, dtype=np.uint8), 2, 16).bpc == pytest.approx(8.0, abs=1e-5)
    assert score_stream(model, BYTES, io.BytesIO(DOC)).bpc == pytest.approx(8.0, abs=1e-5)
