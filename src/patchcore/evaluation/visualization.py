"""Heat maps and their colour language, and the segmentation overlay PNGs of evaluations.

One colour language for every picture the toolkit draws (overlays, `patchcore-predict`'s heat
maps, the dashboard): the `jet` colour map blended at half opacity over the image, on the
model's colour scale (`patchcore.model.calibration.colour_range`: the decision threshold in
the middle when the model has one), and a colour bar with the threshold marked
(`draw_colour_bar`, `colour_bar_rgb`). Pixels the model never saw (outside a centre crop)
are drawn grey (`grey_out`), never in a score colour.

Every heat map drawn by one call of `save_segmentation_images` uses the same colour
scale (by default the minimum and maximum over all maps given), so the same colour means
the same anomaly score in every image of a run and images can be compared at a glance.

Overlay PNGs are composed with numpy and PIL (`compose_overlay`); matplotlib draws only the
colour bar, once per call (`vertical_colour_bar_rgb`), with the object-oriented API on the
Agg canvas, never with pyplot, so no global figure registry is touched and calls are safe
from worker threads.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from patchcore.errors import DataError
from patchcore.files import atomic_write, make_folder, printable_name, unique_file_stems
from patchcore.model.calibration import colour_range as default_colour_range
from patchcore.model.calibration import decide, decision_label
from patchcore.progress import track

LOGGER = logging.getLogger(__name__)

FIGURE_SIZE = (10.0, 3.6)
FIGURE_DPI = 100
HEATMAP_CMAP = "jet"
HEATMAP_ALPHA = 0.5
IMAGE_RANGE_TOLERANCE = 1e-3
UNSEEN_GREY = 160  # grey level of pixels outside the region the model inspected
UNSEEN_IMAGE_WEIGHT = 0.35  # how much of the image shows through that grey
COLOUR_BAR_HEIGHT = 0.74  # inches (74 pixels at the base resolution)
COLOUR_BAR_BASE_WIDTH = 640  # pixels; wider bars are drawn at a proportionally higher dpi

ArrayLike = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class SegmentationPanel:
    """What one PNG shows: HWC image, HW map and mask (or None), score and title name."""

    image: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray | None
    score: float
    name: str


def _to_numpy(values: ArrayLike | Sequence[float]) -> np.ndarray:
    """A float64 numpy copy of a tensor, array or sequence of numbers."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def heatmap_rgb(anomaly_map: np.ndarray, colour_range: tuple[float, float]) -> np.ndarray:
    """An anomaly map [H, W] coloured with the overlays' colour map on a fixed scale, uint8 HxWx3."""
    low, high = colour_range
    scaled = np.clip((np.asarray(anomaly_map, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return np.round(matplotlib.colormaps[HEATMAP_CMAP](scaled)[..., :3] * 255).astype(np.uint8)


def blend_heatmap(
    image: np.ndarray, anomaly_map: np.ndarray, colour_range: tuple[float, float]
) -> np.ndarray:
    """image uint8 [H, W, 3] and map [H, W] -> uint8 [H, W, 3], the coloured map blended over it."""
    heat = heatmap_rgb(anomaly_map, colour_range).astype(np.float64)
    blended = (1.0 - HEATMAP_ALPHA) * image.astype(np.float64) + HEATMAP_ALPHA * heat
    return np.round(blended).astype(np.uint8)


def grey_out(drawn: np.ndarray, original: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
    """`drawn` uint8 [H, W, 3] (e.g. a heat map over `original`) with the pixels where `seen`
    [H, W] is False replaced by the original washed to grey: they were never inspected, so
    they get no score colour. `drawn` itself when every pixel was seen."""
    if seen is None or seen.all():
        return drawn
    washed = UNSEEN_IMAGE_WEIGHT * original.astype(np.float64) + (1 - UNSEEN_IMAGE_WEIGHT) * UNSEEN_GREY
    result = drawn.copy()
    result[~seen] = np.round(washed[~seen]).astype(np.uint8)
    return result


def _threshold_label(threshold: float) -> str:
    """'threshold 21293', 'threshold 0.6840': four significant digits, never an exponent."""
    if threshold == 0 or not math.isfinite(threshold):
        return f"threshold {threshold:g}"
    decimals = max(0, 3 - math.floor(math.log10(abs(threshold))))
    return f"threshold {threshold:.{decimals}f}"


def draw_colour_bar(
    figure: Figure,
    norm: Normalize,
    threshold: float | None,
    orientation: str = "vertical",
    **placement,
):
    """The heat maps' colour bar on `figure` (placed with colorbar's `ax=`/`cax=` keywords),
    labelled "anomaly score", with the threshold marked by a black-and-white line; a
    threshold beyond the scale is marked at the end it lies past."""
    colour_bar = figure.colorbar(
        ScalarMappable(norm=norm, cmap=HEATMAP_CMAP), orientation=orientation, **placement
    )
    colour_bar.set_label("anomaly score", fontsize=8)
    colour_bar.ax.tick_params(labelsize=7)
    if threshold is None:
        return colour_bar
    value = min(max(threshold, norm.vmin), norm.vmax)
    label = _threshold_label(threshold)
    if value != threshold:
        label += " (beyond the scale)"
    axes = colour_bar.ax
    line = axes.axhline if orientation == "vertical" else axes.axvline
    line(value, color="white", linewidth=3.5)
    line(value, color="black", linewidth=1.5)
    if orientation == "vertical":
        axes.annotate(label, xy=(0.0, value), xycoords=("axes fraction", "data"),
                      xytext=(-3, 0), textcoords="offset points", ha="right", va="center",
                      fontsize=7, rotation=90)  # fmt: skip
    else:
        fraction = (value - norm.vmin) / (norm.vmax - norm.vmin)
        align = "left" if fraction < 0.15 else "right" if fraction > 0.85 else "center"
        axes.annotate(label, xy=(value, 1.0), xycoords=("data", "axes fraction"),
                      xytext=(0, 2), textcoords="offset points", ha=align, va="bottom",
                      fontsize=7)  # fmt: skip
    return colour_bar


def colour_bar_rgb(
    colour_range: tuple[float, float], threshold: float | None, width: int
) -> np.ndarray:
    """A horizontal colour bar `width` pixels wide as uint8 [h, width, 3] (white background):
    the heat maps' colours from low to high score, tick labels, the threshold marked."""
    vmin, vmax = _check_colour_range(colour_range)
    dpi = FIGURE_DPI * max(1.0, width / COLOUR_BAR_BASE_WIDTH)
    height = max(1, round(COLOUR_BAR_HEIGHT * dpi))
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0.06, 0.56, 0.88, 0.17))
    draw_colour_bar(figure, Normalize(vmin=vmin, vmax=vmax), threshold, "horizontal", cax=axes)
    axes.xaxis.set_label_position("bottom")
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    figure.clear()
    return np.ascontiguousarray(pixels[:height, :width])


def hidden_reject_note(rejected: bool, anomaly_map: np.ndarray, threshold: float) -> str:
    """Why a rejected image's heat map shows nothing above the threshold, or '' when it does
    (or the image was accepted): the image score is its largest patch score, which the
    Gaussian smoothing of the map lowers when the anomaly is a single patch or two."""
    if not rejected or bool(decide(anomaly_map, threshold).any()):
        return ""
    peak = float(np.nanmax(anomaly_map)) if np.isfinite(anomaly_map).any() else math.nan
    return (
        f"Rejected by its most anomalous patch; the smoothed map peaks at {peak:.4g}, below "
        "the threshold, so no pixel is marked. The box marks that peak; a lower "
        "--mask_threshold shows the region."
    )


def mark_peak(image: np.ndarray, anomaly_map: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
    """`image` uint8 [H, W, 3] with a box (white inside black) around the largest value of
    `anomaly_map` [H, W] within `seen`: the most suspicious place."""
    values = np.where(np.isfinite(anomaly_map), anomaly_map, np.inf)
    if seen is not None:
        values = np.where(seen, values, -np.inf)
    row, column = np.unravel_index(int(np.argmax(values)), values.shape)
    height, width = values.shape
    half = max(4, min(height, width) // 20)
    top, bottom = max(0, row - half), min(height - 1, row + half)
    left, right = max(0, column - half), min(width - 1, column + half)
    marked = image.copy()
    for thickness, colour in ((2, (0, 0, 0)), (1, (255, 255, 255))):
        for offset in range(thickness):
            t, b = min(top + offset, bottom), max(bottom - offset, top)
            l, r = min(left + offset, right), max(right - offset, left)
            marked[t, l : r + 1] = colour
            marked[b, l : r + 1] = colour
            marked[t : b + 1, l] = colour
            marked[t : b + 1, r] = colour
    if seen is not None:
        marked[~seen] = image[~seen]  # the box never covers what was not inspected
    return marked


def decision_caption(width: int, text: str, rejected: bool) -> np.ndarray:
    """A white strip `width` pixels wide as uint8 [h, width, 3] with `text` wrapped onto it,
    red for a reject, dark green for an accept (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    characters = max(8, width // 7)
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if len(candidate) > characters and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    line_height = 13
    canvas = Image.new("RGB", (width, 6 + line_height * len(lines)), "white")
    draw = ImageDraw.Draw(canvas)
    colour = (200, 0, 0) if rejected else (0, 110, 0)
    for number, content in enumerate(lines):
        draw.text((4, 3 + number * line_height), content, fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _check_colour_range(colour_range: tuple[float, float]) -> tuple[float, float]:
    """Validate an explicit (vmin, vmax): two finite numbers with vmin < vmax."""
    if len(colour_range) != 2:
        raise DataError(f"colour_range: expected (vmin, vmax), got {colour_range!r}")
    vmin, vmax = float(colour_range[0]), float(colour_range[1])
    if not (np.isfinite(vmin) and np.isfinite(vmax) and vmin < vmax):
        raise DataError(f"colour_range: need finite vmin < vmax, got ({vmin}, {vmax})")
    return vmin, vmax


def _image_list(images) -> list[np.ndarray]:
    """Validate images ([N, 3 or 1, H, W], or a list of [3 or 1, H, W] of any sizes) in
    [0, 1]; return them as RGB [H, W, 3] arrays."""
    if not isinstance(images, list | tuple):
        array = _to_numpy(images)
        if array.ndim != 4:
            raise DataError(f"images: expected shape [N, 3, H, W], got {list(array.shape)}")
        images = list(array)
    result = []
    for image in images:
        array = _to_numpy(image)
        if array.ndim != 3 or array.shape[0] not in (1, 3):
            raise DataError(f"images: expected shape [N, 3, H, W], got {list(array.shape)}")
        if array.size and (
            array.min() < -IMAGE_RANGE_TOLERANCE or array.max() > 1 + IMAGE_RANGE_TOLERANCE
        ):
            raise DataError(
                f"images: values must be de-normalised RGB in [0, 1], "
                f"got range [{array.min():.3g}, {array.max():.3g}]"
            )
        rgb = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
        result.append(np.clip(rgb.transpose(1, 2, 0), 0.0, 1.0))
    return result


def _map_list(values, argument: str, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Validate maps ([N, H, W], [N, 1, H, W] or a list of [H, W] / [1, H, W]) matching the
    images' sizes; return them as [H, W] arrays."""
    if not isinstance(values, list | tuple):
        values = list(_to_numpy(values))
    if len(values) != len(sizes):
        raise DataError(f"{argument}: expected {len(sizes)} maps, got {len(values)}")
    result = []
    for value, size in zip(values, sizes):
        array = _to_numpy(value)
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if array.shape != tuple(size):
            raise DataError(f"{argument}: expected shape {list(size)}, got {list(array.shape)}")
        result.append(array)
    return result


def _per_image(values: Sequence | ArrayLike, argument: str, count: int) -> list:
    """Validate a per-image sequence of length `count`; return it as a list."""
    items = values.tolist() if isinstance(values, torch.Tensor | np.ndarray) else list(values)
    if len(items) != count:
        raise DataError(f"{argument}: expected {count} entries, got {len(items)}")
    return items


def _title(name: str, score: float, threshold: float | None) -> str:
    """Figure title: the name, the image score and, with a threshold, the decision."""
    text = f"{printable_name(name)}  |  score {score:.4g}"
    if threshold is None:
        return text
    rejected = bool(decide(score, threshold))
    relation = ("not finite," if not np.isfinite(score) else ">") if rejected else "<="
    return f"{text} {relation} threshold {threshold:.4g}: {decision_label(rejected)}"


# The overlay PNG is composed with numpy and PIL; matplotlib draws only its colour bar, once
# per call of save_segmentation_images (the scale and threshold are shared by every image).
PANEL_SIZE = 300  # pixels; each panel's image is fitted into a square of this side
PANEL_GAP = 8
MARGIN = 4
TITLE_HEIGHT = 32
PANEL_TITLE_HEIGHT = 20
OVERLAY_BAR_WIDTH = 84  # pixels: the vertical colour bar with its ticks and labels
NO_TRUTH_IMAGE_WEIGHT = 0.4  # how much of the image shows in the 'no ground truth' panel


def _font(size: int):
    """PIL's built-in scalable font at `size` pixels."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def vertical_colour_bar_rgb(
    colour_range: tuple[float, float], threshold: float | None, height: int
) -> np.ndarray:
    """The overlays' vertical colour bar `height` pixels high as uint8 [height, w, 3] (white
    background): low scores at the bottom, tick labels, "anomaly score", the threshold
    marked by a black-and-white line and labelled to the left of the bar."""
    vmin, vmax = _check_colour_range(colour_range)
    width = OVERLAY_BAR_WIDTH
    figure = Figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI,
                    facecolor="white")  # fmt: skip
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0.2, 0.03, 0.2, 0.94))
    draw_colour_bar(figure, Normalize(vmin=vmin, vmax=vmax), threshold, "vertical", cax=axes)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    figure.clear()
    return np.ascontiguousarray(pixels[:height, :width])


def _fitted(pixels: np.ndarray, nearest: bool = False):
    """uint8 [H, W, 3] as a PIL image fitted into PANEL_SIZE x PANEL_SIZE, aspect kept."""
    from PIL import Image

    height, width = pixels.shape[:2]
    factor = PANEL_SIZE / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return Image.fromarray(pixels).resize(size, resample)


def _mask_panel(image: np.ndarray, mask: np.ndarray | None):
    """The ground-truth panel: the binary mask in black and white, or the image faded
    towards white and marked 'no ground truth'."""
    from PIL import ImageDraw

    if mask is not None:
        grey = np.where(mask > 0.5, 255, 0).astype(np.uint8)
        return _fitted(np.repeat(grey[..., None], 3, axis=-1), nearest=True)
    faded = NO_TRUTH_IMAGE_WEIGHT * image.astype(np.float64) + (1 - NO_TRUTH_IMAGE_WEIGHT) * 255
    panel = _fitted(np.round(faded).astype(np.uint8))
    draw, font, text = ImageDraw.Draw(panel), _font(15), "no ground truth"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (panel.width - (right - left)) // 2 - left
    y = (panel.height - (bottom - top)) // 2 - top
    draw.rectangle((x + left - 6, y + top - 5, x + right + 6, y + bottom + 5),
                   fill=(255, 255, 255), outline=(128, 128, 128))  # fmt: skip
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return panel


def compose_overlay(
    panel: SegmentationPanel,
    colour_range: tuple[float, float],
    threshold: float | None,
    colour_bar: np.ndarray,
):
    """The overlay of one image as a PIL RGB image: the title (name, score, decision), then
    three panels (the image; the ground truth; the anomaly map blended over the image on
    the shared scale, `colour_bar` from `vertical_colour_bar_rgb` beside it)."""
    from PIL import Image, ImageDraw

    image = np.round(np.clip(panel.image, 0.0, 1.0) * 255).astype(np.uint8)
    map_values = np.where(np.isfinite(panel.anomaly_map), panel.anomaly_map, colour_range[1])
    tiles = (_fitted(image), _mask_panel(image, panel.mask),
             _fitted(blend_heatmap(image, map_values, colour_range)))  # fmt: skip
    width = 2 * MARGIN + 3 * PANEL_SIZE + 3 * PANEL_GAP + OVERLAY_BAR_WIDTH
    top = TITLE_HEIGHT + PANEL_TITLE_HEIGHT
    height = top + PANEL_SIZE + 2 * MARGIN
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title_font, panel_font = _font(17), _font(13)
    draw.text((width // 2, TITLE_HEIGHT // 2 + 2), _title(panel.name, panel.score, threshold),
              fill=(0, 0, 0), font=title_font, anchor="mm")  # fmt: skip
    for number, (tile, label) in enumerate(zip(tiles, ("image", "ground truth", "anomaly map"))):
        left = MARGIN + number * (PANEL_SIZE + PANEL_GAP)
        x = left + (PANEL_SIZE - tile.width) // 2
        y = top + (PANEL_SIZE - tile.height) // 2
        canvas.paste(tile, (x, y))
        draw.rectangle((x - 1, y - 1, x + tile.width, y + tile.height), outline=(0, 0, 0))
        draw.text((left + PANEL_SIZE // 2, y - 4), label, fill=(0, 0, 0), font=panel_font,
                  anchor="mb")  # fmt: skip
    bar_left = MARGIN + 3 * PANEL_SIZE + 2 * PANEL_GAP + PANEL_GAP
    canvas.paste(Image.fromarray(colour_bar), (bar_left, top))
    return canvas


def write_png(picture, path: Path) -> None:
    """Write a PIL image as a PNG to `path` atomically: fast zlib compression (level 1, run
    lengths only), half the time of the default for about the same size."""
    atomic_write(path, lambda temporary: picture.save(temporary, format="PNG", compress_level=1,
                                                      compress_type=zlib.Z_RLE))  # fmt: skip


def save_segmentation_images(
    output_folder: Path,
    images: ArrayLike,
    anomaly_maps: ArrayLike,
    scores: Sequence[float] | ArrayLike,
    names: Sequence[str],
    masks: ArrayLike | None = None,
    has_mask: Sequence[bool] | None = None,
    colour_range: tuple[float, float] | None = None,
    threshold: float | None = None,
) -> list[Path]:
    """Write one overlay PNG per image to `output_folder/<name>.png`; return the paths.

    images [N, 3, H, W] in [0, 1]; anomaly_maps [N, H, W]; scores [N]; names [N], made
    safe and distinct as file names (`patchcore.files.unique_file_stems`). masks
    [N, 1, H, W] or [N, H, W] in {0, 1}, or None; has_mask[i] False means image i has no
    ground truth. Images of different sizes are given as lists of per-image tensors. One colour scale is shared by all maps:
    `colour_range`, or by default the global min and max. With a `threshold`, the title
    says whether the image is rejected (`decide`: score above the threshold or not finite)
    or accepted.
    """
    image_array = _image_list(images)
    count, sizes = len(image_array), [image.shape[:2] for image in image_array]
    map_array = _map_list(anomaly_maps, "anomaly_maps", sizes)
    mask_array = None if masks is None else _map_list(masks, "masks", sizes)
    score_list = [float(s) for s in _per_image(scores, "scores", count)]
    stems = unique_file_stems([str(name) for name in _per_image(names, "names", count)])
    mask_flags = [True] * count if has_mask is None else _per_image(has_mask, "has_mask", count)
    if count == 0:
        return []
    if colour_range is None:
        vmin, vmax = default_colour_range(None, None, map_array)
    else:
        vmin, vmax = _check_colour_range(colour_range)
    colour_bar = vertical_colour_bar_rgb((vmin, vmax), threshold, PANEL_SIZE)

    output_folder = make_folder(output_folder)
    paths = []
    for index in track(range(count), "Writing segmentation images", unit="image"):
        has_truth = mask_array is not None and bool(mask_flags[index])
        panel = SegmentationPanel(
            image=image_array[index],
            anomaly_map=map_array[index],
            mask=(mask_array[index] > 0.5).astype(np.float64) if has_truth else None,
            score=score_list[index],
            name=str(names[index]),
        )
        path = output_folder / f"{stems[index]}.png"
        write_png(compose_overlay(panel, (vmin, vmax), threshold, colour_bar), path)
        paths.append(path)
    LOGGER.info("Wrote %d segmentation image(s) to %s", len(paths), output_folder)
    return paths
