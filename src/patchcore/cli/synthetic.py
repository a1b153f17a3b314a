"""`patchcore-synthetic`: write a seeded synthetic dataset in the MVTec AD folder layout."""

from __future__ import annotations

import time
from pathlib import Path

import click

from patchcore.cli.common import SeedOption, common_options, run_guarded
from patchcore.data.synthetic import SYNTHETIC_CATEGORIES, SyntheticSpec

DEFAULTS = SyntheticSpec()
DATA_SEED = SeedOption(DEFAULTS.seed, "Seed of the data: the same seed writes byte-identical files.")


@click.command()
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--categories", "-d", multiple=True, default=SYNTHETIC_CATEGORIES,
              show_default=True, help="Category to write; repeat.")
@click.option("--image_size", type=int, default=DEFAULTS.image_size, show_default=True,
              help="Side of the square images in pixels.")
@click.option("--num_train", type=int, default=DEFAULTS.num_train, show_default=True,
              help="Normal training images per category.")
@click.option("--num_test_good", type=int, default=DEFAULTS.num_test_good, show_default=True,
              help="Normal test images per category.")
@click.option("--num_defective", type=int, default=DEFAULTS.num_test_defective_per_type, show_default=True,
              help="Defective test images per defect type.")
@click.option("--panels", type=int, default=DEFAULTS.panels, show_default=True,
              help="Wide parts: each image is this many square renderings side by side "
                   "(image_size x panels * image_size), a defect in one of them.")
@common_options(seed=DATA_SEED)
def synthetic_cli(root, categories, image_size, num_train, num_test_good, num_defective,
                  panels, common):  # fmt: skip
    """Write a synthetic dataset with exact defect masks to ROOT."""

    def job() -> None:
        from patchcore.data.synthetic import generate_dataset

        spec = SyntheticSpec(
            image_size=image_size,
            num_train=num_train,
            num_test_good=num_test_good,
            num_test_defective_per_type=num_defective,
            seed=common.seed,
            panels=panels,
        )
        started = time.perf_counter()
        generate_dataset(root, list(categories), spec)
        click.echo(
            f"Synthetic dataset: {', '.join(categories)} at {image_size} px"
            f"{f' x {panels} panels' if panels > 1 else ''} ({num_train} train, "
            f"{num_test_good} good + {num_defective} per defect type test), seed {common.seed} "
            f"-> {root} in {time.perf_counter() - started:.2f} s"
        )

    run_guarded(job, common)


def synthetic_main() -> None:
    """Entry point of `patchcore-synthetic`."""
    synthetic_cli()
