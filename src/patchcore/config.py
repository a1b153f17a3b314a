"""Typed, validated configuration of a PatchCore model.

Every option is checked once, when its dataclass is built; code further down trusts it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from patchcore.errors import ConfigurationError

SAMPLER_NAMES = ("identity", "greedy_coreset", "approx_greedy_coreset")
DISTANCES = ("squared_l2", "l2")
# Where the backbone's BatchNorm running statistics come from (see patchcore.model.features):
# "reference": the pretrained ones after the reference implementation's training-mode pass
# of a constant image; "pretrained": the pretrained ones untouched.
BACKBONE_STATISTICS = ("reference", "pretrained")
SEARCH_BACKENDS = ("rerank", "faiss", "torch")
# How an image's score comes from its patch scores (see patchcore.model.scoring): "max" (the
# reference), "quantile" (the image_score_quantile quantile of the patch scores, numpy's
# linear interpolation) or "top_k_mean" (the mean of the image_score_top_k largest).
IMAGE_SCORES = ("max", "quantile", "top_k_mean")
# What runs the backbone on the CPU (see patchcore.model.features.FeatureExtractor): eager torch
# (the default), TorchScript frozen with oneDNN graph fusion, or OpenVINO's CPU runtime at f32.
BACKBONE_RUNTIMES = ("torch", "torch-unfolded", "torchscript")
INDEX_KINDS = ("exact", "ivf", "ivfpq", "hnsw")
BANK_STORAGES = ("memory", "mmap")
NORMALISATIONS = ("test_minmax", "normal_stats")
EXPORT_FORMATS = ("torch", "onnx", "openvino")  # patchcore-export --format
RUNTIMES = ("torch", "onnxruntime", "openvino")  # patchcore-predict --runtime
DEFAULT_BANK_CHUNK_SIZE = 4096  # bank rows per step of the exported models' search

EFFICIENTNET_LITE0 = "efficientnet_lite0"
# Sensible layers for each backbone family when a user gives none: mid-level stages.
EFFICIENTNET_LITE0_LAYERS = ("_blocks.4", "_blocks.10")
DENSENET_LAYERS = ("features.denseblock2", "features.denseblock3")
RESNET_LAYERS = ("layer2", "layer3")
SEED_SUFFIX = ".seed-"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


# numpy's legacy generator, which draws the coreset's starting points as the reference's
# np.random.seed(seed) does, takes 32-bit seeds (torch's take 64-bit ones)
MAX_SEED = 2**32 - 1


def check_seed(seed: int, option: str = "--seed") -> None:
    """A seed every random generator of the library accepts: an integer in [0, MAX_SEED]."""
    _require(
        isinstance(seed, int) and 0 <= seed <= MAX_SEED,
        f"{option} must be an integer between 0 and {MAX_SEED}, got {seed}",
    )


def check_threshold_quantile(quantile: float | None) -> None:
    """--threshold_quantile: None (keep or default) or a number in [0, 1], NaN refused."""
    _require(
        quantile is None or (math.isfinite(quantile) and 0.0 <= quantile <= 1.0),
        f"--threshold_quantile must be a number in [0, 1], got {quantile}",
    )


MAX_DEFAULT_LOADER_WORKERS = 4


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_loader_workers(cores: int | None = None) -> int:
    """Image-decoding worker processes when --num_workers is not given: one less than half
    the usable cores (`usable_cores`), at most MAX_DEFAULT_LOADER_WORKERS; none below 4
    cores. The backbone's torch threads use every core, so a worker takes turns with them
    and every parallel torch operation may wait for a descheduled thread: on 2 cores, fitting
    extracted fastest with no worker (18.5 ms per image against 22.8 with one and 28.4
    with two, docs/explanations/performance-inference.md)."""
    cores = usable_cores() if cores is None else cores
    return min(MAX_DEFAULT_LOADER_WORKERS, max(0, cores // 2 - 1))


def check_loader_settings(batch_size: int, num_workers: int) -> None:
    """The image loader's --batch_size and --num_workers, checked for every command."""
    _require(batch_size >= 1, f"--batch_size must be >= 1, got {batch_size}")
    _require(num_workers >= 0, f"--num_workers must be >= 0, got {num_workers}")


def default_layers(backbone_name: str) -> tuple[str, ...]:
    """Layers to use when none are given: the paper's mid-level stages."""
    if backbone_name == EFFICIENTNET_LITE0:
        return EFFICIENTNET_LITE0_LAYERS
    if backbone_name.startswith("densenet"):
        return DENSENET_LAYERS
    return RESNET_LAYERS


def split_seeded_name(name: str) -> tuple[str, int | None]:
    """`wideresnet50.seed-3` -> (`wideresnet50`, 3); a name without suffix -> (name, None)."""
    base, separator, seed = name.partition(SEED_SUFFIX)
    if not separator:
        return name, None
    _require(
        seed.isdigit(), f"backbone name '{name}': the part after '{SEED_SUFFIX}' must be an integer"
    )
    check_seed(int(seed), f"backbone name '{name}': the seed after '{SEED_SUFFIX}'")
    return base, int(seed)


CROP_MODES = ("center", "none")
MASK_RULES = ("reference", "binary")
MIN_IMAGE_SIDE = 32  # smallest model input side: a stride-16 layer still has a 2 x 2 grid

# Memory bounds on images (docs/explanations/reliability.md). An image is refused from its
# header, before it is decoded, when it holds more than the image limit of pixels or its
# sides are more than MAX_ASPECT_RATIO times apart; and before it is resized when its
# resized (working) image would hold more than the working limit. The options --resize and --tile are bounded by the working
# limit too. Both limits can be changed with the environment variables named here.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_WORKING_PIXELS = 4096 * 4096
MAX_ASPECT_RATIO = 100
IMAGE_PIXELS_VARIABLE = "PATCHCORE_MAX_IMAGE_PIXELS"
WORKING_PIXELS_VARIABLE = "PATCHCORE_MAX_WORKING_PIXELS"


def pixel_limit(variable: str, default: int) -> int:
    """The pixel limit the environment variable `variable` sets, or `default`; a
    ConfigurationError names the variable when it is not a positive integer."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    _require(text.isdigit() and int(text) > 0,
             f"{variable} must be a positive number of pixels, got '{text}'")  # fmt: skip
    return int(text)


def working_pixel_limit() -> int:
    """Most pixels a resized (working) image may hold (MAX_WORKING_PIXELS, or the variable)."""
    return pixel_limit(WORKING_PIXELS_VARIABLE, MAX_WORKING_PIXELS)


def image_pixel_limit() -> int:
    """Most pixels an image file may decode to (MAX_IMAGE_PIXELS, or the variable)."""
    return pixel_limit(IMAGE_PIXELS_VARIABLE, MAX_IMAGE_PIXELS)


@dataclass(frozen=True)
class PreprocessingConfig:
    """How an image becomes the model's input (see `patchcore.data.preprocessing`).

    The shorter side is resized to `resize`; `crop="center"` (the reference) then cuts the
    centre `imagesize` x `imagesize`, `crop="none"` keeps the whole image, its longer side
    capped at `max_size` when given. With `crop="none"`, `scale` replaces the resize of the
    shorter side by one factor for every image (a fixed camera: texture and defects keep
    their size in pixels whatever the image's size). With `tile`, the working image is cut
    into `tile` x `tile` tiles overlapping by the fraction `tile_overlap`, each scored on its
    own and stitched back into one map.
    """

    resize: int = 256
    imagesize: int = 224
    crop: str = "center"
    max_size: int | None = None
    tile: int | None = None
    tile_overlap: float = 0.0
    scale: float | None = None

    def __post_init__(self) -> None:
        _require(
            self.crop in CROP_MODES,
            f"--crop must be one of {', '.join(CROP_MODES)}, got '{self.crop}'",
        )
        _require(
            self.resize >= MIN_IMAGE_SIDE,
            f"--resize must be an integer >= {MIN_IMAGE_SIDE}, got {self.resize}",
        )
        working_limit = working_pixel_limit()
        _require(
            self.resize * self.resize <= working_limit,
            f"--resize {self.resize} makes working images of at least {self.resize}x"
            f"{self.resize} pixels, more than the limit of {working_limit} "
            f"({WORKING_PIXELS_VARIABLE}); use at most {math.isqrt(working_limit)}",
        )
        _require(
            self.tile is None or self.tile * self.tile <= working_limit,
            f"--tile {self.tile} makes tiles of more than the limit of {working_limit} pixels "
            f"({WORKING_PIXELS_VARIABLE}); use at most {math.isqrt(working_limit)}",
        )
        _require(
            self.crop == "none" or MIN_IMAGE_SIDE <= self.imagesize <= self.resize,
            f"--imagesize must be between {MIN_IMAGE_SIDE} and --resize ({self.resize}), "
            f"got {self.imagesize}",
        )
        _require(
            self.scale is None or (math.isfinite(self.scale) and self.scale > 0.0),
            f"--scale must be a number > 0, got {self.scale}",
        )
        _require(
            self.scale is None or self.crop == "none",
            "--scale needs --crop none (the centre crop resizes the shorter side to --resize)",
        )
        _require(
            self.max_size is None or self.max_size >= self.resize or self.scale is not None,
            f"--max_size must be >= --resize ({self.resize}), got {self.max_size}",
        )
        _require(
            self.max_size is None or self.max_size >= MIN_IMAGE_SIDE,
            f"--max_size must be >= {MIN_IMAGE_SIDE}, got {self.max_size}",
        )
        _require(
            self.tile is None or self.tile >= MIN_IMAGE_SIDE,
            f"--tile must be an integer >= {MIN_IMAGE_SIDE} pixels, got {self.tile}",
        )
        _require(
            self.tile is None or self.crop == "none" or self.tile <= self.imagesize,
            f"--tile {self.tile} is larger than the {self.imagesize} px centre crop "
            "(--imagesize); use a smaller tile or --crop none",
        )
        _require(
            0.0 <= self.tile_overlap < 1.0,
            f"--tile_overlap must be in [0, 1), got {self.tile_overlap}",
        )


@dataclass(frozen=True)
class SamplerConfig:
    """Memory-bank subsampling.

    `percentage` is the fraction of training patch features kept; the greedy samplers
    project features to `projection_dimension` with a random bias-free linear map first.
    """

    name: str = "approx_greedy_coreset"
    percentage: float = 0.1
    projection_dimension: int = 128
    num_starting_points: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check_seed(self.seed, "the sampler's seed")
        _require(
            self.name in SAMPLER_NAMES,
            f"sampler must be one of {', '.join(SAMPLER_NAMES)}, got '{self.name}'",
        )
        _require(
            0.0 < self.percentage <= 1.0,
            f"sampler --percentage must be in (0, 1], got {self.percentage}",
        )
        _require(self.projection_dimension >= 1, "sampler projection dimension must be >= 1")
        _require(self.num_starting_points >= 1, "sampler number of starting points must be >= 1")


@dataclass(frozen=True)
class IndexConfig:
    """How the memory bank is searched; part of the saved model.

    `exact` is the reference's exhaustive search (FAISS IndexFlatL2 or torch). The others
    are FAISS approximate indexes: `ivf` (IndexIVFFlat: the bank split into `nlist` k-means
    cells, `nprobe` of them searched), `ivfpq` (IndexIVFPQ: the same cells, vectors stored as
    `pq_m` codes of `pq_bits` bits, distances approximated from the codes) and `hnsw`
    (IndexHNSWFlat: a graph with `hnsw_m` links per vector, built with `ef_construction`
    and searched with `ef_search` candidates). `nlist` and `pq_m` left out (None) are chosen
    from the bank: nlist about 4 sqrt(M), pq_m the largest divisor of the dimension up to
    dimension / 16.
    """

    kind: str = "exact"
    nlist: int | None = None
    nprobe: int = 8
    pq_m: int | None = None
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64

    def __post_init__(self) -> None:
        _require(
            self.kind in INDEX_KINDS,
            f"--search must be one of {', '.join(INDEX_KINDS)}, got '{self.kind}'",
        )
        _require(self.nlist is None or self.nlist >= 1, f"--nlist must be >= 1, got {self.nlist}")
        _require(self.nprobe >= 1, f"--nprobe must be >= 1, got {self.nprobe}")
        _require(self.pq_m is None or self.pq_m >= 1, f"--pq_m must be >= 1, got {self.pq_m}")
        _require(1 <= self.pq_bits <= 16, f"--pq_bits must be in [1, 16], got {self.pq_bits}")
        _require(self.hnsw_m >= 2, f"--hnsw_m must be >= 2, got {self.hnsw_m}")
        _require(
            self.ef_construction >= 1, f"--ef_construction must be >= 1, got {self.ef_construction}"
        )
        _require(self.ef_search >= 1, f"--ef_search must be >= 1, got {self.ef_search}")

    @property
    def approximate(self) -> bool:
        return self.kind != "exact"


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that defines one PatchCore model (one backbone).

    `distance` is what the anomaly score is measured in: `squared_l2` (the reference
    implementation, FAISS IndexFlatL2) or `l2` (the paper's notation).
    `score_reweighting` enables the paper's Eq. 7 image-score re-weighting, using the
    `reweighting_neighbours` nearest memory-bank neighbours of the closest bank feature.
    `index` is how the memory bank is searched (exact by default, or a FAISS approximate
    index); it is saved with the model.
    `image_score` is how an image's score comes from its patch scores: `max` (the reference),
    `quantile` (the `image_score_quantile` quantile of the patch scores) or `top_k_mean` (the
    mean of the `image_score_top_k` largest); the last two are less sensitive to the number
    of patches an image has (docs/how-to/wide-parts.md).
    `backbone_statistics` is where the backbone's BatchNorm running statistics come from:
    `reference` (default) reproduces the reference implementation, whose `PatchCore.load`
    passes one constant image through the backbone in training mode before extracting
    anything, which moves those statistics; `pretrained` keeps the untouched ImageNet ones.
    """

    backbone_name: str = "wideresnet50"
    layers: tuple[str, ...] = ("layer2", "layer3")
    pretrained: bool = True
    pretrain_embed_dimension: int = 1024
    target_embed_dimension: int = 1024
    patchsize: int = 3
    patchstride: int = 1
    num_nn: int = 1
    distance: str = "squared_l2"
    score_reweighting: bool = False
    reweighting_neighbours: int = 9
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    index: IndexConfig = field(default_factory=IndexConfig)
    backbone_statistics: str = "reference"
    image_score: str = "max"
    image_score_quantile: float = 0.99
    image_score_top_k: int = 10

    def __post_init__(self) -> None:
        check_seed(self.seed)
        _require(
            self.image_score in IMAGE_SCORES,
            f"--image_score must be one of {', '.join(IMAGE_SCORES)}, got '{self.image_score}'",
        )
        _require(
            isinstance(self.image_score_quantile, (int, float))
            and math.isfinite(self.image_score_quantile)
            and 0.0 < self.image_score_quantile <= 1.0,
            f"--image_score_quantile must be a number in (0, 1], got {self.image_score_quantile}",
        )
        _require(
            isinstance(self.image_score_top_k, int) and self.image_score_top_k >= 1,
            f"--image_score_top_k must be an integer >= 1, got {self.image_score_top_k}",
        )
        _require(
            not (self.score_reweighting and self.image_score != "max"),
            f"--score_reweighting re-weights the highest patch score and is not defined for "
            f"--image_score {self.image_score}; leave one of them out",
        )
        _require(bool(self.backbone_name), "backbone name must not be empty")
        _require(
            self.backbone_statistics in BACKBONE_STATISTICS,
            f"--backbone_statistics must be one of {', '.join(BACKBONE_STATISTICS)}, "
            f"got '{self.backbone_statistics}'",
        )
        _require(len(self.layers) >= 1, "at least one layer to extract from is required")
        _require(
            len(set(self.layers)) == len(self.layers),
            f"layers to extract from must be distinct, got {list(self.layers)}",
        )
        _require(
            self.pretrain_embed_dimension >= 1,
            f"--pretrain_embed_dimension must be >= 1, got {self.pretrain_embed_dimension}",
        )
        _require(
            self.target_embed_dimension >= 1,
            f"--target_embed_dimension must be >= 1, got {self.target_embed_dimension}",
        )
        _require(
            self.patchsize >= 1 and self.patchsize % 2 == 1,
            f"--patchsize must be an odd integer >= 1, got {self.patchsize}",
        )
        _require(self.patchstride >= 1, f"patch stride must be >= 1, got {self.patchstride}")
        _require(self.num_nn >= 1, f"--anomaly_scorer_num_nn must be >= 1, got {self.num_nn}")
        _require(
            self.distance in DISTANCES,
            f"distance must be one of {', '.join(DISTANCES)}, got '{self.distance}'",
        )
        _require(
            self.reweighting_neighbours >= 1,
            f"re-weighting neighbours must be >= 1, got {self.reweighting_neighbours}",
        )
        _require(
            not (self.score_reweighting and self.preprocessing.tile is not None),
            "--score_reweighting is not defined for tiled inspection (--tile): the stitched "
            "maximum has no single nearest bank feature; leave one of them out",
        )


@dataclass(frozen=True)
class SearchConfig:
    """How nearest neighbours are searched at run time (not part of the saved model).

    `backend` is the exact search's engine; all backends are exact. `rerank` (default): a
    low-precision product pass (bfloat16 on CPUs with bfloat16 instructions; float32 when a
    float32 path is forced with $PATCHCORE_PRODUCTS) bounds every distance and only possible
    neighbours are ranked in float32 (falls back to `faiss` without a C compiler or where the
    CPU's fastest products are float32, which FAISS matched, and to `torch` on a GPU). `faiss`: FAISS IndexFlatL2, as the
    reference. `torch`: matrix products. Approximate indexes (`IndexConfig`) are always FAISS.
    `bank_storage="mmap"` keeps the memory bank in a memory-mapped file (the model folder's
    bank file, or a temporary file under TMPDIR while fitting) instead of in RAM, searched
    by FAISS in blocks, so a bank larger than memory can be used. `index`, when given,
    replaces the model's saved `IndexConfig` for this run (the index is rebuilt from the bank).
    `backbone_runtime` is what runs the backbone, also a run-time choice: `torch` (eager,
    channels-last, BatchNorm folded into the convolutions; the default), `torch-unfolded`
    (eager, channels-last, the network's layers as they are) or `torchscript` (traced,
    frozen, oneDNN graph fusion; CPU only). All compute the same features up to float
    rounding (scores within 1e-5 relative, docs/explanations/performance-inference.md).
    """

    backend: str = "rerank"
    faiss_on_gpu: bool = False
    faiss_num_workers: int = 4
    query_chunk_size: int = 4096
    bank_storage: str = "memory"
    index: IndexConfig | None = None
    backbone_runtime: str = "torch"

    def __post_init__(self) -> None:
        _require(
            self.backbone_runtime in BACKBONE_RUNTIMES,
            f"--backbone_runtime must be one of {', '.join(BACKBONE_RUNTIMES)}, "
            f"got '{self.backbone_runtime}'",
        )
        _require(
            self.backend in SEARCH_BACKENDS,
            f"nearest-neighbour backend must be one of {', '.join(SEARCH_BACKENDS)}, "
            f"got '{self.backend}'",
        )
        _require(
            self.bank_storage in BANK_STORAGES,
            f"--bank_storage must be one of {', '.join(BANK_STORAGES)}, got '{self.bank_storage}'",
        )
        _require(self.faiss_num_workers >= 1, "--faiss_num_workers must be >= 1")
        _require(self.query_chunk_size >= 1, "query chunk size must be >= 1")


DATASET_NAMES = ("mvtec", "folder")


@dataclass(frozen=True)
class DatasetConfig:
    """Which data a run uses and how it is loaded."""

    name: str
    data_path: str
    categories: tuple[str, ...]
    train_val_split: float = 1.0
    batch_size: int = 2
    num_workers: int = field(default_factory=default_loader_workers)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    mask_rule: str = "reference"

    def __post_init__(self) -> None:
        _require(
            self.name in DATASET_NAMES,
            f"dataset must be one of {', '.join(DATASET_NAMES)}, got '{self.name}'",
        )
        _require(len(self.categories) >= 1, "dataset needs at least one -d/--subdatasets")
        _require(
            0.0 < self.train_val_split <= 1.0,
            f"--train_val_split must be in (0, 1], got {self.train_val_split}",
        )
        check_loader_settings(self.batch_size, self.num_workers)
        _require(
            self.mask_rule in MASK_RULES,
            f"--mask_rule must be one of {', '.join(MASK_RULES)}, got '{self.mask_rule}'",
        )

    def run_name(self, category: str) -> str:
        """Name of one evaluated dataset in results and folders, e.g. `mvtec_bottle`."""
        return f"{self.name}_{category}"
