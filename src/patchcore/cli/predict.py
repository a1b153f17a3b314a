"""`patchcore-predict`: score new images with a saved model (`patchcore.apps.predict`)."""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import (
    backbone_runtime_option,
    common_options,
    run_guarded,
    usage_errors,
)
from patchcore.config import RUNTIMES, SEARCH_BACKENDS, default_loader_workers


@click.command()
@click.argument("model_dir", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.argument("inputs", nargs=-1)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("predictions.csv"), show_default=True,
              help="Results file: CSV, or JSON lines when it ends with .jsonl.")
@click.option("--heatmaps", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for one heat-map PNG per image.")
@click.option("--masks", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for one binary mask PNG per image (anomaly map > mask threshold).")
@click.option("--mask_threshold", type=float,
              help="Pixel threshold of --masks; default: the decision threshold.")
@click.option("--threshold", type=float,
              help="Reject images scoring above this; default: the model's saved threshold.")
@click.option("--batch_size", type=int, default=8, show_default=True,
              help="Images per forward pass.")
@click.option("--num_workers", type=int, default=default_loader_workers(), show_default=True,
              help="Image-decoding processes (default: half the CPU cores less one, at most 4).")
@click.option("--nn_backend", type=click.Choice(SEARCH_BACKENDS), default="rerank",
              show_default=True,
              help="Exact nearest-neighbour search: bfloat16 pass with float32 re-ranking "
                   "(rerank), FAISS (faiss) or torch matrix products (torch).")
@backbone_runtime_option
@click.option("--runtime", type=click.Choice(RUNTIMES), default=None,
              help="What runs MODEL: torch (model folders, .pth; the default), onnxruntime "
                   "(.onnx) or openvino (.xml, .onnx); default: by the file's kind.")
@click.option("--describe", is_flag=True,
              help="Print MODEL's content hash, format and model card, and exit (no INPUTS).")
@common_options()
def predict_cli(model_dir, inputs, output, heatmaps, masks, mask_threshold, threshold,
                batch_size, num_workers, nn_backend, backbone_runtime, runtime, describe,
                common):  # fmt: skip
    """Score new images (INPUTS: files, folders, glob patterns) with MODEL, a saved model
    folder or a file written by patchcore-export (or that export's folder): one
    accept/reject decision per image, optional heat maps and masks. Every input gets a row;
    one that cannot be read gets decision 'error' and the reason.

    \b
    Exit codes: 0 every image accepted; 3 some rejected, none failed; 4 some input could not
    be scored (decision 'error'); 1 the run failed (no results file); 2 wrong command line."""
    from patchcore.apps.predict import PredictOptions, run_prediction
    from patchcore.config import SearchConfig

    if describe:
        from patchcore.apps.model_card import describe_model

        run_guarded(lambda: click.echo(describe_model(model_dir)), common)
        return

    def job() -> None:
        with usage_errors():
            options = PredictOptions(
                model_dir=model_dir,
                inputs=tuple(inputs),
                output=output,
                heatmaps=heatmaps,
                masks=masks,
                threshold=threshold,
                mask_threshold=mask_threshold,
                device=common.torch_device(),
                batch_size=batch_size,
                num_workers=num_workers,
                search=SearchConfig(backend=nn_backend, backbone_runtime=backbone_runtime),
                runtime=runtime,
            )
        summary = run_prediction(options)
        click.echo(summary.line())
        return summary.exit_code

    run_guarded(job, common)


def predict_main() -> None:
    """Entry point of `patchcore-predict` and bin/predict_patchcore.py."""
    predict_cli()
