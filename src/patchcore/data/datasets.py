"""MVTec AD-layout datasets and a lenient folder dataset for a user's own images.

Layout of a category:
    <root>/<category>/train/good/*             normal training images
    <root>/<category>/test/good/*              normal test images
    <root>/<category>/test/<defect>/*          defective test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png
Masks are matched to images by file stem, never by sorted position. Images and masks
become tensors in `patchcore.data.preprocessing` (the reference's chain by default).

Batches hold images of one working size: with the centre crop every image has the same
size; in whole-image mode (`crop="none"`) `SizeGroupedBatchSampler` groups images by size,
so an image's scores never depend on which other images share its batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from patchcore.config import DatasetConfig, PreprocessingConfig
from patchcore.data.preprocessing import (
    check_working_size,
    image_header,
    image_size_of,
    image_tensor,
    mask_tensor,
    open_image,
    open_mask,
    unusual_mask_encoding,
    working_size,
)
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
    """Image files in `folder` (and, with `recursive`, in every folder below it, symbolic
    links to folders followed, each real folder visited once), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if not recursive:
        return sorted(path for path in folder.iterdir() if _is_image_file(path))
    found, visited = [], set()
    for current, subfolders, files in os.walk(folder, followlinks=True):
        status = os.stat(current)
        if (status.st_dev, status.st_ino) in visited:  # a link back up: a cycle
            LOGGER.warning("%s: skipped, a link to a folder already searched", current)
            subfolders.clear()
            continue
        visited.add((status.st_dev, status.st_ino))
        for path in map(Path(current).joinpath, files):
            if _is_image_file(path):
                found.append(path)
            elif path.is_symlink() and not path.exists():
                LOGGER.warning("%s: skipped, a broken link", path)
    return sorted(found)


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _split_training(files: list[Path], split: str, train_val_split: float) -> list[Path]:
    """First `train_val_split` of the sorted normal images train, the rest validate."""
    boundary = int(len(files) * train_val_split)
    return files[:boundary] if split == "train" else files[boundary:]


def mask_for(category_root: Path, defect_type: str, image_path: Path) -> Path | None:
    """The ground-truth mask of a test image of the MVTec layout, or None."""
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
        if split == "train" and not chosen:
            raise DataError(
                f"--train_val_split {train_val_split} leaves no training image of the "
                f"{len(files)} in {train_folder}; use a larger fraction"
            )
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
            mask_path = mask_for(category_root, defect_type, image_path)
            if mask_path is None and masks_required:
                raise DataError(
                    f"{image_path}: no mask; expected "
                    f"{category_root / 'ground_truth' / defect_type / (image_path.stem + '_mask.png')}"
                )
            samples.append(Sample(image_path, mask_path, defect_type, True))
    if not samples:
        raise DataError(f"test folder {test_folder} holds no images")
    return samples


class ImageDataset(torch.utils.data.Dataset):
    """Loads samples as dicts: image [3, h, w] in [0, 1], mask [1, h, w] (see the mask rules
    in `patchcore.data.preprocessing`), labels, names and the original (height, width)."""

    def __init__(
        self,
        samples: list[Sample],
        preprocessing: PreprocessingConfig,
        mask_rule: str = "reference",
    ) -> None:
        self.samples = samples
        self.preprocessing = preprocessing
        self.mask_rule = mask_rule
        self._original_sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def original_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, read from the file headers once, after checking
        that each image opens and each mask has its image's size: bad files are reported
        before any work starts, at a few milliseconds per image."""
        if self._original_sizes is None:
            checked = [_checked_size(sample) for sample in self.samples]
            self._original_sizes = [size for size, _ in checked]
            _warn_unusual_masks(self.samples, [encoding for _, encoding in checked])
        return self._original_sizes

    def working_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image as the model sees it; a DataError names the first
        image too small for the model (or for a tile) before any work starts, and one
        warning counts the images smaller than the model's input (they are upsampled)."""
        sizes = self.model_input_sizes()
        for sample, original in zip(self.samples, self.original_sizes(), strict=True):
            check_working_size(sample.image_path, original, self.preprocessing)
        _warn_small_images(self.samples, self.original_sizes(), sizes)
        return sizes

    def model_input_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image as the model sees it, unchecked (`working_sizes`
        checks them, once, before a loader is made)."""
        return [working_size(size, self.preprocessing) for size in self.original_sizes()]

    def load_mask(self, sample: Sample, image_size: tuple[int, int]) -> torch.Tensor:
        """The mask of `sample` for an image of (height, width) `image_size`; zeros without one."""
        if sample.mask_path is None:
            height, width = working_size(image_size, self.preprocessing)
            return torch.zeros(1, height, width)
        mask = open_mask(sample.mask_path)
        if (mask.height, mask.width) != tuple(image_size):
            raise DataError(
                f"{sample.mask_path}: mask is {mask.width}x{mask.height} but its image "
                f"{sample.image_path} is {image_size[1]}x{image_size[0]}"
            )
        return mask_tensor(mask, self.preprocessing, self.mask_rule)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        picture = open_image(sample.image_path, "RGB")
        size = (picture.height, picture.width)
        return {
            "image": image_tensor(picture, self.preprocessing),
            "mask": self.load_mask(sample, size),
            "is_anomaly": int(sample.is_anomaly),
            "has_mask": sample.mask_path is not None or not sample.is_anomaly,
            "defect_type": sample.defect_type,
            "image_name": sample.name,
            "image_path": str(sample.image_path),
            "original_size": torch.tensor(size),
        }


def _warn_small_images(
    samples: list[Sample], originals: list[tuple[int, int]], working: list[tuple[int, int]]
) -> None:
    """One warning for the images whose shorter side is below the model input's shorter side
    (the crop size with the centre crop): they are upsampled, and tiny ones (a 1x1 file) hold
    next to nothing to inspect."""
    small = [
        (min(original), str(sample.image_path), original, size)
        for sample, original, size in zip(samples, originals, working, strict=True)
        if min(original) < min(size)
    ]
    if small:
        _, path, (height, width), (input_height, input_width) = min(small)
        LOGGER.warning(
            "%d of %d images are smaller than the model's input and are upsampled; the "
            "smallest is %s (%dx%d, inspected at %dx%d)",
            len(small), len(samples), path, width, height, input_width, input_height,
        )  # fmt: skip


def _warn_unusual_masks(samples: list[Sample], encodings: list[str | None]) -> None:
    """One warning for a data set's masks stored in an unusual encoding (see
    `patchcore.data.preprocessing.unusual_mask_encoding`): how many, and the first."""
    unusual = [(sample.mask_path, encoding) for sample, encoding in zip(samples, encodings,
               strict=True) if encoding is not None]  # fmt: skip
    if unusual:
        path, encoding = unusual[0]
        LOGGER.warning(
            "%d of %d masks are not 8-bit grey, e.g. %s (%s); every non-zero pixel of them "
            "is read as a defect", len(unusual), sum(s.mask_path is not None for s in samples),
            path, encoding,
        )  # fmt: skip


def _checked_size(sample: Sample) -> tuple[tuple[int, int], str | None]:
    """(height, width) of the sample's image from its header, and its mask's unusual
    encoding (None when usual or without mask)."""
    width, height = image_size_of(sample.image_path, verify=True)
    encoding = None
    if sample.mask_path is not None:
        (mask_width, mask_height), mode = image_header(sample.mask_path, verify=True)
        if (mask_width, mask_height) != (width, height):
            raise DataError(
                f"{sample.mask_path}: mask is {mask_width}x{mask_height} but its image "
                f"{sample.image_path} is {width}x{height}"
            )
        encoding = unusual_mask_encoding(mode)
    return (height, width), encoding


class SizeGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices whose images share one working size.

    Groups come in the order of their first image; within a group, images keep the dataset's
    order. With one size (the centre crop), batches are the plain sequential ones.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int) -> None:
        self.batch_size = batch_size
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(tuple(size), []).append(index)
        self.batches = [
            members[start : start + batch_size]
            for members in groups.values()
            for start in range(0, len(members), batch_size)
        ]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(
    dataset: ImageDataset, config: DatasetConfig, device: torch.device
) -> torch.utils.data.DataLoader:
    """A loader of `dataset` in batches of one working size each."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=SizeGroupedBatchSampler(dataset.working_sizes(), config.batch_size),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )


def split_loader(
    config: DatasetConfig, category: str, split: str, device: torch.device
) -> torch.utils.data.DataLoader | None:
    """Loader of one split of a category (its files checked first); None for an empty
    validation split."""
    samples = list_samples(
        Path(config.data_path),
        category,
        split,
        config.train_val_split,
        masks_required=config.name == "mvtec",
    )
    if not samples:
        return None
    dataset = ImageDataset(samples, config.preprocessing, config.mask_rule)
    return make_loader(dataset, config, device)
