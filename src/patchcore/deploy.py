"""A PatchCore model as one self-contained `torch.nn.Module`, for challenge-style evaluators.

Evaluators that know nothing about this project construct the class without arguments and
restore a category's model from a plain weights file:

    module = PatchCoreModule()
    module.load_state_dict(torch.load("weights/bottle.pth"))  # weights_only=True works
    outputs = module(images)  # images: float32 RGB [B, 3, H, W] in [0, 1]

Everything lives in the state dict as tensors: the configuration (UTF-8 JSON in a uint8
buffer), the memory bank, the backbone's weights and input normalisation, the decision
threshold and the normal-data statistics (NaN when absent). Loading reads the
configuration first, builds the backbone without downloading anything, sizes the buffers,
then loads them with the usual strict checks on missing and unexpected keys.

`forward` does its own preprocessing, with the dataset pipeline's geometry: the shorter
side is resized to `preprocessing.resize` (bilinear, antialiased), then centre-cropped to
`preprocessing.imagesize`. The anomaly map is computed at the crop's size, exactly as
`PatchCore.predict` computes it, then mapped back onto the input frame: each input pixel
takes the crop map's bilinear value at the point the resize sent it to; pixels outside the
crop (which the model never saw) take the value of the nearest crop edge. A map therefore
always has the input's height and width.

Search is exact and pure torch, so a module runs on any device without FAISS.
`export_challenge_models` (and `bin/export_challenge_models.py`) writes one
`<category>.pth` per saved model folder, plus a `requirements.txt`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import click
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

from patchcore import __version__
from patchcore.anomaly_maps import DEFAULT_SIGMA, patch_scores_to_maps
from patchcore.backbones import EFFICIENTNET_LITE0, TORCHVISION_ALIASES, load_backbone
from patchcore.cli_support import configure_process, run_guarded
from patchcore.config import DATASET_NAMES, PatchCoreConfig, PreprocessingConfig, SearchConfig
from patchcore.errors import ConfigurationError, DataError, ModelFormatError
from patchcore.feature_extraction import FeatureExtractor
from patchcore.files import atomic_write
from patchcore.model import NormalStatistics, PatchCore, reweighting_factor
from patchcore.model_io import PARAMS_FILE, config_from_meta, load_models
from patchcore.nearest_neighbours import TorchNearestNeighbours
from patchcore.patch_features import PatchFeatureAggregator

LOGGER = logging.getLogger(__name__)

FORMAT_NAME = "patchcore-challenge-module"
FORMAT_VERSION = 1
CONFIG_KEY = "patchcore_config_json"
BANK_KEY = "memory_bank"
STATISTICS_FIELDS = tuple(field.name for field in dataclasses.fields(NormalStatistics))
WEIGHTS_SUFFIX = ".pth"
ALTERNATIVE_SUFFIX = ".pt"
REQUIREMENTS_FILE = "requirements.txt"

# What importing patchcore.deploy needs besides the patchcore package itself.
BASE_REQUIREMENTS = ("torch>=2.1", "torchvision>=0.16", "numpy>=1.24", "tqdm>=4.60", "click>=8.1")
EFFICIENTNET_REQUIREMENTS = ("efficientnet-lite-pytorch==0.1.0",)
TIMM_REQUIREMENTS = ("timm",)


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
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": dataclasses.asdict(config),
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


# ---------------------------------------------------------------------- geometry
def resized_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side of `size` to `resize` (torchvision's rule)."""
    height, width = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)
    return (new_long, resize) if width <= height else (resize, new_long)


def crop_offsets(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(top, left) of a centre crop of `crop` x `crop` from `size` (torchvision's rule)."""
    return round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)


def preprocess(images: torch.Tensor, preprocessing: PreprocessingConfig) -> torch.Tensor:
    """images [B, 3, H, W] -> shorter side resized (antialiased), then centre-cropped."""
    resized = TF.resize(images, [preprocessing.resize], antialias=True)
    return TF.center_crop(resized, [preprocessing.imagesize])


def uncrop_maps(
    maps: torch.Tensor, input_size: tuple[int, int], preprocessing: PreprocessingConfig
) -> torch.Tensor:
    """Crop-sized maps [B, c, c] -> maps [B, H, W] on the frame of an input of `input_size`.

    Each input pixel centre is sent where the resize sent it, and the crop map is sampled
    there bilinearly (the geometry of `align_corners=False` resizing). Points outside the
    crop take the nearest crop-edge value. With an identity resize, the crop region of the
    result equals `maps`.
    """
    crop = preprocessing.imagesize
    resized = resized_size(input_size, preprocessing.resize)
    top, left = crop_offsets(resized, crop)
    axes = []
    for length, new_length, offset in zip(input_size, resized, (top, left), strict=True):
        centres = torch.arange(length, device=maps.device, dtype=torch.float64) + 0.5
        in_crop = centres * (new_length / length) - offset
        axes.append((2.0 * in_crop / crop - 1.0).float())
    rows, columns = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack((columns, rows), dim=-1).expand(len(maps), -1, -1, -1)
    sampled = F.grid_sample(
        maps.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.squeeze(1)


# ----------------------------------------------------------------------- scoring
def build_feature_extractor(config: PatchCoreConfig) -> FeatureExtractor:
    """The backbone graph of `config` with placeholder weights (never downloads)."""
    backbone = load_backbone(config.backbone_name, pretrained=False, init_seed=config.seed)
    return FeatureExtractor(backbone, config.layers)


class PatchCoreModule(torch.nn.Module):
    """One category's PatchCore model: images in, image scores and input-sized maps out.

    `PatchCoreModule()` is empty until `load_state_dict` (or use `from_patchcore`).
    `forward(images)` takes float RGB [B, 3, H, W] in [0, 1] and returns
    `pred_score` [B], the anomaly map [B, H, W] under both `anomaly_maps` and
    `anomaly_map`, and, when the weights carry a threshold, `pred_label` [B] (bool,
    score > threshold).
    """

    def __init__(self) -> None:
        super().__init__()
        self.config: PatchCoreConfig | None = None
        self.feature_extractor: FeatureExtractor | None = None
        self.aggregator: PatchFeatureAggregator | None = None
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
        module._configure(model.config)
        module.feature_extractor.load_state_dict(model.feature_extractor.state_dict())
        module.memory_bank = model.memory_bank.detach().to("cpu", torch.float32).clone()
        module.threshold = torch.tensor(
            math.nan if threshold is None else float(threshold), dtype=torch.float64
        )
        module.normal_statistics = statistics_tensor(statistics)
        return module.to(model.device)

    def _configure(self, config: PatchCoreConfig) -> None:
        """Builds the backbone graph and patch aggregator of `config` on this module's device."""
        device = self.memory_bank.device
        self.config = config
        self.feature_extractor = build_feature_extractor(config).to(device)
        self.aggregator = PatchFeatureAggregator(
            config.patchsize,
            config.patchstride,
            config.pretrain_embed_dimension,
            config.target_embed_dimension,
        )
        setattr(self, CONFIG_KEY, encode_json(config_blob(config)).to(device))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        """Builds the structure the incoming configuration describes, then loads as usual.

        torch calls this before descending into child modules, so the backbone built here
        receives its weights in the same `load_state_dict` call.
        """
        encoded = state_dict.get(prefix + CONFIG_KEY)
        if encoded is not None:
            config = config_from_blob(decode_json(encoded))
            if config != self.config:
                self._configure(config)
            setattr(self, CONFIG_KEY, torch.empty_like(encoded, device=self.memory_bank.device))
        bank = state_dict.get(prefix + BANK_KEY)
        if bank is not None and self.config is not None:
            self._check_bank_shape(bank)
            setattr(self, BANK_KEY, torch.empty(bank.shape, device=self.memory_bank.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def _check_bank_shape(self, bank: torch.Tensor) -> None:
        dimension = self.config.target_embed_dimension
        if bank.ndim != 2 or bank.shape[1] != dimension or not len(bank):
            raise ModelFormatError(
                f"state dict entry '{BANK_KEY}' must have shape [M > 0, {dimension}], "
                f"got {list(bank.shape)}"
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

    def _scores(
        self, features: torch.Tensor, grid: tuple[int, int], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores [B, h, w] and image scores [B] of patch features [B*h*w, D]."""
        config = self.config
        index = TorchNearestNeighbours(self.memory_bank.device)
        index.fit(self.memory_bank)
        squared, neighbours = index.search(features, config.num_nn)
        distances = squared if config.distance == "squared_l2" else squared.sqrt()
        patch_scores = distances.mean(dim=1).reshape(batch, *grid)
        image_scores, worst_patch = patch_scores.reshape(batch, -1).max(dim=1)
        if config.score_reweighting:
            patches = grid[0] * grid[1]
            image_scores = image_scores * reweighting_factor(
                features.reshape(batch, patches, -1),
                neighbours.reshape(batch, patches, -1),
                worst_patch,
                index,
                config.reweighting_neighbours,
            )
        return patch_scores, image_scores

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
        images = images.to(self.memory_bank.device, torch.float32)
        cropped = preprocess(images, config.preprocessing)
        features, grid = self.aggregator(self.feature_extractor(cropped))
        patch_scores, image_scores = self._scores(features, grid, len(images))
        maps = patch_scores_to_maps(patch_scores, tuple(cropped.shape[-2:]), DEFAULT_SIGMA)
        maps = uncrop_maps(maps, tuple(images.shape[-2:]), config.preprocessing)
        outputs = {"pred_score": image_scores, "anomaly_maps": maps, "anomaly_map": maps}
        threshold = self.decision_threshold
        if threshold is not None:
            outputs["pred_label"] = image_scores > threshold
        return outputs


# ------------------------------------------------------------------------ export
def _is_model_folder(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob(f"*{PARAMS_FILE}"))


def find_model_folders(path: Path) -> list[Path]:
    """Model folders of `path`: itself, its sub-folders, or the sub-folders of its models/."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigurationError(f"{path}: not a folder")
    if _is_model_folder(path):
        return [path]
    parent = path / "models" if (path / "models").is_dir() else path
    folders = sorted(child for child in parent.iterdir() if _is_model_folder(child))
    if not folders:
        raise ModelFormatError(
            f"{path}: no model folders found (a model folder holds {PARAMS_FILE}; looked in "
            f"{path} and its sub-folders{' and models/' if parent != path else ''})"
        )
    return folders


def category_name(folder: Path) -> str:
    """A model folder's category: `mvtec_bottle` -> `bottle`; other names are kept."""
    dataset, separator, rest = Path(folder).name.partition("_")
    return rest if separator and rest and dataset in DATASET_NAMES else Path(folder).name


def backbone_requirements(backbone_name: str) -> tuple[str, ...]:
    """Packages beyond torch/torchvision that building `backbone_name` needs."""
    if backbone_name == EFFICIENTNET_LITE0:
        return EFFICIENTNET_REQUIREMENTS
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    if TORCHVISION_ALIASES.get(backbone_name, backbone_name) in torchvision_names:
        return ()
    return TIMM_REQUIREMENTS


def requirements_text(configs: Sequence[PatchCoreConfig]) -> str:
    """requirements.txt for evaluating modules of `configs`, with how to get PatchCoreModule."""
    extra = [line for config in configs for line in backbone_requirements(config.backbone_name)]
    lines = [
        "# Runtime requirements of patchcore.deploy.PatchCoreModule, written by",
        (
            f"# export_challenge_models.py (patchcore {__version__}, exported with torch "
            f"{torch.__version__}, torchvision {torchvision.__version__})."
        ),
        "# PatchCoreModule is part of the patchcore package: install it as well",
        "# (pip install <patchcore source folder>) or put its src/ folder on PYTHONPATH.",
        *BASE_REQUIREMENTS,
        *dict.fromkeys(extra),
    ]
    return "\n".join(lines) + "\n"


def load_single_model(folder: Path) -> PatchCore:
    """The model of a folder on the CPU; ensembles are refused."""
    models = load_models(folder, "cpu", SearchConfig(backend="torch"))
    if len(models) != 1:
        raise ConfigurationError(
            f"{folder}: an ensemble of {len(models)} models; challenge export supports "
            "single-backbone models only"
        )
    return models[0]


def _unique_categories(folders: list[Path]) -> dict[str, Path]:
    categories: dict[str, Path] = {}
    for folder in folders:
        name = category_name(folder)
        if name in categories:
            raise ConfigurationError(
                f"{folder} and {categories[name]} are both category '{name}'; export them "
                "to different output folders"
            )
        categories[name] = folder
    return categories


def export_challenge_models(
    sources: Sequence[Path], output_folder: Path, also_pt: bool = False
) -> list[Path]:
    """Writes `<category>.pth` (and `.pt` with also_pt) per model folder plus requirements.txt.

    `sources` are model folders, folders of model folders, or run folders with a models/
    folder. Returns the written paths.
    """
    folders = [folder for source in sources for folder in find_model_folders(Path(source))]
    categories = _unique_categories(folders)
    output_folder = Path(output_folder)
    written, configs = [], []
    suffixes = (WEIGHTS_SUFFIX, ALTERNATIVE_SUFFIX) if also_pt else (WEIGHTS_SUFFIX,)
    for category, folder in categories.items():
        model = load_single_model(folder)
        state = PatchCoreModule.from_patchcore(model).cpu().state_dict()
        for suffix in suffixes:
            path = output_folder / f"{category}{suffix}"
            atomic_write(path, lambda temporary, state=state: torch.save(state, temporary))
            written.append(path)
        configs.append(model.config)
        LOGGER.info("Exported %s as %s", folder, category)
    requirements = output_folder / REQUIREMENTS_FILE
    text = requirements_text(configs)
    atomic_write(requirements, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return [*written, requirements]


# --------------------------------------------------------------------------- CLI
@click.command()
@click.argument(
    "sources",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "--output", "-o", "output_folder", required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for <category>.pth files and requirements.txt.",
)  # fmt: skip
@click.option("--also_pt", is_flag=True, help="Also write <category>.pt copies.")
def export_cli(sources: tuple[Path, ...], output_folder: Path, also_pt: bool) -> None:
    """Export saved models (SOURCES: model folders, or run folders with models/) as
    self-contained PatchCoreModule weights files named by category."""

    def job() -> None:
        paths = export_challenge_models(list(sources), output_folder, also_pt)
        for path in paths:
            click.echo(str(path))

    run_guarded(job)


def export_main() -> None:
    """Entry point of `patchcore-export-challenge` and bin/export_challenge_models.py."""
    configure_process()
    export_cli()
