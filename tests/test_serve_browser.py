"""The page of `sharnn serve` in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by selenium) goes through a generation, a surprisal view with its guesses and an attention view; the test
checks what the page shows against the API and the library, and saves a screenshot."""

from __future__ import annotations

import math
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sharnn.checkpoint import load_model, save_checkpoint
from sharnn.config import SHARNNConfig
from sharnn.generate import generate_ids
from sharnn.model import SHARNN, count_parameters
from sharnn.precision import for_inference
from sharnn.serve.app import create_app, model_card
from sharnn.serve.limits import Limits

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                                         "(apt-get install chromium chromium-driver; .ci/run does)"),
]
SLOTS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SHARNN]]:
    import uvicorn

    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("page") / "ckpt"
    save_checkpoint(ckpt, SHARNN(SHARNNConfig(emsize=16, nhid=32, nlayers=2, attn_layers=(1,), attn_span=24)))
    trained = load_model(ckpt)
    model = for_inference(trained, "fp32")
    app = create_app(model, model_card(ckpt, count_parameters(trained)), Limits(slots=SLOTS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/", model
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    # This machine's network is closed: nothing of Chromium's own may try to reach out.
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate, timeout: float = 20.0, what: str = "the page") -> object:
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_page_generates_scores_and_shows_attention(server, browser, tmp_path: Path) -> None:
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, model = server
    browser.get(url)
    by_id = lambda name: browser.find_element(By.ID, name)
    text_of = lambda name: by_id(name).get_attribute("textContent")
    wait_for(lambda: "parameters" in text_of("model-info"), what="the model's description")
    assert "4 generation slots" in text_of("model-info")

    # A generation, streamed into the page.
    prompt = "The cat"
    for name, value in (("prompt", prompt), ("length", "90"), ("seed", "7"), ("temperature", "1")):
        by_id(name).clear()
        by_id(name).send_keys(value)
    by_id("generate").click()
    wait_for(lambda: text_of("generate-status").startswith("done"), what="the generation")
    expected = bytes(t for t, _, _ in generate_ids(model, list(prompt.encode()), 90, seed=7, rows=SLOTS))
    assert text_of("generated") == prompt + expected.decode("utf-8", errors="replace")
    assert "seed 7" in text_of("generate-status") and "90 bytes" in text_of("generate-status")

    # Surprisal: one coloured span per character, its bits those of the API, guesses on hover.
    text = "the cat sat on the mat; the cat ran – naïve"
    by_id("score-text").clear()
    by_id("score-text").send_keys(text)
    by_id("score").click()
    wait_for(lambda: "bits per byte" in text_of("score-status"), what="the surprisal view")
    spans = browser.find_elements(By.CSS_SELECTOR, "#surprisal span")
    assert [s.get_attribute("textContent") for s in spans] == list(text)  # "–" and "ï" are one span each
    api = httpx.post(f"{url}v1/score", json={"text": text, "per_token": True}).json()["results"][0]
    bits, k = [], 0
    for ch in text:
        n = len(ch.encode())
        bits.append(sum(-t["logprob"] / math.log(2) for t in api["per_token"][k : k + n]))
        k += n
    assert [float(s.get_attribute("data-bits")) for s in spans] == [round(b, 2) for b in bits]
    assert f"{api['bpc']:.3f} bits per byte" in text_of("score-status")
    backgrounds = {s.value_of_css_property("background-color") for s in spans}
    assert len(backgrounds) > 5  # coloured by surprisal, not all alike
    ActionChains(browser).move_to_element(spans[4]).perform()
    tip = wait_for(lambda: by_id("tip").is_displayed() and text_of("tip"), what="the tooltip")
    assert tip.startswith('"c"') and "bits" in tip and "guesses:" in tip and tip.count("%") == 5

    # Attention: click a character, see the weights of its query over the text before it.
    spans[20].click()
    wait_for(lambda: text_of("attention-status").startswith("block 1"), what="the attention view")
    shown = browser.find_elements(By.CSS_SELECTOR, "#attention span")
    assert "".join(s.get_attribute("textContent") for s in shown) == text[:21]
    answer = httpx.post(f"{url}v1/attention", json={"text": text, "position": 20}).json()["blocks"][0]
    weights = [float(s.get_attribute("data-weight")) for s in shown]
    start = answer["key_start"]
    assert weights == pytest.approx([round(answer["weights"][i - start], 4) if i >= start else 0.0
                                     for i in range(21)], abs=1e-4)
    assert sum(weights) == pytest.approx(1.0, abs=1e-3)

    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
