"""Serving the Streamlit dashboard (`patchcore-dashboard`, see `patchcore.cli.dashboard`).

Runs `python -m streamlit run app.py -- --results RESULTS_DIR --device DEVICE
[--allow_scoring]` in a child process and waits for it. SIGTERM and SIGINT sent to the
launcher are forwarded to the child, which shuts its server down; the launcher waits for it
(and kills it after `STOP_TIMEOUT` seconds), so stopping `patchcore-dashboard` never leaves a
server running on its port. On Linux the child also gets SIGTERM should the launcher die
without a chance to forward anything (SIGKILL).

The server listens on the loopback address unless `address` says otherwise (e.g. 0.0.0.0 to
serve the line's network): then anyone who can reach the port can view every run under the
results folder, and with `--allow_scoring` run the model on image folders inside it. There
is no login.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import ipaddress
import logging
import signal
import subprocess
import sys
from pathlib import Path

from patchcore.errors import missing_dependency

LOGGER = logging.getLogger(__name__)

APP_SCRIPT = Path(__file__).resolve().with_name("app.py")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1


def streamlit_command(
    results: Path,
    port: int,
    address: str,
    headless: bool,
    device: str = "cpu",
    allow_scoring: bool = False,
) -> list[str]:
    """The command line that serves the dashboard."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT),
        "--server.port", str(port), "--server.address", address,
        "--server.headless", "true" if headless else "false",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
        "--server.fileWatcherType", "none",
        # An uncaught error shows its message only: no traceback (server paths) in a browser.
        "--client.showErrorDetails", "false",
        "--", "--results", str(results), "--device", device,
        *(["--allow_scoring"] if allow_scoring else []),
    ]  # fmt: skip


def is_loopback(address: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: ask the kernel to send this process SIGTERM when its parent dies."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_forwarding_signals(command: list[str]) -> int:
    """Runs `command`, forwarding SIGTERM/SIGINT to it until it exits; returns its exit code
    (0 when it stopped because of a forwarded signal)."""
    # The launcher runs no threads, so a pre-exec function is safe here.
    die_with_parent = _die_with_parent if sys.platform.startswith("linux") else None
    child = subprocess.Popen(command, preexec_fn=die_with_parent)  # noqa: PLW1509
    forwarded: list[int] = []

    def forward(number, _frame) -> None:
        forwarded.append(number)
        if child.poll() is None:
            LOGGER.info("Stopping the dashboard server (%s)", signal.Signals(number).name)
            child.send_signal(number)

    previous = {number: signal.signal(number, forward) for number in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                LOGGER.warning("The dashboard server did not stop in %.0f s; killing it",
                               STOP_TIMEOUT)  # fmt: skip
                child.kill()
                child.wait()
    return 0 if forwarded else code


def serve(
    results: Path, port: int, address: str, headless: bool, device: str, allow_scoring: bool = False
) -> int:
    """Serves the dashboard until it stops; returns the server's exit code."""
    if importlib.util.find_spec("streamlit") is None:
        raise missing_dependency("the dashboard", "streamlit", "dashboard")
    results = Path(results).resolve()
    command = streamlit_command(results, port, address, headless, device, allow_scoring)
    if not is_loopback(address):
        LOGGER.warning(
            "Listening on %s: anyone who can reach port %d can view every run under %s%s. "
            "There is no login; serve it only on a trusted network.",
            address, port, results,
            " and score image folders inside it (--allow_scoring)" if allow_scoring else "",
        )  # fmt: skip
    LOGGER.info("Starting: %s", " ".join(command))
    return run_forwarding_signals(command)
