"""`patchcore-export-challenge`: saved models as self-contained weights files
(`patchcore.apps.export`)."""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import common_options, run_guarded


@click.command()
@click.argument("sources", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", "output_folder", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <category>.pth files and requirements.txt.")
@click.option("--also_pt", is_flag=True, help="Also write <category>.pt copies.")
@common_options()
def export_cli(sources, output_folder, also_pt, common):  # fmt: skip
    """Export saved models (SOURCES: model folders, or run folders with models/) as
    self-contained PatchCoreModule weights files named by category."""

    def job() -> None:
        from patchcore.apps.export import export_challenge_models

        device = common.torch_device()
        for path in export_challenge_models(list(sources), output_folder, also_pt, device):
            click.echo(str(path))

    run_guarded(job, common)


def export_main() -> None:
    """Entry point of `patchcore-export-challenge` and bin/export_challenge_models.py."""
    export_cli()
