"""MVTec AD-layout datasets and a lenient folder dataset for a user's own images.

Layout of a category:
    <root>/<category>/train/good/*             normal training images
    <root>/<category>/test/good/*              normal test images
    <root>/<category>/test/<defect>/*          defective test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png
Masks are matched to images by file stem, never by sorted position. Images are converted
to RGB, resized (shorter side to `resize`) and centre-cropped to `imagesize`, and returned
in [0, 1]; the backbone applies its own normalisation. Masks are binarised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as transforms

from patchcore.config import PreprocessingConfig
from patchcore.errors import ConfigurationError, DataError

LOGGER = logging.getLogger(__name__)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
GOOD = "good"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with its mask if it has one."""

    image_path: Path
    mask_path: Path | None
    defect_type: str
    is_anomaly: bool

    @property
    def name(self) -> str:
        """Readable unique name within a category: `<defect>_<stem>`."""
        return f"{self.defect_type}_{self.image_path.stem}"


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder`, sorted by name."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        path
        for path in folder.glob(pattern)
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _split_training(files: list[Path], split: str, train_val_split: float) -> list[Path]:
    """First `train_val_split` of the sorted normal images train, the rest validate."""
    boundary = int(len(files) * train_val_split)
    return files[:boundary] if split == "train" else files[boundary:]


def _mask_for(category_root: Path, defect_type: str, image_path: Path) -> Path | None:
    folder = category_root / "ground_truth" / defect_type
    for candidate in (folder / f"{image_path.stem}_mask.png", folder / f"{image_path.stem}.png"):
        if candidate.is_file():
            return candidate
    return None


def list_samples(
    root: Path,
    category: str,
    split: str,
    train_val_split: float = 1.0,
    masks_required: bool = True,
) -> list[Sample]:
    """The samples of one split of a category, checking the folder layout.

    `masks_required=True` (MVTec AD) makes a defective test image without a mask an error;
    with False (the folder dataset), such images simply have no mask. The folder dataset
    also accepts training images directly under `train/` or in any sub-folder of it.
    """
    if split not in SPLITS:
        raise ConfigurationError(f"split must be one of {SPLITS}, got '{split}'")
    if not 0.0 < train_val_split <= 1.0:
        raise ConfigurationError(f"--train_val_split must be in (0, 1], got {train_val_split}")
    category_root = Path(root) / category
    if not category_root.is_dir():
        raise DataError(f"category folder {category_root} does not exist")
    if split in ("train", "val"):
        train_folder = category_root / "train" / GOOD
        if not masks_required and not train_folder.is_dir():
            train_folder = category_root / "train"
        files = image_files(train_folder, recursive=not masks_required)
        if not files:
            raise DataError(f"training folder {train_folder} holds no images")
        chosen = _split_training(files, split, train_val_split)
        return [Sample(path, None, GOOD, False) for path in chosen]
    test_folder = category_root / "test"
    if not test_folder.is_dir():
        raise DataError(f"test folder {test_folder} does not exist")
    samples = []
    for defect_folder in sorted(path for path in test_folder.iterdir() if path.is_dir()):
        defect_type = defect_folder.name
        for image_path in image_files(defect_folder):
            if defect_type == GOOD:
                samples.append(Sample(image_path, None, GOOD, False))
                continue
            mask_path = _mask_for(category_root, defect_type, image_path)
            if mask_path is None and masks_required:
                raise DataError(
                    f"{image_path}: no mask; expected "
                    f"{category_root / 'ground_truth' / defect_type / (image_path.stem + '_mask.png')}"
                )
            samples.append(Sample(image_path, mask_path, defect_type, True))
    if not samples:
        raise DataError(f"test folder {test_folder} holds no images")
    return samples


def open_image(path: Path, mode: str) -> Image.Image:
    """Opens and fully decodes an image in `mode`, naming the file in any error."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read image ({error})") from error


class ImageDataset(torch.utils.data.Dataset):
    """Loads samples as dicts: image [3, S, S] in [0, 1], mask [1, S, S] in {0, 1}, labels."""

    def __init__(self, samples: list[Sample], preprocessing: PreprocessingConfig) -> None:
        self.samples = samples
        self.preprocessing = preprocessing
        resize = transforms.Resize(preprocessing.resize, antialias=True)
        crop = transforms.CenterCrop(preprocessing.imagesize)
        self.image_transform = transforms.Compose(
            [transforms.ToImage(), resize, crop, transforms.ToDtype(torch.float32, scale=True)]
        )
        self.mask_transform = transforms.Compose(
            [
                transforms.ToImage(),
                transforms.Resize(
                    preprocessing.resize, interpolation=transforms.InterpolationMode.NEAREST
                ),
                crop,
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def load_mask(self, sample: Sample, image_size: tuple[int, int]) -> torch.Tensor:
        size = self.preprocessing.imagesize
        if sample.mask_path is None:
            return torch.zeros(1, size, size)
        mask = open_image(sample.mask_path, "L")
        if mask.size != image_size:
            raise DataError(
                f"{sample.mask_path}: mask is {mask.size[0]}x{mask.size[1]} but its image "
                f"{sample.image_path} is {image_size[0]}x{image_size[1]}"
            )
        binary = Image.fromarray((np.asarray(mask) > 127).astype(np.uint8) * 255)
        return (self.mask_transform(binary) > 127).float()

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = open_image(sample.image_path, "RGB")
        return {
            "image": self.image_transform(image),
            "mask": self.load_mask(sample, image.size),
            "is_anomaly": int(sample.is_anomaly),
            "has_mask": sample.mask_path is not None or not sample.is_anomaly,
            "defect_type": sample.defect_type,
            "image_name": sample.name,
            "image_path": str(sample.image_path),
        }
