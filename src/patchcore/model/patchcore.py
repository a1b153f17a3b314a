"""The PatchCore estimator: fit a memory bank of normal patch features, score new images.

Parameters are the `PatchCoreConfig` given to `__init__`; the learned state (the memory bank
and the normal-data statistics) exists after `fit` and `calibrate`. Scoring goes through
`patchcore.model.scoring.score_features`, the one scorer. One `PatchCore` uses one
backbone; ensembles are lists of them (see `patchcore.evaluation.ensemble`). Images enter in
[0, 1] (the backbone normalises them) at the preprocessing's image size.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch

from patchcore.config import PatchCoreConfig, SearchConfig
from patchcore.data.preprocessing import (
    check_model_input,
    smallest_model_input_side,
    tile_origins,
    tiles_of,
)
from patchcore.errors import ConfigurationError, DataError
from patchcore.model.bank_file import MappedBank
from patchcore.model.calibration import (
    DEFAULT_THRESHOLD_QUANTILE,
    NormalStatistics,
    measure_normal_statistics,
)
from patchcore.model.feature_store import (
    StoredImage,
    TrainingFeatures,
    feature_store_for,
    spills_layer_maps,
)
from patchcore.model.features import build_embedder, patch_grid_size
from patchcore.model.indexes import bank_storage_of, build_bank_index, gather_bank
from patchcore.model.samplers import build_sampler
from patchcore.model.scoring import (
    ExcludingSearch,
    Prediction,
    memory_bank_problem,
    score_embedded,
    score_images,
)
from patchcore.model.search import available_memory_bytes
from patchcore.progress import track
from patchcore.tensors import count_non_finite

LOGGER = logging.getLogger(__name__)

FIT_IMAGES_AT_ONCE = 2  # images (or tiles) the backbone embeds at a time while fitting


def images_of(batch) -> torch.Tensor:
    """A data-loader batch is either an image tensor or a dict holding one under 'image'."""
    return batch["image"] if isinstance(batch, dict) else batch


BACKBONE_PROBE_SIDE = 64  # side of the blank image the backbone's strides are read from
UNCHECKED_EMBED_DIMENSION = 4096  # embedding dimensions up to this are never refused


@torch.inference_mode()
def probe_layer_shapes(embedder, device: torch.device) -> list[torch.Size]:
    """The [1, C, h, w] shapes of the extracted layers' maps for one blank image of
    BACKBONE_PROBE_SIDE pixels: the backbone's channels and strides (eval mode, so the
    statistics are untouched)."""
    probe = torch.zeros(1, 3, BACKBONE_PROBE_SIDE, BACKBONE_PROBE_SIDE, device=device)
    return [feature_map.shape for feature_map in embedder.extractor(probe)]


def check_against_backbone(config: PatchCoreConfig, maps: list[torch.Size]) -> None:
    """Refuses, before any work, options the backbone cannot use (they would only exhaust
    memory): a patch size beyond what the smallest layer's feature map of the smallest model
    input (`smallest_model_input_side`) can fill, a pretrain dimension above the width of the
    layers' patch features (channels x patch size squared, all layers together), and a
    target dimension above what the layers' pretrain dimensions add up to (both only beyond
    UNCHECKED_EMBED_DIMENSION). `maps` are the layers' shapes on the probe image
    (`probe_layer_shapes`)."""
    side = smallest_model_input_side(config.preprocessing)
    stride = max(BACKBONE_PROBE_SIDE / min(m[-2:]) for m in maps)
    smallest_map = max(1, int(side / stride))
    largest_patch = 2 * smallest_map - 1  # centred on any cell, a larger patch adds padding only
    if config.patchsize > largest_patch:
        raise ConfigurationError(
            f"--patchsize {config.patchsize} is larger than the smallest feature map allows "
            f"({smallest_map}x{smallest_map} for layer strides up to {stride:g} on a {side} px "
            f"input: a patch beyond {largest_patch} only adds zero padding); use at most "
            f"{largest_patch}"
        )
    # Beyond the features' width the adaptive poolings only repeat values; up to
    # UNCHECKED_EMBED_DIMENSION (the reference's defaults and more) any dimension is accepted.
    width = sum(int(m[1]) for m in maps) * config.patchsize**2
    pretrain_limit = max(width, UNCHECKED_EMBED_DIMENSION)
    if config.pretrain_embed_dimension > pretrain_limit:
        raise ConfigurationError(
            f"--pretrain_embed_dimension {config.pretrain_embed_dimension} is above the "
            f"{width} values of the layers' patch features (channels x patch size squared), "
            f"so it would only repeat them; use at most {pretrain_limit}"
        )
    combined = len(maps) * config.pretrain_embed_dimension
    target_limit = max(combined, UNCHECKED_EMBED_DIMENSION)
    if config.target_embed_dimension > target_limit:
        raise ConfigurationError(
            f"--target_embed_dimension {config.target_embed_dimension} is above the {combined} "
            f"values of {len(maps)} layer(s) at --pretrain_embed_dimension "
            f"{config.pretrain_embed_dimension}, so it would only repeat them; use at most "
            f"{target_limit}"
        )


@dataclass(frozen=True)
class FitMemoryEstimate:
    """What fitting on a set of images holds in memory at its peak, roughly: the sampler's
    projections of every patch feature and its distances, and the memory bank; on a GPU also
    the patch features themselves (on the CPU they wait in a temporary file, see
    `feature_store.feature_store_for`)."""

    patch_features: int
    bytes: int


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
        self.layer_shapes = probe_layer_shapes(self.embedder, self.device)
        check_against_backbone(config, self.layer_shapes)
        self.embedder.extractor.use_runtime(search.backbone_runtime)
        if search.backbone_runtime != "torch":
            LOGGER.info("The backbone runs in %s (--backbone_runtime)", search.backbone_runtime)
        self.index = build_bank_index(config.index, search, self.device)
        self.memory_bank: torch.Tensor | None = None
        self.normal_statistics: NormalStatistics | None = None
        # The training image (0-based, in fit order) each bank feature came from, recorded by
        # fit() for leave-one-image-out calibration; None for a loaded or updated model.
        self.bank_sources: torch.Tensor | None = None
        # How the threshold was calibrated (see calibrate*), for the model card; None if not.
        self.calibration_method: str | None = None
        self.num_training_images = 0  # images fit() read
        # The training images' features, kept by fit(keep_training_features=True) until
        # leave-one-image-out calibration has scored them; None otherwise.
        self._training_features: TrainingFeatures | None = None
        self.fit_seconds: dict[str, float] = {}

    # ----------------------------------------------------------------- features
    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B, 3, H, W] in [0, 1] -> patch features [B*h*w, D] and the grid (h, w)."""
        return self.embedder(images.to(self.device, torch.float32))

    def training_features(
        self, images: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
        """Patch features [N_i, D] a batch of normal images adds to the memory bank, with
        their patch grid (h, w), in parts of at most FIT_IMAGES_AT_ONCE images (or tiles,
        with tiled inspection, image-major): the backbone's activations, not the loader's
        batch size, then bound the memory fitting needs (WideResNet50 at 224 px holds about
        15 MB of activations per image). The features are those of the whole batch embedded
        at once, up to float rounding."""
        for _, features, grid in self.training_parts(images):
            yield features, grid

    @torch.inference_mode()
    def training_parts(self, images: torch.Tensor) -> Iterator[tuple]:
        """`training_features`' parts as (layer maps, patch features, grid)."""
        check_model_input(images)
        preprocessing = self.config.preprocessing
        if preprocessing.tile is not None:
            images = tiles_of(images, preprocessing.tile, preprocessing.tile_overlap)
        for part in images.split(FIT_IMAGES_AT_ONCE):
            yield self.embedder.maps_and_features(part.to(self.device, torch.float32))

    def reference_projection_state(self) -> torch.Tensor | None:
        """The CPU generator state the coreset's random projection is drawn from: where the
        reference's global generator stands when its sampler builds the projection layer.
        The reference seeds it (`fix_seeds(seed)`) before building the backbone; after the
        backbone and its statistics pass (`FeatureExtractor.later_generator_state`), its
        training DataLoader draws one base seed when fit iterates it; then the layer is
        initialised. None for a backbone built without a seed."""
        state = self.embedder.extractor.later_generator_state
        if state is None:
            return None
        generator = torch.Generator()
        generator.set_state(state)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the base seed
        return generator.get_state()

    def spills_layer_maps(self) -> bool:
        """Whether fit() on the CPU spills the backbone's layer maps rather than the patch
        features (`feature_store.spills_layer_maps`: maps much smaller than the features).
        Not for a memory-mapped bank, which is gathered in blocks that would each aggregate
        every part again."""
        if bank_storage_of(self.index) == "mmap":
            return False
        first = self.layer_shapes[0]
        patches = math.prod(patch_grid_size(side, self.config.patchsize, self.config.patchstride)
                            for side in first[-2:])  # fmt: skip
        values = sum(math.prod(shape[1:]) for shape in self.layer_shapes)
        return spills_layer_maps(values / patches, self.config.target_embed_dimension)

    # ---------------------------------------------------------------------- fit
    def fit_memory_estimate(self, working_sizes: Iterable[tuple[int, int]]) -> FitMemoryEstimate:
        """The memory `fit` needs for training images of (height, width) `working_sizes`."""
        grid = patch_grid_size(self.layer_shapes[0][-2], self.config.patchsize,
                               self.config.patchstride)  # fmt: skip
        stride = BACKBONE_PROBE_SIDE / grid  # of the patch grid (the first layer's map)
        preprocessing = self.config.preprocessing
        count = 0
        for height, width in working_sizes:
            if preprocessing.tile is None:
                parts = [(height, width)]
            else:
                tiles = (len(tile_origins(height, preprocessing.tile, preprocessing.tile_overlap))
                         * len(tile_origins(width, preprocessing.tile, preprocessing.tile_overlap)))
                parts = [(preprocessing.tile, preprocessing.tile)] * tiles  # fmt: skip
            count += sum(math.ceil(h / stride) * math.ceil(w / stride) for h, w in parts)
        sampler = self.config.sampler
        subsampled = sampler.name != "identity" and sampler.percentage < 1.0
        fraction = sampler.percentage if subsampled else 1.0
        per_feature = (sampler.projection_dimension + 3) * 4 if subsampled else 0
        bank = math.ceil(count * fraction) * self.config.target_embed_dimension * 4
        stored = 0 if self.device.type == "cpu" else count * self.config.target_embed_dimension * 4
        return FitMemoryEstimate(count, count * per_feature + bank + stored)

    def check_fit_memory(self, working_sizes: Iterable[tuple[int, int]], name: str) -> None:
        """A ConfigurationError, before any work, when fitting on images of `working_sizes`
        needs more memory than the device has available (`available_memory_bytes`)."""
        estimate = self.fit_memory_estimate(working_sizes)
        available = available_memory_bytes(self.device)
        if available is not None and estimate.bytes > available:
            raise ConfigurationError(
                f"{name}: fitting needs about {estimate.bytes / 2**30:.1f} GiB of memory "
                f"({estimate.patch_features} patch features), more than the "
                f"{available / 2**30:.1f} GiB available on {self.device}; use fewer or smaller "
                "training images (--resize, --scale, --max_size) or a smaller sampler "
                "percentage (-p)"
            )

    @torch.inference_mode()
    def fit(self, batches: Iterable, keep_training_features: bool = False) -> None:
        """Builds the memory bank from batches of normal training images.

        One streaming pass: each batch's patch features go to a feature store (spilled to a
        temporary file on the CPU; as the layer maps they come from where those are much
        smaller, see `spills_layer_maps`) and are projected for the sampler as they come;
        the bank is read back from the store after selection. With `keep_training_features`
        the store stays open afterwards (`training_features_kept`), so that
        `calibrate_leave_one_out` scores the training images from it without embedding them
        again; it closes the store (as does `release_training_features`).
        """
        self.release_training_features()
        sampler = build_sampler(self.config.sampler, self.reference_projection_state())
        store = feature_store_for(
            self.device, self.embedder.aggregator if self.spills_layer_maps() else None
        )
        projected, sources, stored_images = [], [], []
        num_images = 0
        start = time.perf_counter()
        kept = False
        try:
            for number, batch in enumerate(
                track(batches, "Extracting training features", unit="batch"), start=1
            ):
                images = images_of(batch)
                first_row, batch_rows = len(store), 0
                for maps, features, grid in self.training_parts(images):
                    if count_non_finite(features):
                        raise DataError(
                            f"training batch {number}: the backbone gives patch features that "
                            "are not finite numbers (NaN or infinite); check the backbone's "
                            "weights"
                        )
                    store.append(features, maps)
                    projected.append(sampler.project(features))
                    batch_rows += len(features)
                # Rows come image-major (tiles of one image together): equal shares per image.
                per_image = batch_rows // len(images)
                sources.append(num_images + torch.arange(batch_rows) // per_image)
                size = (int(images.shape[-2]), int(images.shape[-1]))
                stored_images.extend(
                    StoredImage(first_row + position * per_image, per_image, grid, size)
                    for position in range(len(images))
                )
                num_images += len(images)
            if not projected:
                raise DataError("no training images: the memory bank would be empty")
            dimension = features.shape[1]
            extracted = time.perf_counter()
            projected = torch.cat(projected)  # the per-batch parts are freed here
            selected = sampler.select_projected(projected)
            del projected
            selected_rows = selected.cpu()  # waits for a GPU's selection to finish
            selection_done = time.perf_counter()
            num_features = len(store)
            self.set_memory_bank(gather_bank(self.index, store, selected, self.device))
            self.bank_sources = torch.cat(sources)[selected_rows].to(torch.int32)
            self.num_training_images = num_images
            if keep_training_features:
                self._training_features = TrainingFeatures(store, stored_images)
                kept = True
        finally:
            if not kept:
                store.close()
        finished = time.perf_counter()
        # subsampling = coreset (projection's concatenation and the selection) + bank (the
        # selected rows gathered, checked and handed to the search index)
        self.fit_seconds = {
            "extraction": extracted - start,
            "subsampling": finished - extracted,
            "coreset": selection_done - extracted,
            "bank": finished - selection_done,
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

    @property
    def training_features_kept(self) -> bool:
        """Whether fit() kept the training images' features (`keep_training_features`)."""
        return self._training_features is not None

    def release_training_features(self) -> None:
        """Closes the training features fit() kept, if any (their temporary file goes)."""
        if self._training_features is not None:
            self._training_features.close()
            self._training_features = None

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
        self, batches: Iterable | None = None, quantile: float = DEFAULT_THRESHOLD_QUANTILE
    ) -> Prediction:
        """Calibrates on the training images themselves without their optimism: each image
        is scored against the memory bank without the bank features that came from it
        (`bank_sources`, `ExcludingSearch`), as a new normal image would be. Needs no refit.

        The images' features are those fit() kept (`fit(..., keep_training_features=True)`:
        the very features the bank was selected from, no second backbone pass; they are
        released afterwards), or else those of `batches`, the loader fit() read in the same
        order, embedded again one image at a time. Falls back to in-sample scores, with a
        warning, when the bank without one image's features is smaller than the
        neighbourhoods that scoring needs (e.g. a single training image)."""
        try:
            return self._calibrate_leave_one_out(batches, quantile)
        finally:
            self.release_training_features()

    def _calibrate_leave_one_out(self, batches: Iterable | None, quantile: float) -> Prediction:
        if self.bank_sources is None:
            raise DataError(
                "leave-one-image-out calibration needs the bank features' source images, which "
                "only fit() records; calibrate on held-out normal images instead"
            )
        if self._training_features is None and batches is None:
            raise DataError(
                "leave-one-image-out calibration needs the training loader fit() read, or "
                "features fit() kept (fit(..., keep_training_features=True))"
            )
        sources = self.bank_sources.long()
        needed = self.config.num_nn
        if self.config.score_reweighting:
            needed = max(needed, self.config.reweighting_neighbours)
        largest_share = int(torch.bincount(sources).max())
        in_sample = len(sources) - largest_share < needed
        if in_sample:
            LOGGER.warning(
                "The memory bank without one training image's features holds %d features, "
                "fewer than the %d scoring needs; calibrating on in-sample training scores, "
                "which are optimistic (use more training images or --train_val_split)",
                len(sources) - largest_share, needed,
            )  # fmt: skip
        parts, image = [], 0
        description = "Calibrating, leaving each training image out"
        for features, grid, size in track(self._training_images_embedded(batches), description,
                                          total=self.num_training_images, unit="image"):  # fmt: skip
            search = self.index if in_sample else ExcludingSearch(self.index, sources == image)
            parts.append(score_embedded(features, grid, search, self.config, size).cpu())
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
        self.calibration_method = ("training images, in-sample (optimistic)" if in_sample
                                   else "training images, leave-one-image-out")  # fmt: skip
        LOGGER.info(
            "Calibrated on %s scores of %d training images: threshold %.6g (quantile %.3g)",
            "in-sample" if in_sample else "leave-one-image-out",
            image, self.normal_statistics.threshold, quantile,
        )  # fmt: skip
        return prediction

    def _training_images_embedded(
        self, batches: Iterable | None
    ) -> Iterator[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]:
        """Each training image's patch features, patch grid and working size, in fit order:
        from the features fit() kept, or embedded again from `batches`, one image at a time."""
        kept = self._training_features
        if kept is not None:
            for image, stored in enumerate(kept.images):
                yield kept.features_of(image).to(self.device), stored.grid, stored.size
            return
        for batch in batches:
            for single in images_of(batch).split(1):
                parts = list(self.training_features(single))
                features = torch.cat([features for features, _ in parts])
                yield features, parts[0][1], (int(single.shape[-2]), int(single.shape[-1]))
