"""Corpora and batching: enwik8 preparation, corpus loading and splits, streams and BPTT segments."""

from __future__ import annotations

import itertools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sharnn.cli import main
from sharnn.data import (
    Streams,
    eval_segments,
    load_corpus,
    prepare_enwik8,
    python_stdlib_unused,
    segment_length,
    split_bytes,
    train_segments,
)
from sharnn.errors import SharnnError

PERIOD = 251  # a prime: byte k of a synthetic corpus is k % 251, so any slice can be checked by its offset


def pattern(start: int, n: int) -> np.ndarray:
    return (np.arange(start, start + n, dtype=np.int64) % PERIOD).astype(np.uint8)


def make_zip(path: Path, size: int, *, member: str = "enwik8", method: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip holding `member` = the first `size` bytes of the periodic pattern, written in chunks."""
    chunk = pattern(0, PERIOD * 4000).tobytes()  # a multiple of the period: every chunk starts at phase 0
    with (zipfile.ZipFile(path, "w", compression=method, compresslevel=1) as zf,
          zf.open(member, "w", force_zip64=size > 2**31) as f):
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
    return path


def split_files(folder: Path) -> list[Path]:
    return [folder / f"{name}.bin" for name in ("train", "valid", "test")]


# --- enwik8 -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_enwik8_full_size(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "enwik8.zip", 100_000_000)
    out = tmp_path / "enwik8"
    sizes = prepare_enwik8(out, zip_path=zip_path)
    assert sizes == {"train": 90_000_000, "valid": 5_000_000, "test": 5_000_000}
    offsets = {"train": 0, "valid": 90_000_000, "test": 95_000_000}
    for name, size in sizes.items():
        p = out / f"{name}.bin"
        assert p.stat().st_size == size
        data = np.memmap(p, dtype=np.uint8, mode="r")
        start = offsets[name]
        assert np.array_equal(data[:1000], pattern(start, 1000)), name
        assert np.array_equal(data[-1000:], pattern(start + size - 1000, 1000)), name
        probe = np.arange(0, size, 99_991)  # sparse samples across the whole split
        assert np.array_equal(data[probe], ((probe + start) % PERIOD).astype(np.uint8)), name
        del data
    assert not list(out.glob("*.part"))
    assert (out / "meta.json").is_file()

    corpus = load_corpus(out)
    assert isinstance(corpus.train, np.memmap)
    assert corpus.train.dtype == np.uint8 and corpus.vocab_size == 256
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (90_000_000, 5_000_000, 5_000_000)
    assert corpus.valid[0] == 90_000_000 % PERIOD and corpus.test[-1] == (100_000_000 - 1) % PERIOD


def test_prepare_enwik8_small_sizes(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "e.zip", 1000, method=zipfile.ZIP_STORED)
    out = tmp_path / "out"
    assert prepare_enwik8(out, zip_path=zip_path, expected_bytes=1000, heldout=50) == {
        "train": 900, "valid": 50, "test": 50}
    got = b"".join(p.read_bytes() for p in split_files(out))
    assert got == pattern(0, 1000).tobytes()


def test_prepare_replaces_split_files_only_with_overwrite(tmp_path: Path, capsys) -> None:
    # sharnn.outputs' rule: a file a command writes is replaced only with --overwrite (and a folder under its
    # name, or the archive being read, never); other files in DIR are not its business.
    zip_path = make_zip(tmp_path / "e.zip", 1000, method=zipfile.ZIP_STORED)
    out = tmp_path / "out"
    out.mkdir()
    (out / "test.bin").write_bytes(b"mine")
    (out / "notes.txt").write_bytes(b"notes")
    with pytest.raises(SharnnError, match=r"already holds test.bin; pass --overwrite"):
        prepare_enwik8(out, zip_path=zip_path, expected_bytes=1000, heldout=50)
    assert (out / "test.bin").read_bytes() == b"mine" and not (out / "train.bin").exists()
    prepare_enwik8(out, zip_path=zip_path, expected_bytes=1000, heldout=50, overwrite=True)
    assert (out / "test.bin").read_bytes() == pattern(950, 50).tobytes()
    assert (out / "notes.txt").read_bytes() == b"notes"
    with pytest.raises(SharnnError, match=r"already holds train.bin, valid.bin, test.bin, meta.json"):
        prepare_enwik8(out, zip_path=zip_path, expected_bytes=1000, heldout=50)
    (out / "meta.json").unlink()
    (out / "meta.json").mkdir()
    with pytest.raises(SharnnError, match="is a folder"):
        prepare_enwik8(out, zip_path=zip_path, expected_bytes=1000, heldout=50, overwrite=True)
    inside = out / "train.bin"
    with pytest.raises(SharnnError, match="is the input"):
        prepare_enwik8(out, zip_path=inside, expected_bytes=1000, heldout=50, overwrite=True)
    # The command line: --overwrite is the flag that allows it.
    (out / "meta.json").rmdir()
    argv = ["data", "enwik8", str(out), "--from-zip", str(zip_path)]
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err


def test_prepare_enwik8_accepts_member_in_a_folder(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "e.zip", 1000, member="data/enwik8")
    prepare_enwik8(tmp_path / "out", zip_path=zip_path, expected_bytes=1000, heldout=50)
    assert (tmp_path / "out" / "test.bin").read_bytes() == pattern(950, 50).tobytes()


def test_prepare_enwik8_refuses_wrong_size(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "e.zip", 999)
    with pytest.raises(SharnnError, match="999 bytes, expected 1,000"):
        prepare_enwik8(tmp_path / "out", zip_path=zip_path, expected_bytes=1000, heldout=50)
    assert not (tmp_path / "out" / "train.bin").exists()


def test_prepare_enwik8_refuses_zip_without_enwik8(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "e.zip", 1000, member="enwik9")
    with pytest.raises(SharnnError, match="no member named enwik8"):
        prepare_enwik8(tmp_path / "out", zip_path=zip_path, expected_bytes=1000, heldout=50)


def test_prepare_enwik8_refuses_non_zip(tmp_path: Path) -> None:
    not_zip = tmp_path / "enwik8.zip"
    not_zip.write_bytes(b"<html>404 not found</html>\n" * 20)
    with pytest.raises(SharnnError, match="not a zip"):
        prepare_enwik8(tmp_path / "out", zip_path=not_zip, expected_bytes=1000, heldout=50)


def test_prepare_enwik8_refuses_missing_zip(tmp_path: Path) -> None:
    with pytest.raises(SharnnError, match="not found"):
        prepare_enwik8(tmp_path / "out", zip_path=tmp_path / "nope.zip", expected_bytes=1000, heldout=50)


def test_prepare_enwik8_refuses_truncated_zip(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "e.zip", 1000, method=zipfile.ZIP_STORED)
    raw = zip_path.read_bytes()
    zip_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SharnnError, match="damaged or not a zip"):
        prepare_enwik8(tmp_path / "out", zip_path=zip_path, expected_bytes=1000, heldout=50)
    assert not (tmp_path / "out" / "train.bin").exists()


def test_prepare_enwik8_refuses_corrupt_member(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "e.zip", 1000, method=zipfile.ZIP_STORED)
    raw = bytearray(zip_path.read_bytes())
    at = raw.find(pattern(0, 600).tobytes()) + 500  # inside the stored data, in what becomes train.bin
    assert at > 500
    raw[at] ^= 0xFF
    zip_path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    with pytest.raises(SharnnError, match="damaged"):
        prepare_enwik8(out, zip_path=zip_path, expected_bytes=1000, heldout=50)
    assert not (out / "train.bin").exists()
    assert not list(out.glob("*.bin*"))  # no .part files left behind either


def test_prepare_enwik8_downloads_file_url(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "served.zip", 1000)
    out = tmp_path / "out"
    sizes = prepare_enwik8(out, url=src.as_uri(), expected_bytes=1000, heldout=50)
    assert sizes == {"train": 900, "valid": 50, "test": 50}
    assert (out / "enwik8.zip").read_bytes() == src.read_bytes()
    assert (out / "valid.bin").read_bytes() == pattern(900, 50).tobytes()
    assert not (out / "enwik8.zip.part").exists()


def test_prepare_enwik8_missing_url(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SharnnError, match="cannot fetch"):
        prepare_enwik8(out, url=(tmp_path / "absent.zip").as_uri(), expected_bytes=1000, heldout=50)
    assert not (out / "enwik8.zip").exists() and not (out / "enwik8.zip.part").exists()


# --- load_corpus --------------------------------------------------------------------------------------------


def test_single_file_splits_90_5_5(tmp_path: Path) -> None:
    data = pattern(7, 1000).tobytes()
    f = tmp_path / "corpus.txt"
    f.write_bytes(data)
    c = load_corpus(f)
    assert isinstance(c.train, np.memmap)
    assert bytes(c.train) == data[:900]
    assert bytes(c.valid) == data[900:950]
    assert bytes(c.test) == data[950:]
    assert c.split("valid") is c.valid
    with pytest.raises(SharnnError, match="unknown split"):
        c.split("dev")


def test_split_bytes_odd_length_covers_everything() -> None:
    data = pattern(0, 1234)
    c = split_bytes(data, "x")
    assert len(c.valid) == len(c.test) == 61
    assert np.array_equal(np.concatenate([c.train, c.valid, c.test]), data)


@pytest.mark.parametrize("ext", [".txt", ".bin", ""])
def test_folder_with_explicit_splits(tmp_path: Path, ext: str) -> None:
    for name, text in (("train", b"the training text"), ("valid", b"valid!"), ("test", b"test?")):
        (tmp_path / f"{name}{ext}").write_bytes(text)
    c = load_corpus(tmp_path)
    assert (bytes(c.train), bytes(c.valid), bytes(c.test)) == (b"the training text", b"valid!", b"test?")
    assert isinstance(c.train, np.memmap)


def test_folder_with_some_splits_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_bytes(b"x" * 1000)
    (tmp_path / "valid.txt").write_bytes(b"y" * 100)
    with pytest.raises(SharnnError, match="not test"):
        load_corpus(tmp_path)


def test_folder_of_files_concatenates_in_sorted_order(tmp_path: Path) -> None:
    parts = {"c.txt": b"C" * 300, "a.txt": b"A" * 300, "b/2.txt": b"2" * 300, "b/1.txt": b"1" * 300}
    for name, data in parts.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".hidden").write_bytes(b"H" * 300)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_bytes(b"G" * 300)
    (tmp_path / "b" / ".swp").write_bytes(b"S" * 300)
    c = load_corpus(tmp_path)
    whole = b"A" * 300 + b"1" * 300 + b"2" * 300 + b"C" * 300
    assert bytes(c.train) + bytes(c.valid) + bytes(c.test) == whole
    assert (len(c.train), len(c.valid), len(c.test)) == (1080, 60, 60)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SharnnError, match="holds no files"):
        load_corpus(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(SharnnError, match="only empty files"):
        load_corpus(tmp_path)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SharnnError, match="does not exist.*python-stdlib"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(SharnnError, match="sharnn data enwik8"):
        load_corpus(tmp_path / "data" / "enwik8")


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(SharnnError, match="empty.txt is empty"):
        load_corpus(tmp_path / "empty.txt")


def test_too_small_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_bytes(b"tiny corpus")
    with pytest.raises(SharnnError, match="11 bytes: too small"):
        load_corpus(tmp_path / "small.txt")


def test_python_stdlib_corpus_is_deterministic() -> None:
    a, b = load_corpus("python-stdlib"), load_corpus("python-stdlib")
    for name in ("train", "valid", "test"):
        assert len(a.split(name)) > 0
        assert a.split(name).tobytes() == b.split(name).tobytes(), name
    assert (len(a.train), len(a.valid), len(a.test)) == (3_600_000, 200_000, 200_000)
    assert b"def " in a.train.tobytes()


def test_python_stdlib_splits_are_ordinary_modules_from_across_the_library() -> None:
    c = load_corpus("python-stdlib")
    train, held = c.train.tobytes(), {"valid": c.valid.tobytes(), "test": c.test.tobytes()}
    for name, text in held.items():
        # not codec tables (the old test split) nor the documentation dump: Python code like the rest
        assert b"decoding_table" not in text and b"topics = {" not in text, name
        assert text.count(b"def ") > 200, name
        # whole modules that training never reads: a stretch from the middle of each is absent from train
        for start in range(10_000, 190_000, 45_000):
            assert text[start : start + 300] not in train, (name, start)
    assert len(python_stdlib_unused()) > 100  # modules left for held-out checks (benchmarks/compress.py)


# --- streams and segments -----------------------------------------------------------------------------------


def test_segment_shapes_and_contents() -> None:
    ids = pattern(0, 103)  # 4 streams of 25; the last 3 tokens are dropped
    s = Streams(ids, 4)
    assert (s.n, s.batch_size, s.num_predictions) == (25, 4, 96)
    x, y = s.segment(3, 10)
    assert x.shape == y.shape == (10, 4)
    assert x.dtype == y.dtype == torch.int64
    for b in range(4):
        assert x[:, b].tolist() == list(range(b * 25 + 3, b * 25 + 13))
        assert y[:, b].tolist() == list(range(b * 25 + 4, b * 25 + 14))
    # Near the end of the streams a segment is cut short so that every target exists.
    x, y = s.segment(20, 10)
    assert x.shape == (4, 4)
    assert y[-1].tolist() == [24, 49, 74, 99]


def test_streams_refuse_too_little_data() -> None:
    with pytest.raises(SharnnError, match="too few for 4 streams"):
        Streams(pattern(0, 7), 4)
    with pytest.raises(SharnnError, match="needs 68"):
        Streams(pattern(0, 60), 4, min_len=17)
    Streams(pattern(0, 68), 4, min_len=17)


@pytest.mark.parametrize("n_ids,bsz,bptt", [(103, 4, 10), (100, 1, 7), (1000, 3, 1000), (50, 5, 1)])
def test_eval_segments_cover_every_prediction_once(n_ids: int, bsz: int, bptt: int) -> None:
    s = Streams(pattern(0, n_ids), bsz)
    covered = []
    for i, seq_len in eval_segments(s, bptt):
        assert 1 <= seq_len <= bptt
        x, _y = s.segment(i, seq_len)
        assert x.shape == (seq_len, bsz)
        covered.extend(range(i, i + seq_len))
    assert covered == list(range(s.n - 1))
    assert len(covered) * bsz == s.num_predictions


@pytest.mark.parametrize("bptt,start", [(20, 0), (200, 0), (20, 37)])
def test_train_segments_cover_the_epoch(bptt: int, start: int) -> None:
    s = Streams(pattern(0, 4 * 1000), 4)
    segs = list(train_segments(s, bptt, np.random.default_rng(0), start=start))
    assert segs[0][0] == start
    assert sum(n for _, n in segs) == s.n - 1 - start
    for (i, n), (j, _) in itertools.pairwise(segs):
        assert j == i + n
    assert all(5 <= n <= bptt for _, n in segs[:-1])
    assert 1 <= segs[-1][1] <= bptt


def test_segment_length_distribution() -> None:
    rng = np.random.default_rng(1234)
    bptt = 200
    lengths = np.array([segment_length(rng, bptt) for _ in range(20_000)])
    assert lengths.min() >= 5 and lengths.max() == bptt
    short = lengths[lengths < bptt * 0.75]
    long = lengths[lengths >= bptt * 0.75]
    assert 0.03 <= len(short) / len(lengths) <= 0.07
    assert abs(short.mean() - bptt / 2) < 2
    assert 3 < short.std() < 7  # std 5, before rounding down
    # Normal around bptt with std 5, clamped at bptt: about half sit exactly at bptt, the rest just below.
    assert 0.4 < np.mean(long == bptt) < 0.6
    assert long.min() > bptt - 30
    assert 2 < long.std() < 5


def test_segment_length_is_seeded_and_clamped() -> None:
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert [segment_length(a, 64) for _ in range(100)] == [segment_length(b, 64) for _ in range(100)]
    rng = np.random.default_rng(0)
    assert {segment_length(rng, 5) for _ in range(500)} == {5}
    assert all(5 <= segment_length(rng, 8) <= 8 for _ in range(500))
