"""`patchcore-train` and `patchcore-evaluate`: chained commands with the reference's flags.

    patchcore-train [options] RESULTS_PATH patch_core [...] sampler NAME [...] dataset NAME DATA_PATH [...]
    patchcore-evaluate [options] RESULTS_PATH patch_core_loader -p MODEL_DIR [...] dataset NAME DATA_PATH [...]

Each sub-command returns its typed options; the group's result callback runs the job
(`patchcore.apps.runs`). Reference options that this implementation does not support refuse
non-default values with the reason instead of silently ignoring them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from patchcore.cli.common import (
    QUANTILE,
    CommonOptions,
    OrderHintGroup,
    SeedOption,
    backbone_runtime_option,
    common_options,
    image_score_options,
    run_guarded,
    usage_errors,
)
from patchcore.cli.search_options import index_config, index_options
from patchcore.config import (
    BACKBONE_STATISTICS,
    CROP_MODES,
    DATASET_NAMES,
    DISTANCES,
    MASK_RULES,
    NORMALISATIONS,
    SAMPLER_NAMES,
    SEARCH_BACKENDS,
    DatasetConfig,
    IndexConfig,
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    SearchConfig,
    default_layers,
    default_loader_workers,
    split_seeded_name,
)
from patchcore.errors import ConfigurationError

if TYPE_CHECKING:
    from patchcore.apps.runs import PreprocessingRequest

DEFAULT_NUM_WORKERS = default_loader_workers()


RANDOM_WEIGHTS_SUFFIX = ".random"


def split_member_name(name: str) -> tuple[str, int | None, bool]:
    """An ensemble member as given to -b: `resnet18.seed-4.random` (or `resnet18.random.seed-4`)
    -> (`resnet18`, 4, True): the backbone, its own seed or None, and whether it gets random
    weights while the other members keep their pretrained ones."""
    random_member = name.endswith(RANDOM_WEIGHTS_SUFFIX)
    if random_member:
        name = name.removesuffix(RANDOM_WEIGHTS_SUFFIX)
    base, seed = split_seeded_name(name)
    if base.endswith(RANDOM_WEIGHTS_SUFFIX):
        base, random_member = base.removesuffix(RANDOM_WEIGHTS_SUFFIX), True
    return base, seed, random_member


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
    index: IndexConfig = field(default_factory=IndexConfig)
    backbone_statistics: str = "reference"
    image_score: str = "max"
    image_score_quantile: float = 0.99
    image_score_top_k: int = 10

    def configs(
        self, sampler: SamplerConfig, seed: int, preprocessing: PreprocessingConfig
    ) -> list[PatchCoreConfig]:
        """One model configuration per backbone; `i.layer` layers go to backbone i."""
        configs = []
        for position, marked_name in enumerate(self.backbones):
            name, member_seed, random_member = split_member_name(marked_name)
            member_seed = seed if member_seed is None else member_seed
            configs.append(
                PatchCoreConfig(
                    backbone_name=name,
                    layers=self._layers_of(position, name),
                    pretrained=not (self.random_backbone_weights or random_member),
                    pretrain_embed_dimension=self.pretrain_embed_dimension,
                    target_embed_dimension=self.target_embed_dimension,
                    patchsize=self.patchsize,
                    num_nn=self.num_nn,
                    distance=self.distance,
                    score_reweighting=self.score_reweighting,
                    preprocessing=preprocessing,
                    sampler=SamplerConfig(
                        name=sampler.name, percentage=sampler.percentage, seed=member_seed
                    ),
                    seed=member_seed,
                    index=self.index,
                    backbone_statistics=self.backbone_statistics,
                    image_score=self.image_score,
                    image_score_quantile=self.image_score_quantile,
                    image_score_top_k=self.image_score_top_k,
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


@dataclass(frozen=True)
class DatasetOptions:
    """`dataset` options: the data, and the preprocessing exactly as given."""

    config: DatasetConfig
    request: PreprocessingRequest


def _refuse_non_default(option: str, value, default, reason: str) -> None:
    if value != default:
        raise click.UsageError(f"{option} {value} is not supported: {reason}")


def _only_once(commands: list[tuple[str, object]]) -> dict[str, object]:
    """The sub-commands by name; a repeated one is refused (it would replace the first)."""
    parts: dict[str, object] = {}
    for name, value in commands:
        if name in parts:
            raise click.UsageError(f"sub-command '{name}' is given twice; give it once")
        parts[name] = value
    return parts


def _require_parts(parts: dict, names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in parts]
    if missing:
        raise click.UsageError(f"missing sub-command(s): {', '.join(missing)}")


def _show_results(rows: dict[str, dict[str, float]], results_csv: Path) -> None:
    from patchcore.evaluation.quality import summary_lines
    from patchcore.evaluation.reporting import format_results_table

    click.echo("\n" + format_results_table(rows))
    lines = summary_lines(results_csv.parent)
    if lines:
        click.echo("\n" + "\n".join(lines))
    click.echo(f"\nResults: {results_csv} (per defect type: results_by_type.csv; defects "
               "outside the inspected region: inspection_coverage.csv)")


# ------------------------------------------------------------------ shared options
TRAIN_SEED = SeedOption(0, "Seed of the coreset's random projection and starting points; "
                           "'name.seed-N' backbones override it per member.")  # fmt: skip
EVALUATE_SEED = SeedOption(0, "Accepted for the reference's scripts; evaluation is "
                              "deterministic, so only 0 is allowed.")  # fmt: skip


def _output_options(function):
    function = click.option(
        "--save_plots", is_flag=True,
        help="Write ROC and precision-recall curves and a score histogram, with the threshold "
             "marked, per dataset under plots/.",
    )(function)  # fmt: skip
    function = click.option(
        "--save_segmentation_images", is_flag=True,
        help="Write an overlay PNG per test image under segmentation_images/.",
    )(function)  # fmt: skip
    function = click.option(
        "--save_predictions", is_flag=True,
        help="Write per-image scores, maps and masks under predictions/ (the dashboard reads them).",
    )(function)  # fmt: skip
    return click.option(
        "--ensemble_normalisation", type=click.Choice(NORMALISATIONS), default="test_minmax",
        show_default=True,
        help="How ensemble members' scores are rescaled before averaging: min/max over the test "
             "set (reference) or over held-out normal images (no test information).",
    )(function)  # fmt: skip


def _search_options(function):
    function = backbone_runtime_option(function)
    function = click.option(
        "--faiss_on_gpu", is_flag=True,
        help="Search with FAISS on the GPU (needs the gpu extra; falls back to the CPU).",
    )(function)  # fmt: skip
    function = click.option(
        "--faiss_num_workers", type=int, default=8, show_default=True,
        help="Threads FAISS searches with on the CPU.",
    )(function)  # fmt: skip
    return click.option(
        "--nn_backend", type=click.Choice(SEARCH_BACKENDS), default="rerank", show_default=True,
        help="Exact nearest-neighbour search: bfloat16 pass with float32 re-ranking (rerank), "
        "FAISS (faiss) or torch matrix products (torch).",
    )(function)  # fmt: skip


def _dataset_command(group: click.Group, training: bool) -> click.Command:
    def dataset(name, data_path, subdatasets, batch_size, num_workers, resize, imagesize, crop,
                max_size, scale, tile, tile_overlap, mask_rule, augment,
                train_val_split=1.0):  # fmt: skip
        """NAME (mvtec or folder) and DATA_PATH, the categories and how images are loaded."""
        from patchcore.apps.runs import PreprocessingRequest

        _refuse_non_default("--augment", augment, False, "PatchCore trains on unaugmented images")
        with usage_errors():
            request = PreprocessingRequest(resize, imagesize, crop, max_size, tile, tile_overlap,
                                           scale)  # fmt: skip
            config = DatasetConfig(
                name=name,
                data_path=data_path,
                categories=tuple(subdatasets),
                train_val_split=train_val_split,
                batch_size=batch_size,
                num_workers=num_workers,
                preprocessing=request.for_training() if training else PreprocessingConfig(),
                mask_rule=mask_rule,
            )
        return "dataset", DatasetOptions(config, request)

    training_only = [
        click.option("--train_val_split", type=float, default=1.0, show_default=True,
                     help="Keep this fraction of the sorted normal training images for "
                          "training; the rest calibrate the threshold and normal statistics."),
    ]  # fmt: skip
    decorators = [
        click.argument("name", type=click.Choice(DATASET_NAMES)),
        click.argument("data_path", type=click.Path(exists=True, file_okay=False)),
        click.option("--subdatasets", "-d", multiple=True, type=str, required=True,
                     help="Category folder under DATA_PATH; repeat for several."),
        *(training_only if training else []),
        click.option("--batch_size", default=2 if training else 1, type=int, show_default=True,
                     help="Images per forward pass."),
        click.option("--num_workers", default=DEFAULT_NUM_WORKERS, type=int, show_default=True,
                     help="Image-loading processes (default: half the CPU cores less one, at most 4)."),
        click.option("--resize", default=None, type=int,
                     help="Shorter side is resized to this [256; evaluation: the model's]."),
        click.option("--imagesize", default=None, type=int,
                     help="Side of the centre crop [224; evaluation: the model's]."),
        click.option("--crop", type=click.Choice(CROP_MODES), default=None,
                     help="center: the reference's centre crop [default]; none: the whole "
                          "image, aspect ratio kept."),
        click.option("--max_size", type=int, default=None,
                     help="With --crop none: cap of the longer side after resizing [no cap]."),
        click.option("--scale", type=float, default=None,
                     help="With --crop none: resize every image by this factor instead of "
                          "its shorter side to --resize (one pixel size for one camera)."),
        click.option("--tile", type=int, default=None,
                     help="Tiled inspection: tile side in pixels of the working image."),
        click.option("--tile_overlap", type=float, default=None,
                     help="Fraction in [0, 1) by which neighbouring tiles overlap [0]."),
        click.option("--mask_rule", type=click.Choice(MASK_RULES), default="reference",
                     show_default=True,
                     help="reference: bilinear-resized masks, a pixel is defective only at "
                          "1.0; binary: nearest resize, threshold at half."),
        click.option("--augment", is_flag=True,
                     help="Reference option; refused (PatchCore trains on unaugmented images)."),
    ]  # fmt: skip
    for decorator in reversed(decorators):
        dataset = decorator(dataset)
    return group.command("dataset")(dataset)


# --------------------------------------------------------------------- training CLI
@click.group(chain=True, cls=OrderHintGroup)
@click.argument("results_path", type=click.Path(file_okay=False))
@common_options(seed=TRAIN_SEED)
@click.option("--log_group", type=str, default="group", show_default=True,
              help="Run folder name under the project; _0, _1, ... is appended if taken.")
@click.option("--log_project", type=str, default="project", show_default=True,
              help="Project folder under RESULTS_PATH.")
@_output_options
@click.option("--save_patchcore_model", is_flag=True,
              help="Save each dataset's model under models/<dataset>/.")
@click.option(
    "--threshold_quantile", type=QUANTILE, default=0.99, show_default=True,
    help="Decision threshold saved with the model = this quantile of held-out normal image scores.",
)  # fmt: skip
def train_cli(common, **_options):
    """Train PatchCore on each dataset, evaluate it, and write RESULTS_PATH/<log_project>/
    <log_group>/results.csv, optionally with models, overlays and per-image predictions."""


@dataclass(frozen=True)
class TrainRequest:
    """A parsed `patchcore-train` command line: everything its job needs."""

    results_path: Path
    log_project: str
    log_group: str
    configs: tuple[PatchCoreConfig, ...]
    dataset: DatasetConfig
    search: SearchConfig
    outputs: dict
    common: CommonOptions


class ParseOnly:
    """Context object asking the training command to return its `TrainRequest` instead of
    running it (see `parse_train_arguments`)."""


def parse_train_arguments(arguments: list[str]) -> TrainRequest:
    """Parses and validates a `patchcore-train` command line exactly as the command does,
    without running it; click errors propagate (`patchcore-sweep` names the configuration)."""
    return train_cli.main(
        args=list(arguments), prog_name="patchcore-train", standalone_mode=False, obj=ParseOnly()
    )


def _output_options_of(params: dict) -> dict:
    return {
        "save_segmentation_images": params["save_segmentation_images"],
        "save_models": params["save_patchcore_model"],
        "save_predictions": params["save_predictions"],
        "save_plots": params["save_plots"],
        "ensemble_normalisation": params["ensemble_normalisation"],
        "threshold_quantile": params["threshold_quantile"],
    }


@train_cli.result_callback()
def _train(commands, results_path, **params):
    common = CommonOptions.take(params)
    parts = _only_once(commands)
    _require_parts(parts, ("patch_core", "sampler", "dataset"))
    model_options: ModelOptions = parts["patch_core"]
    dataset: DatasetOptions = parts["dataset"]
    with usage_errors():
        configs = model_options.configs(
            parts["sampler"], common.seed, dataset.config.preprocessing
        )
    request = TrainRequest(
        Path(results_path), params["log_project"], params["log_group"], tuple(configs),
        dataset.config, model_options.search, _output_options_of(params), common,
    )  # fmt: skip
    if isinstance(click.get_current_context().obj, ParseOnly):
        return request

    def job() -> None:
        from patchcore.apps.runs import OutputOptions, prepare_training_data, train_run
        from patchcore.layout import new_run_folder

        device = common.torch_device()
        data = prepare_training_data(request.dataset, device)  # bad data: no run folder made
        with new_run_folder(
            request.results_path, request.log_project, request.log_group
        ) as run_folder:
            rows = train_run(run_folder, list(request.configs), request.dataset, device,
                             request.search, OutputOptions(**request.outputs), data)  # fmt: skip
        _show_results(rows, run_folder / "results.csv")

    run_guarded(job, common)


@train_cli.command("patch_core")
@click.option("--backbone_names", "-b", type=str, multiple=True, default=["wideresnet50"],
              show_default=True,
              help="Backbone; repeat for an ensemble; 'name.seed-N' gives a member its own seed, "
                   "'name.random' random weights (mixed with pretrained members).")
@click.option("--layers_to_extract_from", "-le", type=str, multiple=True, default=[],
              help="Layer (module) name; repeat; 'i.layer' with several backbones. Default: "
                   "layer2 and layer3 (the backbone family's mid-level stages).")  # fmt: skip
@click.option("--pretrain_embed_dimension", type=int, default=1024, show_default=True,
              help="Each layer's p x p neighbourhood is average-pooled to this many values.")
@click.option("--target_embed_dimension", type=int, default=1024, show_default=True,
              help="The layers' concatenation is average-pooled to this many values.")
@click.option("--preprocessing", type=str, default="mean", metavar="mean",
              help="Reference option; only 'mean' (adaptive average pooling) exists.")
@click.option("--aggregation", type=str, default="mean", metavar="mean",
              help="Reference option; only 'mean' (average pooling of the layers) exists.")
@click.option("--anomaly_scorer_num_nn", type=int, default=1, show_default=True,
              help="k: a patch's score is its mean distance to its k nearest bank features.")
@click.option("--patchsize", type=int, default=3, show_default=True,
              help="Neighbourhood size p (odd) of the locally aggregated patch features.")
@click.option("--patchscore", type=str, default="max", metavar="max",
              help="Reference option; only 'max' (see --image_score for the others).")
@click.option("--patchoverlap", type=float, default=0.0, metavar="0",
              help="Reference option; patches use stride 1.")
@click.option("--patchsize_aggregate", "-pa", type=int, multiple=True, default=[],
              help="Reference option; multi-size aggregation is not implemented.")
@click.option("--distance", type=click.Choice(DISTANCES), default="squared_l2",
              show_default=True, help="Score unit: squared L2 (reference) or L2 (paper).")
@click.option("--score_reweighting", is_flag=True,
              help="Re-weight image scores by the paper's Eq. 7 (off in the reference).")
@click.option("--random_backbone_weights", is_flag=True,
              help="Random weights for every backbone member (tests of mechanics and timing "
                   "only; results are meaningless); 'name.random' marks one member.")  # fmt: skip
@click.option("--backbone_statistics", type=click.Choice(BACKBONE_STATISTICS), default="reference",
              show_default=True,
              help="BatchNorm statistics: 'reference' moves them by the reference's training-mode "
                   "pass of a constant image, as its PatchCore.load does; 'pretrained' keeps the "
                   "ImageNet ones.")  # fmt: skip
@image_score_options
@_search_options
@index_options(training=True)
@usage_errors()
def _patch_core(
    backbone_names, layers_to_extract_from, pretrain_embed_dimension, target_embed_dimension,
    preprocessing, aggregation, anomaly_scorer_num_nn, patchsize, patchscore, patchoverlap,
    patchsize_aggregate, distance, score_reweighting, random_backbone_weights,
    backbone_statistics, image_score_config, backbone_runtime, faiss_on_gpu, faiss_num_workers,
    nn_backend,
    **index_values,
):  # fmt: skip
    """Backbone(s), layers and patch-feature dimensions; nearest-neighbour search."""
    _refuse_non_default("--preprocessing", preprocessing, "mean",
                        "features are reduced by adaptive average pooling only")  # fmt: skip
    _refuse_non_default("--aggregation", aggregation, "mean",
                        "layers are merged by adaptive average pooling only")  # fmt: skip
    _refuse_non_default("--patchscore", patchscore, "max",
                        "use --image_score (max, quantile, top_k_mean)")  # fmt: skip
    _refuse_non_default("--patchoverlap", patchoverlap, 0.0, "patches use stride 1")
    _refuse_non_default("--patchsize_aggregate", tuple(patchsize_aggregate), (),
                        "multi-size patch aggregation is not implemented")  # fmt: skip
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
        backbone_statistics=backbone_statistics,
        **image_score_config,
        search=SearchConfig(nn_backend, faiss_on_gpu, faiss_num_workers,
                            bank_storage=index_values["bank_storage"],
                            backbone_runtime=backbone_runtime),
        index=index_config(index_values, nn_backend),
    )
    return "patch_core", options


@train_cli.command("sampler")
@click.argument("name", type=click.Choice(SAMPLER_NAMES))
@click.option("--percentage", "-p", type=float, default=0.1, show_default=True,
              help="Fraction of the training patch features kept in the memory bank.")
@usage_errors()
def _sampler(name, percentage):
    """Memory-bank subsampling: identity, greedy_coreset (exact farthest-point) or
    approx_greedy_coreset (the paper's)."""
    return "sampler", SamplerConfig(name=name, percentage=percentage)


_dataset_command(train_cli, training=True)


# ------------------------------------------------------------------- evaluation CLI
@click.group(chain=True, cls=OrderHintGroup)
@click.argument("results_path", type=click.Path(file_okay=False))
@common_options(seed=EVALUATE_SEED)
@_output_options
def evaluate_cli(common, **_options):
    """Evaluate saved PatchCore models on each dataset; writes RESULTS_PATH/results.csv, or,
    when RESULTS_PATH holds one already, RESULTS_PATH_0 (_1, ...) instead (never overwrites)."""


@evaluate_cli.result_callback()
def _evaluate(commands, results_path, **params):
    common = CommonOptions.take(params)
    parts = _only_once(commands)
    _require_parts(parts, ("patch_core_loader", "dataset"))
    _refuse_non_default("--seed", common.seed, 0,
                        "evaluation is deterministic, so a seed changes nothing")  # fmt: skip
    loader: LoaderOptions = parts["patch_core_loader"]
    dataset: DatasetOptions = parts["dataset"]

    def job() -> None:
        from patchcore.apps.runs import OutputOptions, evaluate_run, evaluation_folder

        output = OutputOptions(
            save_segmentation_images=params["save_segmentation_images"],
            save_predictions=params["save_predictions"],
            save_plots=params["save_plots"],
            ensemble_normalisation=params["ensemble_normalisation"],
        )
        device = common.torch_device()
        with evaluation_folder(Path(results_path)) as folder:
            rows = evaluate_run(
                folder, [Path(p) for p in loader.model_folders], dataset.config, dataset.request,
                device, loader.search, output,
            )  # fmt: skip
        _show_results(rows, folder / "results.csv")

    run_guarded(job, common)


@evaluate_cli.command("patch_core_loader")
@click.option("--patch_core_paths", "-p", type=click.Path(exists=True, file_okay=False),
              multiple=True, required=True,
              help="Model folder; one per dataset, or one for all.")  # fmt: skip
@_search_options
@index_options(training=False)
@usage_errors()
def _patch_core_loader(patch_core_paths, backbone_runtime, faiss_on_gpu, faiss_num_workers,
                       nn_backend, **index_values):  # fmt: skip
    """Saved model folder(s) to evaluate; nearest-neighbour search."""
    storage = index_values["bank_storage"]
    search = SearchConfig(nn_backend, faiss_on_gpu, faiss_num_workers, bank_storage=storage,
                          index=index_config(index_values, nn_backend),
                          backbone_runtime=backbone_runtime)  # fmt: skip
    return "patch_core_loader", LoaderOptions(tuple(patch_core_paths), search)


_dataset_command(evaluate_cli, training=False)


def train_main() -> None:
    """Entry point of `patchcore-train` and bin/run_patchcore.py."""
    train_cli()


def evaluate_main() -> None:
    """Entry point of `patchcore-evaluate` and bin/load_and_evaluate_patchcore.py."""
    evaluate_cli()
