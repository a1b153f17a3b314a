"""Chained command lines, compatible with the reference implementation's flags.

    patchcore-train [main options] RESULTS_PATH patch_core [...] sampler NAME [...] dataset NAME DATA_PATH [...]
    patchcore-evaluate [main options] RESULTS_PATH patch_core_loader -p MODEL_DIR [...] dataset NAME DATA_PATH [...]

Each sub-command returns its typed options; the group's result callback runs the job.
Reference options that this implementation does not support refuse non-default values
instead of silently ignoring them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from patchcore.backbones import default_layers, split_seeded_name
from patchcore.cli_support import configure_process, nn_backend_option, run_guarded
from patchcore.config import (
    DATASET_NAMES,
    DISTANCES,
    SAMPLER_NAMES,
    DatasetConfig,
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    SearchConfig,
)
from patchcore.ensemble import NORMALISATIONS
from patchcore.errors import ConfigurationError
from patchcore.reporting import format_results_table
from patchcore.runs import (
    OutputOptions,
    PreprocessingRequest,
    create_run_folder,
    evaluate_run,
    select_device,
    train_run,
)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelOptions:
    """`patch_core` options: backbones and how their features become patch features."""

    backbones: tuple[str, ...]
    layers: tuple[str, ...]
    pretrain_embed_dimension: int
    target_embed_dimension: int
    patchsize: int
    num_nn: int
    distance: str
    score_reweighting: bool
    random_backbone_weights: bool
    search: SearchConfig

    def configs(self, sampler: SamplerConfig, seed: int) -> list[PatchCoreConfig]:
        """One model configuration per backbone; `i.layer` layers go to backbone i."""
        configs = []
        for position, seeded_name in enumerate(self.backbones):
            name, member_seed = split_seeded_name(seeded_name)
            member_seed = seed if member_seed is None else member_seed
            configs.append(
                PatchCoreConfig(
                    backbone_name=name,
                    layers=self._layers_of(position, name),
                    pretrained=not self.random_backbone_weights,
                    pretrain_embed_dimension=self.pretrain_embed_dimension,
                    target_embed_dimension=self.target_embed_dimension,
                    patchsize=self.patchsize,
                    num_nn=self.num_nn,
                    distance=self.distance,
                    score_reweighting=self.score_reweighting,
                    sampler=SamplerConfig(
                        name=sampler.name, percentage=sampler.percentage, seed=member_seed
                    ),
                    seed=member_seed,
                )
            )
        return configs

    def _layers_of(self, position: int, backbone: str) -> tuple[str, ...]:
        if not self.layers:
            return default_layers(backbone)
        if len(self.backbones) == 1:
            return self.layers
        layers = []
        for layer in self.layers:
            index, separator, name = layer.partition(".")
            if not separator or not index.isdigit():
                raise ConfigurationError(
                    f"-le {layer}: with several backbones, layers are written 'i.layer' "
                    "(i = 0-based backbone index), e.g. 0.layer2"
                )
            if int(index) >= len(self.backbones):
                raise ConfigurationError(
                    f"-le {layer}: backbone index {index} but only {len(self.backbones)} "
                    "backbones were given"
                )
            if int(index) == position:
                layers.append(name)
        if not layers:
            raise ConfigurationError(f"no -le layer given for backbone {position} ({backbone})")
        return tuple(layers)


@dataclass(frozen=True)
class LoaderOptions:
    """`patch_core_loader` options."""

    model_folders: tuple[str, ...]
    search: SearchConfig


def _refuse_non_default(option: str, value, default, reason: str) -> None:
    if value != default:
        raise click.UsageError(f"{option} {value} is not supported: {reason}")


@contextlib.contextmanager
def _as_usage_errors():
    """Invalid option values found while building configurations become usage errors."""
    try:
        yield
    except ConfigurationError as error:
        raise click.UsageError(str(error)) from error


def _show_results(rows: dict[str, dict[str, float]], folder: Path) -> None:
    click.echo("\n" + format_results_table(rows))
    click.echo(f"\nResults: {folder / 'results.csv'}")


# ------------------------------------------------------------------ shared options
gpu_option = click.option(
    "--gpu", type=int, multiple=True, default=[0], show_default=True,
    help="CUDA device id; -1 (or no CUDA) runs on the CPU.",
)  # fmt: skip
seed_option = click.option("--seed", type=int, default=0, show_default=True)
segmentation_option = click.option(
    "--save_segmentation_images", is_flag=True, help="Write an overlay PNG per test image."
)
predictions_option = click.option(
    "--save_predictions", is_flag=True,
    help="Write per-image scores, maps and masks under predictions/ (for the dashboard).",
)  # fmt: skip
normalisation_option = click.option(
    "--ensemble_normalisation", type=click.Choice(NORMALISATIONS), default="test_minmax",
    show_default=True, help="How ensemble members' scores are rescaled before averaging.",
)  # fmt: skip


def _search_options(function):
    function = click.option("--faiss_on_gpu", is_flag=True)(function)
    function = click.option("--faiss_num_workers", type=int, default=8, show_default=True)(function)
    return nn_backend_option(function)


def _search_config(nn_backend: str, faiss_on_gpu: bool, faiss_num_workers: int) -> SearchConfig:
    return SearchConfig(nn_backend, faiss_on_gpu, faiss_num_workers)


def _dataset_command(group: click.Group, training: bool):
    @group.command("dataset")
    @click.argument("name", type=click.Choice(DATASET_NAMES))
    @click.argument("data_path", type=click.Path(exists=True, file_okay=False))
    @click.option("--subdatasets", "-d", multiple=True, type=str, required=True)
    @click.option("--train_val_split", type=float, default=1.0, show_default=True)
    @click.option("--batch_size", default=2 if training else 1, type=int, show_default=True)
    @click.option("--num_workers", default=8, type=int, show_default=True)
    @click.option("--resize", default=None, type=int, help="Shorter side before cropping [256].")
    @click.option("--imagesize", default=None, type=int, help="Centre-crop size [224].")
    @click.option("--augment", is_flag=True, help="Not supported; refused if given.")
    def dataset(
        name, data_path, subdatasets, train_val_split, batch_size, num_workers, resize,
        imagesize, augment,
    ):  # fmt: skip
        """NAME (mvtec or folder), DATA_PATH, -d categories, and loading options."""
        _refuse_non_default("--augment", augment, False, "PatchCore trains on unaugmented images")
        request = PreprocessingRequest(resize, imagesize)
        with _as_usage_errors():
            config = DatasetConfig(
                name=name,
                data_path=data_path,
                categories=tuple(subdatasets),
                train_val_split=train_val_split,
                batch_size=batch_size,
                num_workers=num_workers,
                preprocessing=request.for_training() if training else PreprocessingConfig(),
            )
        return "dataset", (config, request)

    return dataset


# --------------------------------------------------------------------- training CLI
@click.group(chain=True)
@click.argument("results_path", type=click.Path(file_okay=False))
@gpu_option
@seed_option
@click.option("--log_group", type=str, default="group", show_default=True)
@click.option("--log_project", type=str, default="project", show_default=True)
@segmentation_option
@predictions_option
@click.option("--save_patchcore_model", is_flag=True, help="Save each category's model.")
@normalisation_option
@click.option(
    "--threshold_quantile", type=click.FloatRange(0, 1), default=0.99, show_default=True,
    help="Decision threshold = this quantile of held-out normal image scores.",
)  # fmt: skip
def train_cli(**_options):
    """Train PatchCore on each dataset, evaluate it, optionally save models and overlays."""


@train_cli.result_callback()
def _train(
    commands, results_path, gpu, seed, log_group, log_project, save_segmentation_images,
    save_predictions, save_patchcore_model, ensemble_normalisation, threshold_quantile,
):  # fmt: skip
    parts = dict(commands)
    missing = [name for name in ("patch_core", "sampler", "dataset") if name not in parts]
    if missing:
        raise click.UsageError(f"missing sub-command(s): {', '.join(missing)}")

    def job() -> None:
        model_options: ModelOptions = parts["patch_core"]
        dataset, _ = parts["dataset"]
        configs = model_options.configs(parts["sampler"], seed)
        output = OutputOptions(
            save_segmentation_images=save_segmentation_images,
            save_models=save_patchcore_model,
            save_predictions=save_predictions,
            ensemble_normalisation=ensemble_normalisation,
            threshold_quantile=threshold_quantile,
        )
        device = select_device(gpu)
        run_folder = create_run_folder(Path(results_path), log_project, log_group)
        LOGGER.info("Writing to %s", run_folder)
        rows = train_run(run_folder, configs, dataset, device, model_options.search, output)
        _show_results(rows, run_folder)

    run_guarded(job)


@train_cli.command("patch_core")
@click.option(
    "--backbone_names",
    "-b",
    type=str,
    multiple=True,
    default=["wideresnet50"],
    show_default=True,
    help="Repeat for an ensemble; 'name.seed-N' seeds a member.",
)
@click.option(
    "--layers_to_extract_from",
    "-le",
    type=str,
    multiple=True,
    default=[],
    help="Layer names; 'i.layer' with several backbones. Default: layer2, layer3.",
)
@click.option("--pretrain_embed_dimension", type=int, default=1024, show_default=True)
@click.option("--target_embed_dimension", type=int, default=1024, show_default=True)
@click.option("--preprocessing", type=click.Choice(["mean", "conv"]), default="mean")
@click.option("--aggregation", type=click.Choice(["mean", "mlp"]), default="mean")
@click.option(
    "--anomaly_scorer_num_nn",
    type=int,
    default=1,
    show_default=True,
    help="k: a patch's score is its mean distance to its k nearest bank features.",
)
@click.option("--patchsize", type=int, default=3, show_default=True)
@click.option("--patchscore", type=str, default="max", show_default=True)
@click.option("--patchoverlap", type=float, default=0.0, show_default=True)
@click.option("--patchsize_aggregate", "-pa", type=int, multiple=True, default=[])
@click.option(
    "--distance",
    type=click.Choice(DISTANCES),
    default="squared_l2",
    show_default=True,
    help="Score unit: squared L2 (reference) or L2 (paper).",
)
@click.option(
    "--score_reweighting", is_flag=True, help="Re-weight image scores by the paper's Eq. 7."
)
@click.option(
    "--random_backbone_weights",
    is_flag=True,
    hidden=True,
    help="Random backbone initialisation (tests of mechanics only).",
)
@_search_options
def _patch_core(
    backbone_names, layers_to_extract_from, pretrain_embed_dimension, target_embed_dimension,
    preprocessing, aggregation, anomaly_scorer_num_nn, patchsize, patchscore, patchoverlap,
    patchsize_aggregate, distance, score_reweighting, random_backbone_weights, faiss_on_gpu,
    faiss_num_workers, nn_backend,
):  # fmt: skip
    """Backbone(s), layers and patch-feature dimensions; nearest-neighbour search."""
    _refuse_non_default(
        "--preprocessing",
        preprocessing,
        "mean",
        "features are reduced by adaptive average pooling only",
    )
    _refuse_non_default(
        "--aggregation", aggregation, "mean", "layers are merged by adaptive average pooling only"
    )
    _refuse_non_default(
        "--patchscore", patchscore, "max", "the image score is the maximum patch score"
    )
    _refuse_non_default("--patchoverlap", patchoverlap, 0.0, "patches use stride 1")
    _refuse_non_default("--patchsize_aggregate", tuple(patchsize_aggregate), (),
                        "multi-size patch aggregation is not implemented")  # fmt: skip
    with _as_usage_errors():
        search = _search_config(nn_backend, faiss_on_gpu, faiss_num_workers)
    options = ModelOptions(
        backbones=tuple(backbone_names),
        layers=tuple(layers_to_extract_from),
        pretrain_embed_dimension=pretrain_embed_dimension,
        target_embed_dimension=target_embed_dimension,
        patchsize=patchsize,
        num_nn=anomaly_scorer_num_nn,
        distance=distance,
        score_reweighting=score_reweighting,
        random_backbone_weights=random_backbone_weights,
        search=search,
    )
    return "patch_core", options


@train_cli.command("sampler")
@click.argument("name", type=click.Choice(SAMPLER_NAMES))
@click.option("--percentage", "-p", type=float, default=0.1, show_default=True)
def _sampler(name, percentage):
    """Memory-bank subsampling: NAME, and -p, the fraction of patch features kept."""
    with _as_usage_errors():
        return "sampler", SamplerConfig(name=name, percentage=percentage)


_dataset_command(train_cli, training=True)


# ------------------------------------------------------------------- evaluation CLI
@click.group(chain=True)
@click.argument("results_path", type=click.Path(file_okay=False))
@gpu_option
@seed_option
@segmentation_option
@predictions_option
@normalisation_option
def evaluate_cli(**_options):
    """Evaluate saved PatchCore models on each dataset."""


@evaluate_cli.result_callback()
def _evaluate(
    commands, results_path, gpu, seed, save_segmentation_images, save_predictions,
    ensemble_normalisation,
):  # fmt: skip
    parts = dict(commands)
    missing = [name for name in ("patch_core_loader", "dataset") if name not in parts]
    if missing:
        raise click.UsageError(f"missing sub-command(s): {', '.join(missing)}")

    def job() -> None:
        loader: LoaderOptions = parts["patch_core_loader"]
        dataset, request = parts["dataset"]
        output = OutputOptions(
            save_segmentation_images=save_segmentation_images,
            save_predictions=save_predictions,
            ensemble_normalisation=ensemble_normalisation,
        )
        device = select_device(gpu)
        folder = Path(results_path)
        folder.mkdir(parents=True, exist_ok=True)
        rows = evaluate_run(
            folder, [Path(p) for p in loader.model_folders], dataset, request, device,
            loader.search, output,
        )  # fmt: skip
        _show_results(rows, folder)

    run_guarded(job)


@evaluate_cli.command("patch_core_loader")
@click.option(
    "--patch_core_paths",
    "-p",
    type=click.Path(exists=True, file_okay=False),
    multiple=True,
    required=True,
    help="Model folder(s): one per dataset, or one.",
)
@_search_options
def _patch_core_loader(patch_core_paths, faiss_on_gpu, faiss_num_workers, nn_backend):
    """Saved model folder(s) to evaluate; nearest-neighbour search."""
    with _as_usage_errors():
        search = _search_config(nn_backend, faiss_on_gpu, faiss_num_workers)
    return "patch_core_loader", LoaderOptions(tuple(patch_core_paths), search)


_dataset_command(evaluate_cli, training=False)


def _main(group: click.Group) -> None:
    configure_process()
    LOGGER.info("Command line: %s", " ".join(sys.argv))
    group()


def train_main() -> None:
    """Entry point of `patchcore-train` and bin/run_patchcore.py."""
    _main(train_cli)


def evaluate_main() -> None:
    """Entry point of `patchcore-evaluate` and bin/load_and_evaluate_patchcore.py."""
    _main(evaluate_cli)
