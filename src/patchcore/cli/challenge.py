"""`patchcore-challenge`: evaluate challenge-format model classes (`patchcore.apps.challenge`)."""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import SeedOption, common_options, run_guarded

DRIFT_SEED = SeedOption(42, "Seed of the drift: the same seed always gives the same images.")


@click.command()
@click.option("--module_path", default="patchcore.model.module", show_default=True,
              help="Python file, or importable module name, defining the model class.")
@click.option("--class_name", default="PatchCoreModule", show_default=True,
              help="The model class, constructed without arguments.")
@click.option("--weights_path", required=True, type=click.Path(path_type=Path),
              help="Folder of <category>.pth weights files.")
@click.option("--dataset_path", required=True, type=click.Path(path_type=Path),
              help="MVTec AD-layout root folder.")
@click.option("--category", "categories", multiple=True,
              help="Category to evaluate; repeat; default: every category with a weights file.")
@click.option("--drift/--no-drift", default=False, show_default=True,
              help="Apply seeded random flips, rotation, colour jitter and blur.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("challenge_results.csv"), show_default=True,
              help="Results CSV (the results.csv format).")
@common_options(seed=DRIFT_SEED)
def challenge_cli(module_path, class_name, weights_path, dataset_path, categories, drift, output,
                  common):  # fmt: skip
    """Evaluate a challenge-format model class on MVTec AD-layout test sets, as challenge
    evaluators do (256 x 256 inputs, batch 1), optionally under seeded drift."""

    def job() -> None:
        from patchcore.apps.challenge import ChallengeOptions, run_challenge
        from patchcore.evaluation.reporting import format_results_table

        options = ChallengeOptions(
            module_path=module_path,
            class_name=class_name,
            weights_path=weights_path,
            dataset_path=dataset_path,
            categories=tuple(categories),
            seed=common.seed,
            drift=drift,
            output=output,
            device=common.torch_device(),
        )
        rows = run_challenge(options)
        click.echo("\n" + format_results_table(rows))
        click.echo(f"\nResults: {output}")

    run_guarded(job, common)


def challenge_main() -> None:
    """Entry point of `patchcore-challenge` and bin/evaluate_challenge.py."""
    challenge_cli()
