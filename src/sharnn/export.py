"""ONNX export (`sharnn export`): the model as a function of (tokens, state) -> (log-probabilities, next state).

Every recurrent quantity is an explicit input and output, so any ONNX runtime can stream tokens through the
model with no PyTorch at hand. Two files can be written, with the same state:

    OUT.onnx               the step: one token per stream and call, tokens (1, batch)
    OUT.segmentN.onnx      (--segment N) N tokens per stream and call, tokens (N, batch): a prompt's bulk

Inputs, in this order (outputs: `logprobs`, then each state input as `next.<name>`, in the same order):

    tokens            int64   (T, batch)       token ids (bytes for byte models; see metadata `sharnn.vocab`)
    block<i>.h        float32 (1, batch, E)    the core's state, per block i: LSTM h and c; GRU h;
    block<i>.c                                 QRNN c, and x (its last input) with qrnn_window 2
    block<i>.memory   float32 (M, batch, E)    attention blocks: the last M attention inputs as a ring:
    block<i>.count    int64   ()               position t lives in row t % M; count = positions so far

    logprobs          float32 (T, batch, V)    log-probabilities of the token after each input token

All zeros is the initial state. The memory is `state.MemoryRing`: its shape never changes, so a step costs
the same at any position, and the segment model reads and writes the same ring (`MemoryRing.extended`):
the state out of either file feeds either file. `count` is shared by the streams of a batch.
Opset 18; the batch axis is dynamic; weights in fp32, value gates collapsed (exact).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import Compute
from .errors import SharnnError
from .model import SHARNN
from .outputs import check_new_file, staged_files
from .precision import for_inference
from .runtime import attention_bytes, require_memory
from .state import BlockState, MemoryRing, State
from .vocab import Vocab, vocab_of

OPSET = 18
CHECK_TOLERANCE = 1e-4  # largest |log p| difference from PyTorch the check accepts
INSTALL = "pip install 'sharnn[onnx]'"


def state_names(model: SHARNN) -> list[str]:
    """The state's input names, in order: block<i>.<part> (see the module docstring)."""
    cores = {"LSTM": ("h", "c"), "GRU": ("h",), "QRNN": ("c", "x")}
    names = []
    for i, block in enumerate(model.blocks):
        names += [f"block{i}.{p}" for p in cores[model.cfg.model][: block.rnn_state_len]]
        if block.attn is not None:
            names += [f"block{i}.memory", f"block{i}.count"]
    return names


def flatten_state(state: State) -> list[Tensor]:
    """A ring state (from `SHARNN.ring_state`) as the list of tensors the ONNX model takes, in `state_names` order."""
    out: list[Tensor] = []
    for s in state:
        out += s.rnn
        if isinstance(s.memory, MemoryRing):
            out += [s.memory.rows, s.memory.count]
    return out


class OnnxStep(nn.Module):
    """What is exported: (tokens, *state) -> (log-probabilities, *next state), the state as flat tensors."""

    def __init__(self, model: SHARNN):
        super().__init__()
        self.model = model
        self.compute = Compute(attention="plain")  # two MatMuls and a Softmax: every runtime has them

    def forward(self, tokens: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        it: Iterator[Tensor] = iter(flat)
        state = []
        for block in self.model.blocks:
            rnn = tuple(next(it) for _ in range(block.rnn_state_len))
            # The ring is written in place; torch.export turns that into a new tensor (ONNX has no mutation).
            memory = MemoryRing(next(it), next(it)) if block.attn is not None else None
            state.append(BlockState(rnn, memory))
        out = self.model(tokens, tuple(state), compute=self.compute)
        assert out.logits is not None
        # log_softmax of an adaptive softmax's log-probabilities leaves them as they are.
        return (out.logits.float().log_softmax(-1), *flatten_state(out.state))


def exportable(model: SHARNN) -> SHARNN:
    """An fp32, eval-mode CPU copy made for export, value gates collapsed. (OnnxStep runs it over a ring, whose
    segments have static shapes, with plain attention.)"""
    if model.encoder.weight.dtype != torch.float32:
        raise SharnnError("export takes the fp32 model, not one converted with --precision")
    return for_inference(model, "fp32").cpu()


def segment_path(out: Path, n: int) -> Path:
    """Where `--segment N` writes its model, beside OUT: model.onnx -> model.segmentN.onnx."""
    return out.with_name(f"{out.stem}.segment{n}{out.suffix or '.onnx'}")


def require(*modules: str, unless: str = "") -> None:
    """SharnnError naming the modules that are not installed, and how to install them (or do without)."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise SharnnError(f"this needs {' and '.join(missing)}, which {verb} not installed: {INSTALL}"
                          + (f" (or pass {unless})" if unless else ""))


def export_onnx(model: SHARNN, out: str | Path, segment: int | None = None, overwrite: bool = False,
                vocab: Vocab | None = None) -> list[Path]:
    """Write the step model to `out` and, with `segment`, the N-token model beside it; returns the paths.

    `vocab` (written into the files' metadata): the checkpoint's; by default the model's own (sharnn.vocab.vocab_of).
    An existing file is replaced only with `overwrite`. The files are written in a temporary folder beside them
    and renamed into place once all are complete: a failed export leaves nothing half-written."""
    require("onnx", "onnxscript")  # what torch.onnx's exporter builds the graph with
    if segment is not None and segment < 2:
        raise SharnnError(f"--segment must be at least 2 (the step model is the 1-token one), got {segment}")
    out = Path(out)
    paths = [out] + ([segment_path(out, segment)] if segment else [])
    for path in paths:
        check_new_file(path, overwrite)
    require_memory(attention_bytes(model.cfg, 2), f"attn_span {model.cfg.attn_span:,}: the exported memory", "cpu")
    vocab = vocab_of(model, vocab)
    m = exportable(model)
    with staged_files(out.parent) as tmp:
        for path, tokens in zip(paths, (1, segment)):
            _export_one(m, vocab, tmp / path.name, tokens or 1)
    return paths


def _export_one(m: SHARNN, vocab: Vocab, path: Path, T: int) -> None:
    names = state_names(m)
    batch = 2  # an example batch of 1 would be taken for a constant
    example = (torch.zeros(T, batch, dtype=torch.long), *flatten_state(m.ring_state(m.initial_state(batch))))
    dim = torch.export.Dim("batch")
    shapes = ({1: dim}, tuple(None if t.dim() == 0 else {1: dim} for t in example[1:]))
    # torch.export's exporter (dynamo=True). The TorchScript one (dynamo=False, still in torch 2.13) traces
    # Python values: its files disagreed with PyTorch by ~0.3 nats here and its QRNN segment failed to run.
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            OnnxStep(m), example, dynamo=True, dynamic_shapes=shapes, opset_version=OPSET, verbose=False,
            input_names=["tokens", *names], output_names=["logprobs", *(f"next.{n}" for n in names)])
    assert program is not None
    meta = program.model.metadata_props
    meta["sharnn.config"] = json.dumps(m.cfg.to_dict())
    meta["sharnn.vocab"] = json.dumps(vocab.to_dict())
    meta["sharnn.tokens_per_call"] = str(T)
    try:
        program.save(path)
    except OSError as e:
        raise SharnnError(f"cannot write {path}: {e.strerror}") from None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter reports its progress on stdout and logs and warns about its own internals (torchvision's ops
    it skips, deprecations): none of it is for our users."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def initial_feed(session: Any, batch: int) -> dict[str, np.ndarray]:
    """The initial state as an onnxruntime feed: every state input as zeros, its batch axis `batch`."""
    kinds = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
    return {i.name: np.zeros([d if isinstance(d, int) else batch for d in i.shape], kinds[i.type])
            for i in session.get_inputs() if i.name != "tokens"}


def stream(sessions: dict[int, Any], ids: np.ndarray, cuts: list[int]) -> np.ndarray:
    """Run `ids` (L, batch) through ONNX sessions {tokens per call: session}, `cuts` tokens at a time, state
    carried; returns the (L, batch, V) log-probabilities."""
    feed = initial_feed(sessions[1], ids.shape[1])
    out, pos = [], 0
    for n in cuts:
        logprobs, *state = sessions[n].run(None, {"tokens": ids[pos : pos + n], **feed})
        feed = dict(zip(feed, state))  # outputs come in the inputs' order
        out.append(logprobs)
        pos += n
    return np.concatenate(out)


def check_cuts(length: int, segment: int | None) -> list[int]:
    """How the check cuts `length` tokens: a segment, then 7 steps, again and again (both hand-offs)."""
    cuts: list[int] = []
    while sum(cuts) < length:
        left = length - sum(cuts)
        cuts += [segment] if segment and left >= segment else []
        cuts += [1] * min(7, length - sum(cuts))
    return cuts


def check_onnx(model: SHARNN, paths: list[Path], length: int = 300, batch: int = 1, seed: int = 0) -> float:
    """Stream `length` random tokens through the exported files with onnxruntime on the CPU and through PyTorch
    (ordinary memory, the same cuts, state carried); returns the largest |difference| of log-probabilities.

    Raises SharnnError when onnxruntime is missing or the difference exceeds CHECK_TOLERANCE.
    """
    require("onnxruntime")
    import onnxruntime as ort

    sessions = {}
    for path in paths:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        sessions[s.get_inputs()[0].shape[0]] = s
    segment = max(sessions) if len(sessions) > 1 else None
    ids = torch.randint(0, model.cfg.vocab_size, (length, batch), generator=torch.Generator().manual_seed(seed))
    cuts = check_cuts(length, segment)
    got = stream(sessions, ids.numpy(), cuts)
    ref = for_inference(model, "fp32").cpu()  # PyTorch's ordinary path: memory in order, no ring
    want, state, pos = [], None, 0
    with torch.no_grad():
        for n in cuts:
            o = ref(ids[pos : pos + n], state)
            assert o.logits is not None
            want.append(o.logits.float().log_softmax(-1))
            state, pos = o.state, pos + n
    diff = float(np.abs(got - torch.cat(want).numpy()).max())
    if not diff <= CHECK_TOLERANCE:
        raise SharnnError(f"the exported model's log-probabilities differ from PyTorch's by {diff:.3g} "
                          f"(more than {CHECK_TOLERANCE}) over {length} tokens; {', '.join(map(str, paths))} "
                          "should not be used")
    return diff
