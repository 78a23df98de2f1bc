"""Corpora -> token ids -> parallel streams -> variable-length BPTT segments.

Byte-level corpora are kept as uint8 arrays, memory-mapped from disk where they come from a file, so an
enwik9-sized corpus costs one byte of RAM per byte at most (and only for the pages touched); segments are
converted to int64 one batch at a time.

Where a corpus can come from (`load_corpus`):
    'python-stdlib'               the Python standard library's own source, a text on every Python machine;
                                  whole modules drawn across the library by a fixed rule (python_stdlib_splits)
    DIR with train/valid/test     explicit splits: train.bin, train.txt or train (same for valid, test)
    DIR (anything else)           every file under it, in sorted path order, concatenated, then split
    FILE                          split deterministically: last 10% -> valid (first half) and test (second half)
The last rule is enwik8's standard split: for its 10^8 bytes it gives 90M / 5M / 5M.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .errors import SharnnError, require_writable_folder
from .outputs import check_new_file, refuse_input_as_output
from .vocab import BYTES, Vocab, text_lines

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000  # the first 10^8 bytes of the English Wikipedia dump of 2006-03-03
ENWIK8_HELDOUT = 5_000_000  # valid and test are 5M each, taken from the end
SPLIT_NAMES = ("train", "valid", "test")
STDLIB_CORPUS = "python-stdlib"
# Bytes per split of the built-in corpus: enough for a few CPU minutes.
STDLIB_SPLIT_BYTES = {"train": 3_600_000, "valid": 200_000, "test": 200_000}


@dataclass(frozen=True)
class Corpus:
    """Three splits of token ids (1-D arrays) and their vocabulary."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: Vocab
    name: str

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def split(self, name: str) -> np.ndarray:
        if name not in SPLIT_NAMES:
            raise SharnnError(f"unknown split {name!r}; choose train, valid or test")
        return getattr(self, name)

    @cached_property
    def identity(self) -> dict[str, Any]:
        """What a run records of its data (config.json "data"): the corpus name and each split's `split_identity`.
        Computed once (a cached_property writes the instance __dict__, which a frozen dataclass allows)."""
        return {"name": self.name, "splits": {name: self.split_identity(name) for name in SPLIT_NAMES}}

    def split_identity(self, name: str) -> dict[str, Any]:
        """`split_identity` of one split, hashed at most once per corpus."""
        known = self.__dict__.setdefault("_split_identities", {})
        if name not in known:
            known[name] = split_identity(self.split(name))
        return known[name]


def split_identity(ids: np.ndarray) -> dict[str, Any]:
    """A split's token count, id type and the SHA-256 of its ids' bytes (for a byte corpus, the SHA-256 of the
    bytes themselves, as `sha256sum` gives it for a split file). Hashed where the array lies, 16 MB at a time: a
    memory-mapped split is read from disk once, never copied into memory."""
    flat = np.ascontiguousarray(ids, dtype=ids.dtype.newbyteorder("<"))  # no copy for a little-endian split
    view = memoryview(flat).cast("B")
    h = hashlib.sha256()
    for i in range(0, len(view), 1 << 24):
        h.update(view[i : i + (1 << 24)])
    return {"tokens": len(ids), "dtype": flat.dtype.name, "sha256": h.hexdigest()}


def data_warning(recorded: dict[str, Any] | None, corpus: Corpus, splits: Iterable[str],
                 checkpoint: str) -> str | None:
    """One line saying which of `splits` differ from what `checkpoint` recorded of its training data, when
    `corpus` goes by the same name (the same --data: the python-stdlib of another Python, say, or an edited
    file); None when they match, when the names differ (other data, asked for) or when nothing was recorded
    (checkpoints written before data identities were)."""
    if not isinstance(recorded, dict) or not _same_source(str(recorded.get("name")), corpus.name):
        return None
    saved = recorded.get("splits") or {}
    changed = []
    for name in splits:
        then, now = saved.get(name), corpus.split_identity(name)  # hashed once per corpus
        if isinstance(then, dict) and then.get("sha256") != now["sha256"]:
            changed.append(f"{name} {now['tokens']:,} tokens, SHA-256 {now['sha256'][:12]} (then "
                           f"{then.get('tokens', 0):,}, {str(then.get('sha256'))[:12]})")
    if not changed:
        return None
    return (f"the data {corpus.name} is not what {checkpoint} was trained with: {'; '.join(changed)}; its "
            "numbers are not comparable with the run's (another Python version for python-stdlib, or changed "
            "files?)")


def _same_source(a: str, b: str) -> bool:
    """The same corpus name: the same spec, or two paths to the same file or folder."""
    if a == b:
        return True
    try:
        return STDLIB_CORPUS not in (a, b) and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# --- loading ------------------------------------------------------------------------------------------------


def load_corpus(spec: str | os.PathLike, vocab: Vocab | None = None, tokens: str = "auto") -> Corpus:
    """Open a corpus; see the module docstring for what `spec` may be.

    Args:
        spec: 'python-stdlib', a file, or a folder.
        vocab: a checkpoint's vocabulary: the text is mapped to its ids (and `tokens` follows it).
        tokens: 'bytes', 'words' (awd-lstm word level), 'chars' (the same layout, characters as tokens,
            reported in bpc), or 'auto': what the folder's meta.json (written by `sharnn data`) says, else bytes.
    """
    if vocab is not None and vocab.kind == "words":
        tokens = "words" if vocab.level == "word" else "chars"
    if tokens == "auto":
        tokens = _meta_tokens(spec)
        if vocab is not None and vocab.kind != "words" and tokens in ("words", "chars"):
            raise SharnnError(f"the model reads bytes but {spec} is a {tokens[:-1]}-level corpus; "
                              "evaluate it with a model trained on that corpus")
    if tokens in ("words", "chars"):
        return _load_word_corpus(Path(spec), "word" if tokens == "words" else "char", vocab)
    if tokens != "bytes":
        raise SharnnError(f"unknown --tokens {tokens!r}; use auto, bytes, words or chars")
    corpus = _load_bytes_corpus(spec)
    if vocab is None or vocab == corpus.vocab:
        return corpus
    return Corpus(vocab.encode(corpus.train), vocab.encode(corpus.valid), vocab.encode(corpus.test), vocab, corpus.name)


def _meta_tokens(spec: str | os.PathLike) -> str:
    meta = Path(spec) / "meta.json"
    if str(spec) != STDLIB_CORPUS and meta.is_file():
        try:
            return str(json.loads(meta.read_text()).get("tokens", "bytes"))
        except (ValueError, AttributeError):
            raise SharnnError(f"{meta} is not valid JSON; delete it or prepare the corpus again") from None
    return "bytes"


def _load_word_corpus(folder: Path, level: str, vocab: Vocab | None) -> Corpus:
    """awd-lstm layout: train/valid/test text files, whitespace-separated tokens, <eos> after every line."""
    if not folder.is_dir():
        raise SharnnError(f"a word-level corpus is a folder with train.txt, valid.txt and test.txt; {folder} is not")
    files = {name: _find_split_file(folder, name) for name in SPLIT_NAMES}
    if missing := [n for n, p in files.items() if p is None]:
        raise SharnnError(f"{folder} lacks {', '.join(f'{m}.txt' for m in missing)} for a word-level corpus")
    texts = {}
    for name, p in files.items():
        try:
            texts[name] = text_lines(p.read_text(encoding="utf-8"))  # type: ignore[union-attr]
        except UnicodeDecodeError as e:
            raise SharnnError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); word corpora must be "
                              "UTF-8 (a byte-level model, --tokens bytes, reads any bytes)") from None
    if vocab is None:
        vocab = Vocab.from_words(texts["train"], level)
    splits = {name: vocab.encode_lines(lines, f"the {name} split of {folder}") for name, lines in texts.items()}
    return Corpus(**splits, vocab=vocab, name=str(folder))


def _load_bytes_corpus(spec: str | os.PathLike) -> Corpus:
    if str(spec) == STDLIB_CORPUS:
        splits = {n: np.frombuffer(b, dtype=np.uint8) for n, b in python_stdlib_splits().items()}
        return Corpus(**splits, vocab=BYTES, name=STDLIB_CORPUS)
    path = Path(spec)
    if not path.exists():
        hint = " (fetch it with `sharnn data enwik8 DIR`)" if "enwik8" in str(spec) else ""
        raise SharnnError(
            f"data path {path} does not exist{hint}; pass --data FILE|DIR, or --data {STDLIB_CORPUS} for the "
            "built-in corpus"
        )
    if path.is_dir():
        explicit = {name: _find_split_file(path, name) for name in SPLIT_NAMES}
        if all(explicit.values()):
            splits = {name: _map_bytes(p) for name, p in explicit.items()}  # type: ignore[arg-type]
            return Corpus(**splits, vocab=BYTES, name=str(path))
        if any(explicit.values()):
            missing = [n for n, p in explicit.items() if p is None]
            raise SharnnError(f"{path} has some split files but not {', '.join(missing)}: give all three or none")
        return split_bytes(_read_tree(path), str(path))
    return split_bytes(_map_bytes(path), str(path))


def _find_split_file(folder: Path, name: str) -> Path | None:
    for candidate in (f"{name}.bin", f"{name}.txt", name):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _map_bytes(path: Path) -> np.ndarray:
    """Memory-map a file as uint8 (no copy into RAM)."""
    if os.path.getsize(path) == 0:
        raise SharnnError(f"corpus file {path} is empty")
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise SharnnError(f"cannot read corpus file {path}: {e.strerror}") from None


def _read_tree(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise SharnnError(f"corpus folder {folder} holds no files")
    data = b"".join(p.read_bytes() for p in files)
    if not data:
        raise SharnnError(f"corpus folder {folder} holds only empty files")
    return np.frombuffer(data, dtype=np.uint8)


def split_bytes(data: np.ndarray, name: str, heldout_fraction: float = 0.1) -> Corpus:
    """Split one byte array: the last `heldout_fraction` is halved into valid then test (enwik8's rule)."""
    n = len(data)
    if n == 0:
        raise SharnnError(f"corpus {name} is empty")
    half = int(n * heldout_fraction / 2)
    if half < 2:
        raise SharnnError(
            f"corpus {name} has only {n} bytes: too small to split into train/valid/test; "
            "give a larger file or a folder with train/valid/test files"
        )
    return Corpus(data[: n - 2 * half], data[n - 2 * half : n - half], data[n - half :], BYTES, name)


def python_stdlib_files() -> list[Path]:
    """The standard library's .py sources (tests and site-packages left out), in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # never walk into installed packages
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def python_stdlib_order() -> list[Path]:
    """The files the python-stdlib corpus draws from, in its fixed pseudo-random order.

    Generated data is left out: `encodings/` (codec tables) and `pydoc_data/` (a dump of the documentation), which
    are not representative Python. The order is by SHA-256 of each file's path relative to the library, so a
    file's place does not depend on which other files this Python version has, and every split below is a sample
    of whole modules from across the library (not one alphabetical stretch of it).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    generated = {"encodings", "pydoc_data"}
    files = [p for p in python_stdlib_files() if p.relative_to(root).parts[0] not in generated]
    return sorted(files, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())


def python_stdlib_splits(sizes: dict[str, int] = STDLIB_SPLIT_BYTES) -> dict[str, bytes]:
    """The python-stdlib corpus: whole files in `python_stdlib_order()`, filling valid, then test, then train.

    Each split takes files until it holds its size in bytes (its last file cut there); the files after the
    corpus (`python_stdlib_unused()`) are held out of all three.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = iter(python_stdlib_order())
    splits: dict[str, bytes] = {}
    for name in ("valid", "test", "train"):
        out = bytearray()
        for p in files:
            out += p.read_bytes()
            if len(out) >= sizes[name]:
                break
        if len(out) < sizes[name] // 2:
            raise SharnnError(f"found too little Python source under {root} to use --data {STDLIB_CORPUS}")
        splits[name] = bytes(out[: sizes[name]])
    return splits


def python_stdlib_unused(sizes: dict[str, int] = STDLIB_SPLIT_BYTES) -> list[Path]:
    """The files of `python_stdlib_order()` that no split of the python-stdlib corpus reads: held-out text."""
    seen, order = 0, python_stdlib_order()
    for i, p in enumerate(order):
        seen += len(p.read_bytes())
        if seen >= sum(sizes.values()):
            return order[i + 1 :]
    return []


# --- batching -----------------------------------------------------------------------------------------------


class Streams:
    """A split cut into `batch_size` contiguous streams, read as (T, B) segments.

    Stream b is ids[b*n : (b+1)*n] with n = len(ids) // batch_size; the leftover tail is dropped, as in the
    reference. Nothing is copied until a segment is read. With `world` > 1 the split is cut into
    batch_size * world streams and this process (`rank`) reads its own contiguous `batch_size` of them, so the
    ranks together see exactly what one process with the combined batch would.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, *, min_len: int = 2, what: str = "split",
                 rank: int = 0, world: int = 1):
        total = batch_size * world
        n = len(ids) // total
        if n < min_len:
            raise SharnnError(
                f"the {what} has {len(ids):,} tokens: too few for {total} streams of at least {min_len} "
                f"(needs {total * min_len:,}); use a smaller --batch_size or --bptt, or more data"
            )
        # (B, n): this rank's streams; a view of a memmap stays one
        self.view = ids[: n * total].reshape(total, n)[rank * batch_size : (rank + 1) * batch_size]
        self.n = n
        self.batch_size = batch_size

    def segment(self, i: int, seq_len: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, both (T, B) int64, for positions i .. i+T-1 of every stream."""
        seq_len = min(seq_len, self.n - 1 - i)
        chunk = torch.from_numpy(np.array(self.view[:, i : i + seq_len + 1])).long()  # (B, T+1), a copy
        chunk = chunk.t().contiguous()
        if torch.device(device).type == "cuda":
            # Page-locked host memory lets the copy run asynchronously: the GPU's work on the previous
            # segment is not stalled by it.
            chunk = chunk.pin_memory()
        chunk = chunk.to(device, non_blocking=True)
        return chunk[:-1], chunk[1:]

    @property
    def num_predictions(self) -> int:
        return (self.n - 1) * self.batch_size


def segment_length(rng: np.random.Generator, bptt: int) -> int:
    """The paper's variable BPTT: mean `bptt` (p=0.95) or `bptt/2`, normal with std 5, clamped to [5, bptt]."""
    mean = bptt if rng.random() < 0.95 else bptt / 2
    return int(min(bptt, max(5, int(rng.normal(mean, 5)))))


def train_segments(streams: Streams, bptt: int, rng: np.random.Generator, start: int = 0) -> Iterator[tuple[int, int]]:
    """Yield (position, length) of one epoch's segments from `start`, lengths drawn from `rng` as needed."""
    i = start
    while i < streams.n - 1:
        seq_len = min(segment_length(rng, bptt), streams.n - 1 - i)
        yield i, seq_len
        i += seq_len


def eval_segments(streams: Streams, bptt: int) -> Iterator[tuple[int, int]]:
    """Fixed-length segments covering every prediction of the streams once, in order."""
    for i in range(0, streams.n - 1, bptt):
        yield i, min(bptt, streams.n - 1 - i)


# --- enwik8 -------------------------------------------------------------------------------------------------


def prepare_enwik8(
    out_dir: str | os.PathLike,
    zip_path: str | os.PathLike | None = None,
    url: str = ENWIK8_URL,
    expected_bytes: int = ENWIK8_BYTES,
    heldout: int = ENWIK8_HELDOUT,
    overwrite: bool = False,
) -> dict[str, int]:
    """Fetch (unless `zip_path`), check and unpack enwik8.zip into train.bin, valid.bin, test.bin.

    The zip's own CRC-32 and the exact unpacked size are checked, so a truncated or wrong file is refused.
    Split files (and meta.json) already in `out_dir` are replaced only with `overwrite`. Returns the split sizes
    in bytes.
    """
    out = Path(out_dir)
    _check_outputs(out, [f"{name}.bin" for name in SPLIT_NAMES], overwrite, zip_path)
    zip_path = _archive_in(out, zip_path, url, "enwik8.zip")
    sizes = {"train": expected_bytes - 2 * heldout, "valid": heldout, "test": heldout}
    sha = hashlib.sha256()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            info = next((i for i in zf.infolist() if Path(i.filename).name == "enwik8"), None)
            if info is None:
                raise SharnnError(f"{zip_path} has no member named enwik8; is it enwik8.zip?")
            if info.file_size != expected_bytes:
                raise SharnnError(
                    f"{zip_path}: enwik8 inside is {info.file_size:,} bytes, expected {expected_bytes:,}; "
                    "delete it and fetch it again"
                )
            with zf.open(info) as src:
                for name, size in sizes.items():
                    tmp = out / f"{name}.bin.part"
                    with open(tmp, "wb") as dst:
                        left = size
                        while left:
                            buf = src.read(min(left, 1 << 22))
                            if not buf:
                                raise SharnnError(f"{zip_path} ended early; delete it and fetch it again")
                            dst.write(buf)
                            sha.update(buf)
                            left -= len(buf)
                src.read()  # reading to the end makes zipfile check the CRC-32 of the whole member
    except BaseException as e:
        for name in sizes:  # never leave half-written splits behind
            (out / f"{name}.bin.part").unlink(missing_ok=True)
        if isinstance(e, (zipfile.BadZipFile, EOFError, zlib.error)):
            raise SharnnError(f"{zip_path} is damaged or not a zip file ({e}); delete it and fetch it again") from None
        raise
    for name in sizes:
        os.replace(out / f"{name}.bin.part", out / f"{name}.bin")
    meta = {"source": "enwik8", "format": "bytes", "sha256": sha.hexdigest(), "sizes": sizes}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return sizes


# --- awd-lstm corpora (Penn Treebank, WikiText) ---------------------------------------------------------------

# name: (archive address, tokens, {split: file name inside the archive})
AWD_CORPORA = {
    "ptb": ("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz", "words",
            {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}),
    "ptb-char": ("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz", "chars",
                 {"train": "ptb.char.train.txt", "valid": "ptb.char.valid.txt", "test": "ptb.char.test.txt"}),
    "wikitext-2": ("https://wikitext.smerity.com/wikitext-2-v1.zip", "words",
                   {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}),
    "wikitext-103": ("https://wikitext.smerity.com/wikitext-103-v1.zip", "words",
                     {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}),
}


def prepare_awd(name: str, out_dir: str | os.PathLike, archive: str | os.PathLike | None = None,
                url: str | None = None, overwrite: bool = False) -> dict[str, int]:
    """Fetch (unless `archive`) a word or character corpus and write train.txt, valid.txt, test.txt, meta.json.

    Like the awd-lstm getdata script; only the three split files are read out of the archive (nothing is
    extracted to disk under the archive's own paths). Split files (and meta.json) already in `out_dir` are
    replaced only with `overwrite`. Returns the split sizes in bytes.
    """
    default_url, tokens, members = AWD_CORPORA[name]
    out = Path(out_dir)
    _check_outputs(out, [f"{split}.txt" for split in SPLIT_NAMES], overwrite, archive)
    archive = _archive_in(out, archive, url or default_url, Path(url or default_url).name)
    wanted = {v: k for k, v in members.items()}
    found: dict[str, bytes] = {}
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if (base := Path(info.filename).name) in wanted and base not in found:
                        found[base] = zf.read(info)
        else:
            with tarfile.open(archive) as tf:
                for m in tf:
                    if m.isfile() and (base := Path(m.name).name) in wanted and base not in found:
                        found[base] = tf.extractfile(m).read()  # type: ignore[union-attr]
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise SharnnError(f"{archive} is damaged or not a zip/tar archive ({e}); delete it and fetch it again") from None
    if missing := [m for m in members.values() if m not in found]:
        raise SharnnError(f"{archive} has no {', '.join(missing)}; is it the {name} archive?")
    sizes = {}
    for member, data in found.items():
        split = wanted[member]
        tmp = out / f"{split}.txt.part"
        tmp.write_bytes(data)
        os.replace(tmp, out / f"{split}.txt")
        sizes[split] = len(data)
    (out / "meta.json").write_text(json.dumps({"source": name, "tokens": tokens, "sizes": sizes}, indent=2) + "\n")
    return {k: sizes[k] for k in SPLIT_NAMES}


def _check_outputs(out: Path, splits: list[str], overwrite: bool, archive: str | os.PathLike | None) -> None:
    """The files `sharnn data` writes in `out` (the splits and meta.json): replaced only with `overwrite` (the
    rule of sharnn.outputs), never the archive being read; checked before anything is fetched."""
    targets = [out / name for name in [*splits, "meta.json"]]
    if archive is not None:
        for t in targets:
            refuse_input_as_output(t, archive)
    if out.is_dir():
        for t in targets:
            check_new_file(t, overwrite=True)  # a folder under a split's name is never replaced
        if (there := [t.name for t in targets if t.exists() or t.is_symlink()]) and not overwrite:
            raise SharnnError(f"{out} already holds {', '.join(there)}; pass --overwrite to replace them, or give "
                              "another folder")


def _archive_in(out: Path, given: str | os.PathLike | None, url: str, name: str) -> Path:
    """Create `out`; return the archive `given`, or out/`name`, fetched from `url` if not there yet."""
    require_writable_folder(out, "choose another folder")
    path = Path(given) if given is not None else out / name
    if given is None and not path.exists():
        download(url, path)
    if not path.is_file():
        raise SharnnError(f"{path} not found")
    return path


def download(url: str, dest: Path) -> None:
    """Stream `url` to `dest` (through a .part file), refusing a transfer shorter than announced."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total = r.headers.get("Content-Length")
            total = int(total) if total else None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetching {dest.name}") as bar:
                while buf := r.read(1 << 20):
                    f.write(buf)
                    got += len(buf)
                    bar.update(len(buf))
        if total is not None and got != total:
            raise SharnnError(f"download of {url} stopped after {got:,} of {total:,} bytes; run the command again")
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: not a URL at all
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise SharnnError(f"cannot fetch {url}: {reason}; or download it yourself and pass --from-zip PATH") from None
    except SharnnError:
        part.unlink(missing_ok=True)
        raise
    shutil.move(part, dest)
