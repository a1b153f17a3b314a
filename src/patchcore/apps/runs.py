"""The two jobs behind `patchcore-train` and `patchcore-evaluate`.

Both write `results.csv` (one row per dataset plus the mean) in the run-folder layout of
`patchcore.layout`, optionally models, predictions and segmentation overlays, and return
the metrics so the caller can print the table. A dataset's model and `results.csv` row are
saved before any optional output, so a failure there never loses a trained model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from patchcore.apps.model_card import TrainingImages, model_card
from patchcore.config import (
    DatasetConfig,
    PatchCoreConfig,
    PreprocessingConfig,
    SearchConfig,
    check_threshold_quantile,
)
from patchcore.data.datasets import list_samples, split_loader
from patchcore.errors import ConfigurationError
from patchcore.evaluation.ensemble import calibrate_ensemble, decision_statistics
from patchcore.evaluation.quality import inspection_coverage, record_quality, type_rows
from patchcore.evaluation.records import write_predictions
from patchcore.evaluation.reporting import merge_results_csv, write_results_csv
from patchcore.evaluation.testset import TestSetResult, evaluate_models
from patchcore.files import check_writable, exclusive_lock_if_free, make_folder
from patchcore.layout import RESULTS_FILE, RunLayout, new_run_folder
from patchcore.model.calibration import (
    DEFAULT_THRESHOLD_QUANTILE,
    NormalStatistics,
    colour_range,
)
from patchcore.model.identity import MODEL_CARD_FILE
from patchcore.model.patchcore import PatchCore
from patchcore.model.serialization import load_ensemble_statistics, load_models, save_models

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputOptions:
    """What a run writes besides results.csv."""

    save_segmentation_images: bool = False
    save_models: bool = False
    save_predictions: bool = False
    save_plots: bool = False
    ensemble_normalisation: str = "test_minmax"
    threshold_quantile: float = DEFAULT_THRESHOLD_QUANTILE
    # Several processes write one results.csv (patchcore-sweep): merge rows under a lock,
    # datasets named in results_order first.
    merge_results: bool = False
    results_order: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_threshold_quantile(self.threshold_quantile)


@dataclass(frozen=True)
class PreprocessingRequest:
    """The `dataset` command's preprocessing options as given (None = not given)."""

    resize: int | None = None
    imagesize: int | None = None
    crop: str | None = None
    max_size: int | None = None
    tile: int | None = None
    tile_overlap: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        """Options that would have no effect with the others given are refused, naming both."""
        crop = self.crop or "center"
        crop_option = f"--crop {crop}" + ("" if self.crop else " (the default)")
        conflicts = [
            (self.max_size is not None and crop == "center",
             (f"--max_size has no effect with {crop_option}: the centre crop is --imagesize "
             "square; give --crop none to cap the longer side, or leave --max_size out")),
            (self.tile_overlap is not None and self.tile is None,
             ("--tile_overlap has no effect without --tile; give --tile or leave "
             "--tile_overlap out")),
            (self.imagesize is not None and crop == "none",
             (f"--imagesize has no effect with {crop_option}: the whole image is inspected at "
             "--resize (or --scale, --max_size); leave --imagesize out")),
        ]  # fmt: skip
        for conflict, message in conflicts:
            if conflict:
                raise ConfigurationError(message)

    def given(self) -> dict:
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        }

    def for_training(self) -> PreprocessingConfig:
        return PreprocessingConfig(**self.given())

    def check_against(self, saved: PreprocessingConfig, folder: Path) -> None:
        """A saved model's preprocessing wins; contradicting it explicitly is an error."""
        for name, requested in self.given().items():
            actual = getattr(saved, name)
            if requested != actual:
                raise ConfigurationError(
                    f"--{name} {requested} contradicts the model in {folder}, which was "
                    f"trained with --{name} {actual}; leave the option out to use the model's "
                    "value"
                )


def _write_optional_outputs(
    layout: RunLayout,
    models: list[PatchCore],
    result: TestSetResult,
    output: OutputOptions,
    ensemble_statistics: NormalStatistics | None,
) -> None:
    """Overlays and per-image predictions of one evaluated dataset, as asked. Both decide and
    colour with the statistics of the scale the scores are on (a single model's own, an
    ensemble's combined `normal_stats` scale; none on a test-set min-max scale)."""
    statistics = decision_statistics(models, ensemble_statistics, output.ensemble_normalisation)
    threshold = None if statistics is None else statistics.threshold
    if output.save_predictions:
        write_predictions(layout.dataset_predictions(result.name), result.records(statistics))
    # matplotlib (0.6 to 0.7 s to import) is loaded only by runs that draw
    if output.save_plots:
        from patchcore.evaluation.plots import PLOTS_FOLDER, save_decision_plots

        save_decision_plots(Path(layout.folder) / PLOTS_FOLDER, result.name,
                            result.scores.numpy(), result.labels.numpy(), threshold)  # fmt: skip
    if output.save_segmentation_images:
        from patchcore.evaluation.visualization import save_segmentation_images

        save_segmentation_images(
            layout.segmentation_images(result.name),
            result.images,
            result.maps,
            result.scores,
            result.image_names,
            masks=result.masks,
            has_mask=result.has_mask,
            colour_range=colour_range(threshold, statistics, result.maps),
            threshold=threshold,
        )


def _by_type(
    models: list[PatchCore],
    result: TestSetResult,
    output: OutputOptions,
    ensemble_statistics: NormalStatistics | None,
) -> list[dict]:
    """Per-type results and decisions at the threshold the scores are decided with."""
    statistics = decision_statistics(models, ensemble_statistics, output.ensemble_normalisation)
    threshold = None if statistics is None else statistics.threshold
    return type_rows(result.name, result.scores.numpy(), result.defect_types,
                     result.labels.numpy(), threshold)  # fmt: skip


def _record_quality(
    layout: RunLayout,
    dataset: DatasetConfig,
    category: str,
    preprocessing: PreprocessingConfig,
    result: TestSetResult,
    by_type: list[dict],
    output: OutputOptions,
) -> None:
    """Coverage of the defects by the inspected region, and per-type results and decision
    rates at the saved threshold, beside results.csv (`patchcore.evaluation.quality`)."""
    samples = list_samples(Path(dataset.data_path), category, "test",
                           masks_required=dataset.name == "mvtec")  # fmt: skip
    record_quality(Path(layout.folder), result.name, inspection_coverage(samples, preprocessing),
                   by_type, shared=output.merge_results)  # fmt: skip


@dataclass(frozen=True)
class CategoryData:
    """The loaders of one category: its files listed, opened and size-checked."""

    name: str
    train: torch.utils.data.DataLoader
    validation: torch.utils.data.DataLoader | None
    test: torch.utils.data.DataLoader


def prepare_training_data(dataset: DatasetConfig, device: torch.device) -> list[CategoryData]:
    """The loaders of every category, built before any work: each image is listed, its header
    read (PNG files verified) and each mask's presence and size checked, so bad data of any
    category is reported in milliseconds per image, before a model is fitted or a run
    folder is made."""
    LOGGER.info("Checking the images of %d dataset(s)", len(dataset.categories))
    return [
        CategoryData(
            dataset.run_name(category),
            split_loader(dataset, category, "train", device),
            split_loader(dataset, category, "val", device),
            split_loader(dataset, category, "test", device),
        )
        for category in dataset.categories
    ]


def _evaluate(models: list[PatchCore], loader, name: str, output: OutputOptions) -> TestSetResult:
    return evaluate_models(
        models,
        loader,
        name,
        output.ensemble_normalisation,
        keep_images=output.save_segmentation_images,
    )


def train_run(
    run_folder: Path,
    model_configs: list[PatchCoreConfig],
    dataset: DatasetConfig,
    device: torch.device,
    search: SearchConfig,
    output: OutputOptions,
    data: list[CategoryData] | None = None,
) -> dict[str, dict[str, float]]:
    """Fits one model per backbone on each category, evaluates, saves; returns metrics.

    `data` is `prepare_training_data(dataset, device)` when the caller checked the data
    already (before creating the run folder); it is prepared here otherwise.
    """
    layout = RunLayout(run_folder)
    rows: dict[str, dict[str, float]] = {}
    categories = prepare_training_data(dataset, device) if data is None else data
    for position, (category, category_folder) in enumerate(
        zip(categories, dataset.categories, strict=True)
    ):
        name = category.name
        LOGGER.info("Training on %s (%d/%d)", name, position + 1, len(categories))
        train_loader, validation_loader = category.train, category.validation
        test_loader = category.test
        models, calibration = [], []
        calibration_loader = _calibration_loader(
            name, validation_loader, train_loader, len(model_configs), output
        )
        for number, config in enumerate(model_configs, start=1):
            member = member_name(config, number, len(model_configs))
            if len(model_configs) > 1:
                LOGGER.info("%s: fitting %s", name, member)
            model = PatchCore(replace(config, preprocessing=dataset.preprocessing), device, search)
            model.check_fit_memory(train_loader.dataset.model_input_sizes(), name)
            leave_one_out = calibration_loader is train_loader
            model.fit(train_loader, keep_training_features=leave_one_out)
            if leave_one_out:  # from the features fit() kept: no second backbone pass
                calibration.append(model.calibrate_leave_one_out(
                    quantile=output.threshold_quantile))  # fmt: skip
            elif calibration_loader is not None:
                calibration.append(model.calibrate(calibration_loader, output.threshold_quantile))
            problem = degenerate_problem(model)
            if problem:
                LOGGER.warning("%s: %s %s; check its backbone weights and layers", name, member,
                               problem)  # fmt: skip
            models.append(model)
        ensemble_statistics = None
        if len(models) > 1 and calibration:
            ensemble_statistics = calibrate_ensemble(models, calibration, output.threshold_quantile)
            LOGGER.info(
                "%s: ensemble threshold %.6g on the members' combined normal-image scale",
                name, ensemble_statistics.threshold,
            )  # fmt: skip
        result = _evaluate(models, test_loader, name, output)
        rows[name] = result.metrics
        by_type = _by_type(models, result, output, ensemble_statistics)
        if output.save_models:
            training = TrainingImages(
                os.path.abspath(Path(dataset.data_path) / category_folder / "train"),
                tuple(os.path.abspath(sample.image_path)
                      for sample in train_loader.dataset.samples),
            )  # fmt: skip
            card = model_card(name, models, ensemble_statistics, training, result.metrics, by_type)
            save_models(layout.model(name), models, ensemble_statistics, {MODEL_CARD_FILE: card})
        if output.merge_results:
            merge_results_csv(layout.results_csv, rows, output.results_order)
        else:
            write_results_csv(layout.results_csv, rows)
        _record_quality(layout, dataset, category_folder, dataset.preprocessing, result, by_type,
                        output)  # fmt: skip
        _write_optional_outputs(layout, models, result, output, ensemble_statistics)
    return rows


DEGENERATE_SPREAD = 1e-3  # bank features varying less than this, relative to their size
DEGENERATE_LEVEL = 1e-3  # a threshold this small: the features barely vary (1024-d features
# of a working backbone give thresholds of 1 to 1e5). A sanity check of the threshold's size,
# not a decision on a score (those go through calibration.decide).


def member_name(config: PatchCoreConfig, number: int, count: int) -> str:
    """How logs name a model: 'member 2 of 3 (resnet18, random weights)'."""
    weights = "ImageNet" if config.pretrained else "random"
    what = f"{config.backbone_name}, {weights} weights, seed {config.seed}"
    return f"member {number} of {count} ({what})" if count > 1 else f"the model ({what})"


def degenerate_problem(model: PatchCore) -> str:
    """What makes a fitted model useless for decisions ('' if nothing): bank features that are
    (nearly) constant, or a (nearly) zero threshold, like the 1.7e-05 of a broken member."""
    bank = model.memory_bank
    rows = bank[: min(len(bank), 4096)].float()
    spread = float(rows.std(dim=0).mean()) if len(rows) > 1 else 0.0
    if spread <= DEGENERATE_SPREAD * float(rows.abs().mean()):
        return f"has near-constant memory-bank features (mean spread {spread:.3g})"
    statistics = model.normal_statistics
    level = None if statistics is None else statistics.threshold
    if level is not None and level < DEGENERATE_LEVEL:
        return f"has a near-zero threshold ({level:.3g}): its features barely vary"
    return ""


def _calibration_loader(name: str, validation_loader, train_loader, members: int, output):
    """The held-out normal images the models calibrate on; the training images, scored
    leave-one-image-out (`PatchCore.calibrate_leave_one_out`), when there are none but a
    threshold or normal statistics are needed."""
    if validation_loader is not None:
        return validation_loader
    needs_statistics = output.save_models or (
        members > 1 and output.ensemble_normalisation == "normal_stats"
    )
    if not needs_statistics:
        return None
    LOGGER.info(
        "%s: no held-out normal images (--train_val_split 1); the threshold and normal "
        "statistics come from leave-one-image-out scores of the training images (held-out "
        "images, --train_val_split < 1, are the stronger check)",
        name,
    )
    return train_loader


def evaluate_run(
    results_folder: Path,
    model_folders: list[Path],
    dataset: DatasetConfig,
    preprocessing: PreprocessingRequest,
    device: torch.device,
    search: SearchConfig,
    output: OutputOptions,
) -> dict[str, dict[str, float]]:
    """Evaluates saved models (one folder per category, or one folder for all of them) and
    writes into `results_folder` (`evaluation_folder` picks one that holds no results)."""
    if len(model_folders) not in (1, len(dataset.categories)):
        raise ConfigurationError(
            f"give one -p model folder per dataset ({len(dataset.categories)}) or a single one "
            f"for all; got {len(model_folders)}"
        )
    check_writable(results_folder)
    layout = RunLayout(results_folder)
    rows: dict[str, dict[str, float]] = {}
    for position, category in enumerate(dataset.categories):
        folder = Path(model_folders[min(position, len(model_folders) - 1)])
        models = load_models(folder, device, search, preprocessing.resize or 256)
        ensemble_statistics = load_ensemble_statistics(folder)
        saved = models[0].config.preprocessing
        if any(model.config.preprocessing != saved for model in models):
            raise ConfigurationError(f"{folder}: ensemble members disagree on preprocessing")
        preprocessing.check_against(saved, folder)
        category_dataset = replace(dataset, preprocessing=saved)
        name = dataset.run_name(category)
        test_loader = split_loader(category_dataset, category, "test", device)
        result = _evaluate(models, test_loader, name, output)
        rows[name] = result.metrics
        write_results_csv(layout.results_csv, rows)
        by_type = _by_type(models, result, output, ensemble_statistics)
        _record_quality(layout, dataset, category, saved, result, by_type, output)
        _write_optional_outputs(layout, models, result, output, ensemble_statistics)
    return rows


@contextlib.contextmanager
def evaluation_folder(results_folder: Path) -> Iterator[Path]:
    """Claims, for the block, where an evaluation writes: RESULTS_PATH when it holds no
    results.csv and no other evaluation is writing there (an exclusive lock beside it, held
    for the block and released by the system if the process dies); otherwise a new sibling
    folder `RESULTS_PATH_0`, `_1`, ... (logged), created atomically, so concurrent
    evaluations never share a folder and nothing is overwritten. A folder this evaluation
    created and left empty by a failure is removed."""
    results_folder = check_writable(Path(results_folder))
    with exclusive_lock_if_free(results_folder) as claimed:
        if claimed and not RunLayout(results_folder).results_csv.exists():
            created = not results_folder.exists()
            make_folder(results_folder)
            try:
                yield results_folder
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):  # not empty: what was written stays
                        results_folder.rmdir()
                raise
            return
    with new_run_folder(results_folder.parent, "", results_folder.name) as folder:
        reason = (f"already holds a {RESULTS_FILE} from an earlier run" if claimed
                  else "is being written by another evaluation")  # fmt: skip
        LOGGER.warning("%s %s; writing this evaluation to %s instead", results_folder, reason,
                       folder)  # fmt: skip
        yield folder
