"""`patchcore-dashboard`: starts the Streamlit dashboard on a results folder.

    patchcore-dashboard --results RESULTS_DIR [--port 8501] [--address 127.0.0.1] [--headless]

Runs `python -m streamlit run app.py -- --results RESULTS_DIR` in a child process and exits
with its exit code. The server listens on the loopback address unless --address says
otherwise (e.g. 0.0.0.0 to serve the line's network).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import click

LOGGER = logging.getLogger(__name__)

APP_SCRIPT = Path(__file__).resolve().with_name("app.py")


def streamlit_command(results: Path, port: int, address: str, headless: bool) -> list[str]:
    """The command line that serves the dashboard."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT),
        "--server.port", str(port), "--server.address", address,
        "--server.headless", "true" if headless else "false",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
        "--server.fileWatcherType", "none",
        "--", "--results", str(results),
    ]  # fmt: skip


@click.command()
@click.option(
    "--results",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Folder holding run folders (searched for results.csv).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True)
@click.option(
    "--address", default="127.0.0.1", show_default=True, help="Interface the server listens on."
)
@click.option("--headless", is_flag=True, help="Do not open a browser window.")
def dashboard_cli(results: Path, port: int, address: str, headless: bool) -> None:
    """Serve the operator dashboard for the runs under RESULTS."""
    if importlib.util.find_spec("streamlit") is None:
        raise click.ClickException(
            'the dashboard needs Streamlit: pip install "patchcore[dashboard]"'
        )
    command = streamlit_command(results.resolve(), port, address, headless)
    LOGGER.info("Starting: %s", " ".join(command))
    click.echo(f"Dashboard on http://{address}:{port} (Ctrl+C stops it)")
    try:
        code = subprocess.call(command)
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


def main() -> None:
    """Entry point of `patchcore-dashboard`."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    dashboard_cli()
