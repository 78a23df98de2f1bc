"""The model's one worker thread: generations stepped together, texts scored together, one queue in front.

Every model call of the server runs here, in order, so nothing in the network needs a lock. Each turn of the
loop admits waiting generations into free slots (their prompts primed one by one, as `sharnn generate` primes),
samples one token for every active generation and runs them all through one `TokenStep`, then scores one
segment of up to `score_rows` texts, then runs one other task (attention maps).

Why every step is `slots` rows wide, however many are busy: BLAS picks its matrix kernel by the number of rows,
and kernels for different row counts round differently (on this CPU a one-row product takes MKL's matrix-vector
kernel, and 2-3 rows round unlike 4 or more). A batch whose width followed the traffic would make a request's
bytes depend on how many others were stepping beside it; at a fixed width each row is computed by the same
kernel whatever the other rows hold. Each generation keeps its own RNN state and its own attention ring (a
count per slot, `MemoryRing`), its own seeded generator, and samples with `sample_token`: its bytes are those
of `generate_ids(..., rows=slots)` with the same seed, exactly. Scoring works the same way: segments of a fixed
length, `score_rows` texts side by side, the texts in a segment all at the same memory length.

The engine knows nothing of HTTP: a job carries callbacks that the worker calls (from its thread) with results.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SharnnError
from ..generate import TokenStep, check_sampling, prime_prompt, sample_token
from ..model import SHARNN
from ..runtime import attention_bytes, require_memory
from ..score import prime
from ..state import BlockState, MemoryRing, State


class QueueFull(Exception):
    """The waiting queue is full: the caller should answer 503 and ask the client to retry later."""


class Stopped(Exception):
    """The engine is shutting down and takes no more work."""


@dataclass(eq=False)
class GenerateJob:
    """One generation: `length` tokens after the prompt `ids`, sampled as `sharnn generate` samples them.

    `on_tokens(tokens, done)` is called from the worker with each new token (done=True with the last, or with
    none when length is 0); `on_error(message)` if the job fails. `cancel()` frees its slot before the next step.
    """

    ids: list[int]
    length: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    on_tokens: Callable[[list[int], bool], None]
    on_error: Callable[[str], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0
    logits: Tensor | None = None  # (V,) scores for the next token
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class TextScore:
    """One text being scored: `seq` is the context's last token then the text's, `state` the state before seq."""

    seq: np.ndarray
    state: State | None
    top_k: int = 0  # guesses kept per position
    pos: int = 0  # inputs seq[pos:] are still to run
    memory: int = 0  # attention memory rows in `state` (texts are batched by it)
    logprobs: list[Tensor] = field(default_factory=list)
    top_ids: list[Tensor] = field(default_factory=list)
    top_logprobs: list[Tensor] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.seq) - 1


@dataclass(eq=False)
class ScoreJob:
    """Score `texts` (token ids) after `context`; `on_done(results)` gets one dict per text."""

    texts: list[np.ndarray]
    context: np.ndarray
    top_k: int
    on_done: Callable[[list[dict[str, Any]]], None]
    on_error: Callable[[str], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    streams: list[TextScore] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class Task:
    """Any other model work (an attention map): `run()` on the worker, its result to `on_done`."""

    run: Callable[[], Any]
    on_done: Callable[[Any], None]
    on_error: Callable[[str], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


def slot_state(model: SHARNN, slots: int) -> State:
    """A zero state for `slots` streams in token-step form: RNN buffers and attention rings with a count each."""
    ring = model.ring_state(model.initial_state(slots))
    return tuple(BlockState(s.rnn, None if s.memory is None else
                            MemoryRing(s.memory.rows, torch.zeros(slots, dtype=torch.long, device=s.memory.rows.device)))
                 for s in ring)


def put_stream(dst: State, slot: int, src: State) -> None:
    """Write the batch-1 ring state `src` (from `SHARNN.ring_state`) into row `slot` of `dst`, in place."""
    for d, s in zip(dst, src):
        for a, b in zip(d.rnn, s.rnn):
            a[:, slot] = b[:, 0]
        if isinstance(d.memory, MemoryRing):
            assert isinstance(s.memory, MemoryRing)
            d.memory.rows[:, slot] = s.memory.rows[:, 0]  # every slot, the unwritten zeros included
            d.memory.count[slot] = s.memory.count


def _memory_rows(state: State | None) -> int:
    for s in state or ():
        if s.memory is not None:
            return int(s.memory.shape[0])  # type: ignore[union-attr]
    return 0


class _Queues:
    """The engine's client side, used from any thread: the jobs running and waiting, and `start`, `stop`,
    `submit`, `load`. The worker that runs them is `Engine`."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue_limit = slots, queue
        self.active: list[GenerateJob | None] = [None] * slots
        self.waiting: collections.deque[GenerateJob] = collections.deque()
        self.scoring: collections.deque[ScoreJob] = collections.deque()
        self.tasks: collections.deque[Task] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.ended = threading.Event()  # set when the loop has ended
        self.thread: threading.Thread | None = None
        self.steps = 0  # token steps run (tests and /healthz read it)

    def run(self) -> None:
        raise NotImplementedError  # the worker's loop: Engine.run

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="sharnn-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no more work, fail what is still waiting or running ("the server is shutting down"), and wait
        for the loop to end (its own thread, or the one in `run`)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        self.ended.wait(timeout)

    def submit(self, job: GenerateJob | ScoreJob | Task) -> None:
        """Queue a job, or raise QueueFull / Stopped."""
        if isinstance(job, GenerateJob):
            check_sampling(job.length, job.temperature, job.top_k, job.top_p)
        with self.cond:
            if self.stopping:
                raise Stopped
            if isinstance(job, GenerateJob):
                if len(self.waiting) >= self.active.count(None) + self.queue_limit:  # beyond the free slots
                    raise QueueFull
                self.waiting.append(job)
            else:
                line = self.scoring if isinstance(job, ScoreJob) else self.tasks
                if len(line) >= max(self.queue_limit, 1):
                    raise QueueFull
                line.append(job)  # type: ignore[arg-type]
            self.cond.notify_all()

    def load(self) -> dict[str, int]:
        """What is running and waiting now."""
        with self.cond:
            return {"active": sum(j is not None for j in self.active), "waiting": len(self.waiting),
                    "scoring": len(self.scoring), "tasks": len(self.tasks), "steps": self.steps}



class Engine(_Queues):
    """The worker. `start()` (a thread of its own) or `run()` (on the calling thread, until `stop()`); submit jobs
    from any thread; `stop()` cancels what is left and returns once the loop has ended.

    `sharnn serve` runs the loop on the main thread: there PyTorch's OpenMP threads wait for work spinning, and a
    token step of the tiny preset takes 1.8 ms with two threads; from any other thread the same step took
    6-7 ms on this 2-core machine (one thread: 1.5 ms either way).

    Args:
        model: in eval mode (`sharnn.precision.for_inference`); every call on it goes through this engine.
        slots: generations stepped together; every token step is this many rows wide.
        queue: jobs that may wait (generations for a slot, score requests, tasks, each); more raise QueueFull.
        score_rows, score_segment: texts side by side and tokens per segment when scoring.
    """

    def __init__(self, model: SHARNN, slots: int = 8, queue: int = 64, score_rows: int = 8,
                 score_segment: int = 128):
        if slots < 1 or queue < 0 or score_rows < 1 or score_segment < 1:
            raise SharnnError(f"the engine needs slots >= 1, queue >= 0, score rows and segment >= 1; got {slots}, "
                              f"{queue}, {score_rows}, {score_segment}")
        super().__init__(slots, queue)
        self.model = model
        self.device = model.encoder.weight.device
        self.score_rows, self.score_segment = score_rows, score_segment
        require_memory(attention_bytes(model.cfg, slots + score_rows, element_size=model.encoder.weight.element_size()),
                       f"attn_span {model.cfg.attn_span:,}: the attention memory of {slots} slots", self.device)
        with torch.no_grad():
            self.step = TokenStep(model, slot_state(model, slots), graph=self.device.type == "cuda")
        self.tokens = torch.zeros(1, slots, dtype=torch.long, device=self.device)
        self.scorer = _TextScorer(model, score_rows, score_segment)
        self.generated = 0  # tokens sampled

    # --- the worker --------------------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self.waiting or self.scoring or self.tasks or any(j is not None for j in self.active))

    def run(self) -> None:
        """The loop, on the calling thread, until `stop()`."""
        try:
            self._loop()
        finally:
            self.ended.set()

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread: this one never records a graph
            while True:
                with self.cond:
                    while not self.stopping and not self._has_work():
                        self.cond.wait()
                    if self.stopping:
                        break
                    joining = []
                    for slot, job in enumerate(self.active):
                        if job is None and self.waiting:
                            joining.append((slot, self.waiting.popleft()))
                            self.active[slot] = joining[-1][1]
                for slot, job in joining:
                    self._join(slot, job)
                self._generate_step()
                self._score_round()
                self._run_task()
            self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self.cond:
            jobs: list[Any] = [j for j in self.active if j is not None]
            jobs += [*self.waiting, *self.scoring, *self.tasks]
            self.active = [None] * self.slots
            self.waiting.clear()
            self.scoring.clear()
            self.tasks.clear()
        for job in jobs:
            _call(job.on_error, message)

    def _free(self, slot: int) -> None:
        with self.cond:
            self.active[slot] = None

    def _join(self, slot: int, job: GenerateJob) -> None:
        """Prime the job's prompt alone (batch 1, as `sharnn generate`) and move its state into `slot`."""
        if job.cancelled.is_set():
            self._free(slot)
            return
        if job.length == 0:  # nothing to sample: `sharnn generate --length 0` prints the prompt alone
            self._free(slot)
            _call(job.on_tokens, [], True)
            return
        try:
            job.generator = torch.Generator(device=self.device)
            job.generator.manual_seed(job.seed)
            state, job.logits = prime_prompt(self.model, job.ids)
            put_stream(self.step.state, slot, self.model.ring_state(state))
        except Exception as e:  # noqa: BLE001 - a job's failure must not stop the worker
            self._free(slot)
            _call(job.on_error, _describe(e))

    def _generate_step(self) -> None:
        """One token for every active generation, then one step of all slots together."""
        stepping = False
        for slot, job in enumerate(self.active):
            if job is None or job.logits is None:
                continue
            if job.cancelled.is_set():
                self._free(slot)
                continue
            assert job.generator is not None
            token = sample_token(job.logits, job.temperature, job.top_k, job.top_p, job.generator)
            job.produced += 1
            self.generated += 1
            done = job.produced >= job.length
            if done:
                self._free(slot)
            else:
                self.tokens[0, slot] = token
                stepping = True
            _call(job.on_tokens, [token], done)
        if not stepping:
            return
        try:
            logits = self.step(self.tokens)  # (slots, V); idle rows step too, on whatever they hold
        except Exception as e:  # noqa: BLE001 - our bug, but the server stays up for the next requests
            for slot, job in enumerate(self.active):
                if job is not None:
                    self._free(slot)
                    _call(job.on_error, _describe(e))
            return
        self.steps += 1
        for slot, job in enumerate(self.active):
            if job is not None and job.logits is not None:
                job.logits = logits[slot]

    def _score_round(self) -> None:
        """One segment of up to `score_rows` texts at the same memory length, at a fixed (segment, rows) shape."""
        with self.cond:
            while self.scoring and self.scoring[0].cancelled.is_set():
                self.scoring.popleft()
            jobs = list(self.scoring)
        if not jobs:
            return
        try:
            for job in jobs:
                if not job.streams and not job.cancelled.is_set():
                    self.scorer.start_texts(job)
            pending = [s for job in jobs if not job.cancelled.is_set() for s in job.streams if not s.done]
            if pending:
                memory = pending[0].memory
                self.scorer.segment([s for s in pending if s.memory == memory][: self.score_rows])
        except Exception as e:  # noqa: BLE001
            with self.cond:
                for job in jobs:
                    if job in self.scoring:
                        self.scoring.remove(job)
            for job in jobs:
                _call(job.on_error, _describe(e))
            return
        for job in jobs:
            if job.cancelled.is_set() or all(s.done for s in job.streams):
                with self.cond:
                    if job in self.scoring:
                        self.scoring.remove(job)
                if not job.cancelled.is_set():
                    _call(job.on_done, [self.scorer.result(job, s) for s in job.streams])

    def _run_task(self) -> None:
        with self.cond:
            task = self.tasks.popleft() if self.tasks else None
        if task is None or task.cancelled.is_set():
            return
        try:
            result = task.run()
        except Exception as e:  # noqa: BLE001
            _call(task.on_error, _describe(e))
            return
        _call(task.on_done, result)


class _TextScorer:
    """Scoring on the worker: texts (after a context) run in segments of `segment_length` tokens, `rows` of them
    side by side at the same memory length, each text's state kept between its segments."""

    def __init__(self, model: SHARNN, rows: int, segment_length: int):
        self.model, self.rows, self.segment_length = model, rows, segment_length
        self.device = model.encoder.weight.device

    def start_texts(self, job: ScoreJob) -> None:
        """Run the context once (as `sharnn score` does: all of it but its last token) for the job's texts."""
        state, last = prime(self.model, job.context)
        for text in job.texts:
            seq = np.concatenate([[last], np.asarray(text, dtype=np.int64)])
            job.streams.append(TextScore(seq, state, job.top_k, memory=_memory_rows(state)))

    def segment(self, group: list[TextScore]) -> None:
        """One segment of `group`'s texts side by side, padded to the fixed (segment, rows) shape."""
        T, W, E = self.segment_length, self.rows, self.model.cfg.emsize
        x = torch.zeros(T, W, dtype=torch.long)
        y = torch.zeros(T, W, dtype=torch.long)
        counts = []
        for b, s in enumerate(group):
            n = min(T, len(s.seq) - 1 - s.pos)
            x[:n, b] = torch.from_numpy(s.seq[s.pos : s.pos + n])
            y[:n, b] = torch.from_numpy(s.seq[s.pos + 1 : s.pos + 1 + n])
            counts.append(n)
        # The texts' states side by side. A text that starts fresh, and a row without a text, get zeros (what
        # `SHARNN.initial_state` is), with as many memory rows as the group's texts have.
        zero = tuple(BlockState(s.rnn, None if s.memory is None else s.memory.new_zeros(group[0].memory, 1, E))
                     for s in self.model.initial_state(1, self.device))
        states = [s.state or zero for s in group] + [zero] * (W - len(group))
        batched = tuple(BlockState(tuple(torch.cat(rnn, dim=1) for rnn in zip(*(st[i].rnn for st in states))),
                                   None if z.memory is None else torch.cat([st[i].memory for st in states], dim=1))
                        for i, z in enumerate(zero))
        out = self.model(x.to(self.device), batched)
        logp = F.log_softmax(out.logits.float(), dim=-1)  # (T, W, V)
        picked = logp.gather(-1, y.to(self.device).unsqueeze(-1)).squeeze(-1).cpu()  # (T, W)
        k = max(s.top_k for s in group)
        top = logp.topk(k, dim=-1) if k else None
        for b, (s, n) in enumerate(zip(group, counts)):
            s.logprobs.append(picked[:n, b])
            if top is not None:
                s.top_logprobs.append(top.values[:n, b].cpu())
                s.top_ids.append(top.indices[:n, b].cpu())
            s.pos += n
            if not s.done:
                s.state = tuple(BlockState(tuple(t[:, b : b + 1].clone() for t in st.rnn),
                                           None if st.memory is None else st.memory[:, b : b + 1].clone())  # type: ignore[index]
                                for st in out.state)
                s.memory = _memory_rows(s.state)
            else:
                s.state = None

    def result(self, job: ScoreJob, s: TextScore) -> dict[str, Any]:
        lp = torch.cat(s.logprobs) if s.logprobs else torch.zeros(0)
        total = float(lp.double().sum())
        n = len(s.seq) - 1
        out: dict[str, Any] = {"logprob": total, "log2prob": total / math.log(2), "tokens": n,
                               "bpc": -total / math.log(2) / n if n else float("nan")}
        out["token_logprobs"] = lp.tolist()
        if job.top_k:
            ids = torch.cat(s.top_ids)[:, : job.top_k] if s.top_ids else torch.zeros(0, job.top_k, dtype=torch.long)
            lps = torch.cat(s.top_logprobs)[:, : job.top_k] if s.top_logprobs else torch.zeros(0, job.top_k)
            out["top_ids"], out["top_logprobs"] = ids.tolist(), lps.tolist()
        return out


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, SharnnError) else f"internal error: {type(e).__name__}: {e}"


def _call(fn: Callable[..., None], *args: Any) -> None:
    """Hand a result to a job's callback; a failing callback (a client gone) never stops the worker."""
    with contextlib.suppress(Exception):
        fn(*args)
