"""`patchcore-dashboard`: the operator dashboard on a results folder (`patchcore.apps.dashboard`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from patchcore.cli.common import common_options, run_guarded


@click.command()
@click.option("--results", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True,
              help="Folder holding run folders (searched for results.csv); the page reads "
                   "runs only inside it.")
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True,
              help="Port the server listens on.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Interface the server listens on; 0.0.0.0 serves the line's network "
                   "(anyone there can then view the runs: there is no login).")
@click.option("--headless", is_flag=True, help="Do not open a browser window.")
@click.option("--allow_scoring", is_flag=True,
              help="Allow scoring new images (folders inside RESULTS only) from the page; "
                   "without it the dashboard is read-only.")
@common_options()
def dashboard_cli(
    results: Path, port: int, address: str, headless: bool, allow_scoring: bool, common
) -> None:
    """Serve the operator dashboard for the runs under RESULTS. Only files inside RESULTS
    are read (and the input images the runs recorded); anyone who can reach the address
    and port can view them, so keep the default loopback address unless the network is
    trusted."""
    codes = []

    def job() -> None:
        from patchcore.apps.dashboard.launch import serve

        device = str(common.torch_device())
        click.echo(f"Dashboard on http://{address}:{port} (Ctrl+C stops it)")
        codes.append(serve(results, port, address, headless, device, allow_scoring))

    run_guarded(job, common)
    sys.exit(codes[0] if codes else 0)


def main() -> None:
    """Entry point of `patchcore-dashboard`."""
    dashboard_cli()
