"""`patchcore-update`: add new good images to a saved model (`patchcore.apps.update`)."""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import QUANTILE, common_options, run_guarded, usage_errors
from patchcore.config import BANK_STORAGES, default_loader_workers


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Write the updated model here and leave MODEL_DIR as it is "
                   "[default: replace MODEL_DIR, atomically].")
@click.option("--target_score", type=float, default=None,
              help="New patch features are added, farthest first, until every one would score "
                   "at most this [the model's threshold].")
@click.option("--percentage", "-p", type=float, default=None,
              help="At most this fraction of the new patch features is added [no cap with a "
                   "target score; the model's sampler fraction without one].")
@click.option("--max_bank_size", type=int, default=None,
              help="The bank never grows beyond this many features.")
@click.option("--normal_images", multiple=True,
              help="Held-out normal images (file, folder or pattern; repeat) to recalibrate "
                   "the threshold and normal statistics on [keep the saved ones].")
@click.option("--threshold_quantile", type=QUANTILE, default=None,
              help="Quantile of the normal images' scores used as threshold [the saved one].")
@click.option("--batch_size", type=int, default=4, show_default=True,
              help="Images per forward pass.")
@click.option("--num_workers", type=int, default=default_loader_workers(), show_default=True,
              help="Image-decoding processes (default: half the CPU cores less one, at most 4).")
@click.option("--faiss_num_workers", type=int, default=4, show_default=True,
              help="Threads FAISS searches with.")
@click.option("--bank_storage", type=click.Choice(BANK_STORAGES), default="memory",
              show_default=True,
              help="mmap: the bank stays in memory-mapped files (for banks larger than RAM).")
@common_options()
def update_cli(model_dir, images, output, target_score, percentage, max_bank_size, normal_images,
               threshold_quantile, batch_size, num_workers, faiss_num_workers, bank_storage,
               common):  # fmt: skip
    """Add the good images IMAGES (files, folders, glob patterns) to the model in MODEL_DIR:
    its greedy coreset is continued over their patch features until they would score at most
    the threshold, the threshold is recalibrated on --normal_images, and the new version
    replaces the old one once complete."""
    from patchcore.apps.update import UpdateOptions, run_update
    from patchcore.config import SearchConfig
    from patchcore.model.update import UpdateLimits

    def job() -> None:
        with usage_errors():
            options = UpdateOptions(
                model_dir=model_dir,
                images=tuple(images),
                output=output,
                limits=UpdateLimits(percentage, max_bank_size, target_score),
                normal_images=tuple(normal_images),
                threshold_quantile=threshold_quantile,
                device=common.torch_device(),
                batch_size=batch_size,
                num_workers=num_workers,
                search=SearchConfig(faiss_num_workers=faiss_num_workers, bank_storage=bank_storage),
            )
        click.echo(run_update(options).line())

    run_guarded(job, common)


def update_main() -> None:
    """Entry point of `patchcore-update`."""
    update_cli()
