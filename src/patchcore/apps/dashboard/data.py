"""What the dashboard shows, computed without Streamlit so that it can be tested directly.

A *run* is a folder holding `results.csv` (e.g. `RESULTS/<project>/<group>`); with
`--save_predictions` it also has `predictions/<dataset>/` (scores, maps, masks, summary) and
with `--save_patchcore_model` `models/<dataset>/`. Decisions follow the rest of the toolkit:
an image is rejected when its score is strictly above the threshold. Defective images are the
positive class, so a *true reject* is a caught defect, a *false reject* a good image thrown
out, a *true accept* a good image passed and a *false accept* an escaped defect.

Everything the dashboard reads lies inside one results folder (`ResultsRoot`): paths are
resolved (symbolic links followed) and refused when they lead outside it, and a run's files
are refused when they lead outside the run. The exception are the input images a run
recorded in its predictions (the dataset it was evaluated on), which are shown read-only.

Images are shown as the model saw them: preprocessed with the saved model's preprocessing
when the run has the model, otherwise resized to the anomaly maps' size.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from patchcore.config import PatchCoreConfig, PreprocessingConfig
from patchcore.data.datasets import image_files
from patchcore.data.preprocessing import image_tensor, open_image
from patchcore.errors import ConfigurationError, DataError, ModelFormatError
from patchcore.evaluation.quality import ground_truth_note
from patchcore.evaluation.records import SUMMARY_FILE, DatasetPredictions, DecisionTable
from patchcore.evaluation.visualization import blend_heatmap, colour_bar_rgb
from patchcore.files import is_staging
from patchcore.layout import RESULTS_FILE, RUN_CONTENT_FOLDERS, RunLayout
from patchcore.model.calibration import (
    DEFAULT_THRESHOLD_QUANTILE,
    decide,
    decision_label,
)
from patchcore.model.calibration import colour_range as scale_of
from patchcore.model.scoring import image_score_rule
from patchcore.model.serialization import META_FILE, config_from_meta, member_prefixes, read_meta

if TYPE_CHECKING:
    import torch

    from patchcore.model.patchcore import PatchCore

LOGGER = logging.getLogger(__name__)

FILTERS = ("all", "rejected", "accepted", "false rejects", "escapes")
FILTER_HELP = (
    "false rejects: good images rejected at the threshold; escapes: defective images accepted"
)
RUN_NAME_LIMIT = 38
SORT_ORDERS = ("score, highest first", "score, lowest first", "name")

GROUND_TRUTH_COLOUR = (255, 0, 255)  # magenta: not in the jet colour map
BOX_COLOUR = (255, 255, 255)
BOX_SHADOW = (0, 0, 0)
MISSING_IMAGE_GREY = 128


# ----------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class ResultsRoot:
    """The one folder the dashboard reads runs from (resolved, symbolic links followed)."""

    path: Path

    @classmethod
    def of(cls, folder: Path | str) -> ResultsRoot:
        """The root at `folder`; DataError when it is not an existing folder."""
        text = str(folder).strip()
        if not text:
            raise DataError("no results folder given: start the dashboard with --results DIR")
        _refuse_nul(text)
        path = Path(text).expanduser().resolve()
        if not path.is_dir():
            raise DataError(f"{folder}: the results folder does not exist or is not a folder")
        return cls(path)

    def inside(self, path: Path | str) -> Path:
        """`path` (relative to the root, or absolute) resolved, symbolic links followed;
        DataError when it contains '..' or leads outside the root."""
        _refuse_nul(str(path))
        candidate = Path(str(path).strip()).expanduser()
        if ".." in candidate.parts:
            raise DataError(f"{path}: '..' is not allowed; give a folder inside {self.path}")
        resolved = (self.path / candidate).resolve()
        if not resolved.is_relative_to(self.path):
            raise DataError(f"{path}: outside the results folder {self.path}; only folders "
                            "inside it can be used")  # fmt: skip
        return resolved


def _refuse_nul(text: str) -> None:
    """A DataError for a path holding a NUL byte, which no file system accepts."""
    if "\x00" in text:
        shown = text.replace("\x00", "\\0")
        raise DataError(f"{shown}: a path cannot hold a NUL byte (\\0); give a folder name")


def _within(path: Path, folder: Path) -> bool:
    """True when `path`, resolved (symbolic links followed), lies inside resolved `folder`."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@dataclass(frozen=True)
class RunInfo:
    """One run folder: where it is, its name relative to the results folder, when written."""

    folder: Path
    label: str
    modified: float

    @property
    def has_predictions(self) -> bool:
        return bool(list_categories(self.folder))


def find_runs(root: ResultsRoot | Path) -> list[RunInfo]:
    """Folders under the root (itself included) holding results.csv, newest first. Symbolic
    links to folders are not followed, and a results.csv leading outside its run is skipped."""
    if not isinstance(root, ResultsRoot):
        if not Path(root).is_dir():
            return []
        root = ResultsRoot.of(root)
    runs = []
    for folder, subfolders, files in os.walk(root.path):
        subfolders[:] = sorted(
            name for name in subfolders if name not in RUN_CONTENT_FOLDERS and name[0] != "."
        )
        path = Path(folder)
        if RESULTS_FILE in files and _within(path / RESULTS_FILE, path):
            label = path.relative_to(root.path).as_posix()
            modified = (path / RESULTS_FILE).stat().st_mtime
            runs.append(RunInfo(path, label, modified))
    return sorted(runs, key=lambda run: (-run.modified, run.label))


def middle_truncated(text: str, limit: int = RUN_NAME_LIMIT) -> str:
    """`text` shortened to `limit` characters by an ellipsis in the middle, so that both the
    start (project) and the end (the run's distinguishing suffix) stay visible."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    tail = limit - 1 - head
    return f"{text[:head]}…{text[-tail:]}"


def list_categories(run_folder: Path) -> list[str]:
    """Datasets with saved predictions in a run (sorted); empty without --save_predictions.
    Entries leading outside the run (symbolic links) are skipped."""
    folder = RunLayout(run_folder).predictions
    if not folder.is_dir() or not _within(folder, run_folder):
        return []
    return sorted(
        path.name
        for path in folder.iterdir()
        if not is_staging(path)
        and (path / SUMMARY_FILE).is_file()
        and _within(path / SUMMARY_FILE, run_folder)
    )


def predictions_folder(run_folder: Path, category: str) -> Path:
    """A dataset's predictions folder; DataError when it leads outside the run."""
    folder = RunLayout(run_folder).dataset_predictions(category)
    if not _within(folder, run_folder):
        raise DataError(f"{folder} leads outside its run folder {run_folder}; not shown")
    return folder


def model_folder(run_folder: Path, category: str) -> Path | None:
    """The saved model folder of a dataset, or None when the run did not save it (or it
    leads outside the run)."""
    folder = RunLayout(run_folder).model(category)
    if not _within(folder, run_folder):
        return None
    try:
        prefixes = member_prefixes(folder)
    except ModelFormatError:
        return None
    if not all(_within(path, run_folder) for path in folder.iterdir()):
        return None
    return folder if prefixes else None


def folder_stamp(folder: Path) -> float:
    """Latest modification time of the files directly in `folder` (0 when absent): a cache key."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0.0
    times = [path.stat().st_mtime for path in folder.iterdir() if path.is_file()]
    return max(times, default=folder.stat().st_mtime)


def saved_config(folder: Path | None) -> PatchCoreConfig | None:
    """The configuration recorded in a saved model's meta file; None without one."""
    if folder is None:
        return None
    meta_path = Path(folder) / f"{member_prefixes(folder)[0]}{META_FILE}"
    if not meta_path.is_file():
        LOGGER.info("%s has no %s: images are resized to the map size", folder, META_FILE)
        return None
    try:
        return config_from_meta(read_meta(meta_path), str(meta_path))
    except (ModelFormatError, ConfigurationError, TypeError) as error:
        LOGGER.warning("%s: unreadable configuration (%s); images are resized to the map size",
                       meta_path, error)  # fmt: skip
        return None


def saved_preprocessing(folder: Path | None) -> PreprocessingConfig | None:
    """The preprocessing recorded in a saved model's meta file; None without one."""
    config = saved_config(folder)
    return None if config is None else config.preprocessing


# ------------------------------------------------------------------------ decisions
@dataclass(frozen=True)
class Confusion:
    """Decision counts at one threshold (defective = positive, reject = positive call)."""

    true_reject: int
    false_reject: int
    true_accept: int
    false_accept: int

    @property
    def good(self) -> int:
        return self.false_reject + self.true_accept

    @property
    def defective(self) -> int:
        return self.true_reject + self.false_accept

    @property
    def rejected(self) -> int:
        return self.true_reject + self.false_reject

    @property
    def accepted(self) -> int:
        return self.true_accept + self.false_accept

    @property
    def false_reject_rate(self) -> float:
        """Share of good images rejected (NaN without good images)."""
        return _ratio(self.false_reject, self.good)

    @property
    def false_accept_rate(self) -> float:
        """Share of defective images accepted, i.e. escapes (NaN without defective images)."""
        return _ratio(self.false_accept, self.defective)

    @property
    def accuracy(self) -> float:
        return _ratio(self.true_reject + self.true_accept, self.good + self.defective)


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def rejected_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """True where an image is rejected (`patchcore.model.calibration.decide`)."""
    return decide(np.asarray(scores, dtype=np.float64), threshold)


def confusion_counts(scores: np.ndarray, is_anomaly: np.ndarray, threshold: float) -> Confusion:
    rejected = rejected_mask(scores, threshold)
    defective = np.asarray(is_anomaly, dtype=bool)
    return Confusion(
        true_reject=int(np.sum(rejected & defective)),
        false_reject=int(np.sum(rejected & ~defective)),
        true_accept=int(np.sum(~rejected & ~defective)),
        false_accept=int(np.sum(~rejected & defective)),
    )


def initial_threshold(
    saved: float | None,
    scores: np.ndarray,
    is_anomaly: np.ndarray,
    new_images_threshold: float | None = None,
) -> tuple[float, str]:
    """Where the threshold slider starts, and a sentence saying where that value comes from.

    `new_images_threshold`: the threshold new images are decided at when it is not on the
    run's scale (an ensemble evaluated with test-set min-max normalisation whose members
    carry a threshold, `new_image_decision`); the sentence then says that a threshold was
    saved, why the slider cannot start at it, and that new images are decided at it, so the
    sidebar and the "Score new images" panel tell one story."""
    if saved is not None and math.isfinite(saved):
        return float(saved), "the threshold saved with the model (calibrated on normal images)"
    if new_images_threshold is not None:
        origin = (
            "the threshold saved with the ensemble's members "
            f"({score_text(new_images_threshold, 5)}) is on their combined normal-image scale, "
            "not on this run's test-set min-max scale (--ensemble_normalisation test_minmax), "
            "so the slider cannot start there; new images are decided at it (Score new "
            "images)"
        )
    else:
        origin = "no threshold was saved with this run"
    good = np.asarray(scores, dtype=np.float64)[~np.asarray(is_anomaly, dtype=bool)]
    if good.size:
        percent = 100 * DEFAULT_THRESHOLD_QUANTILE
        return float(np.quantile(good, DEFAULT_THRESHOLD_QUANTILE)), (
            f"{origin}; starting at the {percent:.0f}th percentile of the good test images' "
            "scores"
        )
    scores = np.asarray(scores, dtype=np.float64)
    return float((scores.min() + scores.max()) / 2), (
        f"{origin}; there are no good test images, so starting at the midpoint of the score "
        "range"
    )


@dataclass(frozen=True)
class SliderRange:
    low: float
    high: float
    step: float
    format: str


def slider_range(scores: np.ndarray, threshold: float, steps: int = 1000) -> SliderRange:
    """A range covering every score and the threshold with a small margin, and its display."""
    values = np.append(np.asarray(scores, dtype=np.float64), threshold)
    low, high = float(values.min()), float(values.max())
    margin = max((high - low) * 0.02, abs(high) * 1e-3, 1e-6)
    low, high = low - margin, high + margin
    step = (high - low) / steps
    decimals = max(0, 1 - math.floor(math.log10(step)))
    return SliderRange(low, high, step, f"%.{decimals}f")


def select_images(
    scores: np.ndarray, is_anomaly: np.ndarray, threshold: float, which: str
) -> np.ndarray:
    """Indices of the images a filter keeps: all, rejected, accepted, false rejects (good
    images rejected) or escapes (defective images accepted)."""
    if which not in FILTERS:
        raise ConfigurationError(f"filter must be one of {', '.join(FILTERS)}, got '{which}'")
    rejected = rejected_mask(scores, threshold)
    defective = np.asarray(is_anomaly, dtype=bool)
    keep = {
        "all": np.ones_like(rejected),
        "rejected": rejected,
        "accepted": ~rejected,
        "false rejects": rejected & ~defective,
        "escapes": ~rejected & defective,
    }[which]
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class CategoryOutlook:
    """What the opening view ranks a category by, at its starting threshold."""

    name: str
    rejected: int
    defective: int


def category_outlook(name: str, table: DecisionTable) -> CategoryOutlook:
    start, _ = initial_threshold(table.threshold, table.scores, table.is_anomaly)
    return CategoryOutlook(
        name, int(rejected_mask(table.scores, start).sum()), int(table.is_anomaly.sum())
    )


def opening_category(outlooks: Sequence[CategoryOutlook]) -> str:
    """The category the dashboard opens on: among those with defective test images (all, if
    none has any), the one with the most rejects at its starting threshold, then the most
    defective images, then the first by name. A good-only category, whose metrics are all
    undefined, is never chosen while another has defects."""
    if not outlooks:
        raise ConfigurationError("no category to open")
    with_defects = [outlook for outlook in outlooks if outlook.defective] or list(outlooks)
    return min(with_defects, key=lambda o: (-o.rejected, -o.defective, o.name)).name


def sort_images(
    indices: np.ndarray, scores: np.ndarray, names: Sequence[str], order: str
) -> np.ndarray:
    """`indices` ordered by score (ties by name) or by name."""
    if order not in SORT_ORDERS:
        raise ConfigurationError(f"order must be one of {', '.join(SORT_ORDERS)}, got '{order}'")
    indices = np.asarray(indices, dtype=int)
    ranks = np.argsort(np.argsort(np.asarray(names, dtype=object)[indices], kind="stable"))
    chosen = np.asarray(scores, dtype=np.float64)[indices]
    if order == "name":
        keys: tuple[np.ndarray, ...] = (ranks,)
    elif order == SORT_ORDERS[0]:
        keys = (ranks, -chosen)
    else:
        keys = (ranks, chosen)
    return indices[np.lexsort(keys)]


def score_text(value: float, digits: int = 4) -> str:
    """A score with about `digits` significant digits and never an exponent (0.2959, 13413)."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def true_label(is_anomaly: bool, defect_type: str) -> str:
    return f"defective ({defect_type})" if is_anomaly else "good"


def decision_text(score: float, threshold: float) -> str:
    return decision_label(bool(decide(float(score), threshold)))


# ------------------------------------------------------------------------- overlays
def colour_range(predictions: DatasetPredictions) -> tuple[float, float]:
    """The model's colour scale (`patchcore.model.calibration.colour_range`), as in the
    evaluation overlays and `patchcore-predict`: the saved threshold in the middle; without
    one, the smallest and largest value of the category's maps."""
    return scale_of(predictions.threshold, predictions.statistics, list(predictions.maps))


def colour_bar(scale: tuple[float, float], threshold: float | None, width: int = 640) -> np.ndarray:
    """The colour bar of `scale` with `threshold` marked, uint8 [h, width, 3]."""
    return colour_bar_rgb(scale, threshold, width)


def mask_outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The inner boundary of a binary mask, `thickness` pixels wide."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    return mask & ~ndimage.binary_erosion(mask, iterations=thickness)


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    scale: tuple[float, float],
    mask: np.ndarray | None = None,
    outline_thickness: int | None = None,
) -> np.ndarray:
    """The heat map blended over the image, with the ground-truth outline when a mask is given.

    The outline is `outline_thickness` pixels wide; by default 2 px per 224 px of image side.
    """
    result = blend_heatmap(image, anomaly_map, scale)
    if mask is not None:
        thickness = outline_thickness or max(2, math.ceil(min(mask.shape) / 112))
        result[mask_outline(mask, thickness)] = GROUND_TRUTH_COLOUR
    return result


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Images of equal height next to each other on a white background."""
    height = max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    left = 0
    for image in images:
        canvas[: image.shape[0], left : left + image.shape[1]] = image
        left += image.shape[1] + gap
    return canvas


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 image encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def placeholder_image(size: tuple[int, int]) -> np.ndarray:
    """A grey image standing in for an input image that cannot be read."""
    return np.full((*size, 3), MISSING_IMAGE_GREY, dtype=np.uint8)


# ---------------------------------------------------------------- suspicious patch
@dataclass(frozen=True)
class SuspiciousPatch:
    """The patch-grid cell that drives an image's score.

    `cell` is its (row, column) in the patch grid and `box` its pixel bounds (top, left,
    bottom, right; bottom/right exclusive). `score` is the cell's patch score (None when the
    records hold no patch scores), `image_score` the score compared with the threshold,
    `map_peak` the smoothed anomaly map's maximum (what the colours show) at pixel `peak`,
    and `relation` one sentence saying how the numbers relate.
    """

    cell: tuple[int, int]
    box: tuple[int, int, int, int]
    score: float | None
    image_score: float
    map_peak: float
    peak: tuple[int, int]
    relation: str


def _cell_box(
    cell: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    (row, col), (grid_h, grid_w), (height, width) = cell, grid, size
    return (
        round(row * height / grid_h),
        round(col * width / grid_w),
        round((row + 1) * height / grid_h),
        round((col + 1) * width / grid_w),
    )


def _relation(patch_score: float, image_score: float, members: int, config) -> str:
    if members > 1:
        return (
            "The image score is the mean of each ensemble member's highest patch score "
            "(normalised); this cell has the highest combined patch score."
        )
    if config is not None and config.preprocessing.tile is not None:
        return (
            "The image score is the highest value of the stitched tile scores; the patch score "
            "is this cell's average of them."
        )
    if config is not None and config.image_score != "max":
        return (
            f"The image score is {image_score_rule(config)}; this cell has the highest patch "
            "score."
        )
    if np.isclose(patch_score, image_score, rtol=1e-6, atol=0.0):
        return "This patch's score is the image score."
    if config is None or config.score_reweighting:
        return (
            f"The image score is this patch's score times the paper's Eq. 7 weight "
            f"{image_score / patch_score:.4f} (--score_reweighting)."
        )
    return "The image score differs from this patch's score."


def most_suspicious_patch(
    anomaly_map: np.ndarray,
    patch_grid: tuple[int, int],
    image_score: float,
    patch_scores: np.ndarray | None = None,
    members: int = 1,
    config: PatchCoreConfig | None = None,
) -> SuspiciousPatch:
    """The cell with the highest patch score (the one an image's score comes from), or,
    without patch scores (records of older versions), the cell holding the map's maximum."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
    height, width = anomaly_map.shape
    grid_h, grid_w = (int(value) for value in patch_grid)
    peak_y, peak_x = np.unravel_index(int(np.nanargmax(anomaly_map)), anomaly_map.shape)
    map_peak = float(anomaly_map[peak_y, peak_x])
    if patch_scores is not None:
        grid = np.asarray(patch_scores, dtype=np.float64)
        row, col = (int(v) for v in np.unravel_index(int(np.nanargmax(grid)), grid.shape))
        score = float(grid[row, col])
        relation = _relation(score, float(image_score), members, config)
    else:
        row = min(peak_y * grid_h // height, grid_h - 1)
        col = min(peak_x * grid_w // width, grid_w - 1)
        score = None
        relation = (
            "These records hold no patch scores (written by an older version): the cell shown "
            "holds the smoothed map's peak, which is lower than the image score."
        )
    box = _cell_box((row, col), (grid_h, grid_w), (height, width))
    return SuspiciousPatch(
        (int(row), int(col)), box, score, float(image_score), map_peak,
        (int(peak_y), int(peak_x)), relation,
    )  # fmt: skip


def draw_box(image: np.ndarray, box: tuple[int, int, int, int], width: int = 1) -> np.ndarray:
    """A copy of `image` with the box outlined in white, `width` pixels, inside a black line."""
    top, left, bottom, right = box
    picture = Image.fromarray(np.ascontiguousarray(image))
    pen = ImageDraw.Draw(picture)
    pen.rectangle((left - width, top - width, right - 1 + width, bottom - 1 + width),
                  outline=BOX_SHADOW, width=width)  # fmt: skip
    pen.rectangle((left, top, right - 1, bottom - 1), outline=BOX_COLOUR, width=width)
    return np.asarray(picture)


def zoom_window(
    box: tuple[int, int, int, int], shape: tuple[int, ...], context: int = 3
) -> tuple[int, int, int, int]:
    """A window `context` boxes wide centred on the box, moved to lie inside the image."""
    top, left, bottom, right = box
    height, width = shape[:2]
    window_h = min(height, (bottom - top) * context)
    window_w = min(width, (right - left) * context)
    start_y = int(np.clip((top + bottom - window_h) // 2, 0, height - window_h))
    start_x = int(np.clip((left + right - window_w) // 2, 0, width - window_w))
    return start_y, start_x, start_y + window_h, start_x + window_w


def zoomed_patch(
    image: np.ndarray, box: tuple[int, int, int, int], context: int = 3, size: int = 240
) -> np.ndarray:
    """The window around the box enlarged (nearest neighbour) to about `size`, box outlined."""
    top, left, bottom, right = zoom_window(box, image.shape, context)
    crop = image[top:bottom, left:right]
    factor = max(1, size // max(crop.shape[:2]))
    enlarged = np.repeat(np.repeat(crop, factor, axis=0), factor, axis=1)
    inner = tuple(factor * (edge - origin) for edge, origin in zip(box, (top, left, top, left)))
    return draw_box(enlarged, inner, width=max(1, factor // 4))


# ------------------------------------------------------------------------- images
def to_uint8_image(tensor: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    array = tensor.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return np.round(array * 255).astype(np.uint8)


def load_view_image(
    path: Path, preprocessing: PreprocessingConfig | None, size: tuple[int, int]
) -> np.ndarray:
    """An input image as the model saw it (uint8 HxWx3 of the map `size`); DataError if unreadable.

    With the saved model's preprocessing the image goes through the same preprocessing as in
    evaluation; without it, it is resized to `size`.
    """
    picture = open_image(Path(path), "RGB")
    if preprocessing is not None:
        array = to_uint8_image(image_tensor(picture, preprocessing))
        if array.shape[:2] == tuple(size):
            return array
        LOGGER.warning("%s: preprocessed to %s, maps are %s; resizing", path, array.shape, size)
        picture = Image.fromarray(array)
    return np.asarray(picture.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def coverage_note(image_path: str, defect_type: str, preprocessing) -> str:
    """Whether a test image's ground-truth defect lies wholly or partly outside the region the
    model inspected (`patchcore.evaluation.quality.ground_truth_note`, as
    inspection_coverage.csv counts it); '' when it lies inside, no mask is known (MVTec
    layout: ground_truth/<type>/) or no saved preprocessing is."""
    return ground_truth_note(Path(image_path), preprocessing, defect_type)


def image_caption(predictions: DatasetPredictions, index: int, threshold: float) -> str:
    score = float(predictions.scores[index])
    label = true_label(bool(predictions.is_anomaly[index]), predictions.defect_types[index])
    return (
        f"{predictions.image_names[index]} · score {score_text(score)} · "
        f"{decision_text(score, threshold)} · {label}"
    )


# ------------------------------------------------------------------ new images
@dataclass
class ScoredImages:
    """Scores of a folder of new images; files that could not be read are listed apart."""

    paths: list[str]
    scores: np.ndarray  # [N]
    maps: list[np.ndarray]  # N maps [H, W]
    images: list[np.ndarray]  # N uint8 [H, W, 3], as the model saw them
    unreadable: list[tuple[str, str]]


def score_images(models: list[PatchCore], paths: Sequence[Path], batch_size: int = 8) -> ScoredImages:
    """Scores image files with a loaded model (or ensemble, combined with normal statistics,
    see `patchcore.evaluation.ensemble.predict_new_images`)."""
    import torch

    from patchcore.apps.predict import model_input
    from patchcore.evaluation.ensemble import predict_new_images

    preprocessing = models[0].config.preprocessing
    kept, scores, maps, images, unreadable = [], [], [], [], []
    for start in range(0, len(paths), batch_size):
        loaded = []
        for path in paths[start : start + batch_size]:
            try:
                # predict's own preparation: the working size checked, one line naming the file
                picture = open_image(Path(path), "RGB")
                loaded.append((str(path), model_input(picture, Path(path), preprocessing)))
            except DataError as error:
                LOGGER.warning("Skipping %s", error)
                unreadable.append((str(path), str(error)))
        for group in _same_size(loaded):
            batch = torch.stack([tensor for _, tensor in group])
            batch_scores, batch_maps = predict_new_images(models, batch)
            kept.extend(path for path, _ in group)
            scores.extend(batch_scores.numpy())
            maps.extend(batch_maps.numpy())
            images.extend(to_uint8_image(image) for image in batch)
    return ScoredImages(kept, np.asarray(scores), maps, images, unreadable)


def _same_size(loaded: list[tuple[str, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
    """(path, image) pairs grouped by image size, each group in input order."""
    groups: dict[tuple, list] = {}
    for path, tensor in loaded:
        groups.setdefault(tuple(tensor.shape), []).append((path, tensor))
    return list(groups.values())


def folder_images(root: ResultsRoot, folder: Path | str, recursive: bool = False) -> list[Path]:
    """Image files of a folder inside the results folder, to score; DataError when it is not
    a folder or leads outside the results folder. Files leading outside (symbolic links) are
    skipped."""
    path = root.inside(folder)
    if not path.is_dir():
        raise DataError(f"{folder} is not a folder inside {root.path}")
    files = image_files(path, recursive=recursive)
    kept = [file for file in files if _within(file, root.path)]
    if len(kept) < len(files):
        LOGGER.warning("%s: skipped %d file(s) leading outside %s", folder, len(files) - len(kept),
                       root.path)  # fmt: skip
    return kept


@dataclass(frozen=True)
class NewImageDecision:
    """How new images of a category are decided: the threshold, where it comes from, or why
    they cannot be scored (`refusal`, then threshold is None)."""

    threshold: float | None
    note: str
    refusal: str = ""
    # The colour scale of new images when they are not on the run's scale, else None.
    scale: tuple[float, float] | None = None


def on_run_scale(predictions: DatasetPredictions) -> bool:
    """Whether new images are scored on the scale of the run's test scores: a single model,
    or an ensemble normalised with its normal images' statistics."""
    return predictions.members == 1 or predictions.normalisation == "normal_stats"


def new_image_decision(
    predictions: DatasetPredictions, slider_threshold: float, ensemble_statistics
) -> NewImageDecision:
    """New images are scored like `patchcore-predict` scores them: a single model's own
    scores, an ensemble's members combined on their normal-image scale. When the run's test
    scores are on that scale, the slider's threshold applies to them; an ensemble evaluated
    on a test-set min-max scale decides new images with the threshold saved with its members
    (`ensemble_statistics`), or cannot score them without one."""
    if on_run_scale(predictions):
        return NewImageDecision(slider_threshold, "decided at the threshold of the slider")
    if ensemble_statistics is not None:
        return NewImageDecision(
            ensemble_statistics.threshold,
            "this run's test scores are min-max normalised over its test set "
            "(--ensemble_normalisation test_minmax), a scale new images cannot be put on; they "
            "are scored on the ensemble's normal-image scale and decided at the threshold "
            f"saved with its members ({score_text(ensemble_statistics.threshold, 5)}), not at "
            "the slider's",
            scale=scale_of(ensemble_statistics.threshold, ensemble_statistics),
        )
    return NewImageDecision(
        None,
        "",
        "This run's ensemble scores are min-max normalised over its test set "
        "(--ensemble_normalisation test_minmax), a scale new images cannot be put on, and its "
        "saved members carry no threshold on their combined normal-image scale. Retrain with "
        "--save_patchcore_model and --train_val_split below 1 (ideally with "
        "--ensemble_normalisation normal_stats) to score new images.",
    )
