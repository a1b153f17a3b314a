"""The two jobs the command line runs: train-and-evaluate, and evaluate saved models.

Both write `results.csv` (one row per dataset plus the mean), optionally segmentation
overlays, and return the metrics so the caller can print the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from patchcore.config import DatasetConfig, PatchCoreConfig, PreprocessingConfig, SearchConfig
from patchcore.errors import ConfigurationError
from patchcore.evaluation import TestSetResult, evaluate_models, split_loader
from patchcore.model import DEFAULT_THRESHOLD_QUANTILE, PatchCore
from patchcore.model_io import load_models, save_models
from patchcore.prediction_records import write_predictions
from patchcore.reporting import write_results_csv
from patchcore.visualization import save_segmentation_images

LOGGER = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"


@dataclass(frozen=True)
class OutputOptions:
    """What a run writes besides results.csv."""

    save_segmentation_images: bool = False
    save_models: bool = False
    save_predictions: bool = False
    ensemble_normalisation: str = "test_minmax"
    threshold_quantile: float = DEFAULT_THRESHOLD_QUANTILE


@dataclass(frozen=True)
class PreprocessingRequest:
    """--resize / --imagesize as given on the command line (None = not given)."""

    resize: int | None = None
    imagesize: int | None = None

    def for_training(self) -> PreprocessingConfig:
        defaults = PreprocessingConfig()
        return PreprocessingConfig(
            resize=self.resize or defaults.resize, imagesize=self.imagesize or defaults.imagesize
        )

    def check_against(self, saved: PreprocessingConfig, folder: Path) -> None:
        """A saved model's preprocessing wins; contradicting it explicitly is an error."""
        for option, requested, actual in (
            ("--resize", self.resize, saved.resize),
            ("--imagesize", self.imagesize, saved.imagesize),
        ):
            if requested is not None and requested != actual:
                raise ConfigurationError(
                    f"{option} {requested} contradicts the model in {folder}, which was trained "
                    f"with {option} {actual}; leave the option out to use the model's value"
                )


def select_device(gpu_ids: tuple[int, ...]) -> torch.device:
    """CUDA device of the first id given; CPU when none is given, -1, or CUDA is absent."""
    if not gpu_ids or gpu_ids[0] < 0:
        LOGGER.info("Running on CPU (no --gpu given)")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        LOGGER.info("Running on CPU: --gpu %d given but CUDA is not available", gpu_ids[0])
        return torch.device("cpu")
    if len(gpu_ids) > 1:
        LOGGER.info("Several --gpu ids given; using the first, %d", gpu_ids[0])
    return torch.device(f"cuda:{gpu_ids[0]}")


def create_run_folder(results_path: Path, project: str, group: str) -> Path:
    """`results_path/project/group`, or `group_0`, `group_1`, ... if it exists; never reused."""
    project_folder = Path(results_path) / project
    project_folder.mkdir(parents=True, exist_ok=True)
    candidates = [group] + [f"{group}_{counter}" for counter in range(10_000)]
    for candidate in candidates:
        folder = project_folder / candidate
        if not folder.exists():
            folder.mkdir()
            return folder
    raise ConfigurationError(f"{project_folder}: too many runs named '{group}'")


def _write_overlays(run_folder: Path, result: TestSetResult, threshold: float | None) -> None:
    save_segmentation_images(
        run_folder / "segmentation_images" / result.name,
        result.images,
        result.maps,
        result.scores,
        result.image_names,
        masks=result.masks,
        has_mask=result.has_mask,
        threshold=threshold,
    )


def _single_threshold(models: list[PatchCore]) -> float | None:
    """A single model's calibrated threshold (ensembles' scores are rescaled, so none)."""
    if len(models) == 1 and models[0].normal_statistics is not None:
        return models[0].normal_statistics.threshold
    return None


def _finish_dataset(
    run_folder: Path, models: list[PatchCore], loader, name: str, output: OutputOptions
) -> dict[str, float]:
    result = evaluate_models(
        models,
        loader,
        name,
        output.ensemble_normalisation,
        keep_images=output.save_segmentation_images,
    )
    threshold = _single_threshold(models)
    if output.save_segmentation_images:
        _write_overlays(run_folder, result, threshold)
    if output.save_predictions:
        write_predictions(run_folder / "predictions" / name, result.records(threshold))
    return result.metrics


def train_run(
    run_folder: Path,
    model_configs: list[PatchCoreConfig],
    dataset: DatasetConfig,
    device: torch.device,
    search: SearchConfig,
    output: OutputOptions,
) -> dict[str, dict[str, float]]:
    """Fits one model per backbone on each category, evaluates, saves; returns metrics."""
    rows: dict[str, dict[str, float]] = {}
    for position, category in enumerate(dataset.categories):
        name = dataset.run_name(category)
        LOGGER.info("Training on %s (%d/%d)", name, position + 1, len(dataset.categories))
        train_loader = split_loader(dataset, category, "train", device)
        validation_loader = split_loader(dataset, category, "val", device)
        test_loader = split_loader(dataset, category, "test", device)
        models = []
        for config in model_configs:
            model = PatchCore(replace(config, preprocessing=dataset.preprocessing), device, search)
            model.fit(train_loader)
            if validation_loader is not None:
                model.calibrate(validation_loader, output.threshold_quantile)
            elif output.save_models or output.ensemble_normalisation == "normal_stats":
                LOGGER.warning(
                    "%s: no held-out normal images (--train_val_split 1); the threshold and "
                    "normal statistics come from the training images and are optimistic",
                    name,
                )
                model.calibrate(train_loader, output.threshold_quantile)
            models.append(model)
        rows[name] = _finish_dataset(run_folder, models, test_loader, name, output)
        if output.save_models:
            save_models(run_folder / "models" / name, models)
        write_results_csv(run_folder / RESULTS_FILE, rows)
    return rows


def evaluate_run(
    results_folder: Path,
    model_folders: list[Path],
    dataset: DatasetConfig,
    preprocessing: PreprocessingRequest,
    device: torch.device,
    search: SearchConfig,
    output: OutputOptions,
) -> dict[str, dict[str, float]]:
    """Evaluates saved models: one folder per category, or one folder for all of them."""
    if len(model_folders) not in (1, len(dataset.categories)):
        raise ConfigurationError(
            f"give one -p model folder per dataset ({len(dataset.categories)}) or a single one "
            f"for all; got {len(model_folders)}"
        )
    rows: dict[str, dict[str, float]] = {}
    for position, category in enumerate(dataset.categories):
        folder = Path(model_folders[min(position, len(model_folders) - 1)])
        models = load_models(folder, device, search, preprocessing.resize or 256)
        saved = models[0].config.preprocessing
        if any(model.config.preprocessing != saved for model in models):
            raise ConfigurationError(f"{folder}: ensemble members disagree on preprocessing")
        preprocessing.check_against(saved, folder)
        category_dataset = replace(dataset, preprocessing=saved)
        name = dataset.run_name(category)
        test_loader = split_loader(category_dataset, category, "test", device)
        rows[name] = _finish_dataset(results_folder, models, test_loader, name, output)
        write_results_csv(Path(results_folder) / RESULTS_FILE, rows)
    return rows
