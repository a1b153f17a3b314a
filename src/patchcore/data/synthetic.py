"""Seeded synthetic anomaly-detection data in the MVTec AD folder layout.

Two categories are available:

* ``"texture"`` -- a plain-weave fabric with two thread colours, random weave
  phase, a slight rotation, brightness changes and fibre noise.  Defects:
  ``"scratch"`` (a thin bright curved line), ``"stain"`` (an irregular coloured
  blot) and ``"hole"`` (a dark frayed opening).
* ``"object"`` -- a brass hex nut with a threaded bore on a dark plain
  background, slightly shifted and rotated, with lighting and brightness
  changes.  Defects: ``"crack"`` (a dark jagged line), ``"missing"`` (a piece
  broken off the rim, background shows through) and ``"color"`` (a paint spot).

Every defective image comes with a binary mask of exactly the pixels that the
defect changed; :func:`make_sample` also returns the defect-free rendering of
the same sample so that this property can be checked.

The layout written by :func:`generate_category` is::

    root/<category>/train/good/000.png
    root/<category>/test/good/000.png
    root/<category>/test/<defect>/000.png
    root/<category>/ground_truth/<defect>/000_mask.png

Run ``patchcore-synthetic ROOT`` to write a dataset from the shell.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image
from scipy import ndimage

from patchcore.config import WORKING_PIXELS_VARIABLE, working_pixel_limit
from patchcore.errors import ConfigurationError

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_DEFECT_TYPES",
    "SyntheticSample",
    "SyntheticSpec",
    "defect_types",
    "generate_category",
    "generate_dataset",
    "make_sample",
    "sample_rng",
]

logger = logging.getLogger(__name__)

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("texture", "object")

SYNTHETIC_DEFECT_TYPES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "texture": ("scratch", "stain", "hole"),
        "object": ("crack", "missing", "color"),
    }
)

_MIN_IMAGE_SIZE = 32
_MAX_DEFECT_ATTEMPTS = 25
_GROUP_TRAIN = 0
_GROUP_TEST_GOOD = 1
_GROUP_FIRST_DEFECT = 2

FloatImage = np.ndarray  # (H, W, 3) float64 in [0, 255]
BoolMask = np.ndarray  # (H, W) bool


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and seed of a synthetic dataset (per category)."""

    image_size: int = 256
    num_train: int = 20
    num_test_good: int = 6
    num_test_defective_per_type: int = 4
    seed: int = 0
    panels: int = 1


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered sample.

    ``clean`` is the defect-free rendering, ``image`` the same rendering with
    the defect applied (identical to ``clean`` for normal samples) and ``mask``
    marks exactly the pixels where ``image`` differs from ``clean``.
    """

    clean: np.ndarray
    image: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class _Scene:
    """A defect-free rendering plus what defect painters need to know about it."""

    image: FloatImage
    background: FloatImage
    body: BoolMask
    placement: BoolMask


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise a one-line ConfigurationError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigurationError(f"SyntheticSpec.{name} must be an integer >= {minimum}, got {value!r}")


def _validate_spec(spec: SyntheticSpec) -> None:
    """Check every field of ``spec``."""
    _check_int("image_size", spec.image_size, _MIN_IMAGE_SIZE)
    largest = math.isqrt(working_pixel_limit())
    if spec.image_size > largest:
        raise ConfigurationError(
            f"SyntheticSpec.image_size must be at most {largest} (the working image limit, "
            f"{WORKING_PIXELS_VARIABLE}), got {spec.image_size}"
        )
    _check_int("num_train", spec.num_train, 1)
    _check_int("num_test_good", spec.num_test_good, 1)
    _check_int("num_test_defective_per_type", spec.num_test_defective_per_type, 1)
    _check_int("seed", spec.seed, 0)
    _check_int("panels", spec.panels, 1)
    if spec.image_size * spec.image_size * spec.panels > working_pixel_limit():
        raise ConfigurationError(
            f"SyntheticSpec.panels {spec.panels} of {spec.image_size} px make images of more "
            f"than the working image limit of {working_pixel_limit()} pixels "
            f"({WORKING_PIXELS_VARIABLE}); use fewer panels or a smaller image_size"
        )


def _validate_category(category: str) -> None:
    """Raise ConfigurationError naming ``category`` if it is not a synthetic category."""
    if category not in SYNTHETIC_DEFECT_TYPES:
        valid = ", ".join(SYNTHETIC_CATEGORIES)
        raise ConfigurationError(f"unknown synthetic category {category!r}; valid categories: {valid}")


def defect_types(category: str) -> tuple[str, ...]:
    """Return the defect types generated for ``category``."""
    _validate_category(category)
    return SYNTHETIC_DEFECT_TYPES[category]


# --------------------------------------------------------------------------- seeding


def sample_rng(seed: int, category: str, group: int, index: int) -> np.random.Generator:
    """Return the generator of one sample.

    The stream depends only on ``seed``, the category name bytes, the image
    group (0 train, 1 test/good, 2+k the k-th defect type) and the index within
    the group, so changing one count in the spec leaves other images unchanged.
    """
    entropy = [int(seed), *category.encode("utf-8")]
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(group, index)))


# --------------------------------------------------------------------------- primitives


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y) pixel-centre coordinates of a ``size`` x ``size`` image."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    xx, yy = np.meshgrid(coords, coords, indexing="xy")
    return xx, yy


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, normalised to zero mean and unit variance.

    Wide kernels are applied on a coarser grid and upsampled bilinearly, which
    looks the same and is much cheaper.
    """
    step = max(1, int(sigma // 3))
    coarse_shape = (shape[0] // step + 2, shape[1] // step + 2)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma / step, mode="wrap")
    if step > 1:
        field = ndimage.zoom(field, step, order=1, grid_mode=False)
    field = field[: shape[0], : shape[1]]
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def _colour(values: Sequence[float]) -> np.ndarray:
    """Return an RGB triple as a float array broadcastable over an image."""
    return np.asarray(values, dtype=np.float64)


def _to_uint8(image: FloatImage) -> np.ndarray:
    """Round a float image to uint8."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _polyline_mask(size: int, points: np.ndarray, width: float) -> BoolMask:
    """Pixels whose centre lies within ``width / 2`` of the polyline ``points`` (N x 2, x/y)."""
    half = width / 2.0
    mask = np.zeros((size, size), dtype=bool)
    lo = np.clip(np.floor(points.min(axis=0) - half - 1), 0, size).astype(int)
    hi = np.clip(np.ceil(points.max(axis=0) + half + 1), 0, size).astype(int)
    if hi[0] <= lo[0] or hi[1] <= lo[1]:
        return mask
    px, py = np.meshgrid(np.arange(lo[0], hi[0]) + 0.5, np.arange(lo[1], hi[1]) + 0.5)
    best = np.full(px.shape, np.inf)
    for start, end in itertools.pairwise(points):
        seg = end - start
        length2 = max(float(seg @ seg), 1e-12)
        t = np.clip(((px - start[0]) * seg[0] + (py - start[1]) * seg[1]) / length2, 0.0, 1.0)
        dist2 = (px - start[0] - t * seg[0]) ** 2 + (py - start[1] - t * seg[1]) ** 2
        np.minimum(best, dist2, out=best)
    mask[lo[1] : hi[1], lo[0] : hi[0]] = best <= half * half
    return mask


def _blob_mask(
    rng: np.random.Generator, size: int, centre: np.ndarray, radius: float, roughness: float
) -> BoolMask:
    """An irregular, roughly elliptical blob of mean radius ``radius`` around ``centre``."""
    mask = np.zeros((size, size), dtype=bool)
    extent = radius * (1.0 + 2.0 * roughness) + 2.0
    lo = np.clip(np.floor(centre - extent), 0, size).astype(int)
    hi = np.clip(np.ceil(centre + extent), 0, size).astype(int)
    if hi[0] <= lo[0] or hi[1] <= lo[1]:
        return mask
    px, py = np.meshgrid(np.arange(lo[0], hi[0]) + 0.5, np.arange(lo[1], hi[1]) + 0.5)
    angle = rng.uniform(0.0, np.pi)
    aspect = rng.uniform(0.6, 1.0)
    dx, dy = px - centre[0], py - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    dist = np.hypot(along / radius, across / (radius * aspect))
    wobble = _smooth_noise(rng, px.shape, sigma=max(radius / 3.0, 1.0))
    mask[lo[1] : hi[1], lo[0] : hi[0]] = dist + roughness * wobble < 1.0
    return mask


def _paint(base: FloatImage, shape: BoolMask, paint: FloatImage, alpha: np.ndarray) -> FloatImage:
    """Blend ``paint`` over ``base`` with per-pixel ``alpha`` inside ``shape`` only."""
    weight = np.where(shape, alpha, 0.0)[..., None]
    return base * (1.0 - weight) + paint * weight


def _random_point(rng: np.random.Generator, allowed: BoolMask) -> np.ndarray:
    """A uniformly chosen pixel centre (x, y) among the ``True`` pixels of ``allowed``."""
    ys, xs = np.nonzero(allowed)
    pick = int(rng.integers(len(xs)))
    return np.array([xs[pick] + 0.5, ys[pick] + 0.5])


def _inner_region(size: int, margin: float) -> BoolMask:
    """Pixels at least ``margin`` pixels away from the image border."""
    xx, yy = _pixel_grid(size)
    m = min(margin, size / 2.0 - 1.0)
    return (xx > m) & (xx < size - m) & (yy > m) & (yy < size - m)


# --------------------------------------------------------------------------- texture scene


def _render_texture(rng: np.random.Generator, size: int) -> _Scene:
    """A plain-weave fabric with random phase, slight rotation and brightness."""
    xx, yy = _pixel_grid(size)
    period = size / 14.0 * rng.uniform(0.97, 1.03)
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    u = xx * np.cos(angle) + yy * np.sin(angle) + rng.uniform(0.0, 2.0 * period)
    v = -xx * np.sin(angle) + yy * np.cos(angle) + rng.uniform(0.0, 2.0 * period)
    cell_u, cell_v = np.floor(u / period), np.floor(v / period)
    fu, fv = u / period - cell_u, v / period - cell_v
    warp_on_top = (cell_u + cell_v) % 2 == 0
    warp = np.sin(np.pi * fu) * (0.7 + 0.3 * np.sin(np.pi * fv))
    weft = np.sin(np.pi * fv) * (0.7 + 0.3 * np.sin(np.pi * fu))
    height = np.sqrt(np.where(warp_on_top, warp, weft))

    gap = _colour((52, 40, 32))
    thread = np.where(warp_on_top[..., None], _colour((204, 180, 136)), _colour((176, 122, 84)))
    image = gap + (thread - gap) * height[..., None]

    fibres = _smooth_noise(rng, (size, size), sigma=0.7)
    cloud = _smooth_noise(rng, (size, size), sigma=size / 10.0)
    shade = rng.uniform(0.92, 1.08) * (1.0 + 0.07 * fibres + 0.05 * cloud)
    image = np.clip(image * shade[..., None], 0.0, 255.0)

    everywhere = np.ones((size, size), dtype=bool)
    return _Scene(image=image, background=image, body=everywhere, placement=everywhere)


def _texture_scratch(rng: np.random.Generator, scene: _Scene, size: int) -> FloatImage:
    """A thin, bright, slightly curved scratch."""
    length = size * rng.uniform(0.18, 0.32)
    width = max(1.5, size * rng.uniform(0.014, 0.022))
    middle = _random_point(rng, _inner_region(size, length / 2.0 + width + 2.0))
    direction = rng.uniform(0.0, 2.0 * np.pi)
    along = np.array([np.cos(direction), np.sin(direction)])
    across = np.array([-along[1], along[0]])
    control = middle + across * length * rng.uniform(-0.25, 0.25)
    t = np.linspace(0.0, 1.0, 25)[:, None]
    start, end = middle - along * length / 2.0, middle + along * length / 2.0
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    shape = _polyline_mask(size, points, width)
    tone = rng.uniform(232.0, 250.0)
    paint = _colour((tone, tone - 4.0, tone - 12.0)) * np.ones_like(scene.image)
    alpha = 0.85 + 0.15 * rng.random((size, size))
    return _paint(scene.image, shape, paint, alpha)


def _texture_stain(rng: np.random.Generator, scene: _Scene, size: int) -> FloatImage:
    """An irregular blot of oil, rust or ink soaked into the fabric."""
    radius = size * rng.uniform(0.06, 0.1)
    centre = _random_point(rng, _inner_region(size, radius * 1.6))
    shape = _blob_mask(rng, size, centre, radius, roughness=0.25)
    palette = ((120, 24, 22), (40, 96, 52), (36, 52, 150))
    paint = _colour(palette[int(rng.integers(len(palette)))]) * np.ones_like(scene.image)
    alpha = 0.8 + 0.08 * np.clip(_smooth_noise(rng, (size, size), sigma=3.0), -1.5, 1.5)
    return _paint(scene.image, shape, paint, alpha)


def _texture_hole(rng: np.random.Generator, scene: _Scene, size: int) -> FloatImage:
    """A dark frayed opening in the fabric."""
    radius = size * rng.uniform(0.045, 0.08)
    centre = _random_point(rng, _inner_region(size, radius * 1.8))
    shape = _blob_mask(rng, size, centre, radius, roughness=0.35)
    dark = _colour((16, 13, 12)) * (1.0 + 0.3 * rng.random((size, size)))[..., None]
    return _paint(scene.image, shape, dark, np.ones((size, size)))


# --------------------------------------------------------------------------- object scene


def _render_object(rng: np.random.Generator, size: int) -> _Scene:
    """A brass hex nut with a threaded bore on a dark plain background."""
    xx, yy = _pixel_grid(size)
    background = (
        _colour((40, 44, 52))
        * (1.0 + 0.04 * _smooth_noise(rng, (size, size), sigma=1.0))[..., None]
        * (0.9 + 0.2 * (1.0 - yy / size))[..., None]
    )

    centre = size / 2.0 + size * rng.uniform(-0.04, 0.04, size=2)
    rotation = np.deg2rad(rng.uniform(-10.0, 10.0))
    outer = size * 0.34 * rng.uniform(0.98, 1.02)
    inradius = outer * np.cos(np.pi / 6.0)
    bore = 0.36 * outer
    face = 0.9 * inradius
    dx, dy = xx - centre[0], yy - centre[1]
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    normals = rotation + np.arange(3) * np.pi / 3.0
    hex_dist = np.max(
        np.abs(dx[..., None] * np.cos(normals) + dy[..., None] * np.sin(normals)), axis=-1
    )
    coverage = np.clip(inradius + 0.5 - hex_dist, 0.0, 1.0) * np.clip(r - bore + 0.5, 0.0, 1.0)

    light = np.cos(theta - rng.uniform(-2.6, -2.0))
    machining = 0.03 * np.sin(2.0 * np.pi * r / max(size / 80.0, 1.5))
    shade = np.where(r < face, 0.93 + 0.07 * light * r / face + machining, 0.72 + 0.25 * light)
    thread_zone = r < bore * 1.25
    thread = 0.62 + 0.12 * np.sin(2.0 * np.pi * r / max(size / 64.0, 1.5))
    shade = np.where(thread_zone, thread, shade)
    grain = 1.0 + 0.035 * _smooth_noise(rng, (size, size), sigma=0.8)
    metal = _colour((186, 150, 86)) * (rng.uniform(0.92, 1.08) * shade * grain)[..., None]

    in_bore = (r < bore)[..., None]
    behind = np.where(in_bore, background * 0.55, background)
    image = np.clip(behind * (1.0 - coverage[..., None]) + metal * coverage[..., None], 0, 255)

    body = coverage >= 1.0
    placement = body & (r > bore * 1.45) & (r < face * 0.92)
    return _Scene(image=image, background=background, body=body, placement=placement)


def _object_crack(rng: np.random.Generator, scene: _Scene, size: int) -> FloatImage:
    """A dark jagged crack running across the nut face."""
    steps = int(rng.integers(5, 9))
    step = size * rng.uniform(0.025, 0.04)
    heading = rng.uniform(0.0, 2.0 * np.pi)
    turns = heading + np.cumsum(rng.normal(0.0, 0.45, size=steps))
    offsets = step * np.stack([np.cos(turns), np.sin(turns)], axis=1)
    start = _random_point(rng, scene.placement)
    points = np.vstack([start, start + np.cumsum(offsets, axis=0)])
    width = max(1.5, size * rng.uniform(0.01, 0.016))
    shape = _polyline_mask(size, points, width)
    if rng.random() < 0.5:
        fork = points[int(rng.integers(1, steps))]
        branch_turns = turns[0] + rng.choice((-1.0, 1.0)) * 0.9 + rng.normal(0, 0.4, size=3)
        branch = step * 0.8 * np.stack([np.cos(branch_turns), np.sin(branch_turns)], axis=1)
        branch_points = np.vstack([fork, fork + np.cumsum(branch, axis=0)])
        shape |= _polyline_mask(size, branch_points, width * 0.8)
    shape &= scene.body
    dark = _colour((22, 18, 14)) * (1.0 + 0.4 * rng.random((size, size)))[..., None]
    return _paint(scene.image, shape, dark, np.ones((size, size)))


def _object_missing(rng: np.random.Generator, scene: _Scene, size: int) -> FloatImage:
    """A piece broken off the rim of the nut; the background shows through."""
    solid = ndimage.binary_fill_holes(scene.body)
    rim = solid & ~ndimage.binary_erosion(solid, iterations=2)
    where = _random_point(rng, rim & _inner_region(size, 2.0))
    radius = size * rng.uniform(0.07, 0.11)
    shape = _blob_mask(rng, size, where, radius, roughness=0.25)
    return np.where(shape[..., None], scene.background, scene.image)


def _object_color(rng: np.random.Generator, scene: _Scene, size: int) -> FloatImage:
    """A spot of paint on the nut face."""
    radius = size * rng.uniform(0.05, 0.085)
    centre = _random_point(rng, scene.placement)
    shape = _blob_mask(rng, size, centre, radius, roughness=0.3) & scene.body
    palette = ((200, 36, 40), (40, 80, 200), (40, 160, 70))
    paint = _colour(palette[int(rng.integers(len(palette)))]) * np.ones_like(scene.image)
    alpha = 0.8 + 0.08 * np.clip(_smooth_noise(rng, (size, size), sigma=2.0), -1.5, 1.5)
    return _paint(scene.image, shape, paint, alpha)


# --------------------------------------------------------------------------- samples

_Renderer = Callable[[np.random.Generator, int], _Scene]
_Painter = Callable[[np.random.Generator, _Scene, int], FloatImage]

_RENDERERS: Mapping[str, _Renderer] = MappingProxyType(
    {"texture": _render_texture, "object": _render_object}
)
_PAINTERS: Mapping[tuple[str, str], _Painter] = MappingProxyType(
    {
        ("texture", "scratch"): _texture_scratch,
        ("texture", "stain"): _texture_stain,
        ("texture", "hole"): _texture_hole,
        ("object", "crack"): _object_crack,
        ("object", "missing"): _object_missing,
        ("object", "color"): _object_color,
    }
)


def _is_visible(mask: BoolMask) -> bool:
    """Whether a defect mask is large enough for patch features to notice."""
    size = mask.shape[0]
    if mask.sum() < max(4, (0.035 * size) ** 2):
        return False
    ys, xs = np.nonzero(mask)
    return max(np.ptp(ys), np.ptp(xs)) + 1 >= 0.07 * size


def make_sample(
    category: str,
    defect_type: str | None,
    image_size: int,
    rng: np.random.Generator,
    panels: int = 1,
) -> SyntheticSample:
    """Render one sample of ``category``; ``defect_type=None`` gives a normal image.

    The defect-free rendering is drawn first from ``rng``, so ``clean`` is a
    normal sample of the category.  Defect placements whose changed area is
    too small (e.g. a crack clipped by the object edge) are redrawn.

    ``panels > 1`` makes a wide part: that many independent renderings of
    ``image_size`` side by side (``image_size`` x ``panels * image_size``, the
    texture and the defects at the same scale in pixels as one panel), the
    defect, if any, in one panel drawn at random.  One panel draws exactly what
    earlier versions drew.
    """
    _validate_category(category)
    _check_int("image_size", image_size, _MIN_IMAGE_SIZE)
    _check_int("panels", panels, 1)
    scenes = [_RENDERERS[category](rng, image_size) for _ in range(panels)]
    cleans = [_to_uint8(scene.image) for scene in scenes]
    clean = np.concatenate(cleans, axis=1)
    if defect_type is None:
        return SyntheticSample(clean=clean, image=clean, mask=np.zeros(clean.shape[:2], bool))
    if defect_type not in SYNTHETIC_DEFECT_TYPES[category]:
        valid = ", ".join(SYNTHETIC_DEFECT_TYPES[category])
        raise ConfigurationError(f"unknown defect type {defect_type!r} for {category!r}; valid: {valid}")
    painter = _PAINTERS[(category, defect_type)]
    chosen = int(rng.integers(panels)) if panels > 1 else 0
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        panel = _to_uint8(painter(rng, scenes[chosen], image_size))
        panel_mask = np.any(panel != cleans[chosen], axis=-1)
        if _is_visible(panel_mask):
            image = np.concatenate([*cleans[:chosen], panel, *cleans[chosen + 1 :]], axis=1)
            return SyntheticSample(clean=clean, image=image, mask=np.any(image != clean, axis=-1))
    raise RuntimeError(f"could not place a visible {defect_type!r} defect on {category!r}")


# --------------------------------------------------------------------------- writing


def _save_rgb(path: Path, image: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG."""
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def _save_mask(path: Path, mask: BoolMask) -> None:
    """Write a boolean mask as a 0/255 grayscale PNG."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
        path, format="PNG", compress_level=1
    )


def _plan(category: str, spec: SyntheticSpec) -> list[tuple[str, int, int, str | None]]:
    """(image folder, seed group, count, defect type) for every folder of a category."""
    plan: list[tuple[str, int, int, str | None]] = [
        ("train/good", _GROUP_TRAIN, spec.num_train, None),
        ("test/good", _GROUP_TEST_GOOD, spec.num_test_good, None),
    ]
    for k, defect in enumerate(SYNTHETIC_DEFECT_TYPES[category]):
        plan.append(
            (f"test/{defect}", _GROUP_FIRST_DEFECT + k, spec.num_test_defective_per_type, defect)
        )
    return plan


def _remove_stale_pngs(category_dir: Path, keep: set[Path]) -> None:
    """Delete PNGs left in the generated folders by an earlier, larger generation."""
    for sub in ("train", "test", "ground_truth"):
        for path in sorted((category_dir / sub).rglob("*.png")):
            if path not in keep:
                logger.debug("removing stale file %s", path)
                path.unlink()


def generate_category(root: Path, category: str, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write one synthetic category under ``root/category`` and return that folder."""
    _validate_spec(spec)
    _validate_category(category)
    category_dir = Path(root) / category
    written: set[Path] = set()
    for folder, group, count, defect in _plan(category, spec):
        image_dir = category_dir / folder
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir = category_dir / "ground_truth" / (defect or "")
        if defect is not None:
            mask_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = sample_rng(spec.seed, category, group, index)
            sample = make_sample(category, defect, spec.image_size, rng, spec.panels)
            image_path = image_dir / f"{index:03d}.png"
            _save_rgb(image_path, sample.image)
            written.add(image_path)
            if defect is not None:
                mask_path = mask_dir / f"{index:03d}_mask.png"
                _save_mask(mask_path, sample.mask)
                written.add(mask_path)
    _remove_stale_pngs(category_dir, written)
    logger.debug("wrote %d files for %s to %s", len(written), category, category_dir)
    return category_dir


def generate_dataset(
    root: Path,
    categories: Sequence[str] = SYNTHETIC_CATEGORIES,
    spec: SyntheticSpec = SyntheticSpec(),
) -> Path:
    """Write every category in ``categories`` under ``root`` and return ``root``."""
    _validate_spec(spec)
    for category in categories:
        _validate_category(category)
    root = Path(root)
    for category in dict.fromkeys(categories):
        generate_category(root, category, spec)
    return root
