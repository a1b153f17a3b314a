"""Image- and pixel-level evaluation metrics: ROC AUC, F1-max and MVTec AD's PRO.

Every metric is computed from one ranking of the scores (a single sort, highest first)
followed by cumulative sums, with no loop over thresholds. Thresholds follow
scikit-learn's conventions: a sample is predicted positive when its score is >= the
threshold, and the curves have one point per distinct score value (the last position
of each run of tied scores in the ranking). AUROC values equal
`sklearn.metrics.roc_auc_score`, F1-max values equal the best F1 along
`sklearn.metrics.precision_recall_curve`; scikit-learn is not needed at run time.

Speed: float32 scores (and any scores that float32 holds exactly) are ranked by sorting
64-bit keys that pack an order-preserving code of the score with a 32-bit payload (the
pixel's label or defect region). numpy sorts such plain integers with SIMD code, several
times faster than an argsort (ten times on an AVX-512 CPU), and the payloads come out in
ranked order without a gather. Other scores (float64 that float32 would round) fall back to an argsort.

Inputs may be numpy arrays or torch tensors. A metric that is undefined for its input
(a single class, no defect region) is NaN, with a logged warning, rather than an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from patchcore.errors import ConfigurationError, DataError

LOGGER = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

Array: TypeAlias = "np.ndarray | torch.Tensor"

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
_SIGN_BIT = np.uint32(1 << 31)


# --------------------------------------------------------------------------- inputs


def _to_numpy(array: Array) -> np.ndarray:
    """A numpy view or copy of `array`, which may be a tensor on any device."""
    if hasattr(array, "detach"):  # a torch tensor (duck-typed: this module never imports torch)
        array = array.detach().cpu()
        if array.is_floating_point() and array.element_size() < 4:
            array = array.float()  # float16 / bfloat16: exact in float32
        return array.numpy()
    return np.asarray(array)


def _narrowed_if_exact(values: NDArray[np.float64]) -> NDArray[np.floating]:
    """`values` as float32 when that loses nothing (float32 ranks much faster)."""
    with np.errstate(over="ignore", invalid="ignore"):  # such values just stay float64
        narrowed = values.astype(np.float32)
    return narrowed if np.array_equal(narrowed, values) else values


def _as_values(array: Array, name: str) -> NDArray[np.floating]:
    """Scores or maps without NaN, as float32 when that is exact, else as float64."""
    values = _to_numpy(array)
    if np.can_cast(values.dtype, np.float32):
        values = values.astype(np.float32, copy=False)
    else:
        values = _narrowed_if_exact(values.astype(np.float64, copy=False))
    if np.isnan(values).any():
        raise DataError(f"{name} contains NaN values; every score must be a number")
    return values


def _as_flags(array: Array) -> NDArray[np.bool_]:
    """Labels or masks as booleans: nonzero means defective."""
    flags = _to_numpy(array)
    return flags if flags.dtype == np.bool_ else flags != 0


def _check_instances(scores: np.ndarray, labels: np.ndarray) -> None:
    """Raise a one-line DataError unless scores is [N], N > 0, and labels matches it."""
    if scores.ndim != 1:
        raise DataError(f"scores has shape {scores.shape} but must be one-dimensional [N]")
    if scores.size == 0:
        raise DataError("scores is empty; at least one image is required")
    if labels.shape != scores.shape:
        raise DataError(
            f"labels has shape {labels.shape} but scores has {scores.shape}; they must match"
        )


@dataclass(frozen=True)
class _Pixels:
    """The pixels of N maps and masks, flattened image after image.

    Attributes:
        values: every map value, as float32 when that is exact.
        flags: True for a defective pixel.
        sizes: [N] pixels per image (images may differ in size).
        images: the masks' image shapes, to find regions in each.
    """

    values: NDArray[np.floating]
    flags: NDArray[np.bool_]
    sizes: NDArray[np.int64]
    shapes: tuple[tuple[int, int], ...]

    def image_masks(self) -> Iterator[NDArray[np.bool_]]:
        """Each image's mask in its own shape."""
        start = 0
        for size, shape in zip(self.sizes, self.shapes):
            yield self.flags[start : start + size].reshape(shape)
            start += size


def _is_image_list(array) -> bool:
    return isinstance(array, list | tuple)


def _pixels(maps, masks) -> _Pixels:
    """Checked, flattened maps and masks: [N, H, W] arrays or tensors, or lists of N [H_i, W_i]
    ones (images of different sizes). A one-line DataError names any mismatch."""
    map_list = list(maps) if _is_image_list(maps) else None
    mask_list = list(masks) if _is_image_list(masks) else None
    if map_list is None and mask_list is None:
        map_values, mask_flags = _as_values(maps, "maps"), _as_flags(masks)
        if map_values.ndim != 3:
            raise DataError(f"maps has shape {map_values.shape} but must be [N, H, W]")
        if map_values.size == 0:
            raise DataError(f"maps has shape {map_values.shape}; at least one pixel is required")
        if mask_flags.shape != map_values.shape:
            raise DataError(
                f"masks has shape {mask_flags.shape} but maps has {map_values.shape}; they must match"
            )
        count, height, width = map_values.shape
        sizes = np.full(count, height * width, dtype=np.int64)
        return _Pixels(map_values.reshape(-1), mask_flags.reshape(-1), sizes,
                       ((height, width),) * count)  # fmt: skip
    map_list = map_list if map_list is not None else list(maps)
    mask_list = mask_list if mask_list is not None else list(masks)
    if len(mask_list) != len(map_list) or not map_list:
        raise DataError(
            f"masks has {len(mask_list)} images but maps has {len(map_list)}; they must match "
            "and there must be at least one"
        )
    values = [_as_values(m, "maps") for m in map_list]
    flags = [_as_flags(m) for m in mask_list]
    for index, (value, flag) in enumerate(zip(values, flags)):
        if value.ndim != 2 or value.shape != flag.shape:
            raise DataError(
                f"image {index}: map has shape {value.shape} and mask {flag.shape}; they must "
                "be the same [H, W]"
            )
    dtype = np.result_type(*values)
    return _Pixels(
        np.concatenate([value.reshape(-1).astype(dtype, copy=False) for value in values]),
        np.concatenate([flag.reshape(-1) for flag in flags]),
        np.array([value.size for value in values], dtype=np.int64),
        tuple(value.shape for value in values),
    )


def _check_max_fpr(max_fpr: float) -> None:
    if not 0.0 < max_fpr <= 1.0:
        raise ConfigurationError(f"max_fpr is {max_fpr} but must be in (0, 1]")


# -------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class _Ranking:
    """Per-sample payloads sorted by decreasing score.

    Attributes:
        sort_keys: the scores in ranked order, or uint32 codes with the same order and
            the same ties; only compared for equality.
        payloads: each sample's uint32 payload (a label, a region id...), in ranked order.
        tie_ends: True at the last position of every run of equal scores; each of these
            positions is one curve point (one distinct threshold).
    """

    sort_keys: np.ndarray
    payloads: NDArray[np.uint32]
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


def _tie_ends(sorted_keys: np.ndarray) -> NDArray[np.bool_]:
    """True at the last position of every run of equal values in a sorted array."""
    ends = np.empty(sorted_keys.shape, dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=ends[:-1])
    ends[-1] = True
    return ends


def _order_codes(values: NDArray[np.float32]) -> NDArray[np.uint32]:
    """uint32 codes whose unsigned order is the order of the float32 values.

    Equal values get equal codes (-0.0 is first turned into +0.0). Positive floats keep
    their bits with the sign bit set; negative floats get all their bits inverted.
    """
    codes = (values + np.float32(0.0)).view(np.uint32)
    negative = codes >= _SIGN_BIT
    np.invert(codes, out=codes, where=negative)
    np.bitwise_or(codes, _SIGN_BIT, out=codes, where=~negative)
    return codes


def _sort_packed(
    values: NDArray[np.float32], payloads: NDArray[np.uint32]
) -> tuple[NDArray[np.uint32], NDArray[np.uint32]]:
    """Score codes and payloads, highest score first, from one sort of 64-bit keys."""
    keys = _order_codes(values).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= payloads
    keys.sort()
    keys = keys[::-1]
    sorted_payloads = keys.astype(np.uint32)  # the low 32 bits
    keys >>= np.uint64(32)
    return keys.astype(np.uint32), sorted_payloads


def _rank(values: NDArray[np.floating], payloads: NDArray[np.uint32]) -> _Ranking:
    """Rank the flattened `values` from highest to lowest, carrying one payload each."""
    flat, payloads = values.reshape(-1), payloads.reshape(-1)
    if flat.dtype == np.float32:
        sort_keys, sorted_payloads = _sort_packed(flat, payloads)
    else:
        order = np.argsort(flat)[::-1]  # the order among tied scores does not matter
        sort_keys, sorted_payloads = flat[order], payloads[order]
    return _Ranking(sort_keys, sorted_payloads, _tie_ends(sort_keys))


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
    ranking = _rank(values, flags.astype(np.uint32))
    return _counts(ranking.payloads != 0, ranking.tie_ends)


def ranked_counts(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) [T] at each distinct score, highest first, when
    every sample scoring at least that score is called positive: the counts the AUROCs
    here are read from, for callers that draw the curves."""
    values = _narrowed_if_exact(np.asarray(scores, dtype=np.float64).reshape(-1))
    counts = _rank_and_count(values, np.asarray(labels).astype(bool).reshape(-1))
    return counts.true_positives, counts.false_positives


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


@dataclass(frozen=True)
class _Regions:
    """The 8-connected defect regions of a stack of masks.

    Attributes:
        ids: [N*H*W] region id of each pixel: 0 = defect-free, 1..R over all images.
        sizes: [R + 1] pixels per id; sizes[0] counts the defect-free pixels.
    """

    ids: NDArray[np.uint32]
    sizes: NDArray[np.int64]


def _find_regions(pixels: _Pixels) -> _Regions:
    """Label the defect regions of each mask, numbering them on across images."""
    eight_connected = np.ones((3, 3), dtype=bool)  # corner contact joins two pixels
    ids = np.zeros(pixels.flags.size, dtype=np.uint32)
    sizes = [np.zeros(1, dtype=np.int64)]
    offset, start = 0, 0
    for image_mask in pixels.image_masks():
        stop = start + image_mask.size
        if image_mask.any():
            image_ids, found = ndimage.label(image_mask, structure=eight_connected)
            image_ids = image_ids.astype(np.uint32).reshape(-1)
            sizes.append(np.bincount(image_ids, minlength=found + 1)[1:])
            image_ids[image_ids != 0] += np.uint32(offset)
            ids[start:stop] = image_ids
            offset += found
        start = stop
    region_sizes = np.concatenate(sizes)
    region_sizes[0] = pixels.flags.size - region_sizes.sum()
    return _Regions(ids, region_sizes)


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


def _pro_from_ranking(
    sorted_ids: NDArray[np.uint32],
    tie_ends: NDArray[np.bool_],
    sizes: NDArray[np.int64],
    max_fpr: float,
) -> float:
    """Normalised area under the PRO-vs-FPR curve up to `max_fpr` (see `pro`).

    Args:
        sorted_ids: region id of each pixel (0 = defect-free), highest map value first.
        tie_ends: the ranking's tie ends.
        sizes: pixels per region id, as in `_Regions`.
        max_fpr: upper FPR limit of the integration.
    """
    num_regions, num_defect_free = len(sizes) - 1, int(sizes[0])
    if num_regions == 0:
        LOGGER.warning("pro: the masks hold no defect region, so PRO is NaN")
        return math.nan
    if num_defect_free == 0:
        LOGGER.warning("pro: every pixel is defective, so the FPR and PRO are undefined")
        return math.nan
    stop, negatives_so_far = _curve_prefix(sorted_ids == 0, tie_ends, max_fpr * num_defect_free)
    ends = tie_ends[:stop]
    # Each region pixel weighs 1 / (its region's size * number of regions), so the
    # running sum is the mean over regions of the fraction of each region detected.
    weights = np.zeros(len(sizes), dtype=np.float64)
    weights[1:] = 1.0 / (sizes[1:].astype(np.float64) * num_regions)
    overlap = weights[sorted_ids[:stop]]
    np.cumsum(overlap, out=overlap)
    fpr = np.concatenate(([0.0], negatives_so_far[ends] / num_defect_free))
    mean_overlap = np.concatenate(([0.0], overlap[ends]))
    return _area_up_to(fpr, mean_overlap, max_fpr) / max_fpr


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
        maps: [N, H, W] anomaly maps, or a list of N [H_i, W_i] maps.
        masks: the ground-truth masks in the same form, nonzero = defective pixel.

    Returns:
        The ROC AUC, or NaN if the pixels are all defective or all defect-free.
    """
    pixels = _pixels(maps, masks)
    return _auroc_from_counts(_rank_and_count(pixels.values, pixels.flags), "full_pixel_auroc")


def anomaly_pixel_auroc(maps: Array, masks: Array, defect_images: Array | None = None) -> float:
    """Pixel-level ROC AUC over the images with a defect: by default those whose mask has at
    least one defective pixel, or the [N] `defect_images` flags when given.

    Args and returns as `full_pixel_auroc`; NaN if no image is selected.
    """
    pixels = _pixels(maps, masks)
    selected = _selected_pixels(pixels, _defective_images(pixels, defect_images))
    if not selected.any():
        return _no_defect_nan("anomaly_pixel_auroc")
    counts = _rank_and_count(pixels.values[selected], pixels.flags[selected])
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
        maps: [N, H, W] anomaly maps, or a list of N [H_i, W_i] maps.
        masks: the ground-truth masks in the same form, nonzero = defective pixel.
        max_fpr: upper FPR limit of the integration, in (0, 1].

    Returns:
        The normalised area, or NaN if there is no defect region (or no defect-free pixel).
    """
    _check_max_fpr(max_fpr)
    pixels = _pixels(maps, masks)
    regions = _find_regions(pixels)
    ranking = _rank(pixels.values, regions.ids)
    return _pro_from_ranking(ranking.payloads, ranking.tie_ends, regions.sizes, max_fpr)


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
        maps: [N, H, W] anomaly maps, or a list of N [H_i, W_i] maps.
        masks: the ground-truth masks in the same form, nonzero = defective pixel.

    Returns:
        The best F1, or NaN if no pixel is defective.
    """
    pixels = _pixels(maps, masks)
    return _f1max_from_counts(_rank_and_count(pixels.values, pixels.flags), "pixel_f1max")


def _defective_images(pixels: _Pixels, defect_images: Array | None = None) -> NDArray[np.bool_]:
    """[N] flags: `defect_images` when given, else the images whose mask has a defective pixel."""
    if defect_images is not None:
        flags = _as_flags(defect_images).reshape(-1)
        if flags.size != pixels.sizes.size:
            raise DataError(
                f"defect_images has {flags.size} entries but there are {pixels.sizes.size} "
                "images; they must match"
            )
        return flags
    starts = np.concatenate(([0], np.cumsum(pixels.sizes)[:-1]))
    return np.logical_or.reduceat(pixels.flags, starts)


def _selected_pixels(pixels: _Pixels, images: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Per pixel: does its image belong to the selected `images`."""
    return np.repeat(images, pixels.sizes)


def _no_defect_nan(what: str) -> float:
    LOGGER.warning("%s: no mask has a defective pixel, so the metric is NaN", what)
    return math.nan


def _pixel_payloads(regions: _Regions, in_subset: NDArray[np.bool_]) -> NDArray[np.uint32]:
    """Per pixel, (region id << 1) | (its image is in the anomaly subset), to carry through a
    ranking: one uint32 then holds the pixel's label (region id != 0), its region for PRO and
    its membership in the anomalous-image subset.
    """
    payloads = regions.ids << 1
    payloads |= in_subset
    return payloads


def _subset_auroc(
    ranking: _Ranking, sorted_flags: NDArray[np.bool_], in_subset: NDArray[np.bool_]
) -> float:
    """ROC AUC over the ranked samples where `in_subset` holds.

    Restricting a ranking to a subset keeps it sorted, so this needs no second sort.
    """
    tie_ends = _tie_ends(ranking.sort_keys[in_subset])
    return _auroc_from_counts(_counts(sorted_flags[in_subset], tie_ends), "anomaly_pixel_auroc")


def _pixel_metrics(
    pixels: _Pixels, defect_images: NDArray[np.bool_], max_fpr: float
) -> dict[str, float]:
    """full/anomaly pixel AUROC, PRO and pixel F1-max, all from one ranking of the maps.

    Each metric is reduced to a number before the next one's arrays are built, to bound
    the peak memory.
    """
    if not pixels.flags.any():
        nan = _no_defect_nan("pixel metrics")
        return dict.fromkeys(("full_pixel_auroc", "anomaly_pixel_auroc", "pro", "pixel_f1max"), nan)
    regions = _find_regions(pixels)
    ranking = _rank(pixels.values, _pixel_payloads(regions, _selected_pixels(pixels, defect_images)))
    sorted_ids = ranking.payloads >> 1
    sorted_flags = sorted_ids != 0
    all_pixels = _counts(sorted_flags, ranking.tie_ends)
    full_auroc = _auroc_from_counts(all_pixels, "full_pixel_auroc")
    f1max = _f1max_from_counts(all_pixels, "pixel_f1max")
    del all_pixels
    anomaly_auroc = _subset_auroc(ranking, sorted_flags, (ranking.payloads & 1).astype(bool))
    del sorted_flags
    return {
        "full_pixel_auroc": full_auroc,
        "anomaly_pixel_auroc": anomaly_auroc,
        "pro": _pro_from_ranking(sorted_ids, ranking.tie_ends, regions.sizes, max_fpr),
        "pixel_f1max": f1max,
    }


def _full_pixel_metrics(pixels: _Pixels) -> dict[str, float]:
    """full pixel AUROC and pixel F1-max only, from one ranking of the maps (no defect
    regions, PRO or anomaly-pixel subset)."""
    if not pixels.flags.any():
        nan = _no_defect_nan("pixel metrics")
        return {"full_pixel_auroc": nan, "pixel_f1max": nan}
    counts = _rank_and_count(pixels.values, pixels.flags)
    return {
        "full_pixel_auroc": _auroc_from_counts(counts, "full_pixel_auroc"),
        "pixel_f1max": _f1max_from_counts(counts, "pixel_f1max"),
    }


def compute_metrics(
    scores: Array,
    labels: Array,
    maps: Array | None = None,
    masks: Array | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
    defect_images: Array | None = None,
    full_pixels_only: bool = False,
) -> dict[str, float]:
    """All metrics of an evaluation run, the pixel ones sharing a single sort of the maps.

    Args:
        scores: [N] image anomaly scores.
        labels: [N] image labels, 1 (nonzero) = defective.
        maps: optional [N, H, W] anomaly maps of the same N images, or a list of N [H_i, W_i]
            maps when the images differ in size.
        masks: optional ground-truth masks in the same form, nonzero = defective pixel.
        max_fpr: FPR limit of the PRO integration.
        defect_images: optional [N] flags of the images the anomaly-pixel AUROC uses; by
            default the images whose mask has a defective pixel. (The reference mask rule
            selects images with any nonzero soft mask value, see
            `patchcore.data.preprocessing`.)
        full_pixels_only: only the full pixel AUROC and pixel F1-max of the pixel metrics
            (what challenge evaluators report), without the defect regions that PRO and the
            anomaly-pixel AUROC need (those are NaN); the same values, at less cost.

    Returns:
        {instance_auroc, full_pixel_auroc, anomaly_pixel_auroc, pro, instance_f1max,
        pixel_f1max}, in that order. Pixel metrics are NaN when maps or masks is None or
        no mask has a defective pixel; any metric undefined for its input is NaN.

    Raises:
        DataError: an argument has the wrong shape or holds NaN (checked before any work).
    """
    _check_max_fpr(max_fpr)
    score_values, label_flags = _as_values(scores, "scores"), _as_flags(labels)
    _check_instances(score_values, label_flags)
    pixels = None
    if maps is not None and masks is not None:
        pixels = _pixels(maps, masks)
        if pixels.sizes.size != score_values.size:
            raise DataError(
                f"maps has {pixels.sizes.size} images but scores has {score_values.size}; "
                "they must match"
            )
        subset = _defective_images(pixels, defect_images)
    elif maps is not None or masks is not None:
        LOGGER.warning("only one of maps and masks was given; pixel metrics are NaN")
    results = dict.fromkeys(METRIC_NAMES, math.nan)
    instance_counts = _rank_and_count(score_values, label_flags)
    results["instance_auroc"] = _auroc_from_counts(instance_counts, "instance_auroc")
    results["instance_f1max"] = _f1max_from_counts(instance_counts, "instance_f1max")
    if pixels is not None and full_pixels_only:
        results.update(_full_pixel_metrics(pixels))
    elif pixels is not None:
        results.update(_pixel_metrics(pixels, subset, max_fpr))
    return results
