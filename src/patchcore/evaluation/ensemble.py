"""Combining the scores of several PatchCore models (one per backbone).

Each member's image scores and anomaly maps are min-max normalised, then averaged.
- `test_minmax` (the reference implementation): min and max over the evaluated test set.
  Uses test-set information, so it suits benchmark tables, not a production line.
- `normal_stats`: min and max measured at fit time on held-out normal images
  (`PatchCore.calibrate`); no test information, usable on a stream of new images.
A single model's scores are returned unchanged.

An ensemble decides on its combined `normal_stats` scale: `calibrate_ensemble` measures that
scale's statistics and threshold on the same held-out normal images the members were
calibrated on, and they are saved with the members (`patchcore.model.serialization`).

`predict_new_images` is how new images are scored outside an evaluation (prediction, the
dashboard): a single model's own scores, or an ensemble combined with `normal_stats`, the
only normalisation that does not need a test set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchcore.config import NORMALISATIONS
from patchcore.errors import ConfigurationError
from patchcore.model.calibration import (
    DEFAULT_THRESHOLD_QUANTILE,
    NormalStatistics,
    measure_normal_statistics,
)
from patchcore.model.scoring import Maps, Prediction, maps_range


def _minmax(values: torch.Tensor, minimum: float, maximum: float) -> torch.Tensor:
    span = maximum - minimum
    return (values - minimum) / span if span > 0 else values - minimum


def _member_ranges(
    predictions: list[Prediction],
    normalisation: str,
    statistics: list[NormalStatistics | None] | None,
) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Per member, the (min, max) its image scores and its maps are normalised with."""
    ranges = []
    for position, prediction in enumerate(predictions):
        if normalisation == "test_minmax":
            score_range = (float(prediction.scores.min()), float(prediction.scores.max()))
            map_range = maps_range(prediction.maps)
        else:
            member = statistics[position] if statistics else None
            if member is None:
                raise ConfigurationError(
                    f"ensemble member {position + 1} has no normal-data statistics; fit with "
                    "--train_val_split < 1 or use --ensemble_normalisation test_minmax"
                )
            score_range = (member.image_score_min, member.image_score_max)
            map_range = (member.pixel_score_min, member.pixel_score_max)
        ranges.append((score_range, map_range))
    return ranges


def _mean_of_members(per_member: list[Maps], as_tensor: bool) -> Maps:
    combined = [torch.stack(parts).mean(dim=0) for parts in zip(*per_member)]
    return torch.stack(combined) if as_tensor else combined


def _on_grid(grid: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A patch-score grid [h, w] resampled (bilinear) to `shape` when members' grids differ."""
    if tuple(grid.shape) == tuple(shape):
        return grid
    return F.interpolate(grid[None, None], size=tuple(shape), mode="bilinear")[0, 0]


def combine_predictions(
    predictions: list[Prediction],
    normalisation: str = "test_minmax",
    statistics: list[NormalStatistics | None] | None = None,
) -> Prediction:
    """The ensemble's `Prediction` from per-member predictions of the same images: image
    scores [N], maps and patch-score grids (as the members hold them), each the mean of the
    members' normalised values. Patch scores are normalised like image scores (an image's
    score is its highest patch score), maps with the pixel range."""
    if normalisation not in NORMALISATIONS:
        raise ConfigurationError(
            f"ensemble normalisation must be one of {', '.join(NORMALISATIONS)}, "
            f"got '{normalisation}'"
        )
    if len(predictions) == 1:
        return predictions[0]
    scores, maps, patches = [], [], []
    ranges = _member_ranges(predictions, normalisation, statistics)
    for prediction, (score_range, map_range) in zip(predictions, ranges, strict=True):
        scores.append(_minmax(prediction.scores, *score_range))
        maps.append([_minmax(single, *map_range) for single in prediction.maps])
        patches.append([
            _on_grid(_minmax(single, *score_range), first.shape)
            for single, first in zip(prediction.patch_scores, predictions[0].patch_scores)
        ])  # fmt: skip
    return Prediction(
        torch.stack(scores).mean(dim=0),
        _mean_of_members(maps, isinstance(predictions[0].maps, torch.Tensor)),
        _mean_of_members(patches, isinstance(predictions[0].patch_scores, torch.Tensor)),
    )


def combine_members(
    predictions: list[Prediction],
    normalisation: str = "test_minmax",
    statistics: list[NormalStatistics | None] | None = None,
) -> tuple[torch.Tensor, Maps]:
    """Ensemble image scores [N] and maps (as the members hold them) from per-member
    predictions of the same images (`combine_predictions` without the patch scores)."""
    combined = combine_predictions(predictions, normalisation, statistics)
    return combined.scores, combined.maps


def calibrate_ensemble(
    models: list, predictions: list[Prediction], quantile: float = DEFAULT_THRESHOLD_QUANTILE
) -> NormalStatistics:
    """The statistics and threshold of an ensemble's combined scale, measured on the held-out
    normal images its members were calibrated on (`predictions`, one per member, the same
    images in the same order): the members' scores combined with `normal_stats`, exactly as
    new images are scored (`predict_new_images`)."""
    scores, maps = combine_members(
        predictions, "normal_stats", [model.normal_statistics for model in models]
    )
    return measure_normal_statistics(scores, maps, quantile)


def decision_statistics(
    models: list,
    ensemble_statistics: NormalStatistics | None,
    normalisation: str = "normal_stats",
) -> NormalStatistics | None:
    """The normal statistics whose threshold decides on scores of `models` combined with
    `normalisation`: a single model's own; an ensemble's combined-scale statistics when its
    scores are combined with `normal_stats` (its test-set min-max scale has none)."""
    if len(models) == 1:
        return models[0].normal_statistics
    return ensemble_statistics if normalisation == "normal_stats" else None


def predict_new_images(models: list, images: torch.Tensor) -> tuple[torch.Tensor, Maps]:
    """Image scores [B] and maps [B, H, W] of a batch of new images, on the scale the models
    decide on: a single model's own scores, an ensemble's combined with `normal_stats`."""
    predictions = [model.predict(images) for model in models]
    return combine_members(
        predictions, "normal_stats", [model.normal_statistics for model in models]
    )
