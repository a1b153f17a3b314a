"""The dashboard served by a real `streamlit run`, loaded in headless Debian Chromium.

Chromium's `--screenshot`/`--dump-dom` fire at the page's load event, before Streamlit has
rendered anything over its websocket, so the browser is driven through the DevTools protocol
on a pipe (`--remote-debugging-pipe`, messages are JSON ended by a NUL byte on file
descriptors 3 and 4): navigate, wait (bounded) until the page shows the metrics and its
images have loaded, then take the DOM and a screenshot. Only the loopback address is used.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.apps.dashboard.launch import streamlit_command
from test_dashboard import make_dashboard_run

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1400, 1000)
SERVER_START_TIMEOUT = 60.0
RENDER_TIMEOUT = 60.0
SCREENSHOT_ENVIRONMENT_VARIABLE = "PATCHCORE_DASHBOARD_SCREENSHOT"

PAGE_READY = """(() => {
  const text = document.body ? document.body.innerText : "";
  const images = Array.from(document.images).filter(i => i.src.includes("/media/"));
  const running = document.querySelector('[data-testid="stStatusWidget"]');
  return {text: text, images: images.length,
          loaded: images.every(i => i.complete && i.naturalWidth > 0),
          charts: document.querySelectorAll('[data-testid="stVegaLiteChart"] canvas, '
                                            + '[data-testid="stVegaLiteChart"] svg').length,
          running: running !== null && running.innerText.includes("Running")};
})()"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


pytest.importorskip(
    "streamlit", reason='Streamlit is not installed (pip install -e ".[dashboard]")'
)
pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium binary on PATH (Debian: apt-get install -y chromium)",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"streamlit did not become healthy at {url} within {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class DevToolsPipe:
    """A headless Chromium and a minimal DevTools-protocol client over its debugging pipe."""

    def __init__(self, chromium: str, profile: Path) -> None:
        browser_reads, self._to_browser = os.pipe()
        self._from_browser, browser_writes = os.pipe()
        arguments = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        # bash places the pipe ends on descriptors 3 and 4, where Chromium expects them.
        script = f'exec "$0" "$@" 3<&{browser_reads} 4>&{browser_writes}'
        self.process = subprocess.Popen(
            ["bash", "-c", script, *arguments],
            pass_fds=(browser_reads, browser_writes),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(browser_reads)
        os.close(browser_writes)
        self._buffer = b""
        self._last_id = 0

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        stop(self.process)
        os.close(self._to_browser)
        os.close(self._from_browser)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:  # fmt: skip
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its debugging pipe")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open_page(self, url: str) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        session_id = session["sessionId"]
        metrics = {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics, session_id)
        self.send("Page.enable", session=session_id)
        self.send("Page.navigate", {"url": url}, session_id)
        return session_id

    def evaluate(self, session: str, expression: str):
        reply = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        return reply["result"].get("value")

    def screenshot(self, session: str) -> bytes:
        return base64.b64decode(
            self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        )


def wait_for_render(browser: DevToolsPipe, session: str, timeout: float) -> dict:
    """Polls until the overview and the image grid are drawn; returns the last page state."""
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = browser.evaluate(session, PAGE_READY) or {}
        drawn = "Image AUROC" in state.get("text", "") and state.get("images", 0) > 0
        if drawn and state.get("loaded") and state.get("charts") and not state.get("running"):
            time.sleep(1.0)  # let the last layout pass (chart axes, fonts) settle
            return state
        time.sleep(0.25)
    raise TimeoutError(f"dashboard not rendered within {timeout:.0f} s; last state: {state}")


@pytest.fixture(scope="module")
def dashboard_run(synthetic_root, tmp_path_factory):
    results = tmp_path_factory.mktemp("dashboard_browser_results")
    return results, make_dashboard_run(synthetic_root, results)


@pytest.fixture
def served_dashboard(dashboard_run, tmp_path):
    """`streamlit run` of the app on a free loopback port; always stopped afterwards."""
    results, _ = dashboard_run
    port = free_port()
    command = streamlit_command(results, port, "127.0.0.1", headless=True)
    log = (tmp_path / "streamlit.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server, SERVER_START_TIMEOUT)
        yield url
    finally:
        stop(server)
        log.close()


def test_page_renders_in_headless_chromium(served_dashboard, tmp_path):
    browser = DevToolsPipe(find_chromium(), tmp_path / "profile")
    try:
        session = browser.open_page(served_dashboard)
        state = wait_for_render(browser, session, RENDER_TIMEOUT)
        dom = browser.evaluate(session, "document.documentElement.outerHTML")
        png = browser.screenshot(session)
    finally:
        browser.close()
    screenshot_path = Path(os.environ.get(SCREENSHOT_ENVIRONMENT_VARIABLE, tmp_path / "page.png"))
    screenshot_path.write_bytes(png)
    print(f"screenshot: {screenshot_path}", file=sys.stderr)

    assert "PatchCore inspection dashboard" in dom
    for text in ("Image AUROC", "Pixel AUROC", "True reject", "False accept", "Inspected images"):
        assert text in state["text"], text
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG" and picture.size == WINDOW
        pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "screenshot looks blank"
    assert (pixels < 128).mean() > 0.01, "hardly any dark pixels: no text or images drawn"
