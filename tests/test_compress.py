"""Compression: exact round trips, size at the model's cross-entropy, and every refusal in one clear line."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sharnn import compress
from sharnn.checkpoint import save_checkpoint
from sharnn.cli import main
from sharnn.compress import (
    START,
    CoderSettings,
    _stream_layout,
    compress_file,
    decompress_file,
    fresh_model,
    quantise,
    read_header,
)
from sharnn.config import SHARNNConfig
from sharnn.dynamic import DynamicConfig
from sharnn.errors import SharnnError
from sharnn.model import SHARNN
from sharnn.vocab import BYTES, Vocab

TEXT = b"Colourless green ideas sleep furiously; the cat sat on the mat. " * 160  # 10 KB


def small_model(cfg: SHARNNConfig, seed: int = 0) -> SHARNN:
    torch.manual_seed(seed)
    return SHARNN(cfg).eval()


@pytest.fixture(autouse=True)
def short_streams(monkeypatch) -> None:
    """Streams of 64 bytes at least, not 4 KiB: small inputs still take several streams, and fewer steps."""
    monkeypatch.setattr(compress, "MIN_STREAM_BYTES", 64)


@pytest.fixture
def model(tiny_config: SHARNNConfig) -> SHARNN:
    return small_model(tiny_config)


@pytest.fixture(scope="module")
def trained() -> SHARNN:
    """A tiny model trained for a few seconds on TEXT, so that its predictions are sharp (as in real use)."""
    m = small_model(SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24, dropout=0.0,
                                 dropouth=0.0, dropouti=0.0, dropoute=0.0))
    ids = torch.tensor(list(TEXT[:4096])).view(8, -1).t().contiguous()  # (512, 8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(3):
        for i in range(0, 511, 32):
            loss = m(ids[i : i + 32][:-1], targets=ids[i + 1 : i + 32]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m.eval()


def roundtrip(model: SHARNN, data: bytes, tmp_path: Path, **settings: object) -> compress.CodingResult:
    src, packed, back = tmp_path / "in", tmp_path / "in.shz", tmp_path / "back"
    src.write_bytes(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = compress_file(model, src, packed, CoderSettings(**settings), overwrite=True)
    decompress_file(packed, back, model, overwrite=True)
    assert back.read_bytes() == data
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # adaptation leaves no trace
    assert res.compressed == packed.stat().st_size
    return res


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 3, TEXT[:2000]], ids=["empty", "one", "binary", "text"])
def test_round_trip(model: SHARNN, data: bytes, tmp_path: Path) -> None:
    roundtrip(model, data, tmp_path, streams=4)


def test_round_trip_random_bytes_many_blocks(model: SHARNN, tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 1001, dtype=np.uint8).tobytes()
    res = roundtrip(model, data, tmp_path, streams=8, block_steps=17)  # 8 streams of 126, the last 119; 8 blocks
    assert res.streams == 8


@pytest.mark.long
def test_round_trip_multi_megabyte(model: SHARNN, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = b"".join(TEXT[: rng.integers(100, 1000)] + rng.integers(0, 256, 50, dtype=np.uint8).tobytes()
                    for _ in range(7000))[: 3 << 20]
    res = roundtrip(model, data, tmp_path, streams=256, block_steps=1000)
    assert res.length == 3 << 20 and res.streams == 256


def entropy_bits(model: SHARNN, data: bytes, streams: int) -> float:
    """The model's cross-entropy on `data` cut as the coder cuts it, in one batched pass (not one byte per step)."""
    S, n = _stream_layout(len(data), streams)
    ids = np.zeros((n + 1, S), dtype=np.int64)
    ids[0] = START
    mask = np.zeros((n, S), dtype=bool)
    for s in range(S):
        part = np.frombuffer(data[s * n : (s + 1) * n], dtype=np.uint8)
        ids[1 : 1 + len(part), s] = part
        mask[: len(part), s] = True
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[:-1])).logits
    lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.from_numpy(ids[1:])[..., None])[..., 0]
    return float(-lp[torch.from_numpy(mask)].sum() / math.log(2))


def test_size_is_the_models_cross_entropy(trained: SHARNN, tmp_path: Path) -> None:
    data = TEXT[1000:9000]
    res = roundtrip(trained, data, tmp_path, streams=16)
    ideal = entropy_bits(trained, data, 16) / 8
    header = read_header(tmp_path / "in.shz").body_start + 32  # magic, version, JSON header; trailer
    assert ideal < len(data) / 3  # the model predicts well: quantisation matters here
    assert abs(res.model_bits / 8 - ideal) < 1e-3 * ideal  # the coder's one-byte steps agree with one pass
    assert res.compressed - header <= 1.01 * ideal
    assert res.compressed - header >= ideal - 8  # no coder beats the model's own probabilities


@pytest.mark.slow
def test_adapt_learns_while_coding(trained: SHARNN, model: SHARNN, tmp_path: Path) -> None:
    data = TEXT[:3000]
    plain = roundtrip(model, data, tmp_path, streams=8)
    adapt = roundtrip(model, data, tmp_path, streams=8, adapt=DynamicConfig(lr=5e-3, decay=0.0, bptt=16))
    assert adapt.compressed < 0.8 * plain.compressed  # an untrained model learns the repeated sentence
    header = read_header(tmp_path / "in.shz").header
    assert header["adapt"]["lr"] == 5e-3 and header["adapt"]["bptt"] == 16
    # A trained model that adapts gently keeps what it knew: it still codes the text it was trained on in well
    # under a third of its bits (the round trip itself checks the decoded bytes).
    kept = roundtrip(trained, data[:800], tmp_path, streams=8, adapt=DynamicConfig(lr=3e-4, decay=0.01, bptt=16))
    assert kept.model_bits / 8 < len(data[:800]) / 3


def overhead(path: Path, blocks: int) -> int:
    """What a file adds to its content when every block is stored: magic, version, header, trailer, 4 per block."""
    return read_header(path).body_start + 32 + 4 * blocks


@pytest.mark.parametrize("kind", ["random", "one repeated byte"])
def test_inputs_the_model_does_not_know_never_grow(trained: SHARNN, tmp_path: Path, kind: str) -> None:
    # Random bytes, and a byte the model has never seen repeated, cost it more than 8 bits a byte: those blocks are
    # stored as they are (the decoder still runs the model over them), so the file grows by a few bytes per block.
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() if kind == "random" else b"\x07" * 3000
    res = roundtrip(trained, data, tmp_path, streams=4, block_steps=200)  # 4 streams of 750: 4 blocks
    assert res.model_bits > 8 * len(data)  # the model alone would have made it larger
    assert res.blocks == 4 and res.stored == 4
    assert res.compressed == len(data) + overhead(tmp_path / "in.shz", res.blocks)


@pytest.mark.slow
@pytest.mark.parametrize("adapt", [None, DynamicConfig(lr=1e-3, decay=0.001, bptt=8)], ids=["plain", "adapt"])
def test_stored_and_coded_blocks_mix(trained: SHARNN, tmp_path: Path, adapt: DynamicConfig | None) -> None:
    # Text the model knows, then random bytes, then text again: coded, stored, coded. With --adapt the decoder
    # learns from the stored bytes exactly as the encoder did, or the blocks after them would not decode.
    rng = np.random.default_rng(1)
    data = TEXT[:600] + rng.integers(0, 256, 600, dtype=np.uint8).tobytes() + TEXT[600:1200]
    res = roundtrip(trained, data, tmp_path, streams=1, block_steps=150, adapt=adapt)
    assert res.blocks == 12 and 4 <= res.stored <= 5  # the random part, and perhaps a block that straddles it
    body = res.compressed - overhead(tmp_path / "in.shz", res.blocks)  # stored bytes and range code
    assert body < 600 + 0.5 * 1200  # the text's blocks are coded, at well under 4 bits a byte


def test_a_diverging_model_stops_in_one_line_and_writes_nothing(model: SHARNN, tmp_path: Path, capsys) -> None:
    # Steps of 1e10 overflow the weights: NaN predictions, which the range coder cannot code.
    (tmp_path / "in").write_bytes(TEXT[:3000])
    with pytest.raises(SharnnError, match="NaN or infinite .* smaller --adapt-lr"):
        compress_file(model, tmp_path / "in", tmp_path / "out", CoderSettings(
            streams=8, adapt=DynamicConfig(lr=1e10, decay=0.0, bptt=8)))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    ckpt = str(save_checkpoint(tmp_path / "ckpt", model))
    assert main(["compress", ckpt, str(tmp_path / "in"), str(tmp_path / "out"), "--quiet", "--adapt",
                 "--adapt-lr", "1e10"]) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(SharnnError, match="not finite"):
        quantise(np.full((1, 256), np.nan, dtype=np.float32))


def test_a_probability_of_zero_still_codes_and_costs_finite_bits(trained: SHARNN, tmp_path: Path) -> None:
    # A byte the model rules out entirely (float32 probability exactly 0) is still coded, at a finite cost.
    with torch.no_grad():
        trained.decoder.bias[ord("x")] -= 1000.0
    try:
        data = TEXT[:500] + b"xxx" + TEXT[:500]
        with torch.no_grad():
            p = torch.softmax(trained(torch.tensor([[ord("a")]])).logits[0, 0], -1)
        assert p[ord("x")] == 0.0
        res = roundtrip(trained, data, tmp_path, streams=2)
        assert math.isfinite(res.model_bits) and res.model_bits > 3 * 1000 / math.log(2)
    finally:
        with torch.no_grad():
            trained.decoder.bias[ord("x")] += 1000.0


def test_format_version_1_files_still_decode(trained: SHARNN, tmp_path: Path) -> None:
    # Version 1 is version 2 without stored blocks: such a file, marked version 1, decodes as before.
    (tmp_path / "in").write_bytes(TEXT[:2000])
    res = compress_file(trained, tmp_path / "in", tmp_path / "z", CoderSettings(streams=4))
    assert res.stored == 0
    raw = bytearray((tmp_path / "z").read_bytes()[:-32])
    raw[8:10] = struct.pack("<H", 1)
    (tmp_path / "z").write_bytes(bytes(raw) + hashlib.sha256(raw).digest())
    assert read_header(tmp_path / "z").version == 1
    decompress_file(tmp_path / "z", tmp_path / "back", trained)
    assert (tmp_path / "back").read_bytes() == TEXT[:2000]


def test_quantise_is_exact_and_keeps_every_byte() -> None:
    p = torch.softmax(torch.randn(5, 256) * 8, -1).numpy()
    q = quantise(p)
    assert (q >= 1).all() and (q.sum(1) == 1 << compress.PRECISION).all() and (q == np.round(q)).all()
    assert np.abs(q / (1 << compress.PRECISION) - p).max() < 1e-4


def test_stream_layout(monkeypatch) -> None:
    monkeypatch.setattr(compress, "MIN_STREAM_BYTES", 4096)
    assert _stream_layout(0, 32) == (0, 0)
    assert _stream_layout(10, 32) == (1, 10)
    assert _stream_layout(100_000, 32) == (24, 4167)  # one stream per 4 KiB at most
    for length in (4096 * 5 + 1, 4096 * 40, 99_999):
        S, n = _stream_layout(length, 32)
        assert (S - 1) * n < length <= S * n  # no stream empty


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.fixture
def packed(model: SHARNN, tmp_path: Path) -> Path:
    (tmp_path / "in").write_bytes(TEXT[:3000])
    compress_file(model, tmp_path / "in", tmp_path / "in.shz", CoderSettings(streams=8))
    return tmp_path / "in.shz"


def rewrite(path: Path, edit) -> None:
    """Apply `edit` to the header JSON and put a matching trailer back (a well-formed file with other contents)."""
    raw = path.read_bytes()
    hlen = struct.unpack("<I", raw[10:14])[0]
    header = json.loads(raw[14 : 14 + hlen])
    edit(header)
    head = json.dumps(header).encode()
    body = raw[:10] + struct.pack("<I", len(head)) + head + raw[14 + hlen : -32]
    path.write_bytes(body + hashlib.sha256(body).digest())


def test_another_model_is_refused(packed: Path, tiny_config: SHARNNConfig, tmp_path: Path) -> None:
    with pytest.raises(SharnnError, match="another model"):
        decompress_file(packed, tmp_path / "out", small_model(tiny_config, seed=1))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "version"])
def test_damaged_or_foreign_files_are_refused(packed: Path, model: SHARNN, tmp_path: Path, damage: str) -> None:
    raw = bytearray(packed.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 1
    elif damage == "truncate":
        raw = raw[:-40]
    elif damage == "magic":
        raw[0] = ord("x")
    else:
        raw[8:10] = struct.pack("<H", 3)
    packed.write_bytes(bytes(raw))
    message = {"flip": "damaged", "truncate": "damaged", "magic": "not a file made by", "version": "version 3"}
    with pytest.raises(SharnnError, match=message[damage]):
        decompress_file(packed, tmp_path / "out", model)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_another_machine_is_refused_unless_asked(packed: Path, model: SHARNN, tmp_path: Path, capsys) -> None:
    rewrite(packed, lambda h: h["machine"].update(torch="1.0.0", isa="AVX512"))
    with pytest.raises(SharnnError, match="torch 1.0.0 there"):
        decompress_file(packed, tmp_path / "out", model)
    ckpt = str(save_checkpoint(tmp_path / "ckpt", model))
    argv = ["decompress", ckpt, str(packed), str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2 and "another kind of machine" in capsys.readouterr().err
    assert main(argv + ["--ignore-machine"]) == 0  # the same machine really: it decodes
    assert (tmp_path / "out").read_bytes() == TEXT[:3000]
    assert main(argv + ["--ignore-machine"]) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--ignore-machine", "--overwrite"]) == 0


def test_a_wrong_decode_is_never_written(trained: SHARNN, tmp_path: Path, monkeypatch) -> None:
    # A decoder whose arithmetic differs from the encoder's (another machine, say) decodes garbage, or constriction's
    # decoder fails on the code (an AssertionError on an AVX-512 machine): either way one clear line, no output.
    (tmp_path / "in").write_bytes(TEXT[:3000])
    res = compress_file(trained, tmp_path / "in", tmp_path / "in.shz", CoderSettings(streams=8, block_steps=100))
    assert res.stored == 0  # range-coded blocks: the model predicts this text
    real = compress.quantise
    for shift in (1, 128):
        monkeypatch.setattr(compress, "quantise", lambda p, k=shift: real(np.roll(p, k, axis=1)))
        with pytest.raises(SharnnError, match="did not give back the original"):
            decompress_file(tmp_path / "in.shz", tmp_path / "out", trained)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("where", ["decode", "construct"])
def test_decoder_failures_become_one_line(trained: SHARNN, tmp_path: Path, monkeypatch, capsys, where: str) -> None:
    # Whatever constriction raises on a code it cannot decode (which depends on the machine), the user gets one line.
    class Broken:
        def __init__(self, words: np.ndarray):
            if where == "construct":
                raise ValueError("not a valid compressed word sequence")

        def decode(self, family: object, probs: np.ndarray) -> np.ndarray:
            raise AssertionError("Tried to decode from compressed data that is invalid for the employed entropy model.")

    ckpt = str(save_checkpoint(tmp_path / "ckpt", trained))
    (tmp_path / "in").write_bytes(TEXT[:2000])
    assert main(["compress", ckpt, str(tmp_path / "in"), str(tmp_path / "z"), "--quiet", "--streams", "4"]) == 0
    assert read_header(tmp_path / "z").header["streams"] == 4
    monkeypatch.setattr(compress._constriction().stream.queue, "RangeDecoder", Broken)
    capsys.readouterr()
    assert main(["decompress", ckpt, str(tmp_path / "z"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "did not give back the original" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_word_models_and_existing_outputs_are_refused(model: SHARNN, packed: Path, tmp_path: Path, capsys) -> None:
    words = Vocab("words", tuple(f"w{i}" for i in range(255)) + ("<eos>",), "word")  # 256 symbols, not bytes
    with pytest.raises(SharnnError, match="byte-level model.*words vocabulary"):
        compress_file(model, tmp_path / "in", tmp_path / "other", CoderSettings(), vocab=words)
    with pytest.raises(SharnnError, match="byte-level model.*words vocabulary"):
        decompress_file(packed, tmp_path / "other", model, vocab=words)
    save_checkpoint(tmp_path / "words", model, vocab=words)  # the commands take the checkpoint's vocabulary
    for cmd in (["compress", str(tmp_path / "words"), str(tmp_path / "in")], ["decompress", str(tmp_path / "words"),
                                                                               str(packed)]):
        capsys.readouterr()
        assert main([*cmd, str(tmp_path / "other"), "--quiet"]) == 2
        assert "words vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    compress_file(model, tmp_path / "in", tmp_path / "other", CoderSettings(), vocab=BYTES)
    with pytest.raises(SharnnError, match="exists; pass --overwrite"):
        compress_file(model, tmp_path / "in", packed, CoderSettings())
    with pytest.raises(SharnnError, match="is the input"):
        compress_file(model, tmp_path / "in", tmp_path / "in", CoderSettings(), overwrite=True)
    with pytest.raises(SharnnError, match="cannot read"):
        compress_file(model, tmp_path / "missing", tmp_path / "x", CoderSettings())


# --- command line -----------------------------------------------------------------------------------------------


def test_cli_round_trip_with_a_checkpoint(model: SHARNN, tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    src = tmp_path / "in.txt"
    src.write_bytes(TEXT[:600])
    argv = ["compress", str(ckpt), str(src), str(tmp_path / "z"), "--quiet"]
    assert main(argv + ["--streams", "3"]) == 0
    out = capsys.readouterr().out
    assert "600 ->" in out and "3 streams" in out and "KB/s" in out
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--adapt", "--adapt-lr", "1e-3", "--adapt-decay", "0.5", "--adapt-bptt",
                        "8"]) == 0
    h = read_header(tmp_path / "z").header
    assert h["adapt"]["lr"] == 1e-3 and h["adapt"]["decay"] == 0.5 and h["adapt"]["bptt"] == 8 and h["threads"] == 1
    assert main(["decompress", str(ckpt), str(tmp_path / "z"), str(tmp_path / "back"), "--quiet"]) == 0
    assert (tmp_path / "back").read_bytes() == TEXT[:600]
    assert "checksum verified" in capsys.readouterr().out
    src.write_bytes(TEXT[:40])  # threads: recorded, and the decoder uses them (a short input: threads spin)
    assert main(argv + ["--overwrite", "--threads", "2"]) == 0 and read_header(tmp_path / "z").header["threads"] == 2
    assert main(["decompress", str(ckpt), str(tmp_path / "z"), str(tmp_path / "b3"), "--quiet"]) == 0
    assert (tmp_path / "b3").read_bytes() == TEXT[:40]
    assert main(["decompress", str(tmp_path / "z"), str(tmp_path / "b2"), "--quiet"]) == 2
    assert "give its checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_fresh_model_round_trip_in_separate_processes(tmp_path: Path) -> None:
    # Encoder and decoder in two processes: the float computation must repeat bit for bit.
    cfg = tmp_path / "small.toml"
    cfg.write_text("[model]\nemsize = 16\nnhid = 32\nnlayers = 2\nattn_layers = [1]\nattn_span = 24\n")
    src = tmp_path / "in.txt"
    src.write_bytes(TEXT[:160])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "sharnn.cli", *a], capture_output=True, text=True, env=env,
                                    check=False)
    r = run("compress", "--fresh", str(cfg), "--seed", "3", "--adapt", str(src), str(tmp_path / "z"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert read_header(tmp_path / "z").header["model"]["fresh"]["seed"] == 3
    r = run("decompress", str(tmp_path / "z"), str(tmp_path / "back"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back").read_bytes() == TEXT[:160]


def test_fresh_models_repeat_and_differ_by_seed() -> None:
    a, info = fresh_model("tiny", seed=1)
    b, _ = fresh_model("tiny", seed=1)
    c, _ = fresh_model("tiny", seed=2)
    assert compress.weights_sha256(a) == compress.weights_sha256(b) != compress.weights_sha256(c)
    assert info["spec"] == "tiny" and info["config"]["emsize"] == 232


@pytest.mark.parametrize("argv, message", [
    (["compress", "IN", "OUT"], "usage: sharnn compress"),
    (["compress", "--fresh", "tiny", "IN", "OUT"], "--fresh needs --adapt"),
    (["compress", "CKPT", "IN", "OUT", "--adapt-lr", "1"], "add --adapt"),
    (["compress", "--fresh", "nosuch", "--adapt", "IN", "OUT"], "not found"),
    (["compress", "CKPT", "IN", "OUT", "--streams", "0"], "at least 1"),
    (["decompress", "OUT"], "usage: sharnn decompress"),
])
def test_cli_mistakes(model: SHARNN, tmp_path: Path, argv: list[str], message: str, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    (tmp_path / "in").write_bytes(b"abc")
    names = {"CKPT": str(ckpt), "IN": str(tmp_path / "in"), "OUT": str(tmp_path / "out")}
    assert main([names.get(a, a) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_a_crafted_fresh_header_is_refused_before_building(tmp_path: Path, capsys) -> None:
    # The trailer is a checksum anyone can recompute: a header asking for a 10^9-wide fresh model must be refused
    # in one line, not end in an allocation's traceback.
    cfg = tmp_path / "small.toml"
    cfg.write_text("[model]\nemsize = 16\nnhid = 32\nnlayers = 2\nattn_layers = [1]\nattn_span = 24\n")
    src = tmp_path / "in.txt"
    src.write_bytes(TEXT[:300])
    assert main(["compress", "--fresh", str(cfg), "--adapt", str(src), str(tmp_path / "z"), "--quiet"]) == 0
    c = read_header(tmp_path / "z")
    c.header["model"]["fresh"]["config"].update(emsize=10**9, nhid=10**9)
    raw = (tmp_path / "z").read_bytes()
    head = json.dumps(c.header).encode()
    crafted = compress.MAGIC + struct.pack("<HI", compress.VERSION, len(head)) + head + raw[c.body_start : c.body_end]
    (tmp_path / "crafted").write_bytes(crafted + hashlib.sha256(crafted).digest())
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "crafted"), str(tmp_path / "back"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "the fresh model its header describes needs" in err, err
    assert not (tmp_path / "back").exists()


def test_cli_says_when_blocks_are_stored(model: SHARNN, tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    (tmp_path / "in").write_bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes())
    assert main(["compress", str(ckpt), str(tmp_path / "in"), str(tmp_path / "z"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 blocks stored as they are" in out
    header = read_header(tmp_path / "z").body_start + 32
    assert (tmp_path / "z").stat().st_size == 500 + header + 4 and header < 800
