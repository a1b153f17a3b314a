"""`patchcore-compare`: several runs' results.csv side by side (`patchcore.apps.compare`)."""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import common_options, run_guarded, usage_errors


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="RUN_OR_CSV...")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("comparison.csv"), show_default=True,
              help="The comparison as CSV (fractions; two header rows: run, metric).")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table as Markdown (best values in bold).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Bar charts, one figure per metric: this file for one metric, "
                   "<stem>_<metric>.png for several.")
@click.option("--metrics", "-m", multiple=True,
              help="Metric column to compare (repeat); default: every metric of the runs.")
@click.option("--names", "-n", multiple=True,
              help="Name of each run in order (repeat); default: the run folder names.")
@common_options()
def compare_cli(inputs, output, markdown, plot, metrics, names, common):
    """Compare runs: RUN_OR_CSV is a results.csv, a run folder holding one, or a folder of
    run folders. Prints categories as rows and runs as column groups, one column per metric,
    with the mean row; the best value of each row and metric is marked."""
    from patchcore.apps.compare import CompareOptions, run_compare

    def job() -> None:
        with usage_errors():
            table, written = run_compare(
                CompareOptions(tuple(inputs), output, markdown, plot, tuple(metrics), tuple(names))
            )
        click.echo(table)
        click.echo("\nWrote " + ", ".join(str(path) for path in written))

    run_guarded(job, common)


def compare_main() -> None:
    """Entry point of `patchcore-compare`."""
    compare_cli()
