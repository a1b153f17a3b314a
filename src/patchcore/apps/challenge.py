"""Challenge-style evaluation, optionally under seeded domain drift.

The contract is the one of challenge evaluators: a Python class (named by a file path or a
module name, plus a class name) is constructed without arguments, restored with
`load_state_dict(torch.load(<weights>/<category>.pth))`, and called on one test image at a
time, resized to 256 x 256 (images bilinear, masks nearest), float RGB in [0, 1]. It must
return `pred_score` [1] and the anomaly map [1, 256, 256] (or [1, 1, 256, 256]) under
`anomaly_maps` or `anomaly_map`.

With drift, every test image gets its own transformation, drawn from a `torch.Generator`
seeded from (seed, image index), so a seed always gives the same images:
- horizontal flip and vertical flip, each with probability 1/2 (image and mask);
- rotation by an angle uniform in [-20, 20] degrees about the centre, corners filled with 0
  (image bilinear, mask nearest, the same angle);
- colour jitter, image only: brightness, contrast and saturation factors uniform in
  [0.9, 1.1], hue shift uniform in [-0.1, 0.1], applied in a random order;
- Gaussian blur, image only, sigma uniform in [0.1, 2.0], kernel 2 * ceil(3 sigma) + 1.

Reported per category and as the mean: image and pixel AUROC and F1-max.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from patchcore.apps.export import ALTERNATIVE_SUFFIX, WEIGHTS_SUFFIX
from patchcore.data.datasets import Sample, list_samples
from patchcore.data.preprocessing import fixed_size_pair
from patchcore.errors import ConfigurationError, DataError, ModelFormatError
from patchcore.evaluation.metrics import compute_metrics
from patchcore.evaluation.reporting import write_results_csv
from patchcore.files import check_writable
from patchcore.model.serialization import first_line, read_weights_file
from patchcore.progress import track

LOGGER = logging.getLogger(__name__)

IMAGE_SIZE = 256
MAX_ROTATION_DEGREES = 20.0
JITTER = 0.1
BLUR_SIGMA_RANGE = (0.1, 2.0)
COLOUR_ADJUSTMENTS = ("brightness", "contrast", "saturation", "hue")
MAP_KEYS = ("anomaly_maps", "anomaly_map")
CHALLENGE_METRICS = ("instance_auroc", "full_pixel_auroc", "instance_f1max", "pixel_f1max")


@dataclass(frozen=True)
class ChallengeOptions:
    """What to evaluate and how; checked once when built."""

    module_path: str
    class_name: str
    weights_path: Path
    dataset_path: Path
    categories: tuple[str, ...]
    seed: int
    drift: bool
    output: Path
    device: torch.device

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigurationError(f"--seed must be >= 0, got {self.seed}")
        if not self.weights_path.is_dir():
            raise ConfigurationError(f"--weights_path {self.weights_path}: not a folder")
        if not self.dataset_path.is_dir():
            raise ConfigurationError(f"--dataset_path {self.dataset_path}: not a folder")


# ------------------------------------------------------------------------- drift
@dataclass(frozen=True)
class DriftParameters:
    """One image's drift transformation, fully determined (see the module docstring)."""

    horizontal_flip: bool
    vertical_flip: bool
    angle: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    colour_order: tuple[int, ...]
    blur_sigma: float

    @property
    def blur_kernel_size(self) -> int:
        return 2 * math.ceil(3.0 * self.blur_sigma) + 1


def drift_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image `index`'s drift: a well-mixed function of (seed, index)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def sample_drift(generator: torch.Generator) -> DriftParameters:
    """Draws one transformation; always in the same order, so a generator state fixes it."""
    flips = torch.rand(2, generator=generator) < 0.5
    return DriftParameters(
        horizontal_flip=bool(flips[0]),
        vertical_flip=bool(flips[1]),
        angle=_uniform(generator, -MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES),
        brightness=_uniform(generator, 1.0 - JITTER, 1.0 + JITTER),
        contrast=_uniform(generator, 1.0 - JITTER, 1.0 + JITTER),
        saturation=_uniform(generator, 1.0 - JITTER, 1.0 + JITTER),
        hue=_uniform(generator, -JITTER, JITTER),
        colour_order=tuple(torch.randperm(len(COLOUR_ADJUSTMENTS), generator=generator).tolist()),
        blur_sigma=_uniform(generator, *BLUR_SIGMA_RANGE),
    )


def _geometric(
    tensor: torch.Tensor, parameters: DriftParameters, interpolation: InterpolationMode
) -> torch.Tensor:
    if parameters.horizontal_flip:
        tensor = TF.horizontal_flip(tensor)
    if parameters.vertical_flip:
        tensor = TF.vertical_flip(tensor)
    return TF.rotate(tensor, parameters.angle, interpolation=interpolation, fill=0.0)


def is_grey(image: torch.Tensor) -> bool:
    """Whether the three channels of image [3, H, W] are equal (a grayscale picture)."""
    return torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def _colour(image: torch.Tensor, parameters: DriftParameters) -> torch.Tensor:
    # Brightness, contrast and saturation keep equal channels equal, and torchvision's hue
    # shift returns a grey image unchanged, bit for bit (saturation 0: every channel is the
    # value); so a grey image skips the shift's costly HSV round trip (about 40 % of the
    # drift's time on grayscale data such as magnetic tile).
    grey = is_grey(image)
    adjust = {
        "brightness": lambda x: TF.adjust_brightness(x, parameters.brightness),
        "contrast": lambda x: TF.adjust_contrast(x, parameters.contrast),
        "saturation": lambda x: TF.adjust_saturation(x, parameters.saturation),
        "hue": lambda x: x if grey else TF.adjust_hue(x, parameters.hue),
    }
    for position in parameters.colour_order:
        image = adjust[COLOUR_ADJUSTMENTS[position]](image)
    return image


def blur_kernel(size: int, sigma: float) -> torch.Tensor:
    """The 1-d Gaussian taps [size] of torchvision's `gaussian_blur` (offsets -size//2 ..
    size//2, weights exp(-offset^2 / (2 sigma^2)), normalised)."""
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    return torch.softmax(-(offsets / sigma).square() / 2.0, dim=0)


def separable_blur(image: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """image float [C, H, W] -> `TF.gaussian_blur(image, [size, size], [sigma, sigma])` (the
    same reflect padding and taps, equal to float rounding) as two 1-d passes: 2 * size
    multiply-adds per pixel instead of size^2 (13 x 13 taps at the largest sigma)."""
    kernel = blur_kernel(size, sigma).to(image)
    channels, radius = image.shape[0], size // 2
    padded = F.pad(image[None], [radius, radius, radius, radius], mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size),
                    groups=channels)  # fmt: skip
    return F.conv2d(rows, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1),
                    groups=channels)[0]  # fmt: skip


def apply_drift(
    image: torch.Tensor, mask: torch.Tensor, parameters: DriftParameters
) -> tuple[torch.Tensor, torch.Tensor]:
    """image float [3, H, W] in [0, 1], mask [1, H, W] -> both transformed, still aligned."""
    image = _geometric(image, parameters, InterpolationMode.BILINEAR)
    mask = _geometric(mask, parameters, InterpolationMode.NEAREST)
    image = _colour(image, parameters)
    image = separable_blur(image, parameters.blur_kernel_size, parameters.blur_sigma)
    return image.clamp(0.0, 1.0), mask


# ------------------------------------------------------------------------ loading
def load_module_class(module_path: str, class_name: str) -> type:
    """The class `class_name` of a Python file (a path) or an importable module name."""
    module = _import_module(module_path)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigurationError(f"--class_name {class_name}: no such class in {module_path}")
    return cls


def _import_module(module_path: str) -> ModuleType:
    path = Path(module_path)
    if path.suffix == ".py" or path.is_file():
        if not path.is_file():
            raise ConfigurationError(f"--module_path {module_path}: file does not exist")
        name = f"challenge_submission_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the importlib recipe: dataclasses look modules up here
        spec.loader.exec_module(module)
        return module
    if importlib.util.find_spec(module_path.split(".")[0]) is None:
        raise ConfigurationError(
            f"--module_path {module_path}: neither a Python file nor an importable module"
        )
    return importlib.import_module(module_path)


def weights_file(weights_path: Path, category: str) -> Path | None:
    """`<category>.pth` (or `.pt`) in `weights_path`, or None."""
    for suffix in (WEIGHTS_SUFFIX, ALTERNATIVE_SUFFIX):
        candidate = weights_path / f"{category}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def available_categories(dataset_path: Path, weights_path: Path) -> tuple[str, ...]:
    """Category folders of the dataset (with a test/ folder) that have a weights file."""
    folders = sorted(path for path in dataset_path.iterdir() if (path / "test").is_dir())
    found = tuple(path.name for path in folders if weights_file(weights_path, path.name))
    if not found:
        raise ConfigurationError(
            f"no category of --dataset_path {dataset_path} has <category>{WEIGHTS_SUFFIX} "
            f"weights in --weights_path {weights_path}"
        )
    return found


def load_submission(cls: type, path: Path, device: torch.device) -> torch.nn.Module:
    """Constructs `cls()` and restores it from `path`, as challenge evaluators do; the file
    is read with `weights_only=True`, so it cannot run code whatever torch's defaults are."""
    state = read_weights_file(path)
    model = cls()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelFormatError(f"{path}: {first_line(error)}") from error
    return model.to(device).eval()


def load_test_pair(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """image float [3, 256, 256] in [0, 1] (bilinear) and mask [1, 256, 256] in {0, 1} (nearest)."""
    return fixed_size_pair(sample.image_path, sample.mask_path, IMAGE_SIZE)


# --------------------------------------------------------------------- evaluation
def _anomaly_map(outputs: dict, cls: type) -> torch.Tensor:
    key = next((key for key in MAP_KEYS if key in outputs), None)
    if key is None or "pred_score" not in outputs:
        raise DataError(
            f"{cls.__name__} returned keys {sorted(outputs)}; expected pred_score and one of "
            f"{', '.join(MAP_KEYS)}"
        )
    anomaly_map = torch.as_tensor(outputs[key]).detach().float().cpu()
    if anomaly_map.numel() != IMAGE_SIZE * IMAGE_SIZE:
        raise DataError(
            f"{cls.__name__} returned an anomaly map of shape {list(anomaly_map.shape)} for one "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} image; expected [1, {IMAGE_SIZE}, {IMAGE_SIZE}]"
        )
    return anomaly_map.reshape(IMAGE_SIZE, IMAGE_SIZE)


class ChallengeImages(torch.utils.data.Dataset):
    """The test images of a category as the evaluator passes them: (image [3, 256, 256],
    mask [1, 256, 256]), each decoded once and, with drift, transformed by its own seeded
    parameters (drawn from (seed, index), so any worker gives the same images)."""

    def __init__(self, samples: list[Sample], seed: int, drift: bool) -> None:
        self.samples, self.seed, self.drift = samples, seed, drift

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = load_test_pair(self.samples[index])
        if self.drift:
            image, mask = apply_drift(image, mask, sample_drift(drift_generator(self.seed, index)))
        return image, mask


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread inside the block, the caller's count restored after it. Decoding
    and the drift's small operations ran up to 10x slower split over the two threads of a
    busy 2-core machine (0.11 s -> 0.01 s per image); the model keeps every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def predict_category(
    model: torch.nn.Module, samples: list[Sample], options: ChallengeOptions, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image scores [N], labels [N], maps [N, 256, 256] and masks [N, 256, 256] of a category;
    the model is called on one image at a time."""
    scores, labels, maps, masks = [], [], [], []
    images = ChallengeImages(samples, options.seed, options.drift)
    for index in track(range(len(images)), f"Evaluating {name}", unit="image"):
        with single_threaded():
            image, mask = images[index]
        sample = samples[index]
        with torch.inference_mode():
            outputs = model(image[None].to(options.device))
        maps.append(_anomaly_map(outputs, type(model)))
        scores.append(float(torch.as_tensor(outputs["pred_score"]).reshape(-1)[0]))
        labels.append(int(sample.is_anomaly))
        masks.append(mask[0] > 0.5)
    return torch.tensor(scores), torch.tensor(labels), torch.stack(maps), torch.stack(masks)


def evaluate_category(cls: type, category: str, options: ChallengeOptions) -> dict[str, float]:
    """Image/pixel AUROC and F1-max of one category."""
    path = weights_file(options.weights_path, category)
    if path is None:
        raise ConfigurationError(
            f"--category {category}: no {category}{WEIGHTS_SUFFIX} in {options.weights_path}"
        )
    model = load_submission(cls, path, options.device)
    samples = list_samples(options.dataset_path, category, "test", masks_required=True)
    scores, labels, maps, masks = predict_category(model, samples, options, category)
    # One sort of the image scores and one of the pixels for the four metrics, without the
    # defect regions and PRO of compute_metrics, which the challenge does not report.
    metrics = compute_metrics(scores, labels, maps, masks, full_pixels_only=True)
    return {key: metrics[key] for key in CHALLENGE_METRICS}


def run_challenge(options: ChallengeOptions) -> dict[str, dict[str, float]]:
    """Evaluates every category, rewriting the CSV after each; returns the rows."""
    check_writable(options.output.parent)
    cls = load_module_class(options.module_path, options.class_name)
    categories = options.categories or available_categories(
        options.dataset_path, options.weights_path
    )
    rows: dict[str, dict[str, float]] = {}
    for category in categories:
        LOGGER.info("Evaluating %s (seed %d, drift %s)", category, options.seed, options.drift)
        rows[category] = evaluate_category(cls, category, options)
        write_results_csv(options.output, rows)
    return rows
