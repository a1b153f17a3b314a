"""Image- and pixel-level evaluation metrics: ROC AUC, F1-max and MVTec AD's PRO.

Every metric is computed from one ranking of the scores (a single argsort, highest
first) followed by cumulative sums, so 300 maps of 224x224 pixels take about a
second. Thresholds follow scikit-learn's conventions: a sample is predicted positive
when its score is >= the threshold, and the curves have one point per distinct score
value (the last position of each run of tied scores in the ranking). AUROC values
equal `sklearn.metrics.roc_auc_score`, F1-max values equal the best F1 along
`sklearn.metrics.precision_recall_curve`; scikit-learn is not needed at run time.

Inputs may be numpy arrays or torch tensors. float32 maps are ranked as float32
(exact, and about twice as fast to sort as float64); other values become float64.
A metric that is undefined for its input (a single class, no defect region) is NaN,
with a logged warning, rather than an exception.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

LOGGER = logging.getLogger(__name__)

Array = np.ndarray | torch.Tensor

DEFAULT_MAX_FPR = 0.3
METRIC_NAMES = (
    "instance_auroc",
    "full_pixel_auroc",
    "anomaly_pixel_auroc",
    "pro",
    "instance_f1max",
    "pixel_f1max",
)

# Long per-threshold arrays are reduced in slices of this many elements, so that the
# float64 temporaries stay small however many pixels are evaluated.
_CHUNK = 1 << 22
# 8-connectivity: pixels touching only at a corner belong to the same defect region.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- inputs


def _to_numpy(array: Array) -> np.ndarray:
    """A numpy view or copy of `array`, which may be a tensor on any device."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.is_floating_point() and array.dtype not in (torch.float32, torch.float64):
            array = array.double()  # float16 / bfloat16 have no lossless numpy twin
        return array.numpy()
    return np.asarray(array)


def _as_values(array: Array, name: str) -> NDArray[np.floating]:
    """Scores or maps as float32 (kept when already float32) or float64, without NaN."""
    values = _to_numpy(array)
    if values.dtype != np.float32:
        values = values.astype(np.float64, copy=False)
    if np.isnan(values).any():
        raise ValueError(f"{name} contains NaN values; every score must be a number")
    return values


def _as_flags(array: Array) -> NDArray[np.bool_]:
    """Labels or masks as booleans: nonzero means defective."""
    flags = _to_numpy(array)
    return flags if flags.dtype == np.bool_ else flags != 0


def _check_instances(scores: np.ndarray, labels: np.ndarray) -> None:
    """Raise a one-line ValueError unless scores is [N], N > 0, and labels matches it."""
    if scores.ndim != 1:
        raise ValueError(f"scores has shape {scores.shape} but must be one-dimensional [N]")
    if scores.size == 0:
        raise ValueError("scores is empty; at least one image is required")
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels has shape {labels.shape} but scores has {scores.shape}; they must match"
        )


def _check_pixels(maps: np.ndarray, masks: np.ndarray) -> None:
    """Raise a one-line ValueError unless maps is [N, H, W], non-empty, and masks matches it."""
    if maps.ndim != 3:
        raise ValueError(f"maps has shape {maps.shape} but must be [N, H, W]")
    if maps.size == 0:
        raise ValueError(f"maps has shape {maps.shape}; at least one pixel is required")
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks has shape {masks.shape} but maps has {maps.shape}; they must match"
        )


# -------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class _Ranking:
    """Samples sorted by decreasing score, with the end of each run of tied scores marked.

    Attributes:
        order: sample indices, highest score first (order among ties is arbitrary).
        sorted_values: the scores in that order.
        tie_ends: True at the last position of every run of equal sorted values; these
            are the positions where a curve point (one distinct threshold) is taken.
    """

    order: NDArray[np.intp]
    sorted_values: NDArray[np.floating]
    tie_ends: NDArray[np.bool_]


@dataclass(frozen=True)
class _Counts:
    """Cumulative true/false positives at each distinct threshold, highest threshold first.

    The last entries are the total numbers of positive and negative samples.
    """

    true_positives: NDArray[np.integer]
    false_positives: NDArray[np.integer]

    @property
    def positives(self) -> int:
        return int(self.true_positives[-1])

    @property
    def negatives(self) -> int:
        return int(self.false_positives[-1])


def _tie_ends(sorted_values: NDArray[np.floating]) -> NDArray[np.bool_]:
    """True at the last position of every run of equal values in a sorted array."""
    ends = np.empty(sorted_values.shape, dtype=bool)
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=ends[:-1])
    ends[-1] = True
    return ends


def _rank(values: NDArray[np.floating]) -> _Ranking:
    """Rank flattened `values` from highest to lowest with one argsort."""
    flat = values.reshape(-1)
    order = np.argsort(flat)[::-1]
    sorted_values = flat[order]
    return _Ranking(order, sorted_values, _tie_ends(sorted_values))


def _count_dtype(size: int) -> type[np.integer]:
    """int32 running counts when they cannot overflow (half the memory), else int64."""
    return np.int32 if size < 2**31 else np.int64


def _counts(sorted_flags: NDArray[np.bool_], tie_ends: NDArray[np.bool_]) -> _Counts:
    """Cumulative positive/negative counts taken at the tie ends of a ranking."""
    dtype = _count_dtype(sorted_flags.size)
    true_positives = np.cumsum(sorted_flags, dtype=dtype)[tie_ends]
    false_positives = np.cumsum(np.logical_not(sorted_flags), dtype=dtype)[tie_ends]
    return _Counts(true_positives, false_positives)


def _rank_and_count(values: NDArray[np.floating], flags: NDArray[np.bool_]) -> _Counts:
    """Counts along the ranking of `values`, with `flags` marking the positives."""
    ranking = _rank(values)
    return _counts(flags.reshape(-1)[ranking.order], ranking.tie_ends)


# ------------------------------------------------------------------ curve reductions


def _slices(length: int) -> Iterator[slice]:
    """Consecutive slices of at most _CHUNK elements covering range(length)."""
    for start in range(0, length, _CHUNK):
        yield slice(start, min(start + _CHUNK, length))


def _twice_trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Sum over segments of (x[i+1] - x[i]) * (y[i+1] + y[i]): twice the trapezoid area.

    Evaluated in float64, slice by slice, so integer count arrays of any length need no
    full-size float copies. Integer counts below 2**53 give an exact result.
    """
    total = 0.0
    for part in _slices(len(x) - 1):
        xs = x[part.start : part.stop + 1].astype(np.float64)
        ys = y[part.start : part.stop + 1].astype(np.float64)
        total += float(np.dot(np.diff(xs), ys[1:] + ys[:-1]))
    return total


def _auroc_from_counts(counts: _Counts, what: str) -> float:
    """Area under the ROC curve through (0, 0) and one point per distinct threshold."""
    positives, negatives = counts.positives, counts.negatives
    if positives == 0 or negatives == 0:
        LOGGER.warning("%s: only one class is present, so the ROC AUC is NaN", what)
        return math.nan
    tps, fps = counts.true_positives, counts.false_positives
    # The first segment starts at (0, 0), which the count arrays do not hold.
    twice_area = float(fps[0]) * float(tps[0]) + _twice_trapezoid(fps, tps)
    return twice_area / (2.0 * positives * negatives)


def _f1max_from_counts(counts: _Counts, what: str) -> float:
    """Best F1 over all distinct thresholds; F1 = 2 TP / (TP + FP + P), which is 2PR/(P+R)."""
    positives = counts.positives
    if positives == 0:
        LOGGER.warning("%s: there are no positive samples, so F1-max is NaN", what)
        return math.nan
    best = 0.0
    for part in _slices(len(counts.true_positives)):
        tps = counts.true_positives[part].astype(np.float64)
        predicted = tps + counts.false_positives[part]
        best = max(best, float(np.max(2.0 * tps / (predicted + positives))))
    return best


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x from x[0] to x_max, interpolating y at x_max.

    `x` must be non-decreasing with x[0] <= x_max. Points beyond x_max are ignored except
    the first one, which with its predecessor fixes the interpolated end point.
    """
    inside = int(np.searchsorted(x, x_max, side="right"))
    area = 0.5 * _twice_trapezoid(x[:inside], y[:inside])
    if inside < len(x) and x[inside - 1] < x_max:
        x0, y0, x1, y1 = x[inside - 1], y[inside - 1], x[inside], y[inside]
        y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_end) * (x_max - x0)
    return float(area)


# ---------------------------------------------------------------------------- PRO


def _region_ids(masks: NDArray[np.bool_]) -> NDArray[np.int32]:
    """Flat ids of the 8-connected defect regions of all masks: 0 = defect-free, 1..R."""
    ids = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for image_mask, image_ids in zip(masks, ids):
        if image_mask.any():
            found = ndimage.label(image_mask, structure=_EIGHT_CONNECTED, output=image_ids)
            image_ids[image_mask] += offset
            offset += found
    return ids.reshape(-1)


def _curve_prefix(
    sorted_negatives: NDArray[np.bool_], tie_ends: NDArray[np.bool_], limit: float
) -> tuple[int, NDArray[np.integer]]:
    """How much of a ranking the curve needs when only FPRs up to a limit matter.

    Returns the number of ranked positions up to (the tie end of) the first curve point
    with more than `limit` false positives, and the running negative counts over them.
    """
    negatives_so_far = np.cumsum(sorted_negatives, dtype=_count_dtype(sorted_negatives.size))
    # Searching with a scalar of the array's own integer type avoids a float64 copy.
    whole_limit = negatives_so_far.dtype.type(math.floor(limit))
    first_over = int(np.searchsorted(negatives_so_far, whole_limit, side="right"))
    if first_over == len(negatives_so_far):
        return first_over, negatives_so_far
    stop = first_over + int(np.argmax(tie_ends[first_over:])) + 1
    return stop, negatives_so_far[:stop]


def _pro_from_ranking(ranking: _Ranking, region_ids: NDArray[np.int32], max_fpr: float) -> float:
    """Normalised area under the PRO-vs-FPR curve up to `max_fpr` (see `pro`)."""
    sizes = np.bincount(region_ids)
    num_regions, num_defect_free = len(sizes) - 1, int(sizes[0])
    if num_regions == 0:
        LOGGER.warning("pro: the masks hold no defect region, so PRO is NaN")
        return math.nan
    if num_defect_free == 0:
        LOGGER.warning("pro: every pixel is defective, so the FPR and PRO are undefined")
        return math.nan
    sorted_ids = region_ids[ranking.order]
    stop, negatives_so_far = _curve_prefix(
        sorted_ids == 0, ranking.tie_ends, max_fpr * num_defect_free
    )
    ends = ranking.tie_ends[:stop]
    # Each region pixel weighs 1 / (its region's size * number of regions), so the
    # running sum is the mean over regions of the fraction of each region detected.
    weights = np.zeros(len(sizes), dtype=np.float64)
    weights[1:] = 1.0 / (sizes[1:].astype(np.float64) * num_regions)
    overlap = weights[sorted_ids[:stop]]
    np.cumsum(overlap, out=overlap)
    fpr = np.concatenate(([0.0], negatives_so_far[ends] / num_defect_free))
    mean_overlap = np.concatenate(([0.0], overlap[ends]))
    return _area_up_to(fpr, mean_overlap, max_fpr) / max_fpr


def _check_max_fpr(max_fpr: float) -> None:
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr is {max_fpr} but must be in (0, 1]")


# ---------------------------------------------------------------------- public API


def instance_auroc(scores: Array, labels: Array) -> float:
    """Image-level ROC AUC.

    Args:
        scores: [N] anomaly scores, higher = more anomalous.
        labels: [N] ground truth, 1 (nonzero) = defective, 0 = good.

    Returns:
        The ROC AUC (ties handled as in scikit-learn), or NaN if only one class is present.
    """
    values, flags = _as_values(scores, "scores"), _as_flags(labels)
    _check_instances(values, flags)
    return _auroc_from_counts(_rank_and_count(values, flags), "instance_auroc")


def full_pixel_auroc(maps: Array, masks: Array) -> float:
    """Pixel-level ROC AUC over every pixel of every image.

    Args:
        maps: [N, H, W] anomaly maps.
        masks: [N, H, W] ground-truth masks, nonzero = defective pixel.

    Returns:
        The ROC AUC, or NaN if the pixels are all defective or all defect-free.
    """
    values, flags = _as_values(maps, "maps"), _as_flags(masks)
    _check_pixels(values, flags)
    return _auroc_from_counts(_rank_and_count(values, flags), "full_pixel_auroc")


def anomaly_pixel_auroc(maps: Array, masks: Array) -> float:
    """Pixel-level ROC AUC over the images whose mask has at least one defective pixel.

    Args and returns as `full_pixel_auroc`; NaN if no mask has a defective pixel.
    """
    values, flags = _as_values(maps, "maps"), _as_flags(masks)
    _check_pixels(values, flags)
    defective = _defective_images(flags)
    if not defective.any():
        return _no_defect_nan("anomaly_pixel_auroc")
    counts = _rank_and_count(values[defective], flags[defective])
    return _auroc_from_counts(counts, "anomaly_pixel_auroc")


def pro(maps: Array, masks: Array, max_fpr: float = DEFAULT_MAX_FPR) -> float:
    """Per-region overlap (MVTec AD), normalised area under the PRO curve up to `max_fpr`.

    Regions are the 8-connected components of each mask. At a threshold t, a pixel is
    predicted defective when its map value is >= t; FPR(t) is the fraction of all
    defect-free pixels (of all images) predicted defective, and PRO(t) the mean over all
    regions of the fraction of the region's pixels predicted defective. The curve has a
    point per distinct map value, starts at (0, 0), and is cut at FPR = max_fpr by linear
    interpolation; its trapezoid area is divided by max_fpr, so a perfect map gives 1.

    Args:
        maps: [N, H, W] anomaly maps.
        masks: [N, H, W] ground-truth masks, nonzero = defective pixel.
        max_fpr: upper FPR limit of the integration, in (0, 1].

    Returns:
        The normalised area, or NaN if there is no defect region (or no defect-free pixel).
    """
    _check_max_fpr(max_fpr)
    values, flags = _as_values(maps, "maps"), _as_flags(masks)
    _check_pixels(values, flags)
    return _pro_from_ranking(_rank(values), _region_ids(flags), max_fpr)


def instance_f1max(scores: Array, labels: Array) -> float:
    """Best image-level F1 score over all thresholds (NaN if there is no defective image).

    Args:
        scores: [N] anomaly scores, higher = more anomalous.
        labels: [N] ground truth, 1 (nonzero) = defective, 0 = good.
    """
    values, flags = _as_values(scores, "scores"), _as_flags(labels)
    _check_instances(values, flags)
    return _f1max_from_counts(_rank_and_count(values, flags), "instance_f1max")


def pixel_f1max(maps: Array, masks: Array) -> float:
    """Best pixel-level F1 score over all thresholds, over every pixel of every image.

    Args:
        maps: [N, H, W] anomaly maps.
        masks: [N, H, W] ground-truth masks, nonzero = defective pixel.

    Returns:
        The best F1, or NaN if no pixel is defective.
    """
    values, flags = _as_values(maps, "maps"), _as_flags(masks)
    _check_pixels(values, flags)
    return _f1max_from_counts(_rank_and_count(values, flags), "pixel_f1max")


def _defective_images(masks: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """[N] flags: True for the images whose mask has at least one defective pixel."""
    return masks.reshape(len(masks), -1).any(axis=1)


def _no_defect_nan(what: str) -> float:
    LOGGER.warning("%s: no mask has a defective pixel, so the metric is NaN", what)
    return math.nan


def _pixel_metrics(
    maps: NDArray[np.floating], masks: NDArray[np.bool_], max_fpr: float
) -> dict[str, float]:
    """full/anomaly pixel AUROC, PRO and pixel F1-max, all from one ranking of the maps.

    Each metric is reduced to a number before the next one's arrays are built, which
    keeps the peak memory near that of the ranking itself.
    """
    defective = _defective_images(masks)
    if not defective.any():
        nan = _no_defect_nan("pixel metrics")
        names = ("full_pixel_auroc", "anomaly_pixel_auroc", "pro", "pixel_f1max")
        return dict.fromkeys(names, nan)
    ranking = _rank(maps)
    sorted_flags = masks.reshape(-1)[ranking.order]
    all_pixels = _counts(sorted_flags, ranking.tie_ends)
    results = {
        "full_pixel_auroc": _auroc_from_counts(all_pixels, "full_pixel_auroc"),
        "pixel_f1max": _f1max_from_counts(all_pixels, "pixel_f1max"),
    }
    del all_pixels
    # Restricting a ranking to a subset of the pixels keeps it sorted: no second sort.
    in_subset = np.repeat(defective, maps[0].size)[ranking.order]
    subset = _counts(sorted_flags[in_subset], _tie_ends(ranking.sorted_values[in_subset]))
    del in_subset, sorted_flags
    results["anomaly_pixel_auroc"] = _auroc_from_counts(subset, "anomaly_pixel_auroc")
    del subset
    results["pro"] = _pro_from_ranking(ranking, _region_ids(masks), max_fpr)
    return results


def compute_metrics(
    scores: Array,
    labels: Array,
    maps: Array | None = None,
    masks: Array | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict[str, float]:
    """All metrics of an evaluation run, the pixel ones sharing a single sort of the maps.

    Args:
        scores: [N] image anomaly scores.
        labels: [N] image labels, 1 (nonzero) = defective.
        maps: optional [N, H, W] anomaly maps of the same N images.
        masks: optional [N, H, W] ground-truth masks, nonzero = defective pixel.
        max_fpr: FPR limit of the PRO integration.

    Returns:
        {instance_auroc, full_pixel_auroc, anomaly_pixel_auroc, pro, instance_f1max,
        pixel_f1max}, in that order. Pixel metrics are NaN when maps or masks is None or
        no mask has a defective pixel; any metric undefined for its input is NaN.

    Raises:
        ValueError: an argument has the wrong shape, or holds NaN.
    """
    _check_max_fpr(max_fpr)
    score_values, label_flags = _as_values(scores, "scores"), _as_flags(labels)
    _check_instances(score_values, label_flags)
    instance_counts = _rank_and_count(score_values, label_flags)
    results = dict.fromkeys(METRIC_NAMES, math.nan)
    results["instance_auroc"] = _auroc_from_counts(instance_counts, "instance_auroc")
    results["instance_f1max"] = _f1max_from_counts(instance_counts, "instance_f1max")
    if maps is None or masks is None:
        if maps is not None or masks is not None:
            LOGGER.warning("only one of maps and masks was given; pixel metrics are NaN")
        return results
    map_values, mask_flags = _as_values(maps, "maps"), _as_flags(masks)
    _check_pixels(map_values, mask_flags)
    if len(map_values) != len(score_values):
        raise ValueError(
            f"maps has {len(map_values)} images but scores has {len(score_values)}; they must match"
        )
    results.update(_pixel_metrics(map_values, mask_flags, max_fpr))
    return results
