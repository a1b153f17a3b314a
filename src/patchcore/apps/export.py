"""Exporting saved models: one self-contained `<category>.pth` per model folder.

`export_challenge_models` (`patchcore-export-challenge`) writes a `PatchCoreModule` state dict
per saved model folder, named by category, plus a `requirements.txt` for evaluators.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision

from patchcore import __version__
from patchcore.config import DATASET_NAMES, PatchCoreConfig, SearchConfig
from patchcore.errors import ConfigurationError, ModelFormatError, OutputError
from patchcore.files import atomic_write, atomic_write_text, check_writable, is_staging
from patchcore.layout import MODELS_FOLDER
from patchcore.model.backbones import EFFICIENTNET_LITE0, TORCHVISION_ALIASES
from patchcore.model.module import PatchCoreModule
from patchcore.model.patchcore import PatchCore
from patchcore.model.serialization import PARAMS_FILE, load_models

LOGGER = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".pth"
ALTERNATIVE_SUFFIX = ".pt"
REQUIREMENTS_FILE = "requirements.txt"

# What importing patchcore.model.module needs besides the patchcore package itself.
BASE_REQUIREMENTS = (
    "torch>=2.1", "torchvision>=0.16", "numpy>=1.24", "pillow>=10.0", "tqdm>=4.60", "click>=8.1",
)  # fmt: skip
EFFICIENTNET_REQUIREMENTS = ("efficientnet-lite-pytorch==0.1.0",)
TIMM_REQUIREMENTS = ("timm",)


def _is_model_folder(folder: Path) -> bool:
    if not folder.is_dir() or not any(folder.glob(f"*{PARAMS_FILE}")):
        return False
    if is_staging(folder):
        LOGGER.warning(
            "Skipping %s: an unfinished copy left by an interrupted save (the next save of "
            "that model removes it; it can be deleted)",
            folder,
        )
        return False
    return True


def find_model_folders(path: Path) -> list[Path]:
    """Model folders of `path`: itself, its sub-folders, or the sub-folders of its models/."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigurationError(f"{path}: not a folder")
    if _is_model_folder(path):
        return [path]
    parent = path / MODELS_FOLDER if (path / MODELS_FOLDER).is_dir() else path
    folders = sorted(child for child in parent.iterdir() if _is_model_folder(child))
    if not folders:
        raise ModelFormatError(
            f"{path}: no model folders found (a model folder holds {PARAMS_FILE}; looked in "
            f"{path} and its sub-folders{f' and {MODELS_FOLDER}/' if parent != path else ''})"
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
        "# Runtime requirements of patchcore.model.module.PatchCoreModule, written by",
        (
            f"# patchcore-export-challenge (patchcore {__version__}, exported with torch "
            f"{torch.__version__}, torchvision {torchvision.__version__})."
        ),
        "# PatchCoreModule (patchcore.model.module) is part of the patchcore package: install it as well",
        "# (pip install <patchcore source folder>) or put its src/ folder on PYTHONPATH.",
        *BASE_REQUIREMENTS,
        *dict.fromkeys(extra),
    ]
    return "\n".join(lines) + "\n"


def _load_exportable(folder: Path, device: torch.device | str) -> PatchCore:
    """The model of a folder; ensembles are refused, with the reason."""
    models = load_models(folder, device, SearchConfig(backend="torch"))
    if len(models) != 1:
        raise ConfigurationError(
            f"{folder}: an ensemble of {len(models)} models cannot be exported: a challenge "
            "module holds one model and its own score scale, while an ensemble decides on its "
            "members' combined normal-image scale (normalised scores, averaged). Score it "
            "with patchcore-predict, which uses that scale and the threshold saved with the "
            "members"
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


def _save(state: dict, temporary: Path, path: Path) -> None:
    """torch.save to `temporary`; its failed writes (a full disk) are RuntimeErrors, reported
    as an OutputError naming `path`."""
    try:
        torch.save(state, temporary)
    except RuntimeError as error:
        raise OutputError(
            f"{path}: cannot write the weights file ({str(error).splitlines()[0]}); free "
            "space on that disk, or write the export somewhere else"
        ) from error


def export_challenge_models(
    sources: Sequence[Path],
    output_folder: Path,
    also_pt: bool = False,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Writes `<category>.pth` (and `.pt` with also_pt) per model folder plus requirements.txt.

    `sources` are model folders, folders of model folders, or run folders with a models/
    folder. Models are loaded on `device`; the files hold CPU tensors. Returns the written
    paths.
    """
    output_folder = check_writable(Path(output_folder))
    folders = [folder for source in sources for folder in find_model_folders(Path(source))]
    categories = _unique_categories(folders)
    written, configs = [], []
    suffixes = (WEIGHTS_SUFFIX, ALTERNATIVE_SUFFIX) if also_pt else (WEIGHTS_SUFFIX,)
    for category, folder in categories.items():
        model = _load_exportable(folder, device)
        state = PatchCoreModule.from_patchcore(model).cpu().state_dict()
        for suffix in suffixes:
            path = output_folder / f"{category}{suffix}"
            atomic_write(
                path, lambda temporary, state=state, path=path: _save(state, temporary, path)
            )
            written.append(path)
        configs.append(model.config)
        LOGGER.info("Exported %s as %s", folder, category)
    requirements = atomic_write_text(output_folder / REQUIREMENTS_FILE, requirements_text(configs))
    return [*written, requirements]


