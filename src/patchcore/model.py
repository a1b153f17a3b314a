"""The PatchCore model: fit a memory bank of normal patch features, score new images.

One `PatchCore` uses one backbone; ensembles are lists of them (see `patchcore.ensemble`).
Images enter in [0, 1] (the backbone normalises them) at the preprocessing's image size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import tqdm

from patchcore.anomaly_maps import DEFAULT_SIGMA, patch_scores_to_maps
from patchcore.backbones import load_backbone
from patchcore.config import PatchCoreConfig, SearchConfig
from patchcore.errors import DataError
from patchcore.feature_extraction import FeatureExtractor
from patchcore.feature_store import feature_store_for
from patchcore.nearest_neighbours import build_index
from patchcore.patch_features import PatchFeatureAggregator
from patchcore.samplers import build_sampler

LOGGER = logging.getLogger(__name__)

DEFAULT_THRESHOLD_QUANTILE = 0.99


@dataclass
class Prediction:
    """Scores of a batch of images: image scores [B], anomaly maps [B, H, W], patch scores [B, h, w]."""

    scores: torch.Tensor
    maps: torch.Tensor
    patch_scores: torch.Tensor

    @staticmethod
    def concatenate(parts: list[Prediction]) -> Prediction:
        return Prediction(
            torch.cat([part.scores for part in parts]),
            torch.cat([part.maps for part in parts]),
            torch.cat([part.patch_scores for part in parts]),
        )


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


def reweighting_factor(
    features: torch.Tensor,
    neighbours: torch.Tensor,
    worst_patch: torch.Tensor,
    index,
    neighbourhood_size: int,
) -> torch.Tensor:
    """The paper's Eq. 7 weight per image: 1 - softmax over the neighbourhood of m*, at m*.

    features [B, P, D] and neighbours [B, P, k] (bank indices, nearest first) of each image's
    patches; worst_patch [B], each image's most anomalous patch. m* is the bank feature
    nearest to that patch; its neighbourhood is its `neighbourhood_size` nearest bank
    features (m* included), searched with `index`. Distances here are L2, as in the paper.
    """
    device = features.device
    rows = torch.arange(len(worst_patch), device=device)
    test_features = features[rows, worst_patch]  # [B, D]
    nearest = neighbours[rows, worst_patch, 0]  # [B]
    bank = index.bank.to(device)
    _, neighbourhood = index.search(bank[nearest], neighbourhood_size)
    neighbourhood_distances = torch.linalg.vector_norm(
        bank[neighbourhood.to(device)] - test_features[:, None, :], dim=-1
    )  # [B, b]
    nearest_distance = torch.linalg.vector_norm(bank[nearest] - test_features, dim=-1)
    return 1.0 - torch.exp(nearest_distance - torch.logsumexp(neighbourhood_distances, dim=1))


def images_of(batch) -> torch.Tensor:
    """A data-loader batch is either an image tensor or a dict holding one under 'image'."""
    return batch["image"] if isinstance(batch, dict) else batch


class PatchCore:
    """A PatchCore anomaly detector on one backbone."""

    def __init__(
        self,
        config: PatchCoreConfig,
        device: torch.device | str = "cpu",
        search: SearchConfig | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        backbone = load_backbone(config.backbone_name, config.pretrained, init_seed=config.seed)
        self.feature_extractor = FeatureExtractor(backbone, config.layers).to(self.device)
        self.aggregator = PatchFeatureAggregator(
            config.patchsize,
            config.patchstride,
            config.pretrain_embed_dimension,
            config.target_embed_dimension,
        )
        self.index = build_index(search or SearchConfig(), self.device)
        self.memory_bank: torch.Tensor | None = None
        self.normal_statistics: NormalStatistics | None = None
        self.fit_seconds: dict[str, float] = {}

    # ----------------------------------------------------------------- features
    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B, 3, H, W] in [0, 1] -> patch features [B*h*w, D] and the grid (h, w)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
        feature_maps = self.feature_extractor(images.to(self.device, torch.float32))
        return self.aggregator(feature_maps)

    # ---------------------------------------------------------------------- fit
    @torch.inference_mode()
    def fit(self, batches: Iterable) -> None:
        """Builds the memory bank from batches of normal training images.

        One streaming pass: each batch's patch features go to a feature store (spilled to a
        temporary file on the CPU) and are projected for the sampler as they come; the bank
        is read back from the store after selection.
        """
        sampler = build_sampler(self.config.sampler)
        store = feature_store_for(self.device)
        projected = []
        start = time.perf_counter()
        try:
            for batch in tqdm.tqdm(batches, desc="Extracting training features", leave=False):
                features = self.embed(images_of(batch))[0]
                store.append(features)
                projected.append(sampler.project(features))
            if not projected:
                raise DataError("no training images: the memory bank would be empty")
            dimension = features.shape[1]
            extracted = time.perf_counter()
            selected = sampler.select_projected(torch.cat(projected))
            del projected
            num_features = len(store)
            self.set_memory_bank(store.gather(selected).to(self.device))
        finally:
            store.close()
        self.fit_seconds = {
            "extraction": extracted - start,
            "subsampling": time.perf_counter() - extracted,
        }
        LOGGER.info(
            "Memory bank: %d of %d patch features (%s, dimension %d); extraction %.1f s, "
            "subsampling %.1f s",
            len(selected),
            num_features,
            self.config.sampler.name,
            dimension,
            self.fit_seconds["extraction"],
            self.fit_seconds["subsampling"],
        )

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        if bank.ndim != 2 or bank.shape[1] != self.config.target_embed_dimension or not len(bank):
            raise DataError(
                f"memory bank must have shape [M > 0, {self.config.target_embed_dimension}], "
                f"got {list(bank.shape)}"
            )
        self.index.fit(bank)
        self.memory_bank = self.index.bank

    # ------------------------------------------------------------------ predict
    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Image scores [B], anomaly maps [B, H, W] (input size) and patch scores [B, h, w]."""
        if self.memory_bank is None:
            raise DataError("the model has no memory bank: call fit() or load a saved model")
        features, (grid_h, grid_w) = self.embed(images)
        batch = images.shape[0]
        squared, neighbours = self.index.search(features, self.config.num_nn)
        distances = squared if self.config.distance == "squared_l2" else squared.sqrt()
        patch_scores = distances.mean(dim=1).to(self.device).reshape(batch, grid_h, grid_w)
        flat = patch_scores.reshape(batch, -1)
        image_scores, worst_patch = flat.max(dim=1)
        if self.config.score_reweighting:
            image_scores = image_scores * reweighting_factor(
                features.reshape(batch, grid_h * grid_w, -1),
                neighbours.to(self.device).reshape(batch, grid_h * grid_w, -1),
                worst_patch,
                self.index,
                self.config.reweighting_neighbours,
            )
        maps = patch_scores_to_maps(patch_scores, tuple(images.shape[-2:]), DEFAULT_SIGMA)
        return Prediction(image_scores.cpu(), maps.cpu(), patch_scores.cpu())

    def predict_batches(self, batches: Iterable, description: str = "Inferring") -> Prediction:
        """Predicts every batch of an iterable (e.g. a DataLoader) and concatenates."""
        parts = [
            self.predict(images_of(batch))
            for batch in tqdm.tqdm(batches, desc=description, leave=False)
        ]
        if not parts:
            raise DataError("no images to predict")
        return Prediction.concatenate(parts)

    # -------------------------------------------------------------- calibration
    def calibrate(self, batches: Iterable, quantile: float = DEFAULT_THRESHOLD_QUANTILE) -> None:
        """Measures scores of held-out normal images: normalisation statistics and threshold."""
        prediction = self.predict_batches(batches, description="Calibrating on normal images")
        self.normal_statistics = NormalStatistics(
            image_score_min=float(prediction.scores.min()),
            image_score_max=float(prediction.scores.max()),
            pixel_score_min=float(prediction.maps.min()),
            pixel_score_max=float(prediction.maps.max()),
            threshold=float(torch.quantile(prediction.scores.double(), quantile)),
            threshold_quantile=quantile,
            num_images=len(prediction.scores),
        )
        LOGGER.info(
            "Calibrated on %d normal images: threshold %.6g (quantile %.3g)",
            len(prediction.scores),
            self.normal_statistics.threshold,
            quantile,
        )
