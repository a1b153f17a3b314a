"""The PatchCore estimator: fit a memory bank of normal patch features, score new images.

Parameters are the `PatchCoreConfig` given to `__init__`; the learned state (the memory bank
and the normal-data statistics) exists after `fit` and `calibrate`. Scoring goes through
`patchcore.model.scoring.score_features`, the one scorer. One `PatchCore` uses one
backbone; ensembles are lists of them (see `patchcore.evaluation.ensemble`). Images enter in
[0, 1] (the backbone normalises them) at the preprocessing's image size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch

from patchcore.config import PatchCoreConfig, SearchConfig
from patchcore.data.preprocessing import check_model_input, cut_tiles
from patchcore.errors import DataError
from patchcore.model.bank_file import MappedBank
from patchcore.model.calibration import (
    DEFAULT_THRESHOLD_QUANTILE,
    NormalStatistics,
    measure_normal_statistics,
)
from patchcore.model.feature_store import feature_store_for
from patchcore.model.features import build_embedder
from patchcore.model.indexes import build_bank_index, gather_bank
from patchcore.model.samplers import build_sampler
from patchcore.model.scoring import (
    ExcludingSearch,
    Prediction,
    memory_bank_problem,
    score_images,
)
from patchcore.progress import track

LOGGER = logging.getLogger(__name__)

FIT_IMAGES_AT_ONCE = 2  # images (or tiles) the backbone embeds at a time while fitting


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
        search = search or SearchConfig()
        if search.index is not None:  # a run-time choice of index replaces the model's own
            config = replace(config, index=search.index)
        self.config = config
        self.device = torch.device(device)
        self.embedder = build_embedder(config).to(self.device)
        self.index = build_bank_index(config.index, search, self.device)
        self.memory_bank: torch.Tensor | None = None
        self.normal_statistics: NormalStatistics | None = None
        # The training image (0-based, in fit order) each bank feature came from, recorded by
        # fit() for leave-one-image-out calibration; None for a loaded or updated model.
        self.bank_sources: torch.Tensor | None = None
        # How the threshold was calibrated (see calibrate*), for the model card; None if not.
        self.calibration_method: str | None = None
        self.num_training_images = 0  # images fit() read
        self.fit_seconds: dict[str, float] = {}

    # ----------------------------------------------------------------- features
    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B, 3, H, W] in [0, 1] -> patch features [B*h*w, D] and the grid (h, w)."""
        return self.embedder(images.to(self.device, torch.float32))

    def training_features(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Patch features [N_i, D] a batch of normal images adds to the memory bank, in parts
        of at most FIT_IMAGES_AT_ONCE images (or tiles, with tiled inspection): the
        backbone's activations, not the loader's batch size, then bound the memory fitting
        needs (WideResNet50 at 224 px holds about 15 MB of activations per image). The
        features are those of the whole batch embedded at once, up to float rounding."""
        check_model_input(images)
        preprocessing = self.config.preprocessing
        if preprocessing.tile is not None:
            images = cut_tiles(images, preprocessing.tile, preprocessing.tile_overlap)[0]
        for part in images.split(FIT_IMAGES_AT_ONCE):
            yield self.embed(part)[0]

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
        projected, sources = [], []
        num_images = 0
        start = time.perf_counter()
        try:
            for number, batch in enumerate(
                track(batches, "Extracting training features", unit="batch"), start=1
            ):
                images = images_of(batch)
                batch_rows = 0
                for features in self.training_features(images):
                    if not bool(torch.isfinite(features).all()):
                        raise DataError(
                            f"training batch {number}: the backbone gives patch features that "
                            "are not finite numbers (NaN or infinite); check the backbone's "
                            "weights"
                        )
                    store.append(features)
                    projected.append(sampler.project(features))
                    batch_rows += len(features)
                # Rows come image-major (tiles of one image together): equal shares per image.
                per_image = batch_rows // len(images)
                sources.append(num_images + torch.arange(batch_rows) // per_image)
                num_images += len(images)
            if not projected:
                raise DataError("no training images: the memory bank would be empty")
            dimension = features.shape[1]
            extracted = time.perf_counter()
            projected = torch.cat(projected)  # the per-batch parts are freed here
            selected = sampler.select_projected(projected)
            del projected
            num_features = len(store)
            self.set_memory_bank(gather_bank(self.index, store, selected, self.device))
            self.bank_sources = torch.cat(sources)[selected.cpu()].to(torch.int32)
            self.num_training_images = num_images
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

    def set_memory_bank(self, bank: torch.Tensor | MappedBank) -> None:
        """Makes `bank` [M, D] (in RAM, or a memory-mapped file) the memory bank; refuses
        non-finite values, and lowers k (and Eq. 7's neighbourhood) to M with a warning when
        the bank is smaller, so the configuration (and a saved model) says what scoring
        really uses."""
        rows = bank.tensor if isinstance(bank, MappedBank) else bank  # a mapping: not read in
        problem = memory_bank_problem(rows, self.config.target_embed_dimension)
        if problem is not None:
            raise DataError(f"the memory bank {problem}")
        self._fit_neighbourhoods(len(bank))
        self.index.fit(bank)
        self.memory_bank = self.index.bank

    def _fit_neighbourhoods(self, bank_size: int) -> None:
        limits = [("num_nn", "k = {} nearest neighbours (--anomaly_scorer_num_nn)")]
        if self.config.score_reweighting:
            limits.append(("reweighting_neighbours", "the {} neighbours of Eq. 7's re-weighting"))
        changes = {}
        for name, description in limits:
            if getattr(self.config, name) > bank_size:
                LOGGER.warning(
                    "The memory bank holds %d features, fewer than %s; scoring uses %d, and a "
                    "saved model records it",
                    bank_size, description.format(getattr(self.config, name)), bank_size,
                )  # fmt: skip
                changes[name] = bank_size
        if changes:
            self.config = replace(self.config, **changes)

    # ------------------------------------------------------------------ predict
    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Image scores [B], anomaly maps [B, H, W] (input size) and patch scores [B, h, w]."""
        if self.memory_bank is None:
            raise DataError("the model has no memory bank: call fit() or load a saved model")
        check_model_input(images)
        return score_images(self.embed, self.index, self.config, images).cpu()

    def predict_batches(self, batches: Iterable, description: str = "Inferring") -> Prediction:
        """Predicts every batch of an iterable (e.g. a DataLoader) and concatenates."""
        parts = [self.predict(images_of(batch)) for batch in track(batches, description, unit="batch")]
        if not parts:
            raise DataError("no images to predict")
        return Prediction.concatenate(parts)

    # -------------------------------------------------------------- calibration
    def calibrate(
        self, batches: Iterable, quantile: float = DEFAULT_THRESHOLD_QUANTILE
    ) -> Prediction:
        """Measures scores of held-out normal images: normalisation statistics and threshold
        (`patchcore.model.calibration.measure_normal_statistics`). Returns the images'
        predictions, so an ensemble can calibrate its combined scale on the same images."""
        prediction = self.predict_batches(batches, description="Calibrating on normal images")
        self.normal_statistics = measure_normal_statistics(
            prediction.scores, prediction.maps, quantile
        )
        self.calibration_method = "held-out normal images"
        LOGGER.info(
            "Calibrated on %d normal images: threshold %.6g (quantile %.3g)",
            len(prediction.scores),
            self.normal_statistics.threshold,
            quantile,
        )
        return prediction

    @torch.inference_mode()
    def calibrate_leave_one_out(
        self, batches: Iterable, quantile: float = DEFAULT_THRESHOLD_QUANTILE
    ) -> Prediction:
        """Calibrates on the training images themselves without their optimism: each image
        (the loader fit() read, in the same order) is scored against the memory bank without
        the bank features that came from it (`bank_sources`, `ExcludingSearch`), as a new
        normal image would be. Needs no refit. Falls back to in-sample scores, with a warning,
        when the bank without one image's features is smaller than the neighbourhoods that
        scoring needs (e.g. a single training image)."""
        if self.bank_sources is None:
            raise DataError(
                "leave-one-image-out calibration needs the bank features' source images, which "
                "only fit() records; calibrate on held-out normal images instead"
            )
        sources = self.bank_sources.long()
        needed = self.config.num_nn
        if self.config.score_reweighting:
            needed = max(needed, self.config.reweighting_neighbours)
        largest_share = int(torch.bincount(sources).max())
        if len(sources) - largest_share < needed:
            LOGGER.warning(
                "The memory bank without one training image's features holds %d features, "
                "fewer than the %d scoring needs; calibrating on in-sample training scores, "
                "which are optimistic (use more training images or --train_val_split)",
                len(sources) - largest_share, needed,
            )  # fmt: skip
            prediction = self.calibrate(batches, quantile)
            self.calibration_method = "training images, in-sample (optimistic)"
            return prediction
        parts, image = [], 0
        for batch in track(batches, "Calibrating, leaving each training image out", unit="batch"):
            for single in images_of(batch).split(1):
                check_model_input(single)
                search = ExcludingSearch(self.index, sources == image)
                parts.append(score_images(self.embed, search, self.config, single).cpu())
                image += 1
        if image != self.num_training_images:
            raise DataError(
                f"leave-one-image-out calibration got {image} images but the bank was built "
                f"from {self.num_training_images}; give it the training loader fit() read"
            )
        prediction = Prediction.concatenate(parts)
        self.normal_statistics = measure_normal_statistics(
            prediction.scores, prediction.maps, quantile
        )
        self.calibration_method = "training images, leave-one-image-out"
        LOGGER.info(
            "Calibrated on leave-one-image-out scores of %d training images: threshold %.6g "
            "(quantile %.3g)",
            image, self.normal_statistics.threshold, quantile,
        )  # fmt: skip
        return prediction
