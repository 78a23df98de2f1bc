"""`sharnn serve`: the API through an in-process client, bad input, the equality with the command line, batching
that leaves every request's bytes as they are alone, limits, disconnects, SIGTERM, and a short load test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # Starlette 1.x would rather see the httpx2 package; httpx works as before
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from sharnn.attention_map import attention_over_text
from sharnn.checkpoint import read_meta, save_checkpoint
from sharnn.cli import main
from sharnn.config import SHARNNConfig
from sharnn.errors import SharnnError
from sharnn.generate import TokenStep, generate_ids
from sharnn.model import SHARNN, count_parameters
from sharnn.precision import for_inference
from sharnn.serve.app import create_app, listen, model_card
from sharnn.serve.engine import put_stream, slot_state
from sharnn.serve.limits import Limits

ROOT = Path(__file__).resolve().parents[1]
CFG = SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)
LIMITS = Limits(slots=4, queue=6, max_length=300, max_prompt=64, max_text=3000, max_texts=8, max_top_k=5)


@dataclass
class Served:
    ckpt: Path
    model: SHARNN  # the model being served (for_inference: eval, fp32, gates collapsed)
    client: TestClient


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    save_checkpoint(path, SHARNN(CFG))
    return path


def serving(ckpt: Path, limits: Limits) -> tuple[SHARNN, object]:
    from sharnn.checkpoint import load_model

    trained = load_model(ckpt)
    model = for_inference(trained, "fp32")
    return model, create_app(model, model_card(ckpt, count_parameters(trained)), limits)


@pytest.fixture(scope="module")
def served(ckpt: Path) -> Iterator[Served]:
    model, app = serving(ckpt, LIMITS)
    with TestClient(app) as client:
        yield Served(ckpt, model, client)


def cli_output(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def library_text(model: SHARNN, prompt: str, length: int, seed: int, rows: int, **kw: object) -> str:
    ids = list(prompt.encode())
    out = bytes(t for t, _, _ in generate_ids(model, ids, length, seed=seed, rows=rows, **kw))  # type: ignore[arg-type]
    return out.decode("utf-8", errors="replace")


# --- generation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [{"seed": 3}, {"seed": 5, "temperature": 0.7, "top_k": 20},
                                    {"seed": 9, "top_p": 0.8}, {"temperature": 0}])
def test_generate_is_what_the_command_line_prints(served: Served, capsys: pytest.CaptureFixture[str],
                                                  fields: dict) -> None:
    prompt = "Colourless green ideas\n"
    r = served.client.post("/v1/generate", json={"prompt": prompt, "length": 120, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == 120 and body["prompt_tokens"] == len(prompt)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**fields, "seed": body["seed"]}.items()]
    printed = cli_output(capsys, "generate", str(served.ckpt), "--prompt", prompt, "--length", "120",
                         "--step-rows", str(LIMITS.slots), *flags)
    assert printed == prompt + body["text"] + "\n"  # the command ends its output with a newline
    kw = {k: v for k, v in fields.items() if k != "seed"}
    assert body["text"] == library_text(served.model, prompt, 120, body["seed"], LIMITS.slots, **kw)


def test_a_drawn_seed_is_returned_and_repeats(served: Served) -> None:
    a = served.client.post("/v1/generate", json={"prompt": "x", "length": 40}).json()
    b = served.client.post("/v1/generate", json={"prompt": "x", "length": 40, "seed": a["seed"]}).json()
    assert a["text"] == b["text"] and a["seed"] == b["seed"]
    assert served.client.post("/v1/generate", json={"prompt": "x", "length": 0}).json()["text"] == ""


def read_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if lines:
            kind = next((ln[7:] for ln in lines if ln.startswith("event: ")), "message")
            events.append((kind, json.loads(next(ln[6:] for ln in lines if ln.startswith("data: ")))))
    return events


def test_streaming_sends_the_same_bytes_as_events(served: Served) -> None:
    plain = served.client.post("/v1/generate", json={"prompt": "é", "length": 60, "seed": 4}).json()
    with served.client.stream("POST", "/v1/generate",
                              json={"prompt": "é", "length": 60, "seed": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r.read().decode())
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"message"} and len(kinds) > 2
    assert "".join(d["text"] for k, d in events if k == "message") == plain["text"] == events[-1][1]["text"]
    assert sum(len(d["tokens"]) for k, d in events if k == "message") == 60


def test_concurrent_generations_get_what_they_get_alone(served: Served) -> None:
    # More requests than slots (4): some wait, join as others finish, and all step together in between.
    requests = [{"prompt": p, "length": n, "seed": s, **extra} for p, n, s, extra in [
        ("The cat", 150, 1, {}), ("sat on", 90, 2, {"top_k": 5}), ("the mat.\n", 200, 3, {"top_p": 0.9}),
        ("A", 60, 4, {"temperature": 0.5}), ("Colourless", 120, 5, {}), ("green ideas", 170, 6, {}),
        ("sleep", 30, 7, {"temperature": 0}), ("furiously", 110, 8, {})]]
    alone = [served.client.post("/v1/generate", json=q).json()["text"] for q in requests]
    engine = served.client.app.state.engine
    steps = engine.steps
    together: list[str | None] = [None] * len(requests)

    def ask(i: int) -> None:
        together[i] = served.client.post("/v1/generate", json=requests[i]).json()["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert engine.steps - steps < sum(q["length"] for q in requests) * 0.6  # they shared steps


def test_rows_of_a_fixed_width_step_do_not_depend_on_each_other(served: Served) -> None:
    # The batching's premise, checked on this machine's kernels: a stream's scores in a step of fixed width are
    # bit for bit the same whatever the other rows hold and whichever row it is in, with streams of different
    # ages (a count per slot), before and after their rings wrap (span 24). They equal `generate_ids`'s steps
    # at that width (a single stream in every row).
    model, W = served.model, LIMITS.slots
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 11, 30, 1)]
    feeds = [torch.randint(0, 256, (40,), generator=g).tolist() for _ in prompts]

    def run(order: list[int]) -> dict[int, list[torch.Tensor]]:
        with torch.no_grad():
            step = TokenStep(model, slot_state(model, W))
            for slot, k in enumerate(order):
                put_stream(step.state, slot, model.ring_state(model(torch.tensor(prompts[k])[:, None]).state))
            out: dict[int, list[torch.Tensor]] = {k: [] for k in order}
            for t in range(40):
                tokens = torch.zeros(1, W, dtype=torch.long)
                for slot, k in enumerate(order):
                    tokens[0, slot] = feeds[k][t]
                logits = step(tokens)
                for slot, k in enumerate(order):
                    out[k].append(logits[slot].clone())
        return out

    a, b = run([0, 1, 2, 3]), run([3, 2, 0, 1])
    single = run([2])
    for k in range(4):
        assert all(torch.equal(x, y) for x, y in zip(a[k], b[k])), k
    assert all(torch.equal(x, y) for x, y in zip(a[2], single[2]))
    with torch.no_grad():  # the same stream alone, as generate_ids steps it with rows=W
        state = model(torch.tensor(prompts[2])[:, None]).state
        wide = tuple(type(s)(tuple(t.expand(-1, W, -1) for t in s.rnn), s.memory.expand(-1, W, -1)
                             if s.memory is not None else None) for s in state)
        step = TokenStep(model, model.ring_state(wide))
        for t in range(40):
            assert torch.equal(step(torch.full((1, W), feeds[2][t]))[0], a[2][t]), t


# --- scoring --------------------------------------------------------------------------------------------------------


def test_score_is_what_the_command_line_prints(served: Served, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    lines = ["The cat sat on the mat.", "Colourless green ideas sleep furiously", "x"]
    r = served.client.post("/v1/score", json={"texts": lines, "eos": True})
    assert r.status_code == 200, r.text
    stdin = tmp_path / "lines.txt"
    stdin.write_text("\n".join(lines) + "\n")
    cli = [json.loads(ln) for ln in cli_output(capsys, "score", str(served.ckpt), str(stdin), "--json").splitlines()]
    for ours, theirs in zip(r.json()["results"], cli, strict=True):
        for key in ("logprob", "log2prob", "bpc"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-4), key
        assert ours["tokens"] == theirs["tokens"]
    doc = "def main():\n    return 1\n" * 12  # several segments of 128 tokens, the state carried
    (tmp_path / "doc.txt").write_text(doc)
    theirs = json.loads(cli_output(capsys, "score", str(served.ckpt), "--document", str(tmp_path / "doc.txt"),
                                   "--json"))
    ours = served.client.post("/v1/score", json={"text": doc, "context": "\n"}).json()["results"][0]
    assert ours["tokens"] == theirs["tokens"] == len(doc)
    assert ours["logprob"] == pytest.approx(theirs["logprob"], rel=1e-5)


def test_score_per_token_and_guesses(served: Served) -> None:
    res = served.client.post("/v1/score", json={"text": "hello, world", "top_k": 3}).json()["results"][0]
    toks = res["per_token"]
    assert [t["token"] for t in toks] == list("hello, world")
    assert sum(t["logprob"] for t in toks) == pytest.approx(res["logprob"], abs=1e-4)
    for t in toks:
        top = [g["logprob"] for g in t["top"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and t["logprob"] <= top[0] + 1e-6
        assert any(g["id"] == t["id"] for g in t["top"]) == (t["logprob"] >= top[-1] - 1e-6)
    plain = served.client.post("/v1/score", json={"text": "hello, world"}).json()["results"][0]
    assert "per_token" not in plain and plain["logprob"] == res["logprob"]


def test_a_text_scores_the_same_whatever_is_scored_beside_it(served: Served) -> None:
    text = "the state is carried from segment to segment " * 8
    alone = served.client.post("/v1/score", json={"text": text, "per_token": True}).json()["results"][0]
    crowd = ["short", text[:200], "x" * 500, text, "é" * 40]
    results: list[dict] = []

    def ask(texts: list[str]) -> None:
        results.extend(served.client.post("/v1/score", json={"texts": texts, "per_token": True}).json()["results"])

    threads = [threading.Thread(target=ask, args=(crowd,)), threading.Thread(target=ask, args=([text],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same = [r for r in results if r["tokens"] == alone["tokens"]]
    assert len(same) == 2 and all(r == alone for r in same)  # exactly: same floats, token by token


# --- the rest of the API -------------------------------------------------------------------------------------------


def test_attention_is_the_models_own(served: Served) -> None:
    text = "the cat sat on the mat and the cat ran"
    r = served.client.post("/v1/attention", json={"text": text, "position": 30})
    assert r.status_code == 200, r.text
    body = r.json()
    (block,) = body["blocks"]
    ids = torch.tensor(list(text.encode()[:31]))
    maps, _ = attention_over_text(served.model, ids, 30, 1, before=CFG.attn_span)
    assert block["block"] == 1 and block["key_start"] == 30 - (CFG.attn_span - 1) == maps[0].key_start
    assert np.allclose(block["weights"], maps[0].weights[0], atol=1e-6) and sum(block["weights"]) == pytest.approx(1)
    assert body["tokens"][-1] == "␣" and body["tokens"][-2] == "e" and len(body["tokens"]) == 31


def test_model_description_health_openapi_and_page(served: Served) -> None:
    info = served.client.get("/v1/model").json()
    assert info["sha256"] == read_meta(served.ckpt)["files"]["model.safetensors"]["sha256"]
    assert info["parameters"] == count_parameters(SHARNN(CFG)) and info["config"]["emsize"] == 16
    assert info["vocabulary"] == {"kind": "bytes", "size": 256, "level": "char"} and info["step_rows"] == 4
    assert served.client.get("/healthz").json()["status"] == "ok"
    spec = served.client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/score", "/v1/attention", "/v1/model", "/healthz"} <= set(spec["paths"])
    page = served.client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for path in ("/", "/static/app.js", "/static/style.css"):  # nothing fetched from elsewhere
        body = served.client.get(path).text
        assert "://" not in body and "<script" not in body.replace('<script src="/static/app.js" defer>', "")


BAD: list[tuple[str, str, object, int, str]] = [
    # (what, path, body (str: sent as is), status, fragment of the error)
    ("not JSON", "/v1/generate", '{"prompt": "x", "length": 5', 400, "not valid JSON"),
    ("not UTF-8", "/v1/generate", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("not an object", "/v1/generate", "[1, 2]", 422, "dictionary"),
    ("empty body", "/v1/generate", "", 400, ""),
    ("a string for a number", "/v1/generate", {"length": "5"}, 422, "length"),
    ("a bool for a number", "/v1/generate", {"length": True}, 422, "length"),
    ("a float for an integer", "/v1/generate", {"length": 5.5}, 422, "length"),
    ("an unknown field", "/v1/generate", {"prompt": "x", "lenght": 5}, 422, "lenght"),
    ("negative length", "/v1/generate", {"length": -1}, 422, "length"),
    ("absurd length", "/v1/generate", {"length": 10**12}, 422, "over the limit"),
    ("negative temperature", "/v1/generate", {"temperature": -0.5}, 422, "temperature"),
    ("NaN temperature", "/v1/generate", '{"temperature": NaN}', 422, "finite"),
    ("top_k 0", "/v1/generate", {"top_k": 0}, 422, "top_k"),
    ("top_p above 1", "/v1/generate", {"top_p": 1.5}, 422, "top_p"),
    ("huge seed", "/v1/generate", {"seed": 2**70}, 422, "seed"),
    ("empty prompt", "/v1/generate", {"prompt": ""}, 422, "empty"),
    ("long prompt", "/v1/generate", {"prompt": "x" * 65}, 422, "over the limit"),
    ("lone surrogate", "/v1/generate", '{"prompt": "\\ud800"}', 422, "Unicode"),
    ("a list for stream", "/v1/generate", {"stream": [1]}, 422, "stream"),
    ("text and texts", "/v1/score", {"text": "a", "texts": ["b"]}, 422, "either"),
    ("neither", "/v1/score", {}, 422, "either"),
    ("empty text", "/v1/score", {"text": ""}, 422, "empty"),
    ("too many texts", "/v1/score", {"texts": ["a"] * 9}, 422, "over the limit"),
    ("texts too long", "/v1/score", {"texts": ["a" * 2000, "b" * 1001]}, 422, "over the limit"),
    ("top_k too big", "/v1/score", {"text": "a", "top_k": 6}, 422, "over the limit"),
    ("empty context", "/v1/score", {"text": "a", "context": ""}, 422, "empty"),
    ("a number for a text", "/v1/score", {"texts": ["a", 3]}, 422, "texts.1"),
    ("position past the end", "/v1/attention", {"text": "abc", "position": 3}, 422, "3 tokens"),
    ("negative position", "/v1/attention", {"text": "abc", "position": -1}, 422, "position"),
    ("too large a body", "/v1/score", {"text": "a" * 100_000}, 413, "over the limit"),
    ("no such path", "/v1/nothing", {}, 404, "no such path"),
]


@pytest.mark.parametrize("what, path, body, status, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_one_line_json_error(served: Served, what: str, path: str, body: object, status: int,
                                            fragment: str) -> None:
    raw = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    r = served.client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (what, r.text)
    error = r.json()
    assert list(error) == ["error"] and "\n" not in error["error"] and fragment in error["error"], error


def test_bad_input_changes_nothing_for_the_others(served: Served) -> None:
    before = served.client.post("/v1/generate", json={"prompt": "same", "length": 50, "seed": 1}).json()["text"]
    for _, path, body, _, _ in BAD:
        raw = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
        served.client.post(path, content=raw)
    assert served.client.post("/v1/generate", json={"prompt": "same", "length": 50, "seed": 1}).json()["text"] == before
    assert served.client.post("/v1/generate", content=b'{"prompt": "same", "length": 50, "seed": 1}').status_code == 200
    assert served.client.get("/v1/generate").status_code == 405


def test_a_full_queue_answers_503_with_retry_after(ckpt: Path) -> None:
    _, app = serving(ckpt, Limits(slots=1, queue=0, max_length=5000))
    with TestClient(app) as client:
        engine = client.app.state.engine
        first: list[httpx.Response] = []
        t = threading.Thread(target=lambda: first.append(client.post("/v1/generate", json={"length": 1500})))
        t.start()
        while engine.load()["active"] == 0:
            time.sleep(0.005)
        r = client.post("/v1/generate", json={"length": 5})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
        t.join()
        assert first[0].status_code == 200 and first[0].json()["tokens"] == 1500
        assert client.post("/v1/generate", json={"length": 5}).status_code == 200


# --- the command -------------------------------------------------------------------------------------------------


def test_serve_flags_reach_the_server(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sharnn.serve.app as serve_app

    seen = {}

    def fake_serve(app, host, port, drain_seconds, announce) -> None:
        seen.update(app=app, host=host, port=port, drain=drain_seconds)

    monkeypatch.setattr(serve_app, "serve", fake_serve)
    assert main(["serve", str(ckpt), "--host", "127.0.0.2", "--port", "9123", "--slots", "3", "--queue", "7",
                 "--max-length", "11", "--max-prompt", "13", "--max-text", "17", "--drain-seconds", "2.5",
                 "--device", "cpu", "--attn-window", "reference"]) == 0
    assert (seen["host"], seen["port"], seen["drain"]) == ("127.0.0.2", 9123, 2.5)
    assert seen["app"].state.limits == Limits(slots=3, queue=7, max_length=11, max_prompt=13, max_text=17)
    engine = seen["app"].state.engine
    assert engine.slots == 3 and engine.model.cfg.attn_window == "reference" and engine.score_segment == 1024
    assert engine.device.type == "cpu"


@pytest.mark.parametrize("flags, fragment", [(["--slots", "0"], "--slots must be at least 1"),
                                             (["--queue", "-1"], "--queue must be at least 0"),
                                             (["--port", "70000"], "--port must be at most 65535")])
def test_serve_refuses_bad_flags_in_one_line(ckpt: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                             fragment: str) -> None:
    assert main(["serve", str(ckpt), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and fragment in err


def test_serve_without_the_web_stack_says_what_to_install(ckpt: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install sharnn` had no [serve]
    assert main(["serve", str(ckpt)]) == 2
    assert capsys.readouterr().err.strip() == "sharnn: error: sharnn serve needs uvicorn: pip install 'sharnn[serve]'"


def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(SharnnError, match="cannot listen on 127.0.0.1:.*another --port"):
            listen("127.0.0.1", s.getsockname()[1])


def test_generate_step_rows_flag(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sharnn.checkpoint import load_model

    model = for_inference(load_model(ckpt), "fp32")
    out = cli_output(capsys, "generate", str(ckpt), "--prompt", "ab", "--length", "80", "--seed", "2",
                     "--step-rows", "3")
    assert out == "ab" + library_text(model, "ab", 80, 2, 3) + "\n"
    assert main(["generate", str(ckpt), "--step-rows", "0"]) == 2
    assert "--step-rows must be at least 1" in capsys.readouterr().err


# --- a real server: disconnects, SIGTERM, load ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_frees_its_slot(ckpt: Path) -> None:
    import uvicorn

    _, app = serving(ckpt, Limits(slots=2, max_length=100_000))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.01)
        engine = app.state.engine
        with httpx.Client() as client, client.stream(
                "POST", f"{url}/v1/generate", json={"length": 100_000, "stream": True, "seed": 1}) as r:
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data: "))
            assert engine.load()["active"] == 1
        t0 = time.time()
        while engine.load()["active"] and time.time() - t0 < 5:
            time.sleep(0.01)
        assert engine.load()["active"] == 0 and time.time() - t0 < 2  # freed within a couple of steps' time
        steps = engine.steps
        time.sleep(0.2)
        assert engine.steps == steps  # and nothing steps for it any more
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "after", "length": 20, "seed": 1})
        assert r.status_code == 200 and r.json()["tokens"] == 20
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_and_exits_0(ckpt: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sharnn.cli", "serve", str(ckpt), "--port", str(port),
                             "--max-length", "20000", "--drain-seconds", "20"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        assert any("serving" in proc.stderr.readline() for _ in range(20))  # (after any warnings)
        answer: list[httpx.Response] = []
        t = threading.Thread(target=lambda: answer.append(
            httpx.post(f"{url}/v1/generate", json={"length": 2000, "seed": 1}, timeout=60)))
        t.start()
        while httpx.get(f"{url}/healthz").json()["active"] == 0:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        t.join()
        assert answer[0].status_code == 200 and answer[0].json()["tokens"] == 2000  # finished, not cut
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.slow
def test_load_benchmark_runs_and_every_answer_is_what_it_is_alone(ckpt: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(ckpt), "--clients", "1",
                           "6", "--seconds", "1", "--length", "60", "--slots", "4", "--recheck", "4", "--json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["server_exit_status"] == 0 and out["peak_memory_mib"] > 0
    for row in out["rows"]:
        assert row["errors"] == 0 and row["requests"] > 0 and row["identical_alone"] == "4/4", row
        assert row["p99_s"] >= row["p50_s"] > 0
