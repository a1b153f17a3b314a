"""Decisions: normal-data statistics, the accept/reject rule and the heat-map colour range.

Written once here and used by every consumer (evaluation overlays, prediction, the exported
module, the dashboard). The module needs neither torch nor a model, so reading a run's
saved results stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from patchcore.errors import ConfigurationError

DEFAULT_THRESHOLD_QUANTILE = 0.99
REJECT = "reject"
ACCEPT = "accept"


@dataclass(frozen=True)
class NormalStatistics:
    """Scores of held-out normal images, measured at fit time (no test data involved).

    Used to normalise ensemble members without test-set information and to set the
    accept/reject threshold (the `threshold_quantile` quantile of normal image scores).
    """

    image_score_min: float
    image_score_max: float
    pixel_score_min: float
    pixel_score_max: float
    threshold: float
    threshold_quantile: float
    num_images: int


def measure_normal_statistics(
    scores, maps, quantile: float = DEFAULT_THRESHOLD_QUANTILE
) -> NormalStatistics:
    """The statistics of held-out normal images from their image `scores` [N] and anomaly
    `maps` (one array or tensor per image, or one [N, H, W]): score and pixel ranges and the
    threshold, the `quantile` quantile of the image scores (linear interpolation).

    Used for a single model's own scores and for an ensemble's combined scores alike.
    """
    values = _float64(scores).ravel()
    if values.size == 0:
        raise ConfigurationError("normal statistics need at least one held-out normal image")
    pixels = [_float64(single) for single in _as_list(maps)]
    return NormalStatistics(
        image_score_min=float(values.min()),
        image_score_max=float(values.max()),
        pixel_score_min=min(float(single.min()) for single in pixels),
        pixel_score_max=max(float(single.max()) for single in pixels),
        threshold=float(np.quantile(values, quantile)),
        threshold_quantile=quantile,
        num_images=int(values.size),
    )


def _float64(values) -> np.ndarray:
    """A float64 numpy copy of a number sequence, array or (CPU or GPU) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def decide(scores, threshold: float):
    """True where an image is rejected: its score is above `threshold` or is not a finite
    number (NaN or infinite), so a failed score never passes a part.

    `scores` may be a number, a sequence, a numpy array or a torch tensor (also while a
    graph is traced for export); arrays and tensors give the same type back.
    """
    if not math.isfinite(threshold):
        raise ConfigurationError(f"the decision threshold must be a finite number, got {threshold}")
    if not hasattr(scores, "shape"):
        scores = np.asarray(scores, dtype=np.float64)
    threshold = threshold_for_dtype(threshold, scores.dtype)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, as intended
        finite = (scores - scores) == 0  # False for NaN and +-inf, in numpy and torch alike
        return ~(finite & (scores <= threshold))


_NARROW_FLOATS = {
    "float32": np.float32, "torch.float32": np.float32,
    "float16": np.float16, "torch.float16": np.float16,
}  # fmt: skip


def threshold_for_dtype(threshold: float, dtype) -> float:
    """The largest value of the float type `dtype` (float32, float16) not above `threshold`.

    Scores of that type compared with it are decided exactly as when they are widened to
    float64 and compared with `threshold` itself: no value of the type lies between the two.
    So a float32 score decides the same in a float32 graph (the exported models) as its
    Python float does against the saved float64 threshold. Other types get `threshold` back.
    """
    kind = _NARROW_FLOATS.get(str(dtype))
    if kind is None:
        return threshold
    bound = float(threshold)  # rounding a number down, not a decision
    with np.errstate(over="ignore"):
        value = kind(bound)
    if float(value) > bound:
        value = np.nextafter(value, kind(-np.inf))
    return float(value)


def decision_label(rejected: bool) -> str:
    """The word for one decision."""
    return REJECT if rejected else ACCEPT


def colour_range(
    threshold: float | None,
    statistics: NormalStatistics | None = None,
    maps=None,
) -> tuple[float, float]:
    """The (low, high) scores that the heat-map colour scale spans.

    With a threshold: from the normal images' lowest pixel score (0 without statistics, and
    never above the threshold) to the value that puts the threshold in the middle of the
    scale. Without one: the smallest and largest finite values of `maps`. A flat range is
    widened so it always has a positive width.
    """
    if threshold is not None:
        low = min(statistics.pixel_score_min if statistics else 0.0, threshold)
        return _widened(low, 2.0 * threshold - low)
    if maps is None:
        raise ConfigurationError("a colour range needs a threshold or the maps to span")
    values = np.concatenate([_float64(single).ravel() for single in _as_list(maps)])
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ConfigurationError("anomaly maps: no finite values to set a colour scale from")
    return _widened(float(finite.min()), float(finite.max()))


def _as_list(maps) -> list:
    if isinstance(maps, list | tuple):
        return list(maps)
    if getattr(maps, "ndim", 0) == 3:  # [N, H, W]: one map per image
        return list(maps)
    return [maps]


def _widened(low: float, high: float) -> tuple[float, float]:
    if high > low:
        return low, high
    half_width = max(abs(low) * 1e-3, 0.5)
    return low - half_width, high + half_width
