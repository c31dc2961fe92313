"""The gateway's web page in a real browser: Playwright driving Debian's headless chromium.

The page loads with everything it needs from the gateway itself (any request to another
host fails the test), a chat streams and completes, the panel shows that request's bytes
as the API reported them, and an image is generated. Never downloads a browser: the
Makefile installs Debian's chromium when it is missing.
"""

from __future__ import annotations

import shutil
from urllib.parse import urlparse

import httpx
import pytest

from gateway_stack import SPLIT, body, gateway, model, pipeline, unet  # noqa: F401 (fixtures)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page(gateway):
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is missing: `make install` installs it (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.foreign = []  # requests to anything but the gateway: the page must need none
        page.errors = []
        here = urlparse(gateway).netloc
        page.on("request", lambda r: urlparse(r.url).netloc != here and r.url.startswith("http")
                and page.foreign.append(r.url))
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(gateway)
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        yield page
        browser.close()


def test_page_loads_from_the_gateway_alone(page, model):
    assert model in page.inner_text("#setting") and SPLIT in page.inner_text("#setting")
    assert page.foreign == [] and page.errors == []
    privacy = page.inner_text("#privacy")
    assert "Not measured" in privacy and "public weights" in privacy  # never more than the audit measured


def test_chat_streams_and_the_panel_shows_its_bytes(page, gateway):
    page.evaluate("""() => {  // count the text updates of the answer as they arrive
        window.updates = 0;
        new MutationObserver((records) => records.forEach((r) => {
            const element = r.target.nodeType === 1 ? r.target : r.target.parentElement;
            if (element && element.closest('.message.assistant')) window.updates++;
        })).observe(document.getElementById('messages'),
            {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#max-tokens", "12")
    page.fill("#chat-input", "the quick brown fox")
    page.click("#chat-send")
    page.wait_for_function("(document.body.dataset.lastRequest || '').startsWith('chatcmpl-')", timeout=120_000)
    answer = page.inner_text(".message.assistant")
    assert answer and not answer.startswith("error")
    assert page.evaluate("window.updates") > 1  # the answer arrived piece by piece
    request_id = page.evaluate("document.body.dataset.lastRequest")
    view = httpx.get(f"{gateway}/lambdasplit/requests/{request_id}").json()
    assert page.inner_text("#panel-bytes-up") == f"{view['bytes_up']:,}"
    assert page.inner_text("#panel-bytes-down") == f"{view['bytes_down']:,}"
    assert page.inner_text("#panel-round-trips") == str(view["round_trips"])
    assert page.inner_text("#hex").startswith("00000000")
    assert page.get_attribute("#picture", "src").startswith("data:image/png")
    search = page.inner_text("#search")
    assert "not found" in search and "found verbatim" in search  # split: not found; cloud-only: verbatim
    assert page.evaluate("document.getElementById('chart').getContext('2d')"
                         ".getImageData(0, 0, 420, 120).data.some(v => v > 0)")


def test_an_image_is_generated(page):
    page.click("#tab-image")
    page.fill("#image-prompt", "a red cat")
    page.click("#image-send")
    page.wait_for_function("(document.body.dataset.lastRequest || '').startsWith('img-')", timeout=120_000)
    assert page.get_attribute("#image-result", "src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('image-result').naturalWidth") > 0
    status = page.inner_text("#image-status")
    n = int(status.split()[0])
    assert status == f"{n} round trip" + ("" if n == 1 else "s")
    assert page.inner_text("#panel-mode") == "split"
    assert page.foreign == [] and page.errors == []
