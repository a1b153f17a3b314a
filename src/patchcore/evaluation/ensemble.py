"""Combining the scores of several PatchCore models (one per backbone).

Each member's image scores and anomaly maps are min-max normalised, then averaged.
- `test_minmax` (the reference implementation): min and max over the evaluated test set.
  Uses test-set information, so it suits benchmark tables, not a production line.
- `normal_stats`: min and max measured at fit time on held-out normal images
  (`PatchCore.calibrate`); no test information, usable on a stream of new images.
A single model's scores are returned unchanged.

`predict_new_images` is how new images are scored outside an evaluation (prediction, the
dashboard): a single model's own scores, or an ensemble combined with `normal_stats`, the
only normalisation that does not need a test set.
"""

from __future__ import annotations

import torch

from patchcore.config import NORMALISATIONS
from patchcore.errors import ConfigurationError
from patchcore.model.calibration import NormalStatistics
from patchcore.model.scoring import Maps, Prediction, maps_range



def _minmax(values: torch.Tensor, minimum: float, maximum: float) -> torch.Tensor:
    span = maximum - minimum
    return (values - minimum) / span if span > 0 else values - minimum


def combine_members(
    predictions: list[Prediction],
    normalisation: str = "test_minmax",
    statistics: list[NormalStatistics | None] | None = None,
) -> tuple[torch.Tensor, Maps]:
    """Ensemble image scores [N] and maps (as the members hold them) from per-member
    predictions of the same images."""
    if normalisation not in NORMALISATIONS:
        raise ConfigurationError(
            f"ensemble normalisation must be one of {', '.join(NORMALISATIONS)}, "
            f"got '{normalisation}'"
        )
    if len(predictions) == 1:
        return predictions[0].scores, predictions[0].maps
    scores, maps = [], []
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
        scores.append(_minmax(prediction.scores, *score_range))
        maps.append([_minmax(single, *map_range) for single in prediction.maps])
    combined = [torch.stack(per_member).mean(dim=0) for per_member in zip(*maps)]
    as_tensor = isinstance(predictions[0].maps, torch.Tensor)
    return torch.stack(scores).mean(dim=0), torch.stack(combined) if as_tensor else combined


def predict_new_images(models: list, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores [B] and maps [B, H, W] of a batch of new images, on the scale the models
    decide on: a single model's own scores, an ensemble's combined with `normal_stats`."""
    predictions = [model.predict(images) for model in models]
    return combine_members(
        predictions, "normal_stats", [model.normal_statistics for model in models]
    )
