"""The web demo (`unipic-jax demo`) in a real browser: Debian's Chromium, driven by Selenium through
Debian's chromedriver (nothing is downloaded).

One demo server per module (per xdist worker running any of these tests), started with the fixture
UniPic checkpoint (random weights: its pictures are noise and its answers gibberish) on a free
loopback port, at the model's native size and 2 MAR steps, and stopped at the end. Each test opens
the page afresh, so it starts a conversation of its own. Without Chromium the tests fail (a skipped
browser test would hide a missing install); `.ci/run` installs it.

`UNIPIC_DEMO_SCREENSHOT=docs/demo.png python -m pytest tests/test_demo_browser.py -k conversation`
also writes the README's screenshot.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import FIXTURE_ROOT, fixture_checkpoint

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
STEPS = 2
START_TIMEOUT = 240   # seconds for the server to load the model and answer
TURN_TIMEOUT = 420    # seconds for one turn (the first compiles; 2 busy cores are slow)
GENERATE, EDIT, ASK = "Generate a picture", "Edit the last picture", "Ask about the last picture"


def native_size() -> int:
    from configs.fixture import get_config

    return get_config(FIXTURE_ROOT / "unipic").mar.img_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """Start `unipic-jax demo` on the fixture checkpoint; yield its URL; stop it."""
    root = tmp_path_factory.mktemp("demo")
    checkpoint = fixture_checkpoint(root)
    port = free_port()
    log = open(root / "server.log", "w+")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    server = subprocess.Popen(
        [sys.executable, "-m", "unipic_jax.cli", "demo", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--size", str(native_size()), "--steps", str(STEPS)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"the demo server exited with status {server.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the demo server did not answer within {START_TIMEOUT}s:\n{log.read()}")
            time.sleep(0.5)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # as Ctrl-C: the server closes and removes its pictures
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium (the flags keep it off the network it cannot reach)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: the browser tests need Debian's Chromium "
                    f"(apt-get install chromium chromium-driver; .ci/run installs them)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class Chat:
    """The demo page as a user sees it: send messages, read the answers."""

    def __init__(self, driver, url: str):
        self.driver = driver
        driver.get(url)
        self.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#message textarea"), 60, "the page to load")

    def wait(self, condition, timeout: float, what: str):
        def check(_):
            try:
                return condition()
            except StaleElementReferenceException:  # the chat re-rendered under us: look again
                return False

        return WebDriverWait(self.driver, timeout, poll_frequency=0.25).until(
            check, f"timed out after {timeout}s waiting for {what}; chat: {self.texts('bot')}")

    def find(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def texts(self, role: str) -> list[str]:
        """The text of each user or bot ("bot") message element (an image is an element of its own)."""
        try:
            return [e.text for e in self.find(f'#chat [data-testid="{role}"]')]
        except StaleElementReferenceException:
            return self.texts(role)

    def pictures(self) -> list[str]:
        """The src of every picture in the assistant's messages."""
        return [e.get_attribute("src") for e in self.find('#chat [data-testid="bot"] img')]

    def downloads(self) -> list[str]:
        return [a.get_attribute("href") for a in self.find("#downloads a[href]")]

    def set_number(self, elem_id: str, value) -> None:
        box = self.find(f"#{elem_id} input[type=number]")[0]
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    def send(self, text: str, mode: str = GENERATE, attach: Path | None = None) -> str:
        """Send a message in `mode` (optionally with a file) and wait for the whole answer: the
        input unlocked and the last assistant message no longer a "…" waiting note. Returns it."""
        self.find(f'#mode label[data-testid="{mode}-radio-label"]')[0].click()
        if attach is not None:
            self.find("#message input[type=file]")[0].send_keys(str(attach))
            self.wait(lambda: self.find("#message .thumbnail-item"), 60, "the upload")
        users = len(self.texts("user"))
        box = self.find("#message textarea")[0]
        box.send_keys(text, Keys.ENTER)
        self.wait(lambda: len(self.texts("user")) > users, 60, "the message to appear")

        def answered():
            bots = self.texts("bot")
            return (bots and not bots[-1].endswith("…")
                    and self.find("#message textarea")[0].get_attribute("disabled") is None)

        self.wait(answered, TURN_TIMEOUT, f"the answer to {text!r}")
        return self.texts("bot")[-1]


def fetch(url: str, path: Path) -> Path:
    with urllib.request.urlopen(url, timeout=30) as response:
        path.write_bytes(response.read())
    return path


@pytest.fixture
def chat(browser, demo_url):
    return Chat(browser, demo_url)


def test_browser_generate_edit_and_ask_in_one_conversation(chat, tmp_path):
    # Turn 1: a picture appears in the chat, with its seed, and as a PNG download carrying its settings.
    reply = chat.send("a red fox in the snow")
    assert reply.startswith("Generated: seed ") and f"{STEPS} steps" in reply, reply
    assert len(chat.pictures()) == 1
    (first,) = chat.downloads()
    with Image.open(fetch(first, tmp_path / "first.png")) as img:
        assert img.format == "PNG" and img.size == (native_size(),) * 2
        assert img.text["prompt"] == "a red fox in the snow" and img.text["task"] == "text-to-image"

    # Turn 2: an edit of that picture.
    reply = chat.send("make it night", mode=EDIT)
    assert reply.startswith("Edited: seed "), reply
    assert len(chat.pictures()) == 2
    assert len(chat.downloads()) == 2
    with Image.open(fetch(chat.downloads()[-1], tmp_path / "edited.png")) as img:
        assert img.text["prompt"] == "make it night" and img.text["task"] == "edit"

    # Turn 3: a question about the edited picture gets an answer (the random model's gibberish).
    chat.set_number("answer-tokens", 16)
    reply = chat.send("What is in the picture?", mode=ASK)
    assert reply.strip() and not reply.startswith("Error"), reply

    # The history scrolls: taller than its box, kept at the bottom, and scrollable to the top.
    log = "#chat [role=log]"
    overflow, height, box, top = chat.driver.execute_script(
        f"const e = document.querySelector('{log}'); "
        "return [getComputedStyle(e).overflowY, e.scrollHeight, e.clientHeight, e.scrollTop];")
    assert overflow in ("auto", "scroll") and height > box, (overflow, height, box)
    assert top > 0 and top + box >= height - 2, "the chat did not scroll to the newest message"
    first_shown = chat.driver.execute_script(
        f"const e = document.querySelector('{log}'); e.scrollTop = 0; "
        "const first = e.querySelector('[data-testid=user]').getBoundingClientRect(); "
        "return first.top >= e.getBoundingClientRect().top - 1;")
    assert first_shown, "scrolled to the top, the first message is not in view"
    chat.driver.save_screenshot(str(tmp_path / "demo.png"))
    if os.environ.get("UNIPIC_DEMO_SCREENSHOT"):  # the README's: the chat stretched to show the whole session
        page = chat.driver.execute_script(
            f"const e = document.querySelector('{log}'); "
            "document.querySelector('#chat').style.height = (e.scrollHeight + 60) + 'px'; "
            "return document.documentElement.scrollHeight;")
        chat.driver.set_window_size(1280, page + 200)
        ActionChains(chat.driver).move_to_element(chat.find("h2")[0]).perform()  # no hover styles
        chat.driver.execute_script(f"const e = document.querySelector('{log}'); e.scrollTop = e.scrollHeight; "
                                   "e.dispatchEvent(new Event('scroll'));")
        time.sleep(1)
        shot = os.environ["UNIPIC_DEMO_SCREENSHOT"]
        chat.driver.save_screenshot(shot)
        Image.open(shot).convert("RGB").quantize(256).save(shot, optimize=True)  # a third of the bytes
        chat.driver.set_window_size(1280, 1000)


def test_browser_ask_about_an_uploaded_image(chat, tmp_path):
    picture = tmp_path / "red square.png"
    Image.new("RGB", (96, 80), (200, 30, 30)).save(picture)
    chat.set_number("answer-tokens", 16)
    reply = chat.send("What colour is this?", mode=ASK, attach=picture)
    assert reply.strip() and not reply.startswith("Error"), reply
    assert chat.find('#chat [data-testid="user"] img'), "the uploaded picture is not shown in the chat"


def test_browser_bad_upload_and_bad_size_are_answered_in_the_chat(chat, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    reply = chat.send("What is this?", mode=ASK, attach=broken)
    assert reply.startswith("Error") and "broken.png" in reply and "not an image" in reply, reply

    chat.set_number("size", native_size() + 8)
    reply = chat.send("a red fox")
    assert reply.startswith("Error") and "multiple of 16" in reply, reply

    reply = chat.send("make it night", mode=EDIT)  # nothing to edit yet, and the page still answers
    assert reply.startswith("Error") and "no picture yet" in reply, reply


def test_model_calls_share_one_queue_slot(tmp_path):
    """Users are queued, never interleaved: every event that runs the model takes the one "model" slot."""
    from unipic_jax.demo.app import Demo, Models, build_app

    app = build_app(Models(str(tmp_path / "not loaded")), tmp_path)
    model_events = [f for f in app.fns.values() if getattr(f.fn, "__func__", None) is Demo.bot_turn]
    assert model_events and all(f.queue and (f.concurrency_id, f.concurrency_limit) == ("model", 1)
                                for f in model_events)


def test_fast_mode_control_appears_with_the_pipelines_switch(tmp_path, monkeypatch):
    from unipic_jax.api import UniPicPipeline
    from unipic_jax.demo.app import GENERATE, Models, Settings, build_app, has_fast_mode

    def shown(app) -> bool:
        return any(getattr(block, "elem_id", None) == "sampler" for block in app.blocks.values())

    assert shown(build_app(Models("unused"), tmp_path)) == has_fast_mode()

    def generate(self, prompt, *, fast: bool = False, **settings):
        return [prompt, fast]

    monkeypatch.setattr(UniPicPipeline, "generate", generate)
    monkeypatch.setattr(UniPicPipeline, "edit", generate)
    assert shown(build_app(Models("unused"), tmp_path))
    s = Settings(GENERATE, 64.0, 2.0, 3.0, -1, "float32", 16, "fast")
    assert s.sampling(UniPicPipeline.generate) == dict(size=64, steps=2, cfg=3.0, seed=None, fast=True)
