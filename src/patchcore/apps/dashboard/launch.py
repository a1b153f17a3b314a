"""Serving the Streamlit dashboard (`patchcore-dashboard`, see `patchcore.cli.dashboard`).

Runs `python -m streamlit run app.py -- --results RESULTS_DIR --device DEVICE` in a child
process and returns its exit code. The server listens on the loopback address unless
`address` says otherwise (e.g. 0.0.0.0 to serve the line's network).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

from patchcore.errors import missing_dependency

LOGGER = logging.getLogger(__name__)

APP_SCRIPT = Path(__file__).resolve().with_name("app.py")


def streamlit_command(
    results: Path, port: int, address: str, headless: bool, device: str = "cpu"
) -> list[str]:
    """The command line that serves the dashboard."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT),
        "--server.port", str(port), "--server.address", address,
        "--server.headless", "true" if headless else "false",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
        "--server.fileWatcherType", "none",
        "--", "--results", str(results), "--device", device,
    ]  # fmt: skip


def serve(results: Path, port: int, address: str, headless: bool, device: str) -> int:
    """Serves the dashboard until it stops; returns the server's exit code."""
    if importlib.util.find_spec("streamlit") is None:
        raise missing_dependency("the dashboard", "streamlit", "dashboard")
    command = streamlit_command(Path(results).resolve(), port, address, headless, device)
    LOGGER.info("Starting: %s", " ".join(command))
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
