"""The job behind `patchcore-update MODEL_DIR IMAGES...`: new good images join a saved model.

Every member of the model (one, or an ensemble's) continues its greedy coreset over the new
images' patch features (`patchcore.model.update`). When held-out normal images are given,
the threshold and normal statistics are measured again on them (same quantile as before,
or `--threshold_quantile`), an ensemble's combined scale too; otherwise the saved ones are
kept and the log says so.

The new version is written next to the old one and exchanged with it only when complete
(`patchcore.files.staged_path`): at every instant MODEL_DIR is a complete model, the old one
until the exchange, and a failure or a kill leaves it untouched; leftovers of a killed update
are recovered or removed by the next load or update. A MODEL_DIR that is a symbolic link
stays one: the folder it points to is updated. `--output DIR` writes the new version elsewhere and keeps MODEL_DIR as it is.
Concurrent updates of one model wait for each other (`patchcore.files.exclusive_lock`).
Each update is recorded in the folder's `update_history.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from patchcore import __version__
from patchcore.apps.predict import resolve_inputs
from patchcore.config import (
    PreprocessingConfig,
    SearchConfig,
    check_loader_settings,
    check_threshold_quantile,
    default_loader_workers,
)
from patchcore.data.datasets import GOOD, ImageDataset, Sample, SizeGroupedBatchSampler
from patchcore.errors import ConfigurationError, ModelFormatError
from patchcore.evaluation.ensemble import calibrate_ensemble, decision_statistics
from patchcore.files import exclusive_lock, link_target
from patchcore.model.calibration import DEFAULT_THRESHOLD_QUANTILE, NormalStatistics
from patchcore.model.identity import MODEL_CARD_FILE
from patchcore.model.patchcore import PatchCore
from patchcore.model.serialization import (
    load_ensemble_statistics,
    load_models,
    read_json,
    save_models,
)
from patchcore.model.update import UpdateLimits, UpdateReport, add_normal_images

LOGGER = logging.getLogger(__name__)

HISTORY_FILE = "update_history.json"


@dataclass(frozen=True)
class UpdateOptions:
    """An update job; checked once when built."""

    model_dir: Path
    images: tuple[str, ...]
    output: Path | None = None
    limits: UpdateLimits = field(default_factory=UpdateLimits)
    normal_images: tuple[str, ...] = ()
    threshold_quantile: float | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 4
    num_workers: int = field(default_factory=default_loader_workers)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        if not self.images:
            raise ConfigurationError("give at least one IMAGES file, folder or pattern")
        check_loader_settings(self.batch_size, self.num_workers)
        check_threshold_quantile(self.threshold_quantile)

    @property
    def destination(self) -> Path:
        return self.output if self.output is not None else self.model_dir


@dataclass(frozen=True)
class UpdateSummary:
    """What the update did, per member and in all."""

    images: int
    reports: list[UpdateReport]
    decision_threshold: tuple[float | None, float | None]  # before, after: the one deciding
    calibration_images: int
    destination: Path

    def line(self) -> str:
        added = ", ".join(
            f"{r.added} of {r.new_features} new patch features (bank {r.bank_before} -> "
            f"{r.bank_after})" for r in self.reports
        )  # fmt: skip
        before, after = self.decision_threshold
        if self.calibration_images:
            threshold = (f"threshold {_number(before)} -> {_number(after)} "
                         f"(recalibrated on {self.calibration_images} normal images)")  # fmt: skip
        else:
            threshold = f"threshold kept at {_number(after)} (no --normal_images given)"
        return f"{self.images} images: added {added}; {threshold}. Model: {self.destination}"


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def image_loader(
    inputs: tuple[str, ...], preprocessing: PreprocessingConfig, options: UpdateOptions
) -> torch.utils.data.DataLoader:
    """Batches (of one working size each) of the good images named by `inputs`; every file
    is opened once first, so an unreadable one stops the update before any work."""
    samples = [Sample(path, None, GOOD, False) for path in resolve_inputs(inputs)]
    dataset = ImageDataset(samples, preprocessing)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=SizeGroupedBatchSampler(dataset.working_sizes(), options.batch_size),
        num_workers=options.num_workers,
    )


def _read_history(folder: Path) -> list:
    path = folder / HISTORY_FILE
    if not path.is_file():
        return []
    history = read_json(path)
    if not isinstance(history, list):
        raise ModelFormatError(f"{path}: expected a list of updates")
    return history


def _threshold(statistics: NormalStatistics | None) -> float | None:
    return statistics.threshold if statistics is not None else None


def _recalibrate(
    models: list[PatchCore],
    loader: torch.utils.data.DataLoader | None,
    ensemble_statistics: NormalStatistics | None,
    options: UpdateOptions,
) -> NormalStatistics | None:
    """Measures every member's normal statistics again on the held-out normal images of
    `loader` (and an ensemble's combined scale, as training does); returns the ensemble's
    statistics (the saved ones when there is nothing to recalibrate on)."""
    if loader is None:
        LOGGER.warning(
            "No --normal_images given: the threshold and normal statistics are the ones saved "
            "before the update (new normal features only lower scores, so it errs towards "
            "accepting); give held-out normal images to recalibrate"
        )
        return ensemble_statistics
    predictions = []
    for model in models:
        previous = model.normal_statistics
        quantile = options.threshold_quantile
        if quantile is None:
            quantile = previous.threshold_quantile if previous else DEFAULT_THRESHOLD_QUANTILE
        predictions.append(model.calibrate(loader, quantile))
    if len(models) == 1:
        return None
    quantile = options.threshold_quantile
    if quantile is None:
        quantile = (ensemble_statistics.threshold_quantile if ensemble_statistics
                    else DEFAULT_THRESHOLD_QUANTILE)  # fmt: skip
    return calibrate_ensemble(models, predictions, quantile)


def run_update(options: UpdateOptions) -> UpdateSummary:
    """Loads MODEL_DIR, adds the images, recalibrates if asked, saves the new version. Two
    updates of one model take turns (a lock beside the folder), so neither is lost."""
    with exclusive_lock(link_target(options.model_dir)):
        return _update(options)


def _update(options: UpdateOptions) -> UpdateSummary:
    models = load_models(options.model_dir, options.device, options.search)
    ensemble_before = load_ensemble_statistics(options.model_dir)
    history = _read_history(options.model_dir)
    preprocessing = models[0].config.preprocessing
    loader = image_loader(options.images, preprocessing, options)
    normal_loader = (image_loader(options.normal_images, preprocessing, options)
                     if options.normal_images else None)  # fmt: skip
    before = [_threshold(model.normal_statistics) for model in models]
    decision_before = _threshold(decision_statistics(models, ensemble_before))
    threads = options.search.faiss_num_workers
    reports = [add_normal_images(model, loader, options.limits, threads) for model in models]
    ensemble_after = _recalibrate(models, normal_loader, ensemble_before, options)
    calibration_images = len(normal_loader.dataset) if normal_loader is not None else 0
    after = [_threshold(model.normal_statistics) for model in models]
    decision_after = _threshold(decision_statistics(models, ensemble_after))
    history.append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "library_version": __version__,
        "from": str(options.model_dir),
        "images": len(loader.dataset),
        "limits": asdict(options.limits),
        "members": [asdict(report) for report in reports],
        "calibration_images": calibration_images,
        "thresholds": [{"before": b, "after": a} for b, a in zip(before, after, strict=True)],
        "decision_threshold": {"before": decision_before, "after": decision_after},
    })  # fmt: skip
    extra_files = {HISTORY_FILE: json.dumps(history, indent=2)}
    card = Path(options.model_dir) / MODEL_CARD_FILE
    if card.is_file():  # the model card goes with the model, its updates appended
        extra_files[MODEL_CARD_FILE] = card.read_text(encoding="utf-8").rstrip("\n") + (
            f"\n\n## Update {history[-1]['time']}\n- {len(loader.dataset)} more normal images; "
            f"memory bank now {', '.join(str(len(model.memory_bank)) for model in models)} "
            f"features; decision threshold {_number(decision_before)} -> "
            f"{_number(decision_after)} ({calibration_images} calibration images); see "
            f"{HISTORY_FILE}\n"
        )
    save_models(options.destination, models, ensemble_after, extra_files=extra_files)
    return UpdateSummary(
        len(loader.dataset), reports, (decision_before, decision_after), calibration_images,
        options.destination,
    )  # fmt: skip
