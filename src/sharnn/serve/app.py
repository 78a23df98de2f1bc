"""The HTTP side of `sharnn serve`: a FastAPI application over one `Engine`, and the uvicorn server that runs it.

    GET  /                 the web page (static/: generation, surprisal, attention)
    GET  /healthz          {"status": "ok", ...}
    GET  /v1/model         configuration, parameter count, vocabulary, checkpoint hash, limits
    POST /v1/generate      the flags of `sharnn generate` as JSON fields; {"text": ...}, or server-sent events
    POST /v1/score         {"text"} or {"texts"}: what `sharnn score --json` prints, per text
    POST /v1/attention     where the attention looks from one position of a text
    GET  /openapi.json     the OpenAPI description of all of it

Every error is a 4xx or 5xx answer with a one-line JSON body, {"error": "what is wrong"}. Limits: the request
body, the prompt, the generated length, the texts, and the waiting queue (full: 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..attention_map import attention_blocks, attention_over_text, token_label
from ..checkpoint import Checkpoint
from ..errors import SharnnError
from ..model import SHARNN
from ..outputs import sha256_file
from ..vocab import Vocab
from .engine import Engine, GenerateJob, QueueFull, ScoreJob, Stopped, Task
from .limits import Limits

STRICT = ConfigDict(strict=True, extra="forbid")  # "5" is not a number, true is not 1, unknown fields are errors


# --- request and answer bodies (the OpenAPI description is made from these) -------------------------------------


class GenerateRequest(BaseModel):
    """The flags of `sharnn generate`, with its defaults."""

    model_config = STRICT
    prompt: str = Field("\n", description="the text to continue (not empty)")
    length: int = Field(500, ge=0, description="bytes to generate")
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, description="0: greedy")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely only")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1,
                             description="for a repeatable sample; default: one is drawn and returned")
    stream: bool = Field(False, description="answer with server-sent events as the bytes are generated")


class GenerateAnswer(BaseModel):
    text: str = Field(description="the continuation, without the prompt; invalid UTF-8 shown as U+FFFD")
    tokens: int = Field(description="tokens generated")
    prompt_tokens: int
    seed: int = Field(description="the seed used: `sharnn generate --seed S` gives the same text")
    seconds: float


class ScoreRequest(BaseModel):
    """One text or several; each is scored after the context, as `sharnn score --document` scores a file."""

    model_config = STRICT
    text: str | None = None
    texts: list[str] | None = None
    context: str = Field("\n", description="condition on this text first (not empty)")
    eos: bool = Field(False, description="score a closing newline after each text (`sharnn score` line mode)")
    per_token: bool = Field(False, description="each token's log-probability")
    top_k: int = Field(0, ge=0, description="the model's k most likely guesses at each position (implies per_token)")

    @model_validator(mode="after")
    def one_of(self) -> ScoreRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give either text or texts")
        return self


class Guess(BaseModel):
    token: str
    id: int
    logprob: float


class TokenScore(BaseModel):
    token: str
    id: int
    logprob: float
    top: list[Guess] | None = None


class TextResult(BaseModel):
    logprob: float = Field(description="natural log of the probability of the text's tokens")
    log2prob: float
    tokens: int
    bpc: float = Field(description="bits per character (per token): -log2prob / tokens")
    per_token: list[TokenScore] | None = None


class ScoreAnswer(BaseModel):
    results: list[TextResult]


class AttentionRequest(BaseModel):
    model_config = STRICT
    text: str
    position: int = Field(ge=0, description="the query: a token position of the text")


class BlockAttention(BaseModel):
    block: int
    key_start: int = Field(description="token position of the first weight")
    weights: list[float] = Field(description="the query's weight on positions key_start .. position")


class AttentionAnswer(BaseModel):
    position: int
    tokens: list[str] = Field(description="a label per token of the text up to the position")
    blocks: list[BlockAttention]


class Problem(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": what}
    for code, what in [(400, "the body is not JSON"), (413, "the body is too large"),
                       (422, "a field is missing, of the wrong type or out of range"),
                       (503, "the queue is full (see Retry-After) or the server is stopping")]
}


# --- errors, body size -------------------------------------------------------------------------------------------


class Refused(Exception):
    """A request the server answers with `status` and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return 400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    if err.get("type") == "missing" and not loc:
        return 400, "the body must be a JSON object"
    field = ".".join(loc)
    msg = err.get("msg", "invalid")
    return 422, f"{field}: {msg}" if field else msg


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, before any of it is parsed.

    A declared Content-Length over the limit is refused at once; otherwise the body is read up to the limit and
    handed on. Bodies are JSON of a few kilobytes, so holding one whole costs nothing. Every body is read as
    JSON, whatever its Content-Type says (`curl -d` says form data).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[dict[str, Any]]],
                       send: Callable[..., Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        declared = dict(headers).get(b"content-length")
        too_big = problem(413, f"the request body is over the limit of {self.limit:,} bytes")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the disconnect, when it comes

        return await self.app(scope, replay, send)


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(422, f"{what}: not valid Unicode text (a lone surrogate escape)") from None


# --- the application --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """What GET /v1/model tells about the model being served."""

    checkpoint: str
    sha256: str
    parameters: int
    vocab: Vocab  # how the model's ids are read and written: the checkpoint's


def model_card(checkpoint: Checkpoint | str | Path, parameters: int) -> ModelCard:
    """The checkpoint folder, its weights' SHA-256 (as recorded in config.json, or computed), size and vocabulary."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    recorded = (ckpt.meta.get("files") or {}).get("model.safetensors", {})
    digest = recorded.get("sha256") if isinstance(recorded, dict) else None
    return ModelCard(str(ckpt.path), digest or sha256_file(ckpt.path / "model.safetensors"), parameters, ckpt.vocab)


def create_app(model: SHARNN, card: ModelCard, limits: Limits | None = None, engine_thread: bool = True) -> FastAPI:
    """The FastAPI application serving `model` (eval mode, fp32). Its engine (`app.state.engine`) stops with it;
    with `engine_thread` it also starts with it, on a thread of its own, else the caller runs `engine.run()`."""
    limits = limits or Limits()
    # Scored texts run in segments of 128 tokens; under the reference window a segment's length changes the
    # numbers, so there they are cut as `sharnn score` cuts them (1024).
    engine = Engine(model, slots=limits.slots, queue=limits.queue,
                    score_segment=1024 if model.cfg.attn_window == "reference" else 128)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine_thread:
            engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="sharnn", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="A SHA-RNN language model: generate, score, look at its attention.")
    app.state.engine = engine
    app.state.limits = limits
    _add_error_handlers(app)
    _add_routes(app, _Served(model, card, limits, engine))
    app.mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static")
    app.add_middleware(BodyLimit, limit=limits.max_body)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as one JSON problem with a plain message, never a traceback."""

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(*_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the body is not valid JSON in UTF-8"
        elif exc.status_code == 404:
            detail = f"no such path: {request.url.path}; the API is described at /openapi.json"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(Refused)
    async def on_refused(request: Request, exc: Refused) -> JSONResponse:
        return problem(exc.status, exc.message, exc.headers)

    @app.exception_handler(SharnnError)
    async def on_user_error(request: Request, exc: SharnnError) -> JSONResponse:
        return problem(422, str(exc))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        return problem(500, f"internal error: {type(exc).__name__}")


class _Served:
    """What the routes share: the model, its vocabulary, the limits, and the engine that runs their jobs."""

    def __init__(self, model: SHARNN, card: ModelCard, limits: Limits, engine: Engine):
        self.model, self.card, self.limits, self.engine, self.vocab = model, card, limits, engine, card.vocab

    def submit(self, job: GenerateJob | ScoreJob | Task) -> None:
        try:
            self.engine.submit(job)
        except QueueFull:
            raise Refused(503, "the server is busy: the queue is full; retry shortly", {"Retry-After": "1"}) from None
        except Stopped:
            raise Refused(503, "the server is shutting down", {"Retry-After": "5"}) from None

    async def wait(self, request: Request, future: asyncio.Future[Any], cancel: Callable[[], None]) -> Any:
        """The job's result; a client that goes away cancels its job (its slot is free at the next step)."""
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    raise Refused(499, "the client went away")
        finally:
            if not future.done():
                cancel()

    def encode(self, data: bytes, what: str) -> list[int]:
        try:
            return [int(i) for i in self.vocab.encode(data)]
        except SharnnError as e:
            raise Refused(422, f"{what}: {e}") from None


def _add_routes(app: FastAPI, served: _Served) -> None:
    model, vocab, limits, engine = served.model, served.vocab, served.limits, served.engine

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz", summary="Whether the server is up, and its load")
    async def healthz() -> JSONResponse:
        if engine.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok", **engine.load()})

    @app.get("/v1/model", summary="The model being served")
    async def model_info() -> dict[str, Any]:
        return {
            "checkpoint": served.card.checkpoint, "sha256": served.card.sha256,
            "parameters": served.card.parameters, "config": model.cfg.to_dict(),
            "vocabulary": {"kind": vocab.kind, "size": vocab.size, "level": vocab.level,
                           **({"symbols": list(vocab.symbols)} if vocab.kind != "bytes" else {})},
            "attention_blocks": attention_blocks(model), "step_rows": limits.slots,
            "device": str(engine.device), "limits": {**asdict(limits), "max_body": limits.max_body},
        }

    @app.post("/v1/generate", response_model=GenerateAnswer, responses={
        **ERRORS, 200: {"description": "the answer, or with stream: text/event-stream of `data: {\"text\": "
                                       "chunk, \"tokens\": [ids]}` events, then `event: done` with the answer",
                        "content": {"text/event-stream": {}}}},
        summary="Continue a prompt, as `sharnn generate` does")
    async def generate(body: GenerateRequest, request: Request) -> Any:
        return await _generate(served, body, request)

    @app.post("/v1/score", response_model=ScoreAnswer, response_model_exclude_none=True, responses=ERRORS,
              summary="Log-probability of texts, as `sharnn score --json` prints it")
    async def score(body: ScoreRequest, request: Request) -> Any:
        return await _score(served, body, request)

    @app.post("/v1/attention", response_model=AttentionAnswer, responses=ERRORS,
              summary="Where the attention looks from one position (what `sharnn attention` draws)")
    async def attention(body: AttentionRequest, request: Request) -> Any:
        return await _attention(served, body, request)


async def _generate(served: _Served, body: GenerateRequest, request: Request) -> Any:
    limits, vocab = served.limits, served.vocab
    prompt = _utf8(body.prompt, "prompt")
    if not prompt:
        raise Refused(422, "prompt: empty; give at least one byte")
    if len(prompt) > limits.max_prompt:
        raise Refused(422, f"prompt: {len(prompt):,} bytes, over the limit of {limits.max_prompt:,}")
    if body.length > limits.max_length:
        raise Refused(422, f"length: {body.length:,}, over the limit of {limits.max_length:,}")
    ids = served.encode(prompt, "prompt")
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    tokens: list[int] = []

    def answer() -> dict[str, Any]:
        text = b"".join(vocab.decode([t]) for t in tokens).decode("utf-8", errors="replace")
        return {"text": text, "tokens": len(tokens), "prompt_tokens": len(ids), "seed": seed,
                "seconds": round(time.perf_counter() - t0, 4)}

    if not body.stream:
        done: asyncio.Future[None] = loop.create_future()

        def collect(new: list[int], last: bool) -> None:  # on the worker thread
            tokens.extend(new)
            if last:
                loop.call_soon_threadsafe(_resolve, done, None)

        job = GenerateJob(ids, body.length, body.temperature, body.top_k, body.top_p, seed, collect,
                          lambda msg: loop.call_soon_threadsafe(_fail, done, msg))
        served.submit(job)
        await served.wait(request, done, job.cancel)
        return answer()

    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    job = GenerateJob(ids, body.length, body.temperature, body.top_k, body.top_p, seed,
                      lambda new, last: loop.call_soon_threadsafe(queue.put_nowait, ("tokens", (new, last))),
                      lambda msg: loop.call_soon_threadsafe(queue.put_nowait, ("error", msg)))
    served.submit(job)
    return JobStream(_events(queue, vocab, tokens, answer), job.cancel)


async def _events(queue: asyncio.Queue[tuple[str, Any]], vocab: Any, tokens: list[int],
                  answer: Callable[[], dict[str, Any]]) -> AsyncIterator[bytes]:
    """A streamed generation's server-sent events: text as it comes, then the answer."""
    # Bytes become text through an incremental decoder, as `sharnn generate` prints them: a character cut
    # between two bytes waits for its end, invalid bytes become U+FFFD.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        try:
            items = [await asyncio.wait_for(queue.get(), timeout=1.0)]
        except asyncio.TimeoutError:  # (TimeoutError itself only from Python 3.11)
            yield b": waiting\n\n"  # a comment: keeps the connection open while the job waits
            continue
        while not queue.empty():
            items.append(queue.get_nowait())
        new, last = [], False
        for kind, payload in items:
            if kind == "error":
                yield _sse({"error": payload}, "error")
                return
            new += payload[0]
            last = last or payload[1]
        tokens.extend(new)
        chunk = "".join(decoder.decode(vocab.decode([t])) for t in new)
        chunk += decoder.decode(b"", final=True) if last else ""
        if new:
            yield _sse({"text": chunk, "tokens": new})
        if last:
            yield _sse(answer(), "done")
            return


async def _score(served: _Served, body: ScoreRequest, request: Request) -> Any:
    limits, vocab = served.limits, served.vocab
    texts = [body.text] if body.text is not None else body.texts or []
    if not texts:
        raise Refused(422, "texts: give at least one text")
    if len(texts) > limits.max_texts:
        raise Refused(422, f"texts: {len(texts)}, over the limit of {limits.max_texts}")
    if body.top_k > min(limits.max_top_k, vocab.size):
        raise Refused(422, f"top_k: {body.top_k}, over the limit of {min(limits.max_top_k, vocab.size)}")
    raw = [_utf8(t, f"texts[{i}]" if body.texts is not None else "text") + (b"\n" if body.eos else b"")
           for i, t in enumerate(texts)]
    if sum(map(len, raw)) > limits.max_text:
        raise Refused(422, f"the texts hold {sum(map(len, raw)):,} bytes, over the limit of {limits.max_text:,}")
    context = _utf8(body.context, "context")
    if not context:
        raise Refused(422, "context: empty; give at least one byte")
    if len(context) > limits.max_prompt:
        raise Refused(422, f"context: {len(context):,} bytes, over the limit of {limits.max_prompt:,}")
    ids = [np.asarray(served.encode(r, "text"), dtype=np.int64) for r in raw]
    if any(len(i) == 0 for i in ids):
        raise Refused(422, "text: empty; nothing to score")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
    job = ScoreJob(ids, np.asarray(served.encode(context, "context")), body.top_k,
                   lambda res: loop.call_soon_threadsafe(_resolve, done, res),
                   lambda msg: loop.call_soon_threadsafe(_fail, done, msg))
    served.submit(job)
    results = await served.wait(request, done, job.cancel)
    return {"results": [_text_result(r, t, body.per_token or body.top_k > 0, vocab) for r, t in zip(results, ids)]}


async def _attention(served: _Served, body: AttentionRequest, request: Request) -> Any:
    model, vocab, limits = served.model, served.vocab, served.limits
    if not attention_blocks(model):
        raise Refused(422, "this model has no attention block")
    data = _utf8(body.text, "text")
    if len(data) > limits.max_text:
        raise Refused(422, f"text: {len(data):,} bytes, over the limit of {limits.max_text:,}")
    ids = served.encode(data, "text")
    if body.position >= len(ids):
        raise Refused(422, f"position: {body.position}, but the text has {len(ids)} tokens")
    upto = ids[: body.position + 1]  # the query sees nothing after itself

    def run() -> dict[str, Any]:
        maps, _ = attention_over_text(model, torch.tensor(upto, device=served.engine.device), body.position, 1,
                                      before=model.cfg.attn_span)
        return {"position": body.position, "tokens": [token_label(vocab, t) for t in upto],
                "blocks": [{"block": m.block, "key_start": m.key_start, "weights": m.weights[0].tolist()}
                           for m in maps]}

    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    task = Task(run, lambda res: loop.call_soon_threadsafe(_resolve, done, res),
                lambda msg: loop.call_soon_threadsafe(_fail, done, msg))
    served.submit(task)
    return await served.wait(request, done, task.cancel)


class JobStream(StreamingResponse):
    """Server-sent events of one job; however the response ends (finished, client gone, shutdown), the job is
    cancelled, so a disconnected client's slot is free at the next step."""

    def __init__(self, events: AsyncIterator[bytes], cancel: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cancel = cancel

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel()


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    """One server-sent event: an optional `event:` line and one `data:` line of JSON (which holds no newline)."""
    return ((f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n").encode()


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], message: str) -> None:
    if not future.done():
        status = 503 if "shutting down" in message else 500
        future.set_exception(Refused(status, message))


def _text_result(r: dict[str, Any], ids: np.ndarray, per_token: bool, vocab: Any) -> dict[str, Any]:
    out = {k: r[k] for k in ("logprob", "log2prob", "tokens", "bpc")}
    if per_token:
        def label(t: int) -> str:  # as `sharnn score --per-token` labels tokens
            return vocab.decode([int(t)]).decode("utf-8", errors="replace")

        rows = []
        for i, (t, lp) in enumerate(zip(ids, r["token_logprobs"])):
            row: dict[str, Any] = {"token": label(t), "id": int(t), "logprob": lp}
            if "top_ids" in r:
                row["top"] = [{"token": label(g), "id": g, "logprob": glp}
                              for g, glp in zip(r["top_ids"][i], r["top_logprobs"][i])]
            rows.append(row)
        out["per_token"] = rows
    return out


# --- the server -------------------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear error (port taken, address not here)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SharnnError(f"cannot listen on {host}:{port}: {e.strerror}; check --host") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise SharnnError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, host: str, port: int, drain_seconds: float, announce: Callable[[str], None]) -> None:
    """Run the app (made with engine_thread=False) until SIGTERM or SIGINT: the engine on this, the main thread,
    uvicorn's event loop on another. On the signal, stop accepting, give the requests in flight up to
    `drain_seconds` to finish, cancel the rest, stop the engine and return (the command then exits 0)."""
    import signal
    import threading

    import uvicorn

    sock = listen(host, port)
    engine: Engine = app.state.engine
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=drain_seconds,
                            lifespan="on")
    server = uvicorn.Server(config)

    def run_http() -> None:
        try:
            server.run(sockets=[sock])  # off the main thread uvicorn installs no signal handlers: ours below
        finally:
            engine.stop()  # however the server ended, the engine's loop on the main thread ends too

    def on_signal(signum: int, frame: Any) -> None:
        if server.should_exit:  # a second signal: stop now, without waiting for the requests in flight
            server.force_exit = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    http = threading.Thread(target=run_http, name="sharnn-http")
    try:
        http.start()
        announce(f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}/")
        engine.run()
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
