"""Per-image results of an evaluated dataset, saved for later inspection (e.g. the dashboard).

    <run>/predictions/<dataset>/predictions.csv   one row per image: name, path, defect type,
                                                   label, whether it has a mask, score
    <run>/predictions/<dataset>/arrays.npz         anomaly maps (float16), masks (bool), patch
                                                   scores (float32, on the image scores' scale)
    <run>/predictions/<dataset>/summary.json       metrics, threshold and the normal statistics
                                                   it came from, ensemble size and
                                                   normalisation, image size, patch grid

Images may differ in size (whole-image inspection), so maps and masks are stored flat, one
image after another, with each image's (height, width) in `shapes`; files written before
that (a stacked `maps` array) are still read. Arrays load with `allow_pickle=False`; all
files are written atomically. Files without patch scores or statistics (older versions)
read with None there.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchcore.errors import DataError
from patchcore.files import atomic_write_bytes, make_folder, printable_name
from patchcore.model.calibration import NormalStatistics

CSV_FILE = "predictions.csv"
ARRAYS_FILE = "arrays.npz"
SUMMARY_FILE = "summary.json"
CSV_COLUMNS = ("image_name", "image_path", "defect_type", "is_anomaly", "has_mask", "score")


@dataclass
class DatasetPredictions:
    """Everything the evaluation knows per image of one dataset."""

    name: str
    image_names: list[str]
    image_paths: list[str]
    defect_types: list[str]
    is_anomaly: np.ndarray  # [N] bool
    has_mask: np.ndarray  # [N] bool
    scores: np.ndarray  # [N] float
    maps: list[np.ndarray]  # N maps [H_i, W_i], float
    masks: list[np.ndarray]  # N masks [H_i, W_i], bool
    metrics: dict[str, float]
    threshold: float | None
    patch_grids: list[tuple[int, int]]  # each image's patch grid (h, w)
    # The normal statistics the threshold comes from (the scores' scale), or None.
    statistics: NormalStatistics | None = None
    members: int = 1  # ensemble size
    normalisation: str | None = None  # how an ensemble's members were combined
    # N patch-score grids [h_i, w_i] on the image scores' scale (an image's score comes from
    # them by the model's image_score rule, by default the highest, up to Eq. 7), or None in
    # files of older versions.
    patch_scores: list[np.ndarray] | None = None


def write_predictions(folder: Path, predictions: DatasetPredictions) -> Path:
    """Writes the three files of one dataset into `folder` (created if needed)."""
    folder = make_folder(folder)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(CSV_COLUMNS)
    for row in zip(
        map(printable_name, predictions.image_names),
        map(printable_name, predictions.image_paths),
        map(printable_name, predictions.defect_types),
        predictions.is_anomaly.astype(int),
        predictions.has_mask.astype(int),
        (repr(float(score)) for score in predictions.scores),
    ):
        writer.writerow(row)
    atomic_write_bytes(folder / CSV_FILE, table.getvalue().encode())
    content = {
        "flat_maps": _flat([np.asarray(m, dtype=np.float16) for m in predictions.maps]),
        "flat_masks": _flat([np.asarray(m, dtype=bool) for m in predictions.masks]),
        "shapes": np.array([np.shape(m) for m in predictions.maps], dtype=np.int64).reshape(-1, 2),
        "patch_grids": np.array(predictions.patch_grids, dtype=np.int64).reshape(-1, 2),
    }
    if predictions.patch_scores is not None:
        patch_scores = [np.asarray(grid, dtype=np.float32) for grid in predictions.patch_scores]
        content["flat_patch_scores"] = _flat(patch_scores)
    arrays = io.BytesIO()
    np.savez_compressed(arrays, **content)
    atomic_write_bytes(folder / ARRAYS_FILE, arrays.getvalue())
    summary = {
        "name": predictions.name,
        "metrics": {key: (None if np.isnan(v) else v) for key, v in predictions.metrics.items()},
        "threshold": predictions.threshold,
        "image_sizes": sorted({tuple(np.shape(m)) for m in predictions.maps}),
        "patch_grid": list(predictions.patch_grids[0]),
        "normal_statistics": (
            None if predictions.statistics is None else dataclasses.asdict(predictions.statistics)
        ),
        "members": predictions.members,
        "normalisation": predictions.normalisation,
    }
    atomic_write_bytes(folder / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    return folder


@dataclass(frozen=True)
class DecisionTable:
    """The light part of a dataset's records: labels, scores and threshold, without maps."""

    is_anomaly: np.ndarray  # [N] bool
    scores: np.ndarray  # [N] float
    threshold: float | None


def _missing_files(folder: Path, names: tuple[str, ...]) -> None:
    for file_name in names:
        if not (folder / file_name).is_file():
            raise DataError(f"{folder / file_name} is missing; re-run with --save_predictions")


def _rows_and_summary(folder: Path) -> tuple[list[dict], dict]:
    with open(folder / CSV_FILE, newline="") as stream:
        rows = list(csv.DictReader(stream))
    return rows, json.loads((folder / SUMMARY_FILE).read_text())


def read_decision_table(folder: Path) -> DecisionTable:
    """Labels, scores and threshold of a dataset's records (no arrays are read)."""
    folder = Path(folder)
    _missing_files(folder, (CSV_FILE, SUMMARY_FILE))
    rows, summary = _rows_and_summary(folder)
    return DecisionTable(
        np.array([row["is_anomaly"] == "1" for row in rows], dtype=bool),
        np.array([float(row["score"]) for row in rows], dtype=np.float64),
        summary["threshold"],
    )


def read_predictions(folder: Path) -> DatasetPredictions:
    """Reads what `write_predictions` wrote."""
    folder = Path(folder)
    _missing_files(folder, (CSV_FILE, ARRAYS_FILE, SUMMARY_FILE))
    rows, summary = _rows_and_summary(folder)
    with np.load(folder / ARRAYS_FILE, allow_pickle=False) as arrays:
        if "maps" in arrays:  # files of patchcore 0.1: stacked [N, H, W] arrays
            maps = list(arrays["maps"].astype(np.float32))
            masks = list(arrays["masks"])
            patch_grids = [tuple(summary["patch_grid"])] * len(maps)
            patch_scores = None
        else:
            shapes = [tuple(shape) for shape in arrays["shapes"]]
            maps = _split(arrays["flat_maps"].astype(np.float32), shapes)
            masks = _split(arrays["flat_masks"], shapes)
            patch_grids = [tuple(int(v) for v in grid) for grid in arrays["patch_grids"]]
            patch_scores = (
                _split(arrays["flat_patch_scores"], patch_grids)
                if "flat_patch_scores" in arrays
                else None
            )
    statistics = summary.get("normal_statistics")
    return DatasetPredictions(
        name=summary["name"],
        image_names=[row["image_name"] for row in rows],
        image_paths=[row["image_path"] for row in rows],
        defect_types=[row["defect_type"] for row in rows],
        is_anomaly=np.array([row["is_anomaly"] == "1" for row in rows]),
        has_mask=np.array([row["has_mask"] == "1" for row in rows]),
        scores=np.array([float(row["score"]) for row in rows]),
        maps=maps,
        masks=masks,
        metrics={k: (float("nan") if v is None else v) for k, v in summary["metrics"].items()},
        threshold=summary["threshold"],
        patch_grids=patch_grids,
        statistics=None if statistics is None else NormalStatistics(**statistics),
        members=int(summary.get("members", 1)),
        normalisation=summary.get("normalisation"),
        patch_scores=patch_scores,
    )


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([array.reshape(-1) for array in arrays]) if arrays else np.zeros(0)


def _split(flat: np.ndarray, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Inverse of `_flat`: the per-image arrays of the given shapes."""
    ends = np.cumsum([height * width for height, width in shapes])
    return [part.reshape(shape) for part, shape in zip(np.split(flat, ends[:-1]), shapes)]
