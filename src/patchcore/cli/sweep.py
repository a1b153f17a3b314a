"""`patchcore-sweep`: a grid of training runs on Ray (`patchcore.apps.sweep`)."""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import common_options, run_guarded, usage_errors


@click.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--address", default=None,
              help="Ray cluster to use: auto (the one `ray start` started on this machine) or "
                   "HOST:PORT. Default: a local Ray instance, started and stopped here.")
@click.option("--num_cpus", type=float, default=1.0, show_default=True,
              help="CPUs each task asks Ray for (and its torch threads, image loaders and "
                   "FAISS threads unless a configuration sets them).")
@click.option("--local_cpus", type=int, default=None,
              help="CPUs of the local Ray instance [all of this machine's].")
@click.option("--max_retries", type=int, default=0, show_default=True,
              help="Times Ray re-runs a task whose worker died.")
@click.option("--force", is_flag=True,
              help="Run every pair again, also those whose row is already in results.csv.")
@click.option("--dry_run", is_flag=True, help="List the tasks (planned or skipped) and stop.")
@common_options()
def sweep_cli(sweep_file, address, num_cpus, local_cpus, max_retries, force, dry_run, common):
    """Run every (category, configuration) pair of SWEEP_FILE (YAML or TOML) as one Ray task,
    with patchcore-train's job; results go to <results_path>/<log_project>/<configuration>/.
    --gpu/--device: tasks ask for one GPU each (default: when the cluster has GPUs)."""
    from patchcore.apps.sweep import (
        ClusterOptions,
        SweepOptions,
        run_sweep,
        unfinished_error,
    )

    def job() -> None:
        with usage_errors():
            cluster = ClusterOptions(address, num_cpus, _gpu_wanted(common), local_cpus,
                                     max_retries)  # fmt: skip
        report, outcomes = run_sweep(SweepOptions(sweep_file, cluster, force, dry_run))
        click.echo(report)
        error = unfinished_error(outcomes)
        if error is not None:
            raise error

    run_guarded(job, common)


def _gpu_wanted(common) -> bool | None:
    """True/False when --gpu/--device say so; None (decide by the cluster) otherwise."""
    if common.gpu:
        return common.gpu[0] >= 0
    if common.device is None or common.device.strip().lower() == "auto":
        return None
    return common.device.strip().lower() != "cpu"


def sweep_main() -> None:
    """Entry point of `patchcore-sweep`."""
    sweep_cli()
