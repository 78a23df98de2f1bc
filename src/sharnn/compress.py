"""Lossless compression with the model: every byte is range-coded under the model's prediction of it.

A byte-level language model that predicts the next byte with probability p lets a range coder spend about
-log2 p bits on it, so the file shrinks to roughly the model's cross-entropy on it. The coder is `constriction`'s
`RangeEncoder`/`RangeDecoder` (a well-kept library, never a hand-written coder).

Streams. The L input bytes are cut into S streams of n = ceil(L / S) bytes (the last may be shorter); stream s is
bytes [s*n, (s+1)*n). Step t feeds every stream's byte t-1 (a newline before its first byte) to the model as one
batch of S one-byte segments and codes every stream's byte t, streams in order, into one range code. A batch of
S costs little more than one stream, so throughput grows with S; each stream starts without context, so S is
also capped at one per 4 KiB of input. Every `block_steps` steps the code is sealed and written out: memory
stays bounded whatever the file's size.

Stored blocks. Where the model predicts a block worse than storing it would (random bytes, or text unlike anything
it knows), the block is written raw instead of its range code, as xz and zstd do: no input grows by more than the
header, the trailer and 4 bytes per block. The model still reads every byte of a stored block, on both sides, so
its state (and with `--adapt` its learning) stays the same in the encoder and the decoder.

`--adapt`: after every `bptt` steps the model takes a dynamic-evaluation step (`sharnn.dynamic`, with running
gradient statistics) on the S x bptt bytes just coded. The decoder has the same bytes at the same moment and
takes the same step, so the two stay in lockstep; from a fresh (untrained) model this is learning from nothing.

Determinism. The decoder must see exactly the probabilities the encoder saw. Both run the same computation: the
same model (its weights' SHA-256 is in the header), the same S, one byte per step, the same torch thread count
(recorded), in float32 on the CPU; the probabilities are then quantised to integers (`quantise`) before coding.
Floating point results can differ between CPU instruction sets and torch versions, so a file decodes on a
machine with the same architecture, the same instruction set torch uses (`torch.backends.cpu.
get_cpu_capability()`, e.g. AVX2), the same torch version and the same constriction version as the machine that
wrote it. Those are in the header and checked; `--ignore-machine` tries anyway. Whatever happens, the decoded
bytes are checked against the original's SHA-256 before the output file appears: a mismatch is an error, never
a wrong file.

File layout (format version 2; integers little-endian):
    8 bytes   MAGIC
    u16       format version
    u32       header length H, then H bytes of JSON (see `_header`)
    blocks    ceil(n / block_steps) of them: u32 word count W, then W u32 words of range code; or u32 STORED,
              then the block's bytes as they are, stream after stream (the decoder knows how many)
    32 bytes  SHA-256 of everything before it (a damaged file is refused before any decoding)
Version 1 is the same without stored blocks; it still decodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .config import SHARNNConfig, load_config_file, load_preset, preset_names, split_settings
from .dynamic import DynamicConfig, DynamicEval
from .errors import SharnnError
from .model import SHARNN, parameter_count
from .optim import WeightSnapshot
from .outputs import refuse_input_as_output, sha256_file
from .runtime import attention_bytes, require_memory
from .state import State
from .vocab import Vocab, vocab_of

if TYPE_CHECKING:  # Python 3.10 has no typing.Self; annotations are not evaluated at run time
    from typing_extensions import Self

MAGIC = b"\x93SHARNNZ"  # a non-ASCII first byte, as PNG's: a file mangled as text shows at once
VERSION = 2
READS = (1, 2)  # the format versions this sharnn decodes (1: no stored blocks)
STORED = 0xFFFF_FFFF  # in place of a block's word count: the block's bytes follow raw (no real count comes near)
PRECISION = 24  # probabilities are integers out of 2^24, constriction's default precision for its range coder
START = 10  # the byte fed before each stream's first: a newline, "the start of a line" (as `sharnn score`)
MIN_STREAM_BYTES = 4096  # a stream starts without context: fewer, longer streams for small files
FRESH_ADAPT = DynamicConfig(lr=2e-3, decay=0.0, bptt=32)  # from nothing: learn fast, nothing to return to
TRAINED_ADAPT = DynamicConfig(lr=1e-3, decay=0.001, bptt=32)  # a trained model: smaller steps, pulled back
BETA = 0.999  # the running gradient statistics' decay (RMSprop, Adam's beta2)


def adapt_config(fresh: bool, lr: float | None = None, decay: float | None = None,
                 bptt: int | None = None) -> DynamicConfig:
    """`--adapt`'s settings: the given ones, the rest from FRESH_ADAPT or TRAINED_ADAPT."""
    base = FRESH_ADAPT if fresh else TRAINED_ADAPT
    given = {"lr": lr, "decay": decay, "bptt": bptt}
    return replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class CoderSettings:
    """What the encoder chooses and the decoder must repeat; written into the header."""

    streams: int = 32  # at most this many streams; fewer for small files (MIN_STREAM_BYTES each)
    threads: int = 1  # torch threads; the decoder uses the same number
    block_steps: int = 4096  # steps between sealed blocks of code (memory: streams x block_steps bytes)
    adapt: DynamicConfig | None = None  # learn while coding (see the module docstring)

    def __post_init__(self) -> None:
        if self.streams < 1 or self.threads < 1 or self.block_steps < 1:
            raise SharnnError("--streams, --threads and the block length must be at least 1")


class CodingResult(NamedTuple):
    length: int  # bytes of the original
    compressed: int  # bytes of the compressed file, header included
    model_bits: float  # the model's cross-entropy on the original, in bits: what ideal coding would cost
    streams: int
    seconds: float  # coding time (model loading not included)
    blocks: int = 0
    stored: int = 0  # blocks written raw: the model would have made them larger

    @property
    def bits_per_byte(self) -> float:
        return 8 * self.compressed / self.length if self.length else float("nan")

    @property
    def kb_per_s(self) -> float:
        return self.length / 1024 / max(self.seconds, 1e-9)


# --- the model, and what identifies it ------------------------------------------------------------------------


def fresh_model(spec: str, seed: int = 0) -> tuple[SHARNN, dict[str, Any]]:
    """An untrained model: the model settings of a preset (`tiny`, `paper`, ...) or of a TOML/JSON config file,
    initialised from `seed`, reading bytes. Same spec, seed and torch version: the same weights.

    Returns the model and what the compressed file's header says about it (the decoder rebuilds it from that).
    """
    settings = load_preset(spec) if spec in preset_names() else load_config_file(spec)
    cfg = SHARNNConfig.from_dict(split_settings(settings)[0])
    return _build(cfg, seed), {"spec": spec, "seed": seed, "config": cfg.to_dict()}


def _build(cfg: SHARNNConfig, seed: int) -> SHARNN:
    if cfg.vocab_size != 256 or cfg.uses_adaptive_softmax:
        raise SharnnError("a fresh model for compression reads bytes: its vocab_size must be 256")
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        model = SHARNN(cfg)
    return model.eval()


def weights_sha256(model: SHARNN) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def machine() -> dict[str, str]:
    """What decides whether two machines compute the model bit for bit alike (see the module docstring)."""
    try:
        constriction_version = metadata.version("constriction")
    except metadata.PackageNotFoundError:
        constriction_version = "none"
    from . import __version__  # a later sharnn may compute the model's steps differently

    return {"arch": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "constriction": constriction_version, "sharnn": __version__}


def _cpu_name() -> str:
    """The CPU's model name, for messages only."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _constriction() -> Any:
    try:
        import constriction
    except ImportError:
        raise SharnnError("compression needs the constriction package (pip install constriction; it has wheels for "
                          "Linux x86_64, macOS and Windows x86_64)") from None
    return constriction


# --- the computation both sides run ---------------------------------------------------------------------------


def quantise(probs: np.ndarray) -> np.ndarray:
    """(S, V) float probabilities -> (S, V) integers >= 1 summing to exactly 2^PRECISION, as float64.

    Integer arithmetic after one float multiply, so the encoder and decoder agree whenever the model's floats do;
    every byte keeps a nonzero share (a byte the model rules out, even with a float probability of exactly 0,
    still costs at most PRECISION bits). constriction takes the counts as floats (exactly representable) and
    rescales them, the same way on both sides. Non-finite probabilities are refused (`_Predictor.predict` stops
    before they get here).
    """
    if not np.isfinite(probs).all():
        raise SharnnError("the model's probabilities are not finite (NaN or infinite); they cannot be coded")
    S, V = probs.shape
    total = 1 << PRECISION
    q = np.floor(probs.astype(np.float64) * (total - V)).astype(np.int64) + 1
    top = q.argmax(axis=1)
    q[np.arange(S), top] += total - q.sum(axis=1)  # the rounding remainder goes to the likeliest byte
    return q.astype(np.float64)


class _Predictor:
    """The model side of coding: one byte per stream per step, and the adaptation steps."""

    def __init__(self, model: SHARNN, streams: int, adapt: DynamicConfig | None):
        self.model = model.eval()
        self.S = streams
        require_memory(attention_bytes(model.cfg, streams), f"attn_span {model.cfg.attn_span:,}: the attention memory "
                       f"of {streams} streams", "cpu")
        self.state: State = model.ring_state(model.initial_state(streams))
        self.prev = np.full(streams, START, dtype=np.int64)
        self.learner = DynamicEval(model, adapt, rms=None, beta=BETA) if adapt else None
        self.bptt = adapt.bptt if adapt else 0
        self.inputs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.segment_state: State | None = None
        self.steps = 0

    @torch.no_grad()
    def predict(self) -> tuple[np.ndarray, np.ndarray]:
        """(S, V) float32 probabilities of every stream's next byte, which are coded, and (S, V) float64
        log2-probabilities, which measure the model's cross-entropy (finite where a probability underflows to 0).

        Stops with a SharnnError when the model's outputs are not finite: a model that diverged, under --adapt
        usually; its probabilities would be garbage to the coder.
        """
        if self.learner is not None and not self.inputs:
            self.segment_state = self.model.ordered_state(self.state)  # where the segment's learning starts
        out = self.model(torch.from_numpy(self.prev).view(1, self.S), self.state)
        self.state = out.state
        logits = out.logits[0].float()
        p = torch.softmax(logits, dim=-1).numpy()
        if not np.isfinite(p).all():
            cause = ""
            if self.learner is not None:
                cause = (f" (the model diverged under --adapt, {self.learner.steps} step(s) in: try a smaller "
                         "--adapt-lr)")
            raise SharnnError(f"the model's predictions became NaN or infinite after {self.steps:,} bytes per "
                              f"stream{cause}; nothing was written")
        self.steps += 1
        return p, (torch.log_softmax(logits.double(), dim=-1) / math.log(2)).numpy()

    def advance(self, symbols: np.ndarray, active: np.ndarray) -> None:
        """Every stream's coded byte of this step (S,), with `active` (S,) False where a stream has ended."""
        x = self.prev
        self.prev = np.where(active, symbols, 0).astype(np.int64)
        if self.learner is None:
            return
        self.inputs.append(x)
        self.targets.append(np.where(active, symbols, -100).astype(np.int64))  # -100: cross_entropy ignores it
        if len(self.inputs) == self.bptt:
            x, y = torch.from_numpy(np.stack(self.inputs)), torch.from_numpy(np.stack(self.targets))  # (T, S)
            self.inputs, self.targets = [], []
            if (y >= 0).any():
                with torch.enable_grad():
                    loss = self.model(x, self.segment_state, targets=y).loss
                self.learner.learn(loss)


def _block_bytes(block: np.ndarray, lengths: np.ndarray, t0: int, t1: int) -> bytes:
    """A block's bytes as a stored block holds them: each stream's part of steps t0..t1, stream after stream.

    Args:
        block: (S, t1 - t0) the block's bytes, zero past a stream's end; lengths: (S,) bytes in each stream.
    """
    ends = np.clip(lengths - t0, 0, t1 - t0)
    return b"".join(block[s, : ends[s]].astype(np.uint8).tobytes() for s in range(len(lengths)))


def _stream_lengths(length: int, streams: int, n: int) -> np.ndarray:
    """Bytes in each of `streams` streams of `n` (the last one shorter)."""
    return np.array([min(n, length - s * n) for s in range(streams)])


def _bar(length: int, what: str, progress: bool) -> tqdm:
    """A KB/s progress bar on a terminal (tqdm's own check), none when `progress` is off."""
    return tqdm(total=length, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if progress else True, leave=False)


def _stream_layout(length: int, max_streams: int) -> tuple[int, int]:
    """(streams S, stream length n) for `length` bytes: n = ceil(length / S), no stream empty."""
    if length == 0:
        return 0, 0
    S = max(1, min(max_streams, length // MIN_STREAM_BYTES))
    n = -(-length // S)
    return -(-length // n), n


# --- files ----------------------------------------------------------------------------------------------------


class _Output:
    """A file written under a temporary name beside `path` and renamed into place only by `commit`."""

    def __init__(self, path: Path, overwrite: bool):
        if path.exists() and not overwrite:
            raise SharnnError(f"{path} exists; pass --overwrite to replace it")
        if path.is_dir():
            raise SharnnError(f"{path} is a folder; give a file name")
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            self.file: BinaryIO = open(self.tmp, "w+b")  # noqa: SIM115 - closed by commit/discard
        except OSError as e:
            raise SharnnError(f"cannot write {path}: {e.strerror}") from None

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Anything that stops the writing before `commit` (an error, Ctrl-C) leaves no file behind; a failed
        write is one line."""
        if exc is None:
            return
        self.discard()
        if isinstance(exc, OSError):
            raise SharnnError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def _open_input(path: Path) -> tuple[np.ndarray, int]:
    try:
        length = path.stat().st_size
        if path.is_dir():
            raise SharnnError(f"{path} is a folder; give a file")
        data = np.memmap(path, dtype=np.uint8, mode="r") if length else np.zeros(0, dtype=np.uint8)
    except OSError as e:
        raise SharnnError(f"cannot read {path}: {e.strerror}") from None
    return data, length


class _HashingWriter:
    """Writes to a file and hashes what it wrote (for the trailer)."""

    def __init__(self, f: BinaryIO):
        self.f, self.h = f, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.h.update(data)


def _header(length: int, original_sha: str, streams: int, n: int, settings: CoderSettings, model: SHARNN,
            fresh: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "length": length,  # bytes of the original
        "sha256": original_sha,  # of the original: the decoded bytes must match it
        "streams": streams,
        "stream_length": n,
        "block_steps": settings.block_steps,
        "threads": settings.threads,
        "precision": PRECISION,
        "start": START,
        "adapt": None if settings.adapt is None else {**asdict(settings.adapt), "beta": BETA},
        "model": {"weights_sha256": weights_sha256(model), "fresh": fresh},
        "machine": machine(),
        "cpu": _cpu_name(),  # informational
    }


# --- compress ---------------------------------------------------------------------------------------------------


def compress_file(model: SHARNN, src: str | os.PathLike, dst: str | os.PathLike, settings: CoderSettings,
                  fresh: dict[str, Any] | None = None, progress: bool = False, overwrite: bool = False,
                  vocab: Vocab | None = None) -> CodingResult:
    """Compress file `src` into `dst` with `model` (unchanged afterwards, also with `settings.adapt`).

    Args:
        vocab: the checkpoint's vocabulary (it must be bytes); by default the model's own (sharnn.vocab.vocab_of).
        fresh: for an untrained model, {"config": SHARNNConfig dict, "seed": int}: written into the header so
            that the decoder can rebuild it (see `fresh_model`); None for a trained model's checkpoint.
    """
    src, dst = Path(src), Path(dst)
    _check_model(model, vocab)
    refuse_input_as_output(dst, src)  # the same file by any name: a link, a hard link, `..`
    data, length = _open_input(src)
    cs = _constriction()
    streams, n = _stream_layout(length, settings.streams)
    original_sha = sha256_file(src)
    with _Output(dst, overwrite) as out:
        with _threads(settings.threads), _restored(model):
            start = time.perf_counter()
            w = _HashingWriter(out.file)
            head = json.dumps(_header(length, original_sha, streams, n, settings, model, fresh)).encode()
            w.write(MAGIC + struct.pack("<HI", VERSION, len(head)) + head)
            predictor = _Predictor(model, streams, settings.adapt) if streams else None
            lengths = _stream_lengths(length, streams, n)
            encoder = cs.stream.queue.RangeEncoder()
            family = cs.stream.model.Categorical(perfect=False)
            bits, blocks, stored = 0.0, 0, 0
            bar = _bar(length, "compress", progress)
            for t0 in range(0, n, settings.block_steps):
                t1 = min(n, t0 + settings.block_steps)
                block = np.zeros((streams, t1 - t0), dtype=np.int64)
                for s in range(streams):
                    a, b = s * n + t0, min(s * n + t1, length)
                    if b > a:
                        block[s, : b - a] = data[a:b]
                code = partial(_encode_column, encoder, family)
                bits += _code_block(predictor, block, lengths, t0, code, bar)  # type: ignore[arg-type]
                words = encoder.get_compressed().astype("<u4")
                raw = _block_bytes(block, lengths, t0, t1)
                blocks += 1
                if 4 * len(words) < len(raw):
                    w.write(struct.pack("<I", len(words)) + words.tobytes())
                else:  # the model does worse than storing: the bytes as they are (the model has read them all)
                    w.write(struct.pack("<I", STORED) + raw)
                    stored += 1
                encoder = cs.stream.queue.RangeEncoder()  # a new one: clear() after sealing leaves state behind
            bar.close()
            out.file.write(w.h.digest())
            seconds = time.perf_counter() - start
        size = out.file.tell()
        out.commit()
    return CodingResult(length, size, bits, streams, seconds, blocks, stored)


def _check_model(model: SHARNN, vocab: Vocab | None) -> None:
    if model.cfg.vocab_size != 256 or (kind := vocab_of(model, vocab).kind) != "bytes":
        kind = "" if model.cfg.vocab_size != 256 else f"{kind} "
        raise SharnnError("compression needs a byte-level model (256 symbols, every byte value); this one reads "
                          f"a {kind}vocabulary of {model.cfg.vocab_size} symbols")
    if model.encoder.weight.dtype != torch.float32 or model.encoder.weight.device.type != "cpu":
        raise SharnnError("compression runs the model in float32 on the CPU (so that the decoder can repeat it)")


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads, then put the previous number back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _restored(model: SHARNN) -> Iterator[None]:
    """The model's weights (and train/eval mode) as they were on entry, whatever adaptation did meanwhile."""
    was_training = model.training
    saved = WeightSnapshot(model.parameters())
    try:
        yield
    finally:
        saved.restore()
        model.train(was_training)


# --- decompress -------------------------------------------------------------------------------------------------


class Compressed(NamedTuple):
    """A compressed file's header, read and checked (`read_header`)."""

    header: dict[str, Any]
    body_start: int  # offset of the first block
    body_end: int  # offset of the trailer
    version: int = VERSION  # the file's format version (one of READS)


def read_header(path: str | os.PathLike) -> Compressed:
    """Check magic, version and the trailer's SHA-256; parse the header. Any problem: one clear SharnnError."""
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise SharnnError(f"cannot read {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(14)
        if len(head) < 14 or head[:8] != MAGIC:
            raise SharnnError(f"{path} is not a file made by `sharnn compress`")
        version, hlen = struct.unpack("<HI", head[8:14])
        if version not in READS:
            raise SharnnError(f"{path} is in compressed-file format version {version}; this sharnn reads versions "
                              f"{', '.join(map(str, READS))} only: decompress it with the sharnn that wrote it")
        if size < 14 + hlen + 32 or sha256_file(f, size - 32) != f.read(32).hex():
            raise SharnnError(f"{path} is damaged: its checksum does not match its contents")
        f.seek(14)
        try:
            header = json.loads(f.read(hlen).decode())
        except (ValueError, UnicodeDecodeError):
            raise SharnnError(f"{path} is damaged: its header is not readable") from None
    return Compressed(header, 14 + hlen, size - 32, version)


def decompress_file(src: str | os.PathLike, dst: str | os.PathLike, model: SHARNN | None,
                    ignore_machine: bool = False, progress: bool = False, overwrite: bool = False,
                    checkpoint_name: str = "the checkpoint", vocab: Vocab | None = None) -> CodingResult:
    """Decompress `src` into `dst`. `model`: the checkpoint's model (`vocab`: its vocabulary, as for
    `compress_file`), or None for a file whose header says it was made from a fresh model. `dst` appears only
    once the decoded bytes match the original's SHA-256."""
    src, dst = Path(src), Path(dst)
    refuse_input_as_output(dst, src)  # --overwrite replaces OUT, never the compressed file being read
    info = read_header(src)
    h = info.header
    settings = _header_settings(src, h)
    model = _decoding_model(src, dst, h, model, checkpoint_name, vocab)
    here = machine()
    if h["machine"] != here and not ignore_machine:
        diff = ", ".join(f"{k} {h['machine'].get(k)} there, {here[k]} here" for k in here
                         if h["machine"].get(k) != here[k])
        raise SharnnError(f"{src} was compressed on another kind of machine or by another sharnn ({diff}; "
                          f"{h.get('cpu')}): the model's arithmetic may differ, so it decodes only where these match "
                          "(--ignore-machine tries anyway; a wrong result is still never written)")
    length, streams = int(h["length"]), int(h["streams"])
    with _Output(dst, overwrite) as out:
        with _threads(settings.threads), _restored(model), open(src, "rb") as f:
            start = time.perf_counter()
            f.seek(info.body_start)
            bits, blocks, stored = _decode_blocks(f, out.file, src, info, model, settings, progress)
            seconds = time.perf_counter() - start
        out.file.flush()
        if out.file.seek(0, os.SEEK_END) != length or sha256_file(out.file) != h["sha256"]:
            raise SharnnError(_not_the_original(src, h, "its SHA-256 differs"))
        out.commit()
    return CodingResult(length, info.body_end + 32, bits, streams, seconds, blocks, stored)


def _header_settings(src: Path, h: dict[str, Any]) -> CoderSettings:
    """The coder settings a compressed file's header records, refused in one line when damaged or foreign."""
    try:
        settings = CoderSettings(streams=max(int(h["streams"]), 1), threads=int(h["threads"]),
                                 block_steps=int(h["block_steps"]),
                                 adapt=None if h["adapt"] is None else DynamicConfig(
                                     **{k: v for k, v in h["adapt"].items() if k != "beta"}))
        _ = int(h["length"]), int(h["stream_length"]), h["model"]["fresh"], h["model"]["weights_sha256"]
        if h["precision"] != PRECISION or h["start"] != START or (h["adapt"] and h["adapt"]["beta"] != BETA):
            raise SharnnError(f"{src} was written with coder settings this sharnn does not have; decompress it with "
                              "the sharnn that wrote it")
    except (KeyError, TypeError, ValueError):
        raise SharnnError(f"{src} is damaged or from an incompatible sharnn: its header lacks required fields") from None
    return settings


def _decoding_model(src: Path, dst: Path, h: dict[str, Any], model: SHARNN | None,
                    checkpoint_name: str, vocab: Vocab | None) -> SHARNN:
    """The model the file was compressed with: `model` (a checkpoint's), or the fresh one its header describes;
    refused in one line when it is not the one whose weights the header names."""
    fresh, want_weights = h["model"]["fresh"], h["model"]["weights_sha256"]
    if fresh is not None and model is not None:
        raise SharnnError(f"{src} was compressed from a fresh model ({fresh.get('spec', 'untrained')}); decompress it "
                          f"without a checkpoint: sharnn decompress {src} {dst}")
    if fresh is None and model is None:
        raise SharnnError(f"{src} was compressed with a trained model (weights SHA-256 {want_weights[:12]}...); give "
                          f"its checkpoint: sharnn decompress CKPT {src} {dst}")
    if model is None:
        cfg = SHARNNConfig.from_dict(fresh["config"])
        try:  # a crafted header can ask for any size: counted on the meta device, nothing allocated
            need = 4 * parameter_count(cfg)
        except RuntimeError:  # more elements than a tensor can have
            need = 1 << 62
        require_memory(need, "the fresh model its header describes", "cpu")
        model = _build(cfg, int(fresh["seed"]))
    _check_model(model, vocab)
    if weights_sha256(model) != want_weights:
        raise SharnnError(f"{src} was compressed with another model (weights SHA-256 {want_weights[:12]}...), not "
                          f"{checkpoint_name} ({weights_sha256(model)[:12]}...); decompress it with the same model")
    return model


def _code_block(predictor: _Predictor, block: np.ndarray, lengths: np.ndarray, t0: int,
                code: Callable[[np.ndarray, np.ndarray, np.ndarray], None], bar: tqdm) -> float:
    """One block, step by step, as the encoder and the decoder both walk it (so they cannot drift apart): the model
    predicts every active stream's next byte, `code(column, active, probs)` codes the column's active bytes (the
    encoder writes them; the decoder fills them in; a stored block has them already), and the model reads them.
    Returns the model's cross-entropy of the block's bytes, in bits."""
    bits = 0.0
    for t in range(t0, t0 + block.shape[1]):
        active = lengths > t
        p, lp = predictor.predict()
        column = block[:, t - t0]  # a view: what `code` fills in lands in the block
        code(column, active, p[active])
        symbols = column[active]
        bits -= float(lp[active][np.arange(len(symbols)), symbols].sum())
        predictor.advance(column, active)
        bar.update(len(symbols))
    return bits


def _encode_column(encoder: Any, family: Any, column: np.ndarray, active: np.ndarray, probs: np.ndarray) -> None:
    encoder.encode(column[active].astype(np.int32), family, quantise(probs))


def _decode_column(src: Path, h: dict[str, Any], decoder: Any, family: Any, column: np.ndarray, active: np.ndarray,
                   probs: np.ndarray) -> None:
    if decoder is not None:  # (a stored block holds its bytes already)
        column[active] = _decoding(src, h, decoder.decode, family, quantise(probs))


def _decode_blocks(f: BinaryIO, out: BinaryIO, src: Path, info: Any, model: SHARNN, settings: CoderSettings,
                   progress: bool) -> tuple[float, int, int]:
    """Decode the body's blocks from `f` (at the body's start) into `out`, each stream at its place; returns the
    model's cross-entropy of the bytes (bits), the blocks read and how many of them were stored."""
    h = info.header
    length, streams, n = int(h["length"]), int(h["streams"]), int(h["stream_length"])
    cs = _constriction()
    predictor = _Predictor(model, streams, settings.adapt) if streams else None
    lengths = _stream_lengths(length, streams, n)
    family = cs.stream.model.Categorical(perfect=False)
    bits, blocks, stored = 0.0, 0, 0
    bar = _bar(length, "decompress", progress)
    for t0 in range(0, n, settings.block_steps):
        t1 = min(n, t0 + settings.block_steps)
        block = np.zeros((streams, t1 - t0), dtype=np.int64)
        ends = np.clip(lengths - t0, 0, t1 - t0)
        words, raw = _read_block(f, info.body_end, src, int(ends.sum()) if info.version >= 2 else None)
        blocks += 1
        if raw is not None:  # a stored block: its bytes as they are; the model still reads them all
            stored += 1
            for s, part in enumerate(np.split(np.frombuffer(raw, dtype=np.uint8), np.cumsum(ends)[:-1])):
                block[s, : len(part)] = part
        decoder = None if raw is not None else _decoding(src, h, cs.stream.queue.RangeDecoder, words)
        code = partial(_decode_column, src, h, decoder, family)
        bits += _code_block(predictor, block, lengths, t0, code, bar)  # type: ignore[arg-type]
        for s in range(streams):
            a, b = s * n + t0, min(s * n + t1, length)
            if b > a:
                out.seek(a)
                out.write(block[s, : b - a].astype(np.uint8).tobytes())
    bar.close()
    return bits, blocks, stored


def _not_the_original(src: Path, h: dict[str, Any], why: str) -> str:
    return (f"decoding {src} did not give back the original ({why}): this machine computes the model "
            f"differently from the one that compressed it ({h.get('cpu')}, torch {h['machine'].get('torch')}), or "
            "the file was altered; nothing was written")


def _decoding(src: Path, h: dict[str, Any], call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)`, a call into constriction's decoder. On data it cannot decode under the probabilities given
    (another machine's arithmetic, a crafted file) it raises whatever it raises (an AssertionError, on some
    machines): that becomes one clear line."""
    try:
        return call(*args)
    except Exception as e:  # noqa: BLE001 - any failure of the library's decoder means the same thing here
        why = f"the range code does not decode: {type(e).__name__}"
        raise SharnnError(_not_the_original(src, h, why)) from None


def _read_block(f: BinaryIO, end: int, src: Path, stored_bytes: int | None) -> tuple[np.ndarray, bytes | None]:
    """The next block: (range-code words, None), or for a stored block (empty words, its `stored_bytes` bytes).
    `stored_bytes` None: the file's format has no stored blocks (version 1)."""
    raw = f.read(4)
    if len(raw) < 4 or f.tell() > end:
        raise SharnnError(f"{src} is damaged: it ends before its last block")
    (count,) = struct.unpack("<I", raw)
    if count == STORED and stored_bytes is not None:
        data = f.read(stored_bytes)
        if len(data) < stored_bytes or f.tell() > end:
            raise SharnnError(f"{src} is damaged: it ends before its last block")
        return np.zeros(0, dtype=np.uint32), data
    data = f.read(4 * count)
    if len(data) < 4 * count or f.tell() > end:
        raise SharnnError(f"{src} is damaged: it ends before its last block")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32), None
