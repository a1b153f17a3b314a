"""`patchcore-export` (deployable files: torch, ONNX, OpenVINO) and
`patchcore-export-challenge` (self-contained weights files); jobs in `patchcore.apps.export`."""

from __future__ import annotations

from pathlib import Path

import click

from patchcore.cli.common import common_options, run_guarded, usage_errors
from patchcore.config import DEFAULT_BANK_CHUNK_SIZE


@click.command()
@click.argument("sources", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", "output_folder", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <category>.pth / .onnx / .xml+.bin files.")
@click.option("--format", "-f", "formats", multiple=True, required=True,
              help="Format to write: torch, onnx or openvino; repeat for several.")
@click.option("--input_size", default=None, metavar="HEIGHTxWIDTH|any",
              help="Input size of ONNX/OpenVINO graphs: fixed, e.g. 480x640 or 256, or 'any' "
                   "(dynamic height and width); default: any for whole-image models "
                   "(--crop none), the model's --resize as a square for centre crops.")
@click.option("--fp16", is_flag=True,
              help="OpenVINO IR with FP16 weights (half the file; see docs/explanations/fidelity.md for accuracy).")
@click.option("--threshold", type=float,
              help="Decision threshold built into the graphs; default: the model's saved one.")
@click.option("--bank_chunk_size", type=int, default=DEFAULT_BANK_CHUNK_SIZE, show_default=True,
              help="Memory-bank rows per search step; the search holds images x patches x "
                   "this many distances at a time.")
@common_options()
def export_deployment_cli(sources, output_folder, formats, input_size, fp16, threshold,
                          bank_chunk_size, common):  # fmt: skip
    """Export saved models (SOURCES: model folders, or run folders with models/) for
    deployment: a PatchCoreModule weights file (torch), an ONNX graph (onnx) or OpenVINO IR
    (openvino), named by category. Graphs take float RGB [B, 3, H, W] in [0, 1] (with
    --input_size any, also the geometry inputs of the size, which patchcore-predict and
    patchcore.apps.runtimes compute) and return pred_score, anomaly_map and pred_label."""

    def job() -> None:
        from patchcore.apps.export import ExportOptions, export_models, parse_input_size

        with usage_errors():
            size = None if input_size is None else parse_input_size(input_size)
            options = ExportOptions(
                formats=tuple(dict.fromkeys(name.lower() for name in formats)),
                input_size=size,
                any_size=input_size is not None and size is None,
                fp16=fp16,
                bank_chunk_size=bank_chunk_size,
                threshold=threshold,
            )
        for path in export_models(list(sources), output_folder, options, common.torch_device()):
            click.echo(str(path))

    run_guarded(job, common)


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


def export_deployment_main() -> None:
    """Entry point of `patchcore-export`."""
    export_deployment_cli()


def export_main() -> None:
    """Entry point of `patchcore-export-challenge` and bin/export_challenge_models.py."""
    export_cli()
