"""A PatchCore model as one self-contained `torch.nn.Module`: images in, scores and maps out.

Evaluators that know nothing about this project construct the class without arguments and
restore a category's model from a plain weights file:

    module = PatchCoreModule()
    module.load_state_dict(torch.load("weights/bottle.pth", weights_only=True))
    outputs = module(images)  # images: float32 RGB [B, 3, H, W] in [0, 1]

Everything lives in the state dict as tensors: the configuration (UTF-8 JSON in a uint8
buffer), the memory bank, the backbone's weights and input normalisation, the decision
threshold and the normal-data statistics (NaN when absent). Loading reads the
configuration first, builds the backbone without downloading anything, sizes the buffers,
then loads them with the usual strict checks on missing and unexpected keys. Files of format
version 1 (patchcore 0.1) load too.

`forward` preprocesses with the model's saved geometry (`patchcore.data.preprocessing.
to_model_input`), scores through the one scorer (`patchcore.model.scoring.score_images`,
with the exact bank-chunked search of `patchcore.model.chunked_search`, so no FAISS is
needed and memory stays bounded), and maps the anomaly map back onto the input frame
(`map_to_input_frame`): pixels outside a centre crop, which the model never saw, take the
value of the nearest crop edge. A map always has the input's height and width.

`FixedSizePatchCore` is the same computation for one input size, with the threshold's
decision inside: the graph that `patchcore-export` writes as ONNX and OpenVINO IR. Both run
`PatchCoreModule.score`, so an exported graph computes what the module computes.
`AnySizePatchCore` is the graph for inputs of any size (dynamic height, width and batch):
the same scorer, with what depends on the input size alone (Pillow's resize windows, the
tiles' places, the map's sampling back onto the input) given as inputs computed per size by
`any_size_inputs`, and the map's upsampling and blur computed inside the graph.
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch

from patchcore import __version__
from patchcore.config import PatchCoreConfig
from patchcore.data.preprocessing import (
    EIGHT_BIT_MAX,
    AxisGeometry,
    ResizeTaps,
    apply_taps,
    cut_tiles,
    frame_of,
    frame_sampling,
    input_geometry,
    input_size_problem,
    map_to_input_frame,
    model_input_problem,
    resamples_rows_first,
    resize_taps,
    tile_indices,
    to_model_input,
)
from patchcore.errors import ConfigurationError, DataError, ModelFormatError
from patchcore.model.calibration import NormalStatistics, decide
from patchcore.model.chunked_search import DEFAULT_BANK_CHUNK_SIZE, BankChunkedSearch
from patchcore.model.features import build_embedder
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import (
    DEFAULT_SIGMA,
    memory_bank_problem,
    resize_and_blur_matrix,
    score_images,
    score_patches,
    stitch_tiles,
)
from patchcore.model.serialization import (
    config_fields,
    config_from_meta,
    exact_search_config,
    oldest_version,
    records_backbone_statistics,
    records_image_score,
    records_scale,
)

FORMAT_NAME = "patchcore-challenge-module"
# 3: preprocessing.scale; 4: backbone_statistics (the buffers hold the statistics either
# way; older files predate the reference's pass and describe "pretrained"); 5: image_score
# (files without it score by the largest patch score). Each written only by modules that
# record it.
FORMAT_VERSION = 5
BACKBONE_STATISTICS_FORMAT_VERSION = 4
SCALE_FORMAT_VERSION = 3
WITHOUT_SCALE_FORMAT_VERSION = 2
CONFIG_KEY = "patchcore_config_json"
BANK_KEY = "memory_bank"
EMBEDDER_PREFIX = "embedder.extractor."
VERSION_1_EMBEDDER_PREFIX = "feature_extractor."
STATISTICS_FIELDS = tuple(field.name for field in dataclasses.fields(NormalStatistics))
OUTPUT_NAMES = ("pred_score", "anomaly_map", "pred_label")


# ------------------------------------------------------------------ configuration blob
def encode_json(data: dict) -> torch.Tensor:
    """A JSON-serialisable dict as a uint8 tensor of its UTF-8 text."""
    return torch.tensor(list(json.dumps(data, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode_json(tensor: torch.Tensor) -> dict:
    """Inverse of `encode_json`; ModelFormatError when the bytes are not a JSON object."""
    text = bytes(tensor.detach().to("cpu", torch.uint8).tolist())
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"state dict entry '{CONFIG_KEY}' is not JSON ({error})") from error
    if not isinstance(data, dict):
        raise ModelFormatError(f"state dict entry '{CONFIG_KEY}' is not a JSON object")
    return data


def config_blob(config: PatchCoreConfig) -> dict:
    """The self-description stored under CONFIG_KEY."""
    return {
        "format": FORMAT_NAME,
        "format_version": oldest_version(
            config,
            WITHOUT_SCALE_FORMAT_VERSION,
            [
                (records_scale, SCALE_FORMAT_VERSION),
                (records_backbone_statistics, BACKBONE_STATISTICS_FORMAT_VERSION),
                (records_image_score, FORMAT_VERSION),
            ],
        ),
        "library_version": __version__,
        "config": config_fields(config),
        "normal_statistics_fields": list(STATISTICS_FIELDS),
    }


def config_from_blob(blob: dict) -> PatchCoreConfig:
    """The model configuration in a CONFIG_KEY blob, after checking its format version."""
    return config_from_meta(blob, f"state dict entry '{CONFIG_KEY}'", FORMAT_NAME, FORMAT_VERSION)


def statistics_tensor(statistics: NormalStatistics | None) -> torch.Tensor:
    """NormalStatistics as float64 [len(STATISTICS_FIELDS)]; all NaN for None."""
    if statistics is None:
        return torch.full((len(STATISTICS_FIELDS),), math.nan, dtype=torch.float64)
    values = [float(getattr(statistics, name)) for name in STATISTICS_FIELDS]
    return torch.tensor(values, dtype=torch.float64)


def statistics_from_tensor(values: torch.Tensor) -> NormalStatistics | None:
    """Inverse of `statistics_tensor`."""
    numbers = values.detach().to("cpu", torch.float64).tolist()
    if all(math.isnan(number) for number in numbers):
        return None
    fields = dict(zip(STATISTICS_FIELDS, numbers, strict=True))
    fields["num_images"] = int(fields["num_images"])
    return NormalStatistics(**fields)


class PatchCoreModule(torch.nn.Module):
    """One category's PatchCore model: images in, image scores and input-sized maps out.

    `PatchCoreModule()` is empty until `load_state_dict` (or use `from_patchcore`).
    `forward(images)` takes float RGB [B, 3, H, W] in [0, 1] and returns
    `pred_score` [B], the anomaly map [B, H, W] under both `anomaly_maps` and
    `anomaly_map`, and, when the weights carry a threshold, `pred_label` [B] (bool,
    `patchcore.model.calibration.decide`: above the threshold or not finite).
    `bank_chunk_size` bounds the search's memory (see `patchcore.model.chunked_search`).
    An empty batch, NaN or infinite values, or values outside [0, 1] beyond rounding (0..255
    pixels, mean/std-normalised images) raise a DataError saying so; in a traced or exported
    graph, where values cannot be checked, a non-finite score is still a reject.
    A memory bank holding NaN or infinite values is refused by `load_state_dict`.
    """

    def __init__(self, bank_chunk_size: int = DEFAULT_BANK_CHUNK_SIZE) -> None:
        super().__init__()
        self.config: PatchCoreConfig | None = None
        self.embedder: torch.nn.Module | None = None
        self.bank_chunk_size = bank_chunk_size
        self.register_buffer(CONFIG_KEY, torch.zeros(0, dtype=torch.uint8))
        self.register_buffer(BANK_KEY, torch.zeros(0, 0))
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("normal_statistics", statistics_tensor(None))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_patchcore(cls, model: PatchCore, threshold: float | None = None) -> PatchCoreModule:
        """A module scoring like `model`; threshold defaults to the model's calibrated one.

        The module is built the way `load_state_dict` builds it, so an export that
        succeeds here also loads in an evaluator.
        """
        if model.memory_bank is None:
            raise ModelFormatError("cannot export a model that has not been fitted")
        statistics = model.normal_statistics
        if threshold is None and statistics is not None:
            threshold = statistics.threshold
        module = cls()
        module._configure(exact_search_config(model.config))  # the module searches exactly
        module.embedder.load_state_dict(model.embedder.state_dict())
        module.memory_bank = model.memory_bank.detach().to("cpu", torch.float32).clone()
        module.threshold = torch.tensor(
            math.nan if threshold is None else float(threshold), dtype=torch.float64
        )
        module.normal_statistics = statistics_tensor(statistics)
        return module.to(model.device)

    def _configure(self, config: PatchCoreConfig) -> None:
        """Builds the embedder of `config` (placeholder weights) on this module's device."""
        device = self.memory_bank.device
        self.config = config
        self.embedder = build_embedder(config, placeholder_weights=True).to(device)
        setattr(self, CONFIG_KEY, encode_json(config_blob(config)).to(device))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        """Builds the structure the incoming configuration describes, then loads as usual.

        torch calls this before descending into child modules, so the backbone built here
        receives its weights in the same `load_state_dict` call. Version-1 files name the
        backbone's entries `feature_extractor.*`; they are renamed in place.
        """
        encoded = state_dict.get(prefix + CONFIG_KEY)
        if encoded is not None:
            blob = decode_json(encoded)
            config = config_from_blob(blob)
            if blob.get("format_version") == 1:
                _rename_version_1_keys(state_dict, prefix)
            if config != self.config:
                self._configure(config)
            setattr(self, CONFIG_KEY, torch.empty_like(encoded, device=self.memory_bank.device))
        bank = state_dict.get(prefix + BANK_KEY)
        if bank is not None and self.config is not None:
            self._check_bank(bank)
            setattr(self, BANK_KEY, torch.empty(bank.shape, device=self.memory_bank.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def _check_bank(self, bank: torch.Tensor) -> None:
        problem = memory_bank_problem(bank, self.config.target_embed_dimension)
        if problem is not None:
            raise ModelFormatError(
                f"state dict entry '{BANK_KEY}' {problem}; the weights file is damaged"
            )

    # ---------------------------------------------------------------- properties
    @property
    def decision_threshold(self) -> float | None:
        """The image-score threshold of `pred_label`, or None."""
        value = float(self.threshold)
        return None if math.isnan(value) else value

    def statistics(self) -> NormalStatistics | None:
        """The held-out normal images' statistics the model was calibrated with, or None."""
        return statistics_from_tensor(self.normal_statistics)

    # ------------------------------------------------------------------ scoring
    def _require_config(self) -> PatchCoreConfig:
        if self.config is None:
            raise ModelFormatError(
                "PatchCoreModule holds no model: load_state_dict(torch.load(<category>.pth)) "
                "or use PatchCoreModule.from_patchcore(model) first"
            )
        return self.config

    def score(
        self, images: torch.Tensor, geometry: tuple[AxisGeometry, AxisGeometry]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images [B, 3, H, W] on the module's device and their `input_geometry` ->
        image scores [B] and anomaly maps [B, H, W]: the computation every runtime runs."""
        config = self._require_config()
        model_input = to_model_input(images, config.preprocessing, geometry)
        search = BankChunkedSearch(self.memory_bank, self.bank_chunk_size)
        prediction = score_images(self.embedder, search, config, model_input)
        maps = map_to_input_frame(prediction.maps, tuple(images.shape[-2:]), config.preprocessing)
        return prediction.scores, maps

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images float [B, 3, H, W] in [0, 1] -> pred_score, anomaly_maps/anomaly_map [B, H, W].

        Runs without autograd, but not in inference mode, so callers may modify the returned
        tensors in place.
        """
        config = self._require_config()
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise DataError(
                "PatchCoreModule expects float RGB images [B, 3, H, W] in [0, 1], got "
                f"{images.dtype} {list(images.shape)}"
            )
        problem = model_input_problem(images) if _eager() else None
        if problem is not None:
            raise DataError(f"PatchCoreModule: {problem}")
        images = images.to(self.memory_bank.device, torch.float32)
        geometry = input_geometry(tuple(images.shape[-2:]), config.preprocessing)
        scores, maps = self.score(images, geometry)
        outputs = {"pred_score": scores, "anomaly_maps": maps, "anomaly_map": maps}
        threshold = self.decision_threshold
        if threshold is not None:
            outputs["pred_label"] = decide(scores, threshold)
        return outputs


_AXES = ("rows", "columns")


class FixedSizePatchCore(torch.nn.Module):
    """A `PatchCoreModule` for inputs of one (height, width): the exported graph.

    `forward(images)` takes float RGB [B, 3, height, width] in [0, 1], any B, and returns
    the tuple (pred_score [B], anomaly_map [B, height, width]) followed, when the module
    carries a threshold, by pred_label [B] (bool, `decide`). The resize taps of the input
    size are computed once here and held as buffers, so a traced graph holds them as
    constants.
    """

    def __init__(self, module: PatchCoreModule, input_size: tuple[int, int]) -> None:
        super().__init__()
        config = module._require_config()
        self.module = module
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.threshold = module.decision_threshold
        geometry = input_geometry(self.input_size, config.preprocessing)
        self._slices = tuple((axis.start, axis.length, axis.resized) for axis in geometry)
        self._resized = tuple(axis.taps is not None for axis in geometry)
        device = module.memory_bank.device
        for name, axis in zip(_AXES, geometry, strict=True):
            if axis.taps is not None:
                self.register_buffer(f"{name}_indices", axis.taps.indices.clone().to(device))
                self.register_buffer(f"{name}_high", axis.taps.high.clone().to(device))
                self.register_buffer(f"{name}_low", axis.taps.low.clone().to(device))

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.threshold is not None else OUTPUT_NAMES[:2]

    def geometry(self) -> tuple[AxisGeometry, AxisGeometry]:
        axes = []
        for name, (start, length, size), resized in zip(
            _AXES, self._slices, self._resized, strict=True
        ):
            taps = None
            if resized:
                taps = ResizeTaps(
                    getattr(self, f"{name}_indices"),
                    getattr(self, f"{name}_high"),
                    getattr(self, f"{name}_low"),
                )
            axes.append(AxisGeometry(start, length, taps, size))
        return axes[0], axes[1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        expected = (3, *self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise DataError(
                f"this exported model takes float RGB images [B, {', '.join(map(str, expected))}]"
                f", got {list(images.shape)}"
            )
        scores, maps = self.module.score(images, self.geometry())
        if self.threshold is None:
            return scores, maps
        return scores, maps, decide(scores, self.threshold)


# ------------------------------------------------------------- any input size
# The inputs of a graph for images of any size, after `images`: what depends on the image's
# size only, computed outside the graph by `any_size_inputs` (patchcore.apps.runtimes does it
# per image size). Pillow's 8-bit resize, which the model's preprocessing reproduces pixel for
# pixel, places its windows by integer truncation of double-precision positions; OpenVINO
# computes at float32, so those windows are computed here and given to the graph.
# `resize1`..`resize3`: the passes of Pillow's resize (and the crop) as taps over columns,
# rows, columns (the first or the last column pass is the identity, by Pillow's order);
# each `_indices` int64 [out, K] and `_weights` float32 [2, out, K] (the high and low parts
# of the fixed-point weights, `ResizeTaps`). `map_rows` / `map_columns`: how each input pixel
# samples the map on the model's frame (`frame_sampling`), `_indices` int64 [L, 2] and
# `_weights` float32 [L, 2]. With tiles, `tile_rows` / `tile_columns` int64 [T, tile]: the
# working-image rows and columns of each row and column of tiles (`tile_indices`).
RESIZE_PASSES = ("resize1", "resize2", "resize3")
MAP_AXES = ("map_rows", "map_columns")
TILE_INPUT_NAMES = ("tile_rows", "tile_columns")
GEOMETRY_INPUT_NAMES = tuple(
    f"{name}_{part}" for name in (*RESIZE_PASSES, *MAP_AXES) for part in ("indices", "weights")
)


def geometry_input_names(config: PatchCoreConfig) -> tuple[str, ...]:
    """The inputs after `images` of an any-size graph of a model of `config`."""
    tiles = TILE_INPUT_NAMES if config.preprocessing.tile is not None else ()
    return GEOMETRY_INPUT_NAMES + tiles


def any_size_inputs(
    size: tuple[int, int], config: PatchCoreConfig, name: str | None = None
) -> dict[str, torch.Tensor]:
    """The geometry inputs (`geometry_input_names`) of an any-size graph for images of
    (height, width) `size`: CPU tensors. A DataError for a size that cannot be scored, with
    its `input_size_problem` (naming `name`, default the size): its working image is smaller
    than the patch grid needs or than a tile, or holds more pixels than the working limit,
    or a resize shrinks it more than can be computed exactly."""
    preprocessing = config.preprocessing
    height, width = int(size[0]), int(size[1])
    problem = input_size_problem((height, width), preprocessing, name)
    if problem is not None:
        raise DataError(problem)
    frame = frame_of((height, width), preprocessing)
    rows, columns = (resize_taps(*axis) for axis in frame.axis_resizes())
    if resamples_rows_first((height, width), frame.resized):
        passes = (resize_taps(width, width), rows, columns)
    else:
        passes = (columns, rows, resize_taps(frame.size[1], frame.size[1]))
    inputs = {}
    for key, taps in zip(RESIZE_PASSES, passes, strict=True):
        inputs[f"{key}_indices"] = taps.indices
        inputs[f"{key}_weights"] = torch.stack([taps.high, taps.low])
    for key, (indices, weights) in zip(
        MAP_AXES, frame_sampling((height, width), preprocessing), strict=True
    ):
        inputs[f"{key}_indices"] = indices
        inputs[f"{key}_weights"] = weights
    if preprocessing.tile is not None:
        tiles = tile_indices(frame.size, preprocessing.tile, preprocessing.tile_overlap)
        inputs.update(zip(TILE_INPUT_NAMES, tiles, strict=True))
    return inputs


def _sample(matrix: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rows of `matrix` [N, C] mixed by taps: indices [L, 2], weights [L, 2] -> [L, C]."""
    picked = matrix.index_select(0, indices.reshape(-1)).reshape(
        indices.shape[0], indices.shape[1], matrix.shape[1]
    )
    return (picked * weights[:, :, None]).sum(dim=1)


class AnySizePatchCore(torch.nn.Module):
    """A `PatchCoreModule` for inputs of any (height, width): the exported graph with
    dynamic spatial dimensions (and a dynamic batch).

    `forward(images, *geometry)` takes float RGB [B, 3, H, W] in [0, 1] and the geometry
    inputs of (H, W) (`any_size_inputs`, in the order of `geometry_input_names`), and
    returns what `FixedSizePatchCore` returns: (pred_score [B], anomaly_map [B, H, W]) and,
    with a threshold, pred_label [B]. Scores come from the module's own scorer
    (`score_patches`, and with tiles its own `cut_tiles` and `stitch_tiles`); the resize,
    the map's upsampling, blur and return to the input's frame are written with the sizes as
    graph values, so one graph serves every size.
    """

    def __init__(self, module: PatchCoreModule, sigma: float = DEFAULT_SIGMA) -> None:
        super().__init__()
        self.config = module._require_config()
        if self.config.preprocessing.tile is not None and self.config.image_score != "max":
            # The tiled image score pools the stitched map to a patch grid whose size depends
            # on the image's size; the graph has no size-generic form of that step.
            raise ConfigurationError(
                f"a tiled model with --image_score {self.config.image_score} exports for one "
                "input size only; give --input_size HEIGHTxWIDTH"
            )
        self.module = module
        self.threshold = module.decision_threshold
        self.sigma = sigma
        self.input_names = ("images", *geometry_input_names(self.config))

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.threshold is not None else OUTPUT_NAMES[:2]

    def _model_input(self, images: torch.Tensor, taps: list[ResizeTaps]) -> torch.Tensor:
        """`to_model_input` with the passes as given: columns, rows, columns."""
        pixels = torch.round(images.float() * EIGHT_BIT_MAX)
        for dim, pass_taps in zip((-1, -2, -1), taps, strict=True):
            pixels = apply_taps(pixels, dim, pass_taps)
        return pixels / EIGHT_BIT_MAX

    @torch.no_grad()
    def forward(self, images: torch.Tensor, *geometry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names[1:], geometry, strict=True))
        taps = [
            ResizeTaps(inputs[f"{name}_indices"], *inputs[f"{name}_weights"].unbind(0))
            for name in RESIZE_PASSES
        ]
        model_input = self._model_input(images, taps)
        working = (model_input.shape[-2], model_input.shape[-1])
        search = BankChunkedSearch(self.module.memory_bank, self.module.bank_chunk_size)
        if self.config.preprocessing.tile is None:
            features, grid = self.module.embedder(model_input)
            patch_scores, scores = score_patches(features, grid, search, self.config)
            rows = resize_and_blur_matrix(grid[0], working[0], self.sigma, images.device)
            columns = resize_and_blur_matrix(grid[1], working[1], self.sigma, images.device)
            maps = patch_scores.float()
        else:
            tile_rows, tile_columns = inputs["tile_rows"], inputs["tile_columns"]
            features, grid = self.module.embedder(cut_tiles(model_input, tile_rows, tile_columns))
            patch_scores, _ = score_patches(features, grid, search, self.config)
            maps = stitch_tiles(patch_scores, tile_rows, tile_columns, working)
            scores = maps.flatten(1).amax(dim=1)
            rows = resize_and_blur_matrix(working[0], working[0], self.sigma, images.device)
            columns = resize_and_blur_matrix(working[1], working[1], self.sigma, images.device)
        rows = _sample(rows, inputs["map_rows_indices"], inputs["map_rows_weights"])
        columns = _sample(columns, inputs["map_columns_indices"], inputs["map_columns_weights"])
        maps = rows @ maps @ columns.T
        if self.threshold is None:
            return scores, maps
        return scores, maps, decide(scores, self.threshold)


def _eager() -> bool:
    """False while a graph is traced, compiled or exported: the value checks of the input
    (finite, in range, not empty) need concrete values and run in eager mode only."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or compiling)


def _rename_version_1_keys(state_dict, prefix: str) -> None:
    old = prefix + VERSION_1_EMBEDDER_PREFIX
    for key in [key for key in state_dict if key.startswith(old)]:
        state_dict[prefix + EMBEDDER_PREFIX + key[len(old) :]] = state_dict.pop(key)
