"""`patchcore-dashboard`: the operator dashboard on a results folder (`patchcore.apps.dashboard`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from patchcore.cli.common import common_options, run_guarded


@click.command()
@click.option("--results", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Folder holding run folders (searched for results.csv).")
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True,
              help="Port the server listens on.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Interface the server listens on; 0.0.0.0 serves the line's network.")
@click.option("--headless", is_flag=True, help="Do not open a browser window.")
@common_options()
def dashboard_cli(results: Path, port: int, address: str, headless: bool, common) -> None:
    """Serve the operator dashboard for the runs under RESULTS."""
    codes = []

    def job() -> None:
        from patchcore.apps.dashboard.launch import serve

        device = str(common.torch_device())
        click.echo(f"Dashboard on http://{address}:{port} (Ctrl+C stops it)")
        codes.append(serve(results, port, address, headless, device))

    run_guarded(job, common)
    sys.exit(codes[0] if codes else 0)


def main() -> None:
    """Entry point of `patchcore-dashboard`."""
    dashboard_cli()
