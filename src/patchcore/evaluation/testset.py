"""Running models over a test set: predictions, ensemble combination and metrics."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from patchcore.data.preprocessing import defective_pixels, has_defect
from patchcore.errors import DataError
from patchcore.evaluation.ensemble import combine_predictions
from patchcore.evaluation.metrics import compute_metrics
from patchcore.evaluation.records import DatasetPredictions
from patchcore.model.calibration import NormalStatistics
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import Maps, Prediction, concatenate_maps
from patchcore.progress import track

LOGGER = logging.getLogger(__name__)


@dataclass
class TestSetResult:
    """Everything known about one evaluated dataset, image by image.

    Maps, masks and images are [N, ...] tensors when all images have one size (the centre
    crop), lists of per-image tensors otherwise (whole-image inspection).
    """

    name: str
    metrics: dict[str, float]
    scores: torch.Tensor  # [N]
    maps: Maps  # [N, H, W] anomaly maps in the model's input frame
    labels: torch.Tensor  # [N], 1 = defective
    masks: Maps  # [N, H, W] bool: the pixels counted as defective
    defect_images: torch.Tensor  # [N] bool: images whose mask marks any defect
    has_mask: list[bool]
    image_names: list[str]
    image_paths: list[str]
    defect_types: list[str]
    patch_grids: list[tuple[int, int]]  # each image's patch grid (h, w)
    images: Maps | None  # [N, 3, H, W] in [0, 1], kept only when asked
    patch_scores: Maps | None = None  # [N, h, w] on the image scores' scale
    members: int = 1
    normalisation: str | None = None  # how an ensemble's members were combined

    def records(self, statistics: NormalStatistics | None) -> DatasetPredictions:
        """The per-image results in their saved form; `statistics` are the normal statistics
        on the scores' scale whose threshold decides (None: no threshold)."""
        return DatasetPredictions(
            name=self.name,
            image_names=self.image_names,
            image_paths=self.image_paths,
            defect_types=self.defect_types,
            is_anomaly=self.labels.numpy().astype(bool),
            has_mask=np.array(self.has_mask, dtype=bool),
            scores=self.scores.numpy(),
            maps=[single.numpy() for single in self.maps],
            masks=[single.numpy() for single in self.masks],
            metrics=self.metrics,
            threshold=None if statistics is None else statistics.threshold,
            patch_grids=self.patch_grids,
            statistics=statistics,
            members=self.members,
            normalisation=self.normalisation,
            patch_scores=(
                None if self.patch_scores is None else [grid.numpy() for grid in self.patch_scores]
            ),
        )


def evaluate_models(
    models: list[PatchCore],
    loader: torch.utils.data.DataLoader,
    name: str,
    normalisation: str = "test_minmax",
    keep_images: bool = False,
) -> TestSetResult:
    """Predicts every test image with every member (one pass over the data) and scores it.

    Pixels count as defective where the mask is 1.0 and an image counts as having a defect
    where its mask has any value above 0 (both mask rules agree on binary masks; see
    `patchcore.data.preprocessing`).
    """
    member_parts: list[list[Prediction]] = [[] for _ in models]
    labels, masks, defect_images, images = [], [], [], []
    has_mask, names, paths, defects = [], [], [], []
    for batch in track(loader, f"Evaluating {name}", unit="batch"):
        for parts, model in zip(member_parts, models):
            parts.append(model.predict(batch["image"]))
        labels.append(torch.as_tensor(batch["is_anomaly"]))
        masks.append(defective_pixels(batch["mask"][:, 0]))
        defect_images.append(has_defect(batch["mask"]))
        has_mask.extend(bool(flag) for flag in batch["has_mask"])
        names.extend(batch["image_name"])
        paths.extend(batch["image_path"])
        defects.extend(batch["defect_type"])
        if keep_images:
            images.append(batch["image"])
    predictions = [Prediction.concatenate(parts) for parts in member_parts]
    combined = combine_predictions(
        predictions, normalisation, [model.normal_statistics for model in models]
    )
    scores, maps = combined.scores, combined.maps
    failed = [path for path, score in zip(paths, scores.tolist()) if not math.isfinite(score)]
    if failed:
        raise DataError(
            f"{name}: {len(failed)} image scores are not finite numbers (the first: {failed[0]}); "
            "the model or these images hold NaN or infinite values"
        )
    all_masks = concatenate_maps(masks)
    all_labels = torch.cat(labels)
    all_defect_images = torch.cat(defect_images)
    if all(has_mask):
        metrics = compute_metrics(
            scores, all_labels, maps, all_masks, defect_images=all_defect_images,
        )  # fmt: skip
    else:
        LOGGER.warning("%s: some defective images have no mask; pixel metrics are left empty", name)
        metrics = compute_metrics(scores, all_labels)
    for key, value in metrics.items():
        LOGGER.info("%s %s: %.4f", name, key, value)
    return TestSetResult(
        name=name,
        metrics=metrics,
        scores=scores,
        maps=maps,
        labels=all_labels,
        masks=all_masks,
        defect_images=all_defect_images,
        has_mask=has_mask,
        image_names=names,
        image_paths=paths,
        defect_types=defects,
        patch_grids=[tuple(grid.shape[-2:]) for grid in predictions[0].patch_scores],
        images=concatenate_maps(images) if keep_images else None,
        patch_scores=combined.patch_scores,
        members=len(models),
        normalisation=normalisation if len(models) > 1 else None,
    )

