#!/usr/bin/env python3
"""Take the screenshots of the gateway's web page in docs/img/ with headless Chromium.

Starts real processes: a body server for zoo:smollm2 (layers 2:28), a U-Net server for
zoo:digits, and `lambdasplit gateway` in split mode over both; then Playwright drives
Debian's chromium (never a downloaded browser): one chat and one image, a screenshot of
each view with its wire panel.

    .venv/bin/python scripts/gateway_screenshots.py                     # writes docs/img/gateway-*.png
    .venv/bin/python scripts/gateway_screenshots.py --gateway http://127.0.0.1:8000   # an existing gateway
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def start_gateway(stack: ExitStack, split: str = "2:28") -> str:
    from lambdasplit.gateway.process import GatewayProcess
    from lambdasplit.server.process import ServerProcess

    body = stack.enter_context(ServerProcess(["--model", "zoo:smollm2", "--layers", split]))
    unet = stack.enter_context(ServerProcess(["--component", "unet", "--model", "zoo:digits"]))
    gateway = stack.enter_context(GatewayProcess(["--model", "zoo:smollm2", "--split", split, "--server", body.address,
                                                  "--image-model", "zoo:digits", "--image-server", unet.address]))
    return gateway.url


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        raise SystemExit("Debian's chromium is needed: apt-get install -y chromium")
    return path


def shoot(url: str, out: Path, prompt: str, image_prompt: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = [out / "gateway-chat.png", out / "gateway-image.png"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#chat-input", prompt)
        page.click("#chat-send")
        page.wait_for_function("document.body.dataset.lastRequest", timeout=300_000)
        page.screenshot(path=str(shots[0]), full_page=True)
        summaries = [_summary(url, page)]
        page.click("#tab-image")
        page.fill("#image-prompt", image_prompt)
        page.click("#image-send")
        page.wait_for_function("(document.body.dataset.lastRequest || '').startsWith('img-')", timeout=300_000)
        page.screenshot(path=str(shots[1]), full_page=True)
        summaries.append(_summary(url, page))
        browser.close()
    for summary in summaries:
        print(json.dumps(summary))
    return shots


def _summary(url: str, page) -> dict:
    """The wire summary of the page's last request, as the API reported it."""
    import httpx

    view = httpx.get(f"{url}/lambdasplit/requests/{page.evaluate('document.body.dataset.lastRequest')}").json()
    keys = ("id", "mode", "split", "codec", "bytes_up", "bytes_down", "round_trips", "completion_tokens")
    return {k: view[k] for k in keys if k in view}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", help="URL of a running gateway (default: start servers and a gateway)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--image-prompt", default="a handwritten digit seven")
    args = parser.parse_args()
    began = time.perf_counter()
    with ExitStack() as stack:
        url = args.gateway or start_gateway(stack)
        for shot in shoot(url, args.out, args.prompt, args.image_prompt):
            print(f"wrote {shot}")
    print(f"{time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
