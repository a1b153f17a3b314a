"""The dashboard served by a real `streamlit run`, loaded and operated in headless Chromium.

Chromium's `--screenshot`/`--dump-dom` fire at the page's load event, before Streamlit has
rendered anything over its websocket, so the browser is driven through the DevTools protocol
on a pipe (`--remote-debugging-pipe`, messages are JSON ended by a NUL byte on file
descriptors 3 and 4): navigate, wait (bounded) until the page shows the metrics and its
images have loaded, then read the page, click and type as an operator would, and take a
screenshot (`docs/images/dashboard.png`, shown in docs/how-to/dashboard.md, is written by
this test when PATCHCORE_DASHBOARD_SCREENSHOT names it). Only the loopback address is used.
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

from conftest import DASHBOARD_CATEGORY, DASHBOARD_ENSEMBLE_RUN, DASHBOARD_GOOD_ONLY
from patchcore.apps.dashboard import data
from patchcore.apps.dashboard.launch import streamlit_command
from patchcore.evaluation.records import read_predictions
from patchcore.model.serialization import load_ensemble_statistics

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
pytestmark = [
    pytest.mark.skipif(
        find_chromium() is None,
        reason="no Chromium binary on PATH (Debian: apt-get install -y chromium)",
    ),
    pytest.mark.slow,
]


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


def page_text(browser: DevToolsPipe, session: str) -> str:
    return browser.evaluate(session, "document.body ? document.body.innerText : ''") or ""


def wait_for_text(browser: DevToolsPipe, session: str, text: str, timeout: float = 60.0) -> str:
    """Polls until `text` is on the page and Streamlit has stopped running; returns the text."""
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = browser.evaluate(session, PAGE_READY) or {}
        if text in state.get("text", "") and not state.get("running"):
            return state["text"]
        time.sleep(0.25)
    raise TimeoutError(
        f"'{text}' did not appear within {timeout:.0f} s; the page ends with: "
        f"{state.get('text', '')[-1500:]!r}"
    )


LIVE = "(e => e.closest('[data-stale=\"true\"]') === null && e.offsetParent !== null)"


def click(browser: DevToolsPipe, session: str, selector: str, text: str) -> None:
    """Clicks the first live element (not left over from the previous run, visible) matching
    `selector` whose text is `text` (or ends with it: an expander's summary starts with its
    icon's name), waiting (bounded) for one to appear."""
    poll(browser, session, f"""(() => {{
      const all = Array.from(document.querySelectorAll({json.dumps(selector)})).filter({LIVE});
      const hit = all.find(e => e.innerText.trim() === {json.dumps(text)})
        || all.find(e => e.innerText.trim().endsWith({json.dumps(text)}));
      if (hit) {{ hit.click(); }}
      return hit !== undefined;
    }})()""", f"nothing to click: {selector} '{text}'")


def poll(browser: DevToolsPipe, session: str, script: str, what: str, timeout: float = 30.0):
    """Evaluates `script` until it returns a true value (which is returned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.evaluate(session, script)
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def open_expander(browser: DevToolsPipe, session: str, title: str) -> None:
    """Opens the live expander titled `title` unless it is open already; waits until open."""
    poll(browser, session, f"""(() => {{
      const summary = Array.from(document.querySelectorAll('[data-testid="stExpander"] summary'))
        .filter({LIVE}).find(e => e.innerText.trim().endsWith({json.dumps(title)}));
      if (!summary) {{ return false; }}
      const details = summary.closest('details');
      if (details && details.open) {{ return true; }}
      summary.click();
      return false;
    }})()""", f"no open expander '{title}'")
    settle(browser, session)


def type_text(browser: DevToolsPipe, session: str, selector: str, text: str) -> None:
    """Types `text` into the live input matching `selector` (replacing its content) and
    presses Enter, as a keyboard would."""
    poll(browser, session, f"""(() => {{
      const input = Array.from(document.querySelectorAll({json.dumps(selector)})).find({LIVE});
      if (input) {{ input.focus(); input.select(); }}
      return input !== undefined;
    }})()""", f"no input {selector}")
    browser.send("Input.insertText", {"text": text}, session)
    for kind in ("keyDown", "keyUp"):
        browser.send("Input.dispatchKeyEvent", {
            "type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13,
            "nativeVirtualKeyCode": 13, **({"text": "\r"} if kind == "keyDown" else {}),
        }, session)  # fmt: skip
    settle(browser, session)


def settle(browser: DevToolsPipe, session: str, timeout: float = 30.0) -> None:
    """Waits until Streamlit has finished the rerun an interaction started."""
    time.sleep(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (browser.evaluate(session, PAGE_READY) or {}).get("running"):
            return
        time.sleep(0.25)
    raise TimeoutError(f"Streamlit still running after {timeout:.0f} s")


@pytest.fixture
def served_dashboard(dashboard_results, tmp_path):
    """`streamlit run` of the app on a free loopback port, scoring allowed; always stopped."""
    port = free_port()
    command = streamlit_command(dashboard_results, port, "127.0.0.1", True, allow_scoring=True)
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


def check_screenshot(png: bytes) -> None:
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG" and picture.size == WINDOW
        pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "screenshot looks blank"
    assert (pixels < 128).mean() > 0.01, "hardly any dark pixels: no text or images drawn"


def test_an_operator_session_in_headless_chromium(served_dashboard, dashboard_results, tmp_path):
    """Opening view, filters, restricted scoring folders, the ensemble's threshold and its
    new-image scores, in a real browser."""
    run_folder = dashboard_results / "project" / "group"
    saved = read_predictions(run_folder / "predictions" / DASHBOARD_CATEGORY)
    counts = data.confusion_counts(saved.scores, saved.is_anomaly, saved.threshold)
    browser = DevToolsPipe(find_chromium(), tmp_path / "profile")
    try:
        session = browser.open_page(served_dashboard)
        wait_for_render(browser, session, RENDER_TIMEOUT)
        dom = browser.evaluate(session, "document.documentElement.outerHTML")
        png = browser.screenshot(session)
        screenshot_path = Path(
            os.environ.get(SCREENSHOT_ENVIRONMENT_VARIABLE, tmp_path / "page.png")
        )
        screenshot_path.write_bytes(png)
        print(f"screenshot: {screenshot_path}", file=sys.stderr)

        # The opening view: the category with defects, not the good-only one sorted first.
        assert "PatchCore inspection dashboard" in dom
        text = wait_for_text(browser, session, "Patch score (this cell)")
        for expected in ("Image AUROC", "Pixel AUROC", "True reject", "False accept",
                         "Inspected images", "Image score (decides)",
                         "Patch score (this cell)", "This patch's score is the image score.",
                         "scoring new images allowed"):  # fmt: skip
            assert expected in text, expected
        assert f"project/group · {DASHBOARD_CATEGORY} ·" in text
        assert f"· {DASHBOARD_GOOD_ONLY} ·" not in text
        assert f"{100 * saved.metrics['instance_auroc']:.2f} %" in text
        check_screenshot(png)

        # The new filters.
        click(browser, session, '[data-testid="stRadio"] label', "escapes")
        text = wait_for_text(browser, session, f"Inspected images: {counts.false_accept} escapes")
        click(browser, session, '[data-testid="stRadio"] label', "false rejects")
        wait_for_text(browser, session, f"Inspected images: {counts.false_reject} false rejects")
        click(browser, session, '[data-testid="stRadio"] label', "all")
        wait_for_text(browser, session, f"Inspected images: {len(saved.scores)}")

        # Scoring folders must lie inside the results folder.
        open_expander(browser, session, "Score new images")
        folder_input = '[data-testid="stTextInput"] input'
        type_text(browser, session, folder_input, "../")
        click(browser, session, '[data-testid="stButton"] button', "Score images")
        wait_for_text(browser, session, "'..' is not allowed")
        type_text(browser, session, folder_input, "outside_images")
        click(browser, session, '[data-testid="stButton"] button', "Score images")
        wait_for_text(browser, session, "outside the results folder")

        # The ensemble run: its saved combined-scale threshold, and equal new-image scores.
        model_folder = dashboard_results / DASHBOARD_ENSEMBLE_RUN / "models" / DASHBOARD_CATEGORY
        statistics = load_ensemble_statistics(model_folder)
        ensemble = read_predictions(
            dashboard_results / DASHBOARD_ENSEMBLE_RUN / "predictions" / DASHBOARD_CATEGORY
        )
        type_text(browser, session, '[data-testid="stSidebar"] [data-testid="stSelectbox"] input',
                  "ensemble")  # fmt: skip
        text = wait_for_text(browser, session, "ensemble of 2, scores combined with normal_stats")
        start = data.score_text(statistics.threshold, 5)
        assert f"Starts at {start}: the threshold saved with the model" in text
        open_expander(browser, session, "Score new images")
        type_text(browser, session, folder_input, "incoming/object_test")
        click(browser, session, '[data-testid="stButton"] button', "Score images")
        run_scores = {
            f"{Path(path).parent.name}_{Path(path).name}": score
            for path, score in zip(ensemble.image_paths, ensemble.scores, strict=True)
        }
        # The summary line comes before the image grid has rendered: wait for the captions.
        deadline = time.monotonic() + 60
        while True:
            text = wait_for_text(browser, session, f"{len(ensemble.scores)} scored,")
            shown = [line for line in text.splitlines() if ".png · score " in line]
            if any(line.split(" · ")[0] in run_scores for line in shown):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert shown, "no scored image captions"
        for line in shown:
            name, _, value = line.partition(" · score ")
            if name in run_scores:  # the new images' captions (not the test grid's)
                assert float(value) == pytest.approx(run_scores[name], rel=2e-3), line
        assert any(line.split(" · ")[0] in run_scores for line in shown)
        screenshot_path.with_name(f"{screenshot_path.stem}_ensemble.png").write_bytes(
            browser.screenshot(session)
        )
    finally:
        browser.close()
