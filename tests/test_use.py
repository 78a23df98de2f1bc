"""Using a trained model: generate, score, safe checkpoints, save/from_pretrained, reference import, collapse."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sharnn import SHARNN
from sharnn.checkpoint import Checkpoint, load_model, save_checkpoint
from sharnn.cli import main
from sharnn.config import SHARNNConfig, TrainConfig
from sharnn.convert import reference_vocab
from sharnn.errors import SharnnError
from sharnn.evaluate import evaluate
from sharnn.generate import filter_logits, generate, generate_ids
from sharnn.model import count_parameters
from sharnn.precision import for_inference
from sharnn.score import score_lines, score_stream
from sharnn.state import MemoryRing
from sharnn.vocab import BYTES, Vocab


@pytest.fixture
def model(tiny_config: SHARNNConfig) -> SHARNN:
    torch.manual_seed(0)
    m = SHARNN(replace(tiny_config, attn_span=12)).eval()
    with torch.no_grad():  # make the gates non-trivial so that collapse/import checks mean something
        m.blocks[1].attn.vs.normal_()
        m.blocks[1].attn.qs.normal_()
    return m


@pytest.fixture
def ckpt(model: SHARNN, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ckpt", model, TrainConfig(bptt=16, batch_size=2))


# --- generation -----------------------------------------------------------------------------------------------


def test_filter_logits() -> None:
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [False, True, False, True]
    p = logits.softmax(-1)  # 0.644, 0.087, 0.237, 0.032
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [True, False, True, False]  # 0.644 < 0.7, so the second most likely stays
    assert (~torch.isinf(filter_logits(logits, top_p=0.5))).tolist() == [True, False, False, False]
    assert p[0] > 0.5


def test_generate_is_seeded_and_continues(model: SHARNN) -> None:
    a = generate(model, b"hello", 30, seed=3)
    assert generate(model, b"hello", 30, seed=3).data == a.data != generate(model, b"hello", 30, seed=4).data
    assert len(a.data) == 30
    greedy = generate(model, b"hello", 40, temperature=0)
    first = generate(model, b"hello", 15, temperature=0)
    rest = generate(model, b"", 25, temperature=0, state=first.state, logits=first.logits)
    assert first.data + rest.data == greedy.data
    assert model.generate("hello", 40, temperature=0).data == greedy.data  # the method is the same function


def test_generation_state_equals_one_pass(model: SHARNN) -> None:
    # Priming in one pass then feeding tokens one at a time must match one pass over the whole text.
    g = generate(model, b"the prompt", 20, seed=1)
    whole = torch.tensor(list(b"the prompt" + g.data)).unsqueeze(1)
    with torch.no_grad():
        out = model(whole)
    assert torch.allclose(out.logits[-1, 0], g.logits, atol=1e-5)
    assert torch.allclose(out.state[1].memory, g.state[1].memory, atol=1e-5)
    assert g.state[1].memory.shape[0] == 11  # bounded by the span (12) - 1, never the whole history


@pytest.mark.parametrize("window", ["sliding", "reference"])
def test_a_short_prompt_is_primed_in_one_pass(model: SHARNN, window: str) -> None:
    # Up to PRIME_CHUNK tokens the prompt is one segment, as it always was: the sample is bit for bit the one that
    # priming by hand in one pass gives, under both windows (the reference window's outputs depend on the cut).
    model.set_attn_window(window)
    prompt = bytes(range(32, 127)) * 10  # 950 tokens
    with torch.no_grad():
        out = model(torch.tensor(list(prompt)).unsqueeze(1))
    by_hand = generate(model, b"", 40, seed=5, state=out.state, logits=out.logits[-1, 0])
    assert generate(model, prompt, 40, seed=5).data == by_hand.data


def test_a_long_prompt_is_primed_in_segments(model: SHARNN, monkeypatch) -> None:
    prompt = bytes(range(256)) * 10  # 2560 tokens: segments of 1024, 1024 and 512
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, *a, **k: seen.append(x.shape[0]) or forward(x, *a, **k))
    g = generate(model, prompt, 3, seed=0)
    assert seen[:3] == [1024, 1024, 512] and max(seen) == 1024
    end = generate(model, prompt, 0)  # no sampling: the state and scores after the prompt, the same way
    monkeypatch.undo()
    with torch.no_grad():
        whole = model(torch.tensor(list(prompt)).unsqueeze(1))  # one pass: the sliding window does not see the cut
    torch.testing.assert_close(end.logits, whole.logits[-1, 0], atol=1e-5, rtol=1e-5)
    assert len(g.data) == 3


@pytest.mark.slow
def test_priming_memory_does_not_grow_with_the_prompt(tmp_path: Path) -> None:
    # Before priming in segments, a prompt of n bytes took memory ~ n^2 (a 8 KB prompt: ~320 MB more here, 40 KB
    # with the tiny preset: 8 GB). Measured in a fresh process: its peak resident memory is the high-water mark.
    script = tmp_path / "prime.py"
    script.write_text(
        "import resource, sys, torch\n"
        "from sharnn.config import SHARNNConfig\nfrom sharnn.model import SHARNN\nfrom sharnn.generate import generate\n"
        "torch.manual_seed(0)\n"
        "m = SHARNN(SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)).eval()\n"
        "generate(m, b'warm up', 2, seed=0)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "g = generate(m, bytes(range(256)) * int(sys.argv[1]), 5, seed=0)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, len(g.data))\n")
    for blocks in (32, 128):  # 8 KB, then 32 KB of prompt (which took ~5 GB before)
        r = subprocess.run([sys.executable, str(script), str(blocks)], capture_output=True, text=True, check=False,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        mb, n = r.stdout.split()
        assert float(mb) < 48 and n == "5", (blocks, mb)  # MB more than before the prompt


def test_memory_ring_steps_equal_ordinary_steps(model: SHARNN) -> None:
    # Token steps over a MemoryRing (in place, keys in slot order) give the numbers of ordinary memory, before
    # and after the ring wraps around (span 12, 30 steps), and leave the state they started from untouched.
    with torch.no_grad():
        start = model(torch.tensor(list(b"ring")).unsqueeze(1)).state
        kept = [t.clone() for s in start for t in (*s.rnn, *([s.memory] if s.memory is not None else []))]
        plain, ring = start, model.ring_state(start)
        for t in torch.randint(0, 256, (30,)).tolist():
            a, b = model(torch.tensor([[t]]), plain), model(torch.tensor([[t]]), ring)
            assert torch.allclose(a.logits, b.logits, atol=1e-5)
            plain, ring = a.state, b.state
        assert ring[1].memory.count == 34 and ring[1].memory.rows.shape[0] == 12
        back = model.ordered_state(ring)
        assert torch.allclose(back[1].memory, plain[1].memory, atol=1e-5) and back[1].memory.shape[0] == 11
        # A segment of several tokens after a ring attends over its slots as they lie and writes itself in.
        seg = torch.randint(0, 256, (5, 1))
        a, b = model(seg, plain), model(seg, ring)
        assert torch.allclose(a.logits, b.logits, atol=1e-5) and isinstance(b.state[1].memory, MemoryRing)
        assert torch.allclose(model.ordered_state(b.state)[1].memory, a.state[1].memory, atol=1e-5)
    after = [t for s in start for t in (*s.rnn, *([s.memory] if s.memory is not None else []))]
    assert all(torch.equal(x, y) for x, y in zip(kept, after))


def test_generation_copies_no_memory_per_token(tiny_config: SHARNNConfig) -> None:
    # The ring's promise, checked where it matters: a token step allocates far less than the attention memory
    # holds (20,000 rows of 64 floats, 5.1 MB), so it neither copies nor rebuilds it. Measured by PyTorch's own
    # allocator (the profiler): what any copy of the memory, by any op, would show up in.
    model = SHARNN(replace(tiny_config, emsize=64, nhid=64, attn_span=20_000)).eval()
    primed = generate(model, b"x" * 40, 0)
    steps = generate_ids(model, [], 8, seed=0, state=primed.state, logits=primed.logits)
    next(steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        assert len(list(steps)) == 7
    per_token = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0) / 7
    memory = 20_000 * 64 * 4
    assert per_token < memory / 4, (per_token, memory)


@pytest.mark.parametrize("core", ["LSTM", "GRU", "QRNN"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_inference_precisions_stay_close_to_fp32(tiny_config: SHARNNConfig, core: str, adaptive: bool) -> None:
    cfg = replace(tiny_config, model=core, vocab_size=300 if adaptive else 256, tied=not adaptive,
                  adaptive_cutoffs=(100, 200) if adaptive else ())
    torch.manual_seed(0)
    model = SHARNN(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, cfg.vocab_size, (30, 2))
    with torch.no_grad():
        ref = model(x[:-1], targets=x[1:]).loss
        for precision in ("bf16", "int8"):
            fast = for_inference(model, precision)
            loss = fast(x[:-1], targets=x[1:]).loss
            assert loss != ref and float(loss) == pytest.approx(float(ref), abs=0.01), precision
            # Token steps (ring memory, the int8 LSTM/GRU's own step) continue the segment's state.
            state = fast(x[:20]).state
            state = fast.ring_state(state)
            for t in range(20, 29):
                out = fast(x[t : t + 1], state)
                state = out.state
            assert out.state[1].memory.count == 29
    quantized = for_inference(model, "int8")
    assert not isinstance(quantized.blocks[0].ff.linear1, torch.nn.Linear)  # replaced by the int8 module
    assert for_inference(model, "bf16").encoder.weight.dtype == torch.bfloat16
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the fp32 model is untouched
    assert model.encoder.weight.dtype == torch.float32 and not model.cfg.collapsed_gate


def test_inference_precision_refusals(model: SHARNN) -> None:
    with pytest.raises(SharnnError, match="unknown --precision"):
        for_inference(model, "fp16")
    with pytest.raises(SharnnError, match="already converted"):
        for_inference(for_inference(model, "bf16"), "int8")


def test_generate_cli_precisions(ckpt: Path, capsys) -> None:
    for precision in ("bf16", "int8"):
        assert main(["generate", str(ckpt), "-p", "abc", "-n", "20", "--seed", "1", "--no-prompt",
                     "--precision", precision]) == 0
        assert len(capsys.readouterr().out) >= 2  # some text and the closing newline


def test_generate_cli_streams_and_is_safe_with_bad_utf8(ckpt: Path, tmp_path: Path, capsys) -> None:
    prompt = tmp_path / "p.bin"
    prompt.write_bytes(b"\xff\xfeab")
    assert main(["generate", str(ckpt), "--prompt-file", str(prompt), "-n", "50", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\ufffd\ufffdab") and out.endswith("\n")
    assert main(["generate", str(ckpt), "--prompt", "x", "-n", "50", "--seed", "2", "--top-k", "5",
                 "--top-p", "0.9", "--temperature", "0.7"]) == 0
    assert main(["generate", str(ckpt), "--prompt", "x", "-n", "0", "--top-k", "0"]) == 2
    assert "top-k" in capsys.readouterr().err


def test_generate_cli_raw_and_stdin(ckpt: Path, monkeypatch, capfdbinary) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    assert main(["generate", str(ckpt), "--prompt", "-", "-n", "20", "--seed", "4", "--raw", "--no-prompt"]) == 0
    raw = capfdbinary.readouterr().out
    assert len(raw) == 20
    want = generate(load_model(ckpt), b"from stdin", 20, seed=4).data
    assert raw == want


# --- scoring ---------------------------------------------------------------------------------------------------


def by_hand(model: SHARNN, context: bytes, text: bytes) -> float:
    ids = torch.tensor(list(context + text)).unsqueeze(1)
    with torch.no_grad():
        lp = F.log_softmax(model(ids[:-1]).logits, -1)[:, 0]
    n = len(text)
    return float(lp[-n:].gather(-1, ids[-n:, :1]).sum())


def test_score_lines_match_hand_computation(model: SHARNN) -> None:
    lines = [b"a short one", b"", b"and a somewhat longer line of text", b"x"]
    scores = list(score_lines(model, BYTES, lines, per_token=True, batch_size=3))
    for line, s in zip(lines, scores):
        assert s.tokens == len(line) + 1
        assert s.logprob == pytest.approx(by_hand(model, b"\n", line + b"\n"), abs=1e-4)
        assert sum(lp for _, lp in s.token_logprobs) == pytest.approx(s.logprob, abs=1e-6)
    one_by_one = [next(iter(score_lines(model, BYTES, [line]))).logprob for line in lines]
    assert one_by_one == pytest.approx([s.logprob for s in scores], abs=1e-4)  # padding never leaks
    ctx = next(iter(score_lines(model, BYTES, [b"the end"], context=b"some context\n", eos=False)))
    assert ctx.logprob == pytest.approx(by_hand(model, b"some context\n", b"the end"), abs=1e-4)


def test_score_document_matches_eval_and_streams(model: SHARNN) -> None:
    doc = b"A document of several lines.\nIt keeps going for a while, " * 5
    whole = score_stream(model, BYTES, io.BytesIO(doc))
    pieces = score_stream(model, BYTES, io.BytesIO(doc), read_bytes=7, chunk=5)
    assert whole.logprob == pytest.approx(pieces.logprob, abs=1e-3)
    ev = evaluate(model, np.frombuffer(b"\n" + doc, dtype=np.uint8), 1, 16)
    assert ev.predictions == whole.tokens == len(doc)
    assert whole.bpc == pytest.approx(ev.bpc, rel=1e-5)
    with pytest.raises(SharnnError, match="empty"):
        score_stream(model, BYTES, io.BytesIO(b""))


def test_score_cli(ckpt: Path, tmp_path: Path, capsys) -> None:
    f = tmp_path / "in.txt"
    f.write_bytes(b"first line\nsecond line\n")
    assert main(["score", str(ckpt), str(f), "--per-token"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["first line", "second line"]
    assert len(rows[0]["per_token"]) == 11 and rows[0]["per_token"][-1]["token"] == "\n"
    assert rows[0]["log2prob"] == pytest.approx(rows[0]["logprob"] / math.log(2))
    assert main(["score", str(ckpt), "--document", str(f), str(f), "--json"]) == 0
    docs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(docs) == 2 and docs[0]["tokens"] == f.stat().st_size
    assert main(["score", str(ckpt), str(tmp_path / "missing.txt")]) == 2


def test_score_lines_are_the_bytes_as_given(ckpt: Path, model: SHARNN, tmp_path: Path, capsys) -> None:
    # A line ends at \n only: a \r before it (a CRLF file) is the line's own byte and is scored, as is a lone \r
    # or a form feed inside a line. (bytes.splitlines() dropped the \r, scoring other bytes than the file holds.)
    f = tmp_path / "crlf.txt"
    f.write_bytes(b"first line\r\nsecond\rhalf\x0cthird\nlast, no newline")
    assert main(["score", str(ckpt), str(f), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    lines = [b"first line\r", b"second\rhalf\x0cthird", b"last, no newline"]
    assert [r["text"] for r in rows] == [line.decode() for line in lines]
    assert [r["tokens"] for r in rows] == [len(line) + 1 for line in lines]
    for r, line in zip(rows, lines):
        assert r["logprob"] == pytest.approx(by_hand(model, b"\n", line + b"\n"), abs=1e-4)


# --- checkpoints -------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickles_never_run(ckpt: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil(marker)}, evil)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(_Evil(marker), f)
    # as a reference state dict
    assert main(["import-reference", str(evil), str(tmp_path / "out")]) == 2
    assert "refusing" in capsys.readouterr().err
    # as a checkpoint path, and hidden inside a checkpoint as its weights or its training state
    assert main(["eval", str(tmp_path / "plain.pkl"), "--data", str(evil)]) == 2
    (ckpt / "train_state.pt").write_bytes(evil.read_bytes())
    from sharnn.checkpoint import load_train_state

    with pytest.raises(SharnnError, match="refusing"):
        load_train_state(ckpt)
    (ckpt / "model.safetensors").write_bytes(evil.read_bytes())
    with pytest.raises(SharnnError, match="corrupt"):
        load_model(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("edit,fragment", [
    ({"emsize": 10**9, "nhid": 10**9}, "impossibly large model (emsize 1000000000"),
    ({"emsize": 10**9, "nhid": 10**9}, "unlike its weights (decoder.weight [256, 16])"),  # tied: stored once as that
    ({"emsize": 10**6, "nhid": 10**6}, "decoder.weight is [256, 16] in model.safetensors but [256, 1000000]"),
    ({"nhid": 64}, "blocks.0.ff.linear1.weight is [32, 16] in model.safetensors but [64, 16]"),
    ({"nlayers": 3, "attn_layers": [1]}, "model.safetensors lacks blocks.2."),
    ({"nlayers": 1, "attn_layers": []}, "model.safetensors has blocks.1."),
    ({"attn_layers": [0]}, "model.safetensors has blocks.1.attn."),
    ({"tied": False}, "model.safetensors lacks encoder.weight"),  # tied weights are stored once
    ({"model": "GRU"}, "blocks.0.rnn.weight_ih_l0 is [64, 16] in model.safetensors but [48, 16]"),
    ({"vocab_size": 300}, "its vocabulary has 256 symbols but its model 300"),
])
def test_config_json_that_disagrees_with_the_weights(ckpt: Path, edit: dict, fragment: str, capsys) -> None:
    # A damaged or crafted config.json is refused from the weights file's header, before any model is built:
    # emsize 10^6 would otherwise ask for terabytes.
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"].update(edit)
    (ckpt / "config.json").write_text(json.dumps(meta))
    assert main(["generate", str(ckpt), "--length", "3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and fragment in err, err
    with pytest.raises(SharnnError, match="damaged"):
        load_model(ckpt)


@pytest.mark.parametrize("command", [["generate", "{ckpt}", "--length", "3", "--device", "cpu"],
                                     ["compress", "{ckpt}", "{text}", "{out}"],
                                     ["export", "{ckpt}", "{out}"],
                                     ["attention", "{ckpt}", "--text", "{text}", "-o", "{out}.png"]],
                         ids=["generate", "compress", "export", "attention"])
def test_attention_span_too_large_to_use(ckpt: Path, tmp_path: Path, capsys, command: list[str]) -> None:
    # No weight depends on the span, so only the commands' memory allocations would notice 10^12: each refuses.
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["attn_span"] = 10**12
    (ckpt / "config.json").write_text(json.dumps(meta))
    text = tmp_path / "text.txt"
    text.write_bytes(b"some text to read, long enough for a window of attention. " * 4)
    argv = [a.format(ckpt=ckpt, text=text, out=tmp_path / "out") for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "attn_span 1,000,000,000,000" in err and "GiB" in err, err


def test_save_and_from_pretrained(model: SHARNN, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "pre")
    again = SHARNN.from_pretrained(tmp_path / "pre")
    x = torch.randint(0, 256, (9, 2))
    assert torch.equal(again.eval()(x).logits, model(x).logits)
    assert again.vocab == BYTES
    with pytest.raises(SharnnError, match="neither a local folder"):
        SHARNN.from_pretrained(tmp_path / "nope" / "deeper")


def test_the_vocabulary_travels_with_sharnn_and_the_plain_network_asks_for_one(tiny_config: SHARNNConfig,
                                                                               tmp_path: Path) -> None:
    import sharnn.model

    cfg = replace(tiny_config, vocab_size=3, tied=False)
    words = Vocab("words", ("a", "b", "<eos>"), "word")
    model = SHARNN(cfg, words)
    assert model.collapse().vocab == words and for_inference(model, "int8").vocab == words  # copies keep it
    model.save_pretrained(tmp_path / "w")
    assert SHARNN.from_pretrained(tmp_path / "w").vocab == words == Checkpoint.open(tmp_path / "w").vocab
    assert generate(model, "a b", 3, seed=0).data  # reads and writes words
    with pytest.raises(SharnnError, match="2 symbols but the model 3"):
        SHARNN(cfg, Vocab("words", ("a", "<eos>"), "word"))
    plain = sharnn.model.SHARNN(cfg)  # the network alone knows no vocabulary: bytes would be wrong for it
    with pytest.raises(SharnnError, match="has 3 symbols, so its vocabulary is not bytes"):
        generate(plain, "a b", 3)
    assert generate(plain, "a b", 3, seed=0, vocab=words).data == generate(model, "a b", 3, seed=0).data
    with pytest.raises(SharnnError, match="its vocabulary is not bytes"):
        SHARNN(cfg).save_pretrained(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_hub_install_hint_names_an_extra_that_exists(monkeypatch) -> None:
    import re
    import sys

    from sharnn.checkpoint import pretrained_checkpoint
    from sharnn.config import tomllib

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(SharnnError, match="hub extra") as e:
        SHARNN.from_pretrained("someone/some-model")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    named = re.findall(r"\.\[(\w+)\]", str(e.value)) + re.findall(r"\[(\w+)\]", pretrained_checkpoint.__doc__ or "")
    assert named and all(x in project["optional-dependencies"] for x in named), named
    assert any(d.startswith("huggingface_hub") for d in project["optional-dependencies"]["hub"])


def test_collapse_keeps_outputs(model: SHARNN, ckpt: Path, tmp_path: Path, capsys) -> None:
    small = model.collapse()
    x = torch.randint(0, 256, (9, 2))
    assert torch.allclose(small(x).logits, model(x).logits, atol=1e-6)
    assert count_parameters(small) == count_parameters(model) - (16 * 32 + 32 + 16) + 16
    assert main(["collapse", str(ckpt), str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "train_config.json").read_text() == (ckpt / "train_config.json").read_text()
    loaded = load_model(tmp_path / "c")
    assert loaded.cfg.collapsed_gate and torch.allclose(loaded.eval()(x).logits, model(x).logits, atol=1e-6)


# --- the reference's naming ---------------------------------------------------------------------------------


def reference_forward(sd: dict[str, torch.Tensor], tokens: torch.Tensor, nlayers: int, attn: set[int]) -> torch.Tensor:
    """The paper's forward pass written out from the reference's state dict, independently of sharnn.model."""
    E = sd["encoder.weight"].shape[1]

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (E,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-12)

    h = sd["encoder.weight"][tokens]  # (T, B, E)
    T = h.shape[0]
    for i in range(nlayers):
        p = f"blocks.{i}."
        lstm = torch.nn.LSTM(E, E)
        lstm.load_state_dict({k: sd[p + "rnn." + k] for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")})
        h, _ = lstm(ln(h, p + "lnstart"))
        if i in attn:
            mh, h = ln(h, p + "lnmem"), ln(h, p + "lnmid")
            q = F.layer_norm(F.linear(h, sd[p + "attn.q.weight"], sd[p + "attn.q.bias"]), (E,),
                             sd[p + "attn.qln.weight"], sd[p + "attn.qln.bias"], eps=1e-12)
            c, f = F.linear(torch.sigmoid(sd[p + "attn.vs"]), sd[p + "attn.vq.l1.weight"], sd[p + "attn.vq.l1.bias"]).chunk(2, -1)
            q = torch.sigmoid(sd[p + "attn.qs"]) * q
            k = torch.sigmoid(sd[p + "attn.ks"]) * mh
            v = torch.sigmoid(f) * torch.tanh(c) * mh
            scores = torch.einsum("tbe,sbe->bts", q, k) / math.sqrt(E)
            scores = scores + torch.full((T, T), float("-inf")).triu(1)
            h = h + torch.einsum("bts,sbe->tbe", scores.softmax(-1), v)
        h, x = ln(h, p + "lnff"), ln(h, p + "lnxff")
        u = F.linear(x, sd[p + "ff.linear1.weight"], sd[p + "ff.linear1.bias"])
        u = u * torch.sigmoid(1.702 * u)
        h = h + u.view(T, -1, u.shape[-1] // E, E).sum(-2)
    return F.linear(h, sd["encoder.weight"], sd["decoder.bias"])


def test_import_reference(tmp_path: Path, capsys) -> None:
    # A corpus with 10 distinct bytes; the reference numbers them by frequency over train, ties by first appearance.
    train = b"bb\naaab\ncc\nz" * 30 + b"yxwvu"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_bytes(train)
    (corpus / "valid.txt").write_bytes(b"abc\nab")
    (corpus / "test.txt").write_bytes(b"cab\nba")
    vocab = reference_vocab(np.frombuffer(train, dtype=np.uint8))
    assert vocab.symbols == ("98", "<eos>", "97", "99", "122", "121", "120", "119", "118", "117")

    torch.manual_seed(5)
    cfg = SHARNNConfig(vocab_size=10, emsize=16, nhid=48, nlayers=3, attn_layers=(1,), dropoute=0.0)
    source = SHARNN(cfg)
    with torch.no_grad():
        source.blocks[1].attn.vs.normal_()
        source.blocks[1].attn.ks.normal_()
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["blocks.1.attn.qkvs"] = torch.zeros(1, 3, 16)  # unused by the reference's forward
    sd["blocks.1.attn.r_gate"] = torch.ones(1, 1, 16)
    for i in range(3):
        sd[f"blocks.{i}.lnout.weight"], sd[f"blocks.{i}.lnout.bias"] = torch.ones(16), torch.zeros(16)
    for i in (0, 2):  # the reference builds these in every block, and uses them only with attention
        for ln in ("lnmid", "lnmem"):
            sd[f"blocks.{i}.{ln}.weight"], sd[f"blocks.{i}.{ln}.bias"] = torch.ones(16), torch.zeros(16)
    path = tmp_path / "ref.pt"
    torch.save(sd, path)

    assert main(["import-reference", str(path), str(tmp_path / "imported"), "--vocab-from", str(corpus)]) == 0
    assert "imported 10,394 parameters" in capsys.readouterr().out
    imported = load_model(tmp_path / "imported").eval()
    assert Checkpoint.open(tmp_path / "imported").vocab == vocab
    assert SHARNN.from_pretrained(tmp_path / "imported").vocab == vocab  # the model class that holds one
    ids = torch.from_numpy(vocab.encode(b"ab\ncab\nzz").astype(np.int64)).unsqueeze(1)
    want = reference_forward(sd, ids, 3, {1})
    assert torch.allclose(imported(ids).logits, want, atol=1e-5)

    # Byte text is read through the table: eval and score work on the imported model.
    assert main(["eval", str(tmp_path / "imported"), "--data", str(corpus), "--split", "valid", "--json",
                 "--batch_size", "2"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["bpc"])
    # Without --vocab-from the symbol order is unknown, and a different corpus is refused.
    assert main(["import-reference", str(path), str(tmp_path / "x")]) == 2
    other = tmp_path / "other.txt"
    other.write_bytes(bytes(range(256)) * 10)
    assert main(["import-reference", str(path), str(tmp_path / "x"), "--vocab-from", str(other)]) == 2
    assert "distinct symbols" in capsys.readouterr().err


def test_import_reads_the_attention_blocks_off_the_weights() -> None:
    # The original put attention in block nlayers-2, or (edited by hand, as its README suggests) in every block:
    # the import takes what the tensors say, and the config keeps it explicitly, whatever the default.
    from sharnn.convert import config_from_state_dict

    for attn in [(0, 1, 2, 3), (2,), ()]:
        sd = SHARNN(SHARNNConfig(emsize=16, nhid=32, nlayers=4, attn_layers=attn)).state_dict()
        cfg = config_from_state_dict(sd, attn_span=5000)
        assert cfg.attn_layers == attn and cfg.to_dict()["attn_layers"] == list(attn)
        assert SHARNNConfig.from_dict(cfg.to_dict()) == cfg


def test_table_vocab_round_trip() -> None:
    v = Vocab("table", ("<eos>", "97", "98"))
    ids = v.encode(b"ab\nba")
    assert ids.tolist() == [1, 2, 0, 2, 1] and v.decode(ids) == b"ab\nba"
    with pytest.raises(SharnnError, match="lacks"):
        v.encode(b"abc")
    assert Vocab.from_dict(v.to_dict()) == v


def test_word_document_is_scored_like_one_piece(tmp_path: Path) -> None:
    v = Vocab.from_words(["the cat sat on the mat", "a dog"])
    torch.manual_seed(0)
    m = SHARNN(SHARNNConfig(vocab_size=v.size, emsize=16, nhid=32, nlayers=2, attn_layers=(1,))).eval()
    doc = b"the cat sat\non the mat\na dog sat on the cat\n" * 3 + b"the end"
    doc = doc.replace(b"end", b"mat")
    whole = score_stream(m, v, io.BytesIO(doc))
    pieces = score_stream(m, v, io.BytesIO(doc), read_bytes=5)  # reads that cut words in two
    assert pieces.tokens == whole.tokens == len(v.encode(doc))
    assert pieces.logprob == pytest.approx(whole.logprob, abs=1e-4)
    with pytest.raises(SharnnError, match="empty"):
        score_stream(m, v, io.BytesIO(b"   "))


def test_cli_flags_of_eval_score_and_import(ckpt: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "t.txt"
    text.write_bytes(b"some text to evaluate on, long enough for two streams of segments. " * 20)
    results = {}
    for precision in ("fp32", "bf16", "int8"):
        assert main(["eval", str(ckpt), "--data", str(text), "--split", "valid", "--batch_size", "1",
                     "--precision", precision, "--json"]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["precision"] == precision
        results[precision] = row["bpc"]
    for low in ("bf16", "int8"):  # a real conversion (the numbers move), and a small one
        assert results[low] != results["fp32"] and results[low] == pytest.approx(results["fp32"], abs=0.05)
    scored = {}
    for precision in ("fp32", "int8"):
        assert main(["score", str(ckpt), str(text), "--no-eos", "--json", "--batch_size", "1",
                     "--precision", precision]) == 0
        scored[precision] = rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert rows[0]["tokens"] == len(text.read_bytes().splitlines()[0])  # the closing newline is not scored
    assert scored["int8"][0]["bpc"] == pytest.approx(scored["fp32"][0]["bpc"], abs=0.05)
    sd = tmp_path / "sd.pt"
    torch.save(load_model(ckpt).state_dict(), sd)
    assert main(["import-reference", str(sd), str(tmp_path / "imp"), "--attn-span", "77"]) == 0
    assert load_model(tmp_path / "imp").cfg.attn_span == 77


@pytest.mark.parametrize("window", ["sliding", "reference"])
def test_a_lines_score_does_not_depend_on_its_batch(model: SHARNN, window: str) -> None:
    # With the reference window the memory is trimmed by the segment's length, so padding to a longer line in
    # the same batch would change the score: lines are batched only with lines of their own length there.
    model.set_attn_window(window)
    context = b"a context longer than the attention span of this tiny model, to fill its memory\n"
    short, long = b"short line", b"a much longer line than the other one"
    alone = next(iter(score_lines(model, BYTES, [short], context=context))).logprob
    beside = next(iter(score_lines(model, BYTES, [short, long], context=context))).logprob
    assert beside == pytest.approx(alone, abs=1e-5)


# --- one line for each mistake, nothing printed before it, no invalid JSON ----------------------------------------


def only_error_line(capsys, *fragments: str) -> str:
    out, err = capsys.readouterr()
    lines = err.strip("\n").split("\n")
    assert out == "" and len(lines) == 1 and lines[0].startswith("sharnn: error: "), (out, err)
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.mark.parametrize("flags,fragment", [
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--length", "-1"], "--length must not be negative"),
    (["--temperature", "-1"], "--temperature must be a number, not negative"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
])
def test_generate_refuses_bad_flags_before_printing_anything(ckpt: Path, flags: list[str], fragment: str,
                                                             capsys) -> None:
    assert main(["generate", str(ckpt), "--prompt", "hello", "--device", "cpu", *flags]) == 2
    only_error_line(capsys, fragment)


@pytest.mark.parametrize("argv", [["eval", "{ckpt}", "--dynamic", "--dynamic-lr", "nan"],
                                  ["score", "{ckpt}", "--document", "--dynamic", "--dynamic-decay", "inf"],
                                  ["compress", "{ckpt}", "a", "b", "--adapt", "--adapt-lr=-inf"]])
def test_every_float_flag_must_be_finite(ckpt: Path, argv: list[str], capsys) -> None:
    assert main([a.format(ckpt=ckpt) for a in argv]) == 2
    only_error_line(capsys, "must be a finite number")


def test_eval_json_never_prints_nan(ckpt: Path, tmp_path: Path, capsys) -> None:
    # A diverged model's loss is NaN, which JSON cannot hold: the line must still parse as strict JSON.
    model = load_model(ckpt)
    with torch.no_grad():
        model.encoder.weight.fill_(float("nan"))
    bad = save_checkpoint(tmp_path / "bad", model, TrainConfig(bptt=16, batch_size=2))
    text = tmp_path / "t.txt"
    text.write_bytes(b"some text to evaluate on, long enough for a few segments of sixteen bytes. " * 20)
    assert main(["eval", str(bad), "--data", str(text), "--split", "valid", "--json", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()

    def no_constants(name: str) -> None:
        pytest.fail(f"eval --json printed {name}, which is not JSON: {line}")

    result = json.loads(line, parse_constant=no_constants)
    assert result["loss"] is None and result["bpc"] is None and result["ppl"] is None


def test_a_refused_pickle_is_one_line(ckpt: Path, tmp_path: Path) -> None:
    # In a real process: torch's advice (several lines, suggesting weights_only=False) must not reach the user,
    # nor any warning after sharnn's line.
    import subprocess
    import sys

    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil(tmp_path / "PWNED")}, evil)
    (ckpt / "train_state.pt").write_bytes(evil.read_bytes())
    text = tmp_path / "t.txt"
    text.write_bytes(b"text " * 400)
    for argv in (["import-reference", str(evil), str(tmp_path / "out")],
                 ["train", "--resume", str(ckpt), "--data", str(text), "--save", str(tmp_path / "run"), "--quiet"]):
        proc = subprocess.run([sys.executable, "-m", "sharnn.cli", *argv], capture_output=True, text=True,
                              timeout=120, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "holds pickled Python objects (" in lines[0] and "refusing to load it" in lines[0], lines[0]
        assert "weights_only" not in lines[0] and "trusted" not in lines[0]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content,fragment", [
    (b"hello\n", "is not a PyTorch file (neither torch.save's zip archive nor a pickle)"),
    (b"a,b,c\n1,2,3\n", "is not a PyTorch file"),
    (b"\x80\x02garbage", "is not a readable PyTorch file ("),
])
def test_import_reference_does_not_call_any_file_a_pickle(tmp_path: Path, content: bytes, fragment: str,
                                                          capsys) -> None:
    p = tmp_path / "file.pt"
    p.write_bytes(content)
    assert main(["import-reference", str(p), str(tmp_path / "out")]) == 2
    assert "pickled" not in only_error_line(capsys, fragment) and not (tmp_path / "out").exists()


def test_a_symlink_loop_is_reported_as_such(tmp_path: Path, capsys) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main(["eval", str(tmp_path / "a"), "--device", "cpu"]) == 2
    only_error_line(capsys, "is a loop of symbolic links")
    assert main(["eval", str(tmp_path / "dangling"), "--device", "cpu"]) == 2
    only_error_line(capsys, f"is a symbolic link to {tmp_path / 'nowhere'}, which does not exist")
    assert main(["eval", str(tmp_path / "absent"), "--device", "cpu"]) == 2
    only_error_line(capsys, "does not exist")
