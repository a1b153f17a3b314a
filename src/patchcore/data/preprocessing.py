"""The one place where an image or mask file becomes a tensor, and where maps go back.

Default (`crop="center"`): the reference implementation's chain, byte for byte. The file is
decoded and converted to RGB (`convert("RGB")`), its shorter side is resized to `resize` with
PIL's bilinear filter, it is centre-cropped to `imagesize`, and `ToTensor`'s scaling (uint8
/ 255) gives float32 [3, S, S] in [0, 1]. The backbone normalises it (mean/std) itself.

Whole-image inspection (`crop="none"`): the same resize of the shorter side, optionally with
the longer side capped at `max_size` (torchvision's rule), and no crop: the working image keeps
the original's aspect ratio and every pixel of it is inspected. With `scale`, every image is
instead resized by that one factor (PIL bilinear, sides rounded), so images of different sizes
from one camera keep one pixel size.

Decoding: 8-bit images follow `convert("RGB")`. 16-bit images (modes I;16*, and 32-bit
integer images whose values fit 16 bits) are scaled to 8 bits by value * 255 / 65535, rounded,
instead of Pillow's clipping at 255 that turns them white; 32-bit float images must hold
values in [0, 1] and are scaled by 255. Anything else is refused with the file named.

Masks, two rules (`mask_rule`):
- `reference`: the reference's chain on the mask file (PIL bilinear resize, centre crop,
  ToTensor), so mask values lie in [0, 1]; a pixel counts as defective only when its value is
  exactly 1.0, while an image counts as having a defect when any value is above 0 (the
  reference's pixel metrics and its anomaly-only image selection).
- `binary`: nearest-neighbour resize and a threshold at half (value > 127 of 255).
A mask stored as 0/1 (not 0/255) is detected, logged with its file name, and read as 0/255.
A mask in any other encoding than 8-bit grey or 1-bit (RGB or palette colours as annotation
tools write them, 16- or 32-bit values such as 16-bit 0/1) is read as 0/255 with every
non-zero pixel (in any colour channel; alpha ignored) a defect, under both rules; a data set
warns once about such masks (`unusual_mask_encoding`).

`to_model_input` and `map_to_input_frame` are the tensor forms of the same geometry, for
callers that hold float images already (the exported module and exported graphs): resize and
crop on tensors, and anomaly maps sampled back onto the input's frame. The tensor resize is
Pillow's own 8-bit bilinear resize, transcribed: the input is read as 8-bit pixels, each
axis (in the order Pillow takes them) is a sum of a few shifted copies weighted in 22-bit
fixed point, rounded and clipped to 8 bits (`ResizeTaps`, the weights Pillow computes),
cropped rows and columns only: gathers, products and sums of whole numbers below 2**24,
which every runtime computes exactly in float32. For a decoded file the model's input is
therefore the same tensor, bit for bit, whichever path made it (`tests/test_preprocessing.py`).
"""

from __future__ import annotations

import functools
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from patchcore.config import (
    IMAGE_PIXELS_VARIABLE,
    MASK_RULES,
    MAX_ASPECT_RATIO,
    MIN_IMAGE_SIDE,
    WORKING_PIXELS_VARIABLE,
    PreprocessingConfig,
    image_pixel_limit,
    working_pixel_limit,
)
from patchcore.errors import ConfigurationError, DataError
from patchcore.tensors import count_non_finite

LOGGER = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_MAX = 65535
EIGHT_BIT_MAX = 255


# -------------------------------------------------------------------------- decoding
def _eight_bit(path: Path, image: Image.Image) -> Image.Image:
    """An 8-bit image of `image`: 16-bit and float data scaled, never clipped."""
    if image.mode not in (*SIXTEEN_BIT_MODES, "I", "F"):
        return image
    values = np.asarray(image)
    if image.mode == "F":
        finite = np.isfinite(values).all()
        if not finite or values.min() < 0.0 or values.max() > 1.0:
            raise DataError(
                f"{path}: 32-bit float image with values outside [0, 1] "
                f"({np.nanmin(values):.4g} to {np.nanmax(values):.4g}); save it as 8- or "
                "16-bit, or scale it to [0, 1]"
            )
        scaled = np.rint(values.astype(np.float64) * EIGHT_BIT_MAX)
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    wide = values.astype(np.int64)
    if wide.min() < 0 or wide.max() > SIXTEEN_BIT_MAX:
        raise DataError(
            f"{path}: 32-bit integer image with values outside 0..{SIXTEEN_BIT_MAX} "
            f"({wide.min()} to {wide.max()}); save it as 8- or 16-bit"
        )
    scaled = (wide * EIGHT_BIT_MAX + SIXTEEN_BIT_MAX // 2) // SIXTEEN_BIT_MAX
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Opens and fully decodes an image file in `mode` ("RGB" or "L"), naming the file in any
    error; 16-bit and float images are scaled to 8 bits (see the module docstring)."""
    path = Path(path)
    return _decoded(path, lambda image: _eight_bit(path, image).convert(mode))


def decode_image(data: bytes, name: str, mode: str = "RGB") -> Image.Image:
    """`open_image` of an image file's bytes (an upload to `patchcore-serve`): the same size
    checks and 8-bit rule; errors name the image as `name`."""
    return _decoded(
        Path(name), lambda image: _eight_bit(Path(name), image).convert(mode), io.BytesIO(data)
    )


def image_header_problem(size: tuple[int, int]) -> str | None:
    """What is wrong with an image of (width, height) `size`, read from its header: more
    pixels than an image may decode to, or sides more than MAX_ASPECT_RATIO times apart (see
    the limits in `patchcore.config`); None when nothing is."""
    width, height = size
    limit = image_pixel_limit()
    if width * height > limit:
        return (f"{width}x{height} pixels, more than the limit of {limit} for one image "
                f"({IMAGE_PIXELS_VARIABLE}); reduce the image or raise the limit")  # fmt: skip
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        return (f"{width}x{height} pixels, sides more than {MAX_ASPECT_RATIO} times apart; "
                "not an image the model can inspect")  # fmt: skip
    return None


def _decoded(path: Path, convert, source: io.BytesIO | None = None) -> Image.Image:
    """`convert` of the fully decoded image file `path` (or of the file's bytes in `source`),
    its size checked from the header before decoding (`image_header_problem`); a DataError
    names the file."""
    try:
        with Image.open(path if source is None else source) as image:
            problem = image_header_problem(image.size)
            if problem is None:
                image.load()
                return convert(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as error:  # fmt: skip
        raise DataError(f"{path}: cannot read image ({error})") from error
    raise DataError(f"{path}: {problem}")


def image_size_of(path: Path, verify: bool = False) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels
    (`image_header`)."""
    return image_header(path, verify)[0]


def image_header(path: Path, verify: bool = False) -> tuple[tuple[int, int], str]:
    """(width, height) and Pillow mode of an image file from its header, without decoding
    the pixels; a DataError for a size `image_header_problem` refuses.

    `verify=True` also checks the file's structure without decoding it (Pillow's `verify`:
    for PNG every chunk and its checksum, so a truncated or damaged PNG is found at a few
    milliseconds per image; other formats' pixel data is checked when it is decoded).
    """
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
            if verify:
                image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as error:  # fmt: skip
        raise DataError(f"{path}: cannot read image ({error})") from error
    problem = image_header_problem(size)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    return size, mode


STANDARD_MASK_MODES = ("L", "1")  # 8-bit grey and 1-bit: read as they are
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def unusual_mask_encoding(mode: str) -> str | None:
    """A description of a mask file's Pillow `mode` when it is not 8-bit grey or 1-bit (such
    masks are read with every non-zero pixel a defect), else None."""
    if mode in STANDARD_MASK_MODES:
        return None
    if mode in (*SIXTEEN_BIT_MODES, "I"):
        return f"{'16' if mode in SIXTEEN_BIT_MODES else '32'}-bit values ({mode})"
    return {"F": "32-bit float values (F)", "P": "palette colours (P)"}.get(mode, f"colour ({mode})")


def _non_zero_as_defect(image: Image.Image) -> Image.Image:
    """An "L" 0/255 mask: 255 where any colour channel of `image` is non-zero."""
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    values = np.asarray(image)
    if image.mode in _ALPHA_MODES or image.mode == "RGBA":
        values = values[..., :-1]
    defect = values != 0
    if defect.ndim == 3:
        defect = defect.any(axis=2)
    return Image.fromarray(np.where(defect, EIGHT_BIT_MAX, 0).astype(np.uint8), mode="L")


def open_mask(path: Path) -> Image.Image:
    """A mask file as an 8-bit "L" image; a 0/1 mask is read as 0/255 (and logged); a mask
    of an unusual encoding (`unusual_mask_encoding`) has every non-zero pixel as 255."""
    path = Path(path)
    mask = _decoded(path, lambda image: image.convert("L") if image.mode in STANDARD_MASK_MODES
                    else _non_zero_as_defect(image))  # fmt: skip
    values = np.asarray(mask)
    if values.max(initial=0) == 1:
        LOGGER.warning("%s: mask values are 0/1, not 0/255; reading 1 as defect", path)
        return Image.fromarray((values * EIGHT_BIT_MAX).astype(np.uint8), mode="L")
    return mask


# -------------------------------------------------------------------------- geometry
def resized_size(
    size: tuple[int, int], resize: int, max_size: int | None = None, scale: float | None = None
) -> tuple[int, int]:
    """(height, width) after resizing the shorter side of (height, width) `size` to `resize`
    (or, with `scale`, both sides by that factor, rounded), the longer side capped at
    `max_size` (torchvision's rule, int truncation included)."""
    height, width = size
    short, long = (width, height) if width <= height else (height, width)
    if scale is None:
        new_short, new_long = resize, int(resize * long / short)
    else:
        new_short, new_long = max(1, round(short * scale)), max(1, round(long * scale))
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def crop_offsets(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(top, left) of a centre crop of `crop` x `crop` from (height, width) `size` (torchvision's rule)."""
    return round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)


def working_size(size: tuple[int, int], config: PreprocessingConfig) -> tuple[int, int]:
    """(height, width) of the model's input for an original image of (height, width) `size`."""
    if config.crop == "center":
        return config.imagesize, config.imagesize
    return resized_size(size, config.resize, config.max_size, config.scale)


def working_size_problem(original: tuple[int, int], config: PreprocessingConfig) -> str | None:
    """Why an image of (height, width) `original` cannot be preprocessed by `config`: once
    resized it would hold more pixels than the working limit, or its working image is
    smaller than the model's smallest input or than a tile; None when it can."""
    frame = frame_of(original, config)
    limit = working_pixel_limit()
    if frame.resized[0] * frame.resized[1] > limit:
        return (
            f"resized to {frame.resized[1]}x{frame.resized[0]} pixels, more than the "
            f"working limit of {limit} ({WORKING_PIXELS_VARIABLE}); use a smaller --resize, "
            "--scale or --max_size, or raise the limit"
        )
    size = frame.size
    if min(size) < MIN_IMAGE_SIDE:
        return (
            f"the working image is {size[1]}x{size[0]} pixels, smaller than the "
            f"{MIN_IMAGE_SIDE} pixels the patch grid needs; use a larger --resize, --scale or "
            "--max_size"
        )
    if config.tile is not None and config.tile > min(size):
        return (
            f"--tile {config.tile} is larger than the working image ({size[1]}x{size[0]}); "
            "use a smaller --tile or a larger --resize or --scale"
        )
    return None


def check_working_size(path: Path, original: tuple[int, int], config: PreprocessingConfig) -> None:
    """A DataError naming `path` for the `working_size_problem` of an image of (height,
    width) `original`, if it has one."""
    problem = working_size_problem(original, config)
    if problem is not None:
        raise DataError(f"{path}: {problem}")


def smallest_model_input_side(config: PreprocessingConfig) -> int:
    """The shortest side a model input (a tile, with tiles) of `config` can have, as far as
    the configuration says: the crop, the resized shorter side, or, when every image is
    scaled by one factor, the largest side the working limit allows."""
    if config.crop == "center":
        side = config.imagesize
    elif config.scale is None:
        side = config.resize
    else:
        side = math.isqrt(working_pixel_limit())
    return min(side, config.tile) if config.tile is not None else side


@dataclass(frozen=True)
class Frame:
    """How a working image sits in its original: resized to `resized`, then cut at (top, left)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    size: tuple[int, int]

    def axis_resizes(self) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """Per axis (rows, columns), the arguments of `resize_taps` for this frame: (input
        length, resized length, first output kept, outputs kept)."""
        rows, columns = (
            (int(length), int(resized), int(offset), int(kept))
            for length, resized, offset, kept in zip(
                self.original, self.resized, (self.top, self.left), self.size, strict=True
            )
        )
        return rows, columns


def frame_of(size: tuple[int, int], config: PreprocessingConfig) -> Frame:
    """The geometry taking an original of (height, width) `size` to the model's input."""
    if config.crop == "none":
        resized = resized_size(size, config.resize, config.max_size, config.scale)
        return Frame(tuple(size), resized, 0, 0, resized)
    resized = resized_size(size, config.resize)
    top, left = crop_offsets(resized, config.imagesize)
    return Frame(tuple(size), resized, top, left, (config.imagesize, config.imagesize))


# -------------------------------------------------------------------- PIL to tensor
def to_tensor(picture: Image.Image) -> torch.Tensor:
    """torchvision's `ToTensor` on an 8-bit image: uint8 [C, H, W] / 255 as float32."""
    array = np.array(picture, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(EIGHT_BIT_MAX)


def _geometry(picture: Image.Image, config: PreprocessingConfig, resample) -> Image.Image:
    frame = frame_of((picture.height, picture.width), config)
    if (picture.height, picture.width) != frame.resized:
        picture = picture.resize((frame.resized[1], frame.resized[0]), resample)
    if frame.size != frame.resized:
        top, left = frame.top, frame.left
        picture = picture.crop((left, top, left + frame.size[1], top + frame.size[0]))
    return picture


def image_tensor(picture: Image.Image, config: PreprocessingConfig) -> torch.Tensor:
    """An RGB image as the model's input: float32 [3, h, w] in [0, 1]."""
    return to_tensor(_geometry(picture, config, Image.Resampling.BILINEAR))


def mask_tensor(mask: Image.Image, config: PreprocessingConfig, rule: str) -> torch.Tensor:
    """An "L" mask in the model's input frame: float32 [1, h, w], values in [0, 1] for the
    reference rule, {0, 1} for the binary one."""
    if rule not in MASK_RULES:
        raise ConfigurationError(f"--mask_rule must be one of {', '.join(MASK_RULES)}, got '{rule}'")
    if rule == "reference":
        return to_tensor(_geometry(mask, config, Image.Resampling.BILINEAR))
    nearest = to_tensor(_geometry(mask, config, Image.Resampling.NEAREST))
    return (nearest > 0.5).float()


def defective_pixels(masks: torch.Tensor) -> torch.Tensor:
    """Boolean masks of the pixels counted as defective: value 1.0 (both rules agree)."""
    return masks >= 1.0


def has_defect(masks: torch.Tensor) -> torch.Tensor:
    """[N] flags: the masks with any value above 0 (the reference's anomaly-only selection)."""
    return masks.reshape(len(masks), -1).amax(dim=1) > 0


def load_image(path: Path, config: PreprocessingConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file as the model's input [3, h, w], and its original (height, width)."""
    picture = open_image(path, "RGB")
    return image_tensor(picture, config), (picture.height, picture.width)


# ------------------------------------------------------------------ model input
INPUT_RANGE_TOLERANCE = 0.01  # rounding of resizes; far below 0..255 or normalised inputs


def model_input_problem(images: torch.Tensor) -> str | None:
    """What is wrong with `images` as a model's input, or None: it must be a non-empty float
    batch [B, 3, H, W] of finite values in [0, 1] (within INPUT_RANGE_TOLERANCE), since
    0..255 pixels, mean/std-normalised images and NaN or infinite values would otherwise give
    meaningless scores without a word."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        return (
            "expected float RGB images [B, 3, H, W] in [0, 1], got "
            f"{images.dtype} {list(images.shape)}"
        )
    if images.shape[0] == 0:
        return "expected at least one image, got an empty batch [0, 3, H, W]"
    # One pass gives the range and, as in count_non_finite, whether any value is not finite.
    low, high = (float(value) for value in torch.aminmax(images))
    if not (math.isfinite(low) and math.isfinite(high)):
        return (
            f"images hold {count_non_finite(images)} values that are not finite numbers (NaN "
            "or infinite); such an image cannot be scored"
        )
    if low < -INPUT_RANGE_TOLERANCE or high > 1.0 + INPUT_RANGE_TOLERANCE:
        return (
            f"expected images with values in [0, 1], got values from {low:.4g} to {high:.4g}; "
            "divide 8-bit pixels by 255 and do not normalise (the model does that itself)"
        )
    return None


def check_model_input(images: torch.Tensor) -> None:
    """A DataError with the `model_input_problem` of `images`, if they have one."""
    problem = model_input_problem(images)
    if problem is not None:
        raise DataError(problem)


# --------------------------------------------------------------- tensors (export)
# Pillow resamples 8-bit images in fixed point: weights scaled by 2**22, sums rounded and
# clipped back to 8 bits after each axis (Resample.c, PRECISION_BITS = 32 - 8 - 2).
PIL_PRECISION_BITS = 22
LOW_WEIGHT_BITS = 8  # each fixed-point weight is split into high * 2**8 + low


@dataclass(frozen=True)
class ResizeTaps:
    """One axis of Pillow's bilinear resize of 8-bit pixels as taps: output position i is
    (sum_k weight[i, k] * input[indices[i, k]] + 2**21) >> 22, clipped to 0..255, where
    each 22-bit fixed-point weight = high * 2**8 + low (float32 [out, K] each): every
    product and partial sum is then an integer below 2**24, exact in float32, so every
    runtime computes the same pixels."""

    indices: torch.Tensor
    high: torch.Tensor
    low: torch.Tensor


def _bilinear(distance: float) -> float:
    distance = abs(distance)
    return 1.0 - distance if distance < 1.0 else 0.0


# The widest window of taps whose fixed-point sums stay exact in float32 (`apply_taps`):
# a resize that shrinks about 60 times or more needs wider ones.
MAX_RESIZE_WINDOW = 1 << (24 - 2 * LOW_WEIGHT_BITS - 1)


def _resize_windows(
    in_length: int, out_length: int, first: int, count: int
) -> list[tuple[int, int, float]]:
    """Pillow's bilinear windows over the input of one axis resized from `in_length` to
    `out_length`, for the `count` outputs from `first` on: (first input, length, centre)
    each, computed in double precision as Pillow does."""
    scale = in_length / out_length
    support = max(scale, 1.0)  # the bilinear filter's support (1) times the filter scale
    windows = []
    for output in range(first, first + count):
        centre = (output + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        windows.append((low, min(int(centre + support + 0.5), in_length) - low, centre))
    return windows


def _windows_problem(
    in_length: int, out_length: int, windows: list[tuple[int, int, float]]
) -> str | None:
    """Why taps over `windows` (`_resize_windows`) cannot be computed exactly: one is wider
    than MAX_RESIZE_WINDOW; None when none is."""
    if max((length for _, length, _ in windows), default=0) < MAX_RESIZE_WINDOW:
        return None
    return (
        f"a resize from {in_length} to {out_length} pixels shrinks the image "
        f"{in_length / out_length:.0f} times, more than the about 60 times whose "
        "8-bit resize can be computed exactly; resize the image before scoring it"
    )


def resize_problem(
    in_length: int, out_length: int, first: int = 0, count: int | None = None
) -> str | None:
    """Why `resize_taps` with the same arguments cannot compute its taps exactly (the
    resize shrinks too much for float32 sums), or None when it can."""
    count = out_length - first if count is None else count
    windows = _resize_windows(in_length, out_length, first, count)
    return _windows_problem(in_length, out_length, windows)


@functools.lru_cache(maxsize=32)
def resize_taps(
    in_length: int, out_length: int, first: int = 0, count: int | None = None
) -> ResizeTaps:
    """The taps of Pillow's bilinear resize of one axis of an 8-bit image from `in_length`
    to `out_length`, for the `count` outputs from `first` on (a crop): each output's
    window and weights computed in double precision and turned into 22-bit fixed point the
    way Pillow does, so `apply_taps` reproduces `Image.resize` pixel for pixel. Results are
    cached CPU tensors; callers must not modify them. A DataError for a `resize_problem`."""
    count = out_length - first if count is None else count
    spans = _resize_windows(in_length, out_length, first, count)
    problem = _windows_problem(in_length, out_length, spans)
    if problem is not None:
        raise DataError(problem)
    inverse_scale = 1.0 / max(in_length / out_length, 1.0)  # Pillow multiplies by the reciprocal
    windows = []
    for low, length, centre in spans:
        weights = [_bilinear((tap + low - centre + 0.5) * inverse_scale) for tap in range(length)]
        total = sum(weights)
        if total != 0.0:
            weights = [weight / total for weight in weights]
        fixed = [int(weight * (1 << PIL_PRECISION_BITS) + (0.5 if weight >= 0 else -0.5))
                 for weight in weights]  # fmt: skip
        windows.append((low, fixed))
    width = max(len(fixed) for _, fixed in windows)
    indices = torch.tensor(
        [[min(low + tap, in_length - 1) for tap in range(width)] for low, _ in windows]
    )
    weights = torch.tensor([fixed + [0] * (width - len(fixed)) for _, fixed in windows])
    return ResizeTaps(
        indices,
        (weights >> LOW_WEIGHT_BITS).float(),
        (weights & ((1 << LOW_WEIGHT_BITS) - 1)).float(),
    )


def apply_taps(pixels: torch.Tensor, dim: int, taps: ResizeTaps) -> torch.Tensor:
    """Resamples 8-bit `pixels` (whole numbers 0..255 in float32) along `dim` with `taps`:
    Pillow's fixed-point sum over the taps, rounded and clipped to 0..255, computed exactly
    in float32. With S_high and S_low the sums of the weight parts (each below 2**24), the
    fixed-point total is S_high * 2**8 + S_low + 2**21 and the pixel its floor over 2**22,
    split as q + floor(((S_high - q * 2**14) * 2**8 + S_low + 2**21) / 2**22) with
    q = floor(S_high / 2**14), where every term stays below 2**24. Every product and partial
    sum is a whole number below 2**24, so the order of the sums does not matter: taps are
    summed one at a time (memory of the output's size), or, when their number is a traced
    value (a graph of any input size, whose taps are inputs), gathered and summed at once."""
    indices = taps.indices.to(pixels.device)
    high_weights = taps.high.to(pixels.device, torch.float32)
    low_weights = taps.low.to(pixels.device, torch.float32)
    if isinstance(indices.shape[1], int):
        shape = [1] * pixels.ndim
        shape[dim] = -1
        high = low = None
        for tap in range(indices.shape[1]):
            gathered = pixels.index_select(dim, indices[:, tap])
            high_term = gathered * high_weights[:, tap].view(shape)
            low_term = gathered * low_weights[:, tap].view(shape)
            high = high_term if high is None else high + high_term
            low = low_term if low is None else low + low_term
    else:
        moved = pixels.movedim(dim, -1)
        gathered = moved.index_select(-1, indices.reshape(-1)).reshape(
            *moved.shape[:-1], indices.shape[0], indices.shape[1]
        )  # [..., out, K]
        high = (gathered * high_weights).sum(dim=-1).movedim(-1, dim)
        low = (gathered * low_weights).sum(dim=-1).movedim(-1, dim)
    high_shift = float(1 << (PIL_PRECISION_BITS - LOW_WEIGHT_BITS))
    whole = torch.floor(high / high_shift)
    rest = (high - whole * high_shift) * float(1 << LOW_WEIGHT_BITS) + low
    rest = rest + float(1 << (PIL_PRECISION_BITS - 1))
    return (whole + torch.floor(rest / float(1 << PIL_PRECISION_BITS))).clamp(0, EIGHT_BIT_MAX)


@functools.cache
def pillow_resamples_rows_first_when_height_shrinks_most() -> bool:
    """Whether this Pillow resamples rows before columns when an image's height shrinks by
    more than twice as many pixels as its width changes (Pillow 13 does, for speed; earlier
    versions always resample columns first). Each 8-bit pass rounds, so the order changes
    pixels; Pillow itself is asked, once, with a probe image whose two orders differ."""
    probe = np.random.default_rng(0).integers(0, EIGHT_BIT_MAX + 1, (64, 24), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(probe).resize((23, 16), Image.Resampling.BILINEAR))
    pixels = torch.from_numpy(probe).float()
    rows_first = apply_taps(apply_taps(pixels, 0, resize_taps(64, 16)), 1, resize_taps(24, 23))
    return bool(np.array_equal(rows_first.numpy(), expected))


def resamples_rows_first(size: tuple[int, int], resized: tuple[int, int]) -> bool:
    """Whether Pillow resizing (height, width) `size` to `resized` resamples rows first."""
    shrink = size[0] - resized[0]
    return (
        shrink > 0
        and shrink > 2 * (size[1] - resized[1])
        and resized[1] != size[1]
        and pillow_resamples_rows_first_when_height_shrinks_most()
    )


@dataclass(frozen=True)
class AxisGeometry:
    """How one axis of an input becomes the model's: `taps` (resize to `resized` and crop
    in one), or the plain slice [start, start + length) when the axis is not resized."""

    start: int
    length: int
    taps: ResizeTaps | None
    resized: int


def input_geometry(
    size: tuple[int, int], config: PreprocessingConfig
) -> tuple[AxisGeometry, AxisGeometry]:
    """(rows, columns) geometry taking a float input of (height, width) `size` to the
    model's input: `image_tensor`'s resize and crop, on tensors."""
    axes = []
    for length, resized, offset, crop in frame_of(tuple(size), config).axis_resizes():
        taps = None if resized == length else resize_taps(length, resized, offset, crop)
        axes.append(AxisGeometry(offset, crop, taps, resized))
    return axes[0], axes[1]


def input_size_problem(
    size: tuple[int, int], config: PreprocessingConfig, name: str | None = None
) -> str | None:
    """Why a float input of (height, width) `size` cannot be scored on tensors by a model
    of `config` (`input_geometry`, or an any-size graph's geometry inputs): its
    `working_size_problem`, or a resize that shrinks it too much to compute exactly
    (`resize_problem`). One line naming `name` (default the size), or None when it can."""
    height, width = int(size[0]), int(size[1])
    problem = working_size_problem((height, width), config)
    for axis in frame_of((height, width), config).axis_resizes():
        if problem is None:
            problem = resize_problem(*axis)
    return None if problem is None else f"{name or f'a {height}x{width} image'}: {problem}"


def to_model_input(
    images: torch.Tensor,
    config: PreprocessingConfig,
    geometry: tuple[AxisGeometry, AxisGeometry] | None = None,
) -> torch.Tensor:
    """Float images [B, 3, H, W] in [0, 1] -> the model's input: `image_tensor`'s chain on
    tensors. The images are read as 8-bit pixels (x * 255, rounded), as a decoded file is,
    resized by Pillow's fixed-point bilinear resize (one axis after the other, in Pillow's
    order, each rounded to 8 bits), cropped, and divided by 255: for an image decoded from
    a file, the very tensor `image_tensor` gives. `geometry` is
    `input_geometry((H, W), config)`, computed here when not given."""
    size = (int(images.shape[-2]), int(images.shape[-1]))
    if geometry is None:
        geometry = input_geometry(size, config)
    pixels = torch.round(images.float() * EIGHT_BIT_MAX)
    passes = [(-1, geometry[1]), (-2, geometry[0])]  # columns first, as Pillow ...
    if resamples_rows_first(size, (geometry[0].resized, geometry[1].resized)):
        passes.reverse()  # ... unless it shrinks the rows first
    for dim, axis in passes:
        if axis.taps is not None:
            pixels = apply_taps(pixels, dim, axis.taps)
        elif axis.length != pixels.shape[dim]:
            pixels = pixels.narrow(dim, axis.start, axis.length)
    return pixels.to(images.dtype) / EIGHT_BIT_MAX


def _crop_coordinates(frame: Frame, device) -> list[torch.Tensor]:
    """Per axis, where the centre of each input pixel lands in the model's input frame (in
    that frame's pixels, float64): where the resize sends it, minus the crop offset."""
    return [
        (torch.arange(length, device=device, dtype=torch.float64) + 0.5) * (new_length / length)
        - offset
        for length, new_length, offset in zip(
            frame.original, frame.resized, (frame.top, frame.left), strict=True
        )
    ]


def inspected_region(input_size: tuple[int, int], config: PreprocessingConfig) -> torch.Tensor:
    """bool [H, W] on an input of `input_size`: True where the pixel's centre lies inside the
    model's input (all True without a centre crop). Outside it, `map_to_input_frame` only
    repeats the crop's edge values: the model never saw those pixels."""
    frame = frame_of(tuple(input_size), config)
    inside = [
        (coordinates >= 0) & (coordinates < crop)
        for coordinates, crop in zip(_crop_coordinates(frame, "cpu"), frame.size, strict=True)
    ]
    return inside[0][:, None] & inside[1][None, :]


def map_to_input_frame(
    maps: torch.Tensor, input_size: tuple[int, int], config: PreprocessingConfig
) -> torch.Tensor:
    """Maps [B, h, w] in the model's input frame -> maps [B, H, W] on an input of `input_size`.

    Each input pixel centre is sent where the resize sent it, and the map is sampled there
    bilinearly (the geometry of `align_corners=False` resizing). Points outside a centre crop
    take the nearest crop-edge value (`inspected_region` tells them apart; what an operator
    sees greys them out). With an identity resize, the crop region of the result equals
    `maps`.
    """
    frame = frame_of(tuple(input_size), config)
    axes = [
        (2.0 * coordinates / crop - 1.0).float()
        for coordinates, crop in zip(_crop_coordinates(frame, maps.device), frame.size, strict=True)
    ]
    rows, columns = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack((columns, rows), dim=-1).expand(maps.shape[0], -1, -1, -1)
    sampled = F.grid_sample(
        maps.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.squeeze(1)


def frame_sampling(
    input_size: tuple[int, int], config: PreprocessingConfig
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`map_to_input_frame`'s bilinear sampling as taps, per axis (rows, columns): indices
    int64 [L, 2] into the model's frame and weights float32 [L, 2] for each of the L input
    pixels, the two neighbours that grid sampling with border padding reads, computed the
    way it computes them. A map's value at input pixel (y, x) is then
    sum_ij rows.weights[y, i] * columns.weights[x, j] * map[rows.indices[y, i],
    columns.indices[x, j]] (the form exported graphs of any input size use)."""
    frame = frame_of(tuple(input_size), config)
    axes = []
    for coordinates, crop in zip(_crop_coordinates(frame, "cpu"), frame.size, strict=True):
        grid = (2.0 * coordinates / crop - 1.0).float()
        position = (((grid + 1.0) * crop - 1.0) / 2.0).clamp(0, crop - 1)
        first = position.floor()
        weight = position - first
        first = first.long()
        indices = torch.stack([first, (first + 1).clamp(max=crop - 1)], dim=1)
        axes.append((indices, torch.stack([1.0 - weight, weight], dim=1)))
    return axes[0], axes[1]


# --------------------------------------------------------------------------- tiles
def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start positions of tiles of `tile` pixels covering `length` pixels, neighbours
    overlapping by at least the fraction `overlap`; the last tile ends at the edge."""
    if tile > length:
        raise DataError(
            f"--tile {tile} is larger than the working image ({length} px along one side); "
            "use a smaller --tile or a larger --resize or --scale"
        )
    stride = max(1, int(tile * (1.0 - overlap)))
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def tile_indices(
    size: tuple[int, int], tile: int, overlap: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles of a working image of (height, width) `size`: its rows of each row of tiles
    and its columns of each column of tiles (int64 [Tr, tile] and [Tc, tile], from the
    `tile_origins`), the form `cut_tiles` and `stitch_tiles` take."""
    span = torch.arange(tile, device=device)
    rows, columns = (
        torch.tensor(tile_origins(int(length), tile, overlap), device=device)[:, None] + span
        for length in size
    )
    return rows, columns


def cut_tiles(
    images: torch.Tensor, tile_rows: torch.Tensor, tile_columns: torch.Tensor
) -> torch.Tensor:
    """images [B, 3, H, W] -> tiles [B * Tr * Tc, 3, tile, tile], image-major, tiles in
    row-major order of their places (`tile_indices`). Written by index, with the numbers
    of tiles as tensor sizes, so that a graph of any input size cuts them the same way."""
    batch, channels = images.shape[0], images.shape[1]
    count_rows, tile = tile_rows.shape[0], tile_rows.shape[1]
    count_columns = tile_columns.shape[0]
    rows = images.index_select(2, tile_rows.reshape(-1))  # [B, 3, Tr*t, W]
    both = rows.index_select(3, tile_columns.reshape(-1))  # [B, 3, Tr*t, Tc*t]
    both = both.reshape(batch, channels, count_rows, tile, count_columns, tile)
    return both.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, tile, tile)



def tiles_of(images: torch.Tensor, tile: int, overlap: float) -> torch.Tensor:
    """Working-size images [B, 3, H, W] -> their tiles [B * T, 3, tile, tile], image-major
    (`tile_indices` of their size, cut by `cut_tiles`)."""
    size = (int(images.shape[-2]), int(images.shape[-1]))
    return cut_tiles(images, *tile_indices(size, tile, overlap, images.device))

# ------------------------------------------------------------------- fixed sizes
def fixed_size_pair(
    image_path: Path, mask_path: Path | None, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and its mask resized to `size` x `size`, as challenge evaluators feed them:
    image float [3, S, S] in [0, 1] (PIL bilinear), mask [1, S, S] in {0, 1} (nearest,
    threshold at half); zeros without a mask."""
    image = to_tensor(open_image(image_path, "RGB").resize((size, size), Image.Resampling.BILINEAR))
    if mask_path is None:
        return image, torch.zeros(1, size, size)
    mask = to_tensor(open_mask(mask_path).resize((size, size), Image.Resampling.NEAREST))
    return image, (mask > 0.5).float()
