"""The one scorer: patch features in, patch scores, image scores and anomaly maps out.

Every consumer (`PatchCore.predict`, the exported `PatchCoreModule`, evaluation, prediction,
the dashboard) scores through `score_features`, so a model scores the same wherever it runs.

- A patch's score is the mean distance to its k nearest memory-bank features (squared L2
  like the reference's FAISS IndexFlatL2, or L2 with `distance="l2"`). The search finds
  the neighbours; their distances are then recomputed from the differences
  (`neighbour_distances`): the search's ||q||^2 - 2 q.b + ||b||^2 loses the digits its
  terms share (1e-4 to 1e-3 of the distance when features are long and close to the bank),
  so its values would depend on how a backend or runtime sums (FAISS, torch, ONNX Runtime,
  OpenVINO, CPU or GPU), while the recomputed ones agree to float rounding of the distance.
- An image's score is its largest patch score, optionally re-weighted by the paper's Eq. 7;
  or, with `image_score` "quantile" / "top_k_mean", a high quantile of its patch scores or
  the mean of its k largest (`image_scores_of`), which grow less with the number of patches
  an image has (wide parts, whole images: docs/how-to/wide-parts.md). Both use top-k
  selection only, so exported graphs (ONNX, OpenVINO) compute them too.
- The anomaly map is the patch-score grid upsampled bilinearly to the image size, then
  smoothed by a Gaussian equal to `scipy.ndimage.gaussian_filter(map, sigma)` (truncate
  4.0, mode 'reflect', i.e. edge-including mirror padding), done in torch on the maps' device
  (both steps folded into one small matrix per axis).
- Tiled inspection (`preprocessing.tile`): each tile's patch scores are upsampled to the
  tile's pixels and stitched into one map of the whole image, averaged where tiles overlap;
  the image score is the largest value of that stitched map (or, with another `image_score`,
  the rule applied to the stitched patch grid), which is then smoothed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from patchcore.config import PatchCoreConfig
from patchcore.data.preprocessing import tile_indices, tiles_of
from patchcore.tensors import count_non_finite

DEFAULT_SIGMA = 4.0
TRUNCATE = 4.0


class NearestNeighbourSearch(Protocol):
    """What the scorer needs of a search backend (see `patchcore.model.search`).

    The scorer uses the returned distances to rank only and recomputes those of the found
    neighbours (`neighbour_distances`), unless the search returns them computed that way
    already (an attribute `exact_distances = True`). A search may also gather bank rows
    itself (a method `rows(indices)`): `patchcore.model.chunked_search` does both, so an
    exported graph holds the bank only in its search chunks.
    """

    bank: torch.Tensor

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> squared L2 distances [Q, k] and bank indices [Q, k], nearest first."""
        ...


class ExcludingSearch:
    """A search of `inner`'s bank that never returns the bank rows marked in `excluded`
    ([M] bool): what leave-one-image-out calibration scores a training image with (the bank
    without the features that came from that image), with no refit.

    A search that can leave rows out itself (a method `search_excluding(queries, k,
    excluded)`: the torch and re-ranking searches) does; of any other, it asks for k plus the
    number of excluded rows, drops the excluded ones and keeps the k nearest of the rest.
    Either way the result is exactly that of a search of the bank without those rows.
    Indices stay those of the whole bank, so the scorer's distances, Eq. 7's re-weighting
    and `bank_rows` work unchanged.
    """

    def __init__(self, inner: NearestNeighbourSearch, excluded: torch.Tensor) -> None:
        self.inner = inner
        self.bank = inner.bank
        self.excluded = excluded.to(torch.bool).cpu()
        self.num_excluded = int(self.excluded.sum())
        self.available = len(self.excluded) - self.num_excluded
        self.exact_distances = getattr(inner, "exact_distances", False)
        gather = getattr(inner, "rows", None)
        if gather is not None:
            self.rows = gather
        self._search_excluding = getattr(inner, "search_excluding", None)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.available)
        if self._search_excluding is not None:
            return self._search_excluding(queries, k, self.excluded)
        distances, indices = self.inner.search(queries, k + self.num_excluded)
        dropped = self.excluded[indices.cpu()].to(indices.device)
        # A stable sort puts the kept neighbours first, nearest first as the search found them.
        order = torch.argsort(dropped.to(torch.int8), dim=1, stable=True)[:, :k]
        return distances.gather(1, order.to(distances.device)), indices.gather(1, order)


Maps = torch.Tensor | list[torch.Tensor]  # [N, H, W], or N maps [H_i, W_i] of different sizes


def concatenate_maps(parts: list[Maps]) -> Maps:
    """Maps of several batches as one [N, H, W] tensor, or as a list of per-image maps when
    the images differ in size (whole-image inspection)."""
    per_image = [single for part in parts for single in part]
    if len({tuple(single.shape) for single in per_image}) <= 1:
        return torch.stack(per_image) if per_image else torch.empty(0, 0, 0)
    return per_image


def maps_range(maps: Maps) -> tuple[float, float]:
    """The smallest and largest value over all maps."""
    return (
        min(float(single.min()) for single in maps),
        max(float(single.max()) for single in maps),
    )


@dataclass
class Prediction:
    """Scores of images: image scores [B], anomaly maps and patch scores, each a [B, H, W]
    tensor (one batch, or images of one size) or a list of per-image maps (`Maps`)."""

    scores: torch.Tensor
    maps: Maps
    patch_scores: Maps

    @staticmethod
    def concatenate(parts: list[Prediction]) -> Prediction:
        return Prediction(
            torch.cat([part.scores for part in parts]),
            concatenate_maps([part.maps for part in parts]),
            concatenate_maps([part.patch_scores for part in parts]),
        )

    def cpu(self) -> Prediction:
        return Prediction(self.scores.cpu(), self.maps.cpu(), self.patch_scores.cpu())


# ------------------------------------------------------------------------ smoothing
def gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _mirror_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices padding an axis by `radius` on both sides as 'd c b a | a b c d | d c b a'."""
    positions = torch.arange(-radius, size + radius, device=device)
    # the period as a tensor: with a symbolic size (an export with dynamic sizes) the
    # remainder then has an ONNX form
    period = positions.new_ones(()) * (2 * size)
    positions = torch.remainder(positions, period)
    return torch.where(positions >= size, period - 1 - positions, positions)


def gaussian_blur(maps: torch.Tensor, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """maps [B, H, W] -> smoothed maps of the same shape."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, maps.device)
    radius = (len(kernel) - 1) // 2
    height, width = maps.shape[-2:]
    padded = maps.index_select(-1, _mirror_indices(width, radius, maps.device))
    rows = F.conv1d(padded.reshape(-1, 1, padded.shape[-1]), kernel.view(1, 1, -1))
    rows = rows.reshape(maps.shape[0], height, width)
    padded = rows.index_select(-2, _mirror_indices(height, radius, maps.device))
    columns = padded.transpose(1, 2).reshape(-1, 1, height + 2 * radius)
    smoothed = F.conv1d(columns, kernel.view(1, 1, -1))
    return smoothed.reshape(maps.shape[0], width, height).transpose(1, 2).contiguous()


def resize_and_blur_matrix(
    size_in: int, size_out: int, sigma: float, device: torch.device
) -> torch.Tensor:
    """[size_out, size_in] float32: the linear map of one axis that resizes bilinearly
    (align_corners=False) and then smooths like `gaussian_blur` (plain float32 operations
    only, so exported graphs keep working). Eager calls share one computed matrix per sizes,
    sigma and device (about 2 ms to build, as long as the rest of the maps' work); a graph
    being traced or compiled builds its own. Callers must not modify the result."""
    if torch.compiler.is_compiling():
        return _resize_and_blur_matrix(size_in, size_out, sigma, device)
    return _shared_resize_and_blur_matrix(size_in, size_out, sigma, device)


@functools.lru_cache(maxsize=64)
def _shared_resize_and_blur_matrix(
    size_in: int, size_out: int, sigma: float, device: torch.device
) -> torch.Tensor:
    with torch.inference_mode(False):  # a plain tensor, usable outside inference mode too
        return _resize_and_blur_matrix(size_in, size_out, sigma, device)


def _resize_and_blur_matrix(
    size_in: int, size_out: int, sigma: float, device: torch.device
) -> torch.Tensor:
    units = torch.eye(size_in, device=device)[:, None, :, None]
    resized = F.interpolate(units, size=(size_out, 1), mode="bilinear", align_corners=False)
    responses = resized[:, 0, :, 0]  # [size_in, size_out]: response to each unit score
    if sigma > 0:
        kernel = gaussian_kernel(sigma, device)
        radius = (len(kernel) - 1) // 2
        padded = responses.index_select(1, _mirror_indices(size_out, radius, device))
        responses = F.conv1d(padded[:, None, :], kernel.view(1, 1, -1))[:, 0]
    return responses.T.contiguous()


def patch_scores_to_maps(
    patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = DEFAULT_SIGMA
) -> torch.Tensor:
    """patch_scores [B, h, w] -> anomaly maps [B, H, W] at the image size: bilinear
    upsampling then `gaussian_blur`. Both are linear and separable, so they are applied as
    one matrix per axis, rows @ scores @ columns^T (equal to the two steps within float32
    rounding, a few multiply-adds per pixel instead of a 33-tap blur per axis)."""
    height, width = patch_scores.shape[-2:]
    rows = resize_and_blur_matrix(height, size[0], sigma, patch_scores.device)
    columns = resize_and_blur_matrix(width, size[1], sigma, patch_scores.device)
    return rows @ patch_scores.float() @ columns.T


# -------------------------------------------------------------------------- scoring
def reweighting_factor(
    features: torch.Tensor,
    neighbours: torch.Tensor,
    worst_patch: torch.Tensor,
    index: NearestNeighbourSearch,
    neighbourhood_size: int,
) -> torch.Tensor:
    """The paper's Eq. 7 weight per image: 1 - softmax over the neighbourhood of m*, at m*.

    features [B, P, D] and neighbours [B, P, k] (bank indices, nearest first) of each image's
    patches; worst_patch [B], each image's most anomalous patch. m* is the bank feature
    nearest to that patch; its neighbourhood is its `neighbourhood_size` nearest bank
    features (m* included), searched with `index`. Distances here are L2, as in the paper.
    """
    device = features.device
    rows = torch.arange(worst_patch.shape[0], device=device)
    test_features = features[rows, worst_patch]  # [B, D]
    nearest_feature = bank_rows(index, neighbours[rows, worst_patch, 0], device)  # [B, D]
    _, neighbourhood = index.search(nearest_feature, neighbourhood_size)
    neighbourhood_distances = torch.linalg.vector_norm(
        bank_rows(index, neighbourhood, device) - test_features[:, None, :], dim=-1
    )  # [B, b]
    nearest_distance = torch.linalg.vector_norm(nearest_feature - test_features, dim=-1)
    return 1.0 - torch.exp(nearest_distance - torch.logsumexp(neighbourhood_distances, dim=1))


_CHECK_ROWS = 4096  # rows per finiteness check: small temporaries, also for a mapped bank


def memory_bank_problem(bank: torch.Tensor, dimension: int) -> str | None:
    """What makes `bank` unusable as a memory bank of `dimension`-d features (its shape, or
    non-finite values, which would score every image wrongly), or None. Values are checked
    a few thousand rows at a time, so a memory-mapped bank is never read in whole."""
    if bank.ndim != 2 or bank.shape[1] != dimension or not len(bank):
        return f"must have shape [M > 0, {dimension}], got {list(bank.shape)}"
    non_finite = sum(count_non_finite(bank[start : start + _CHECK_ROWS])
                     for start in range(0, len(bank), _CHECK_ROWS))  # fmt: skip
    if non_finite:
        return f"holds {non_finite} values that are not finite numbers (NaN or infinite)"
    return None


def bank_rows(
    index: NearestNeighbourSearch, indices: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The bank features at `indices` (any shape) -> [*indices.shape, D] on `device`."""
    gather = getattr(index, "rows", None)
    if gather is not None:
        return gather(indices).to(device)
    return index.bank[indices.to(index.bank.device)].to(device)


def neighbour_distances(
    features: torch.Tensor, bank: torch.Tensor, neighbours: torch.Tensor
) -> torch.Tensor:
    """Squared L2 distances [Q, k] from features [Q, D] to their found bank features (bank
    indices [Q, k]), on the features' device, computed from the differences (see the
    module docstring); one bank column at a time, so at most [Q, D] more memory."""
    columns = []
    for column in range(neighbours.shape[1]):
        rows = bank[neighbours[:, column].to(bank.device)].to(features.device)
        columns.append((rows - features).square().sum(dim=1))
    return torch.stack(columns, dim=1)


def image_scores_of(patch_scores: torch.Tensor, config: PatchCoreConfig) -> torch.Tensor:
    """Patch scores [B, ...] -> image scores [B] by `config.image_score`: the largest patch
    score; the `image_score_quantile` quantile (linear interpolation between the two
    neighbouring order statistics, as `numpy.quantile`'s default); or the mean of the
    `image_score_top_k` largest (all patches when an image has fewer). Only the largest few
    scores are selected (`topk`), never a full sort, and every size is a Python integer of
    the map's static shape, so traced and exported graphs hold the same computation."""
    flat = patch_scores.flatten(1)
    count = int(flat.shape[1])
    if config.image_score == "max":
        return flat.amax(dim=1)
    if config.image_score == "top_k_mean":
        return flat.topk(min(config.image_score_top_k, count), dim=1).values.mean(dim=1)
    position = config.image_score_quantile * (count - 1)
    below = min(math.floor(position), count - 1)
    fraction = position - below
    # The largest count - below scores, descending: the order statistics below and above.
    largest = flat.topk(count - below, dim=1).values
    lower = largest[:, -1]
    upper = largest[:, -2] if count - below >= 2 else lower
    return lower + fraction * (upper - lower)


def image_score_rule(config: PatchCoreConfig) -> str:
    """How `config` scores an image, in words (model card, dashboard)."""
    if config.image_score == "quantile":
        return f"the {config.image_score_quantile:g} quantile of the patch scores (--image_score quantile)"
    if config.image_score == "top_k_mean":
        return f"the mean of the {config.image_score_top_k} largest patch scores (--image_score top_k_mean)"
    return "the largest patch score (--image_score max, the reference)"


def score_patches(
    features: torch.Tensor,
    grid: tuple[int, int],
    index: NearestNeighbourSearch,
    config: PatchCoreConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features [B*h*w, D] (image, row, column order) -> patch scores [B, h, w] and
    image scores [B], on the features' device."""
    device = features.device
    grid_h, grid_w = grid
    batch = features.shape[0] // (grid_h * grid_w)
    squared, neighbours = index.search(features, config.num_nn)
    if not getattr(index, "exact_distances", False):
        squared = neighbour_distances(features, index.bank, neighbours)
    distances = squared if config.distance == "squared_l2" else squared.sqrt()
    patch_scores = distances.to(device).mean(dim=1).reshape(batch, grid_h, grid_w)
    image_scores, worst_patch = patch_scores.reshape(batch, -1).max(dim=1)
    if config.image_score != "max":
        image_scores = image_scores_of(patch_scores, config)
    if config.score_reweighting:
        image_scores = image_scores * reweighting_factor(
            features.reshape(batch, grid_h * grid_w, -1),
            neighbours.to(device).reshape(batch, grid_h * grid_w, -1),
            worst_patch,
            index,
            config.reweighting_neighbours,
        )
    return patch_scores, image_scores


def score_features(
    features: torch.Tensor,
    grid: tuple[int, int],
    index: NearestNeighbourSearch,
    config: PatchCoreConfig,
    image_size: tuple[int, int],
    sigma: float = DEFAULT_SIGMA,
) -> Prediction:
    """Patch features of a batch of images of `image_size` -> their `Prediction`."""
    patch_scores, image_scores = score_patches(features, grid, index, config)
    maps = patch_scores_to_maps(patch_scores, image_size, sigma)
    return Prediction(image_scores, maps, patch_scores)


def stitch_tiles(
    patch_scores: torch.Tensor,
    tile_rows: torch.Tensor,
    tile_columns: torch.Tensor,
    image_size: tuple,
) -> torch.Tensor:
    """Tile patch scores [B*T, g, g] (image-major, the order of `cut_tiles`) -> stitched
    maps [B, H, W]: each tile's scores upsampled to its pixels, averaged where tiles overlap.

    The tiles' pixels are summed into the map by index (`index_add`, in the tiles' order:
    on the CPU, the sums of a loop over the tiles, bit for bit; on a GPU, by atomic adds, so
    where tiles overlap the last bit may vary from run to run), with the numbers of tiles
    and the image size as tensor sizes, so that a graph of any input size stitches the same
    way (ONNX ScatterND)."""
    count_rows, tile = tile_rows.shape[0], tile_rows.shape[1]
    count_columns = tile_columns.shape[0]
    upsampled = F.interpolate(
        patch_scores.unsqueeze(1), size=(tile, tile), mode="bilinear", align_corners=False
    ).reshape(-1, count_rows * count_columns * tile * tile)
    # The map pixel of each tile pixel, tiles in row-major order, rows then columns within.
    pixels = (tile_rows[:, None, :, None] * image_size[1] + tile_columns[None, :, None, :]).reshape(-1)
    flat_size = image_size[0] * image_size[1]
    total = upsampled.new_zeros(upsampled.shape[0], flat_size).index_add(1, pixels, upsampled)
    ones = torch.ones_like(pixels, dtype=upsampled.dtype)
    coverage = upsampled.new_zeros(flat_size).index_add(0, pixels, ones)
    return (total / coverage).reshape(-1, image_size[0], image_size[1])


Embed = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int]]]


def score_images(
    embed: Embed,
    index: NearestNeighbourSearch,
    config: PatchCoreConfig,
    images: torch.Tensor,
    sigma: float = DEFAULT_SIGMA,
) -> Prediction:
    """Working-size images [B, 3, H, W] in [0, 1] -> their `Prediction`, whole or tiled."""
    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    tile = config.preprocessing.tile
    if tile is not None:
        images = tiles_of(images, tile, config.preprocessing.tile_overlap)
    features, grid = embed(images)
    return score_embedded(features, grid, index, config, image_size, sigma)


def score_embedded(
    features: torch.Tensor,
    grid: tuple[int, int],
    index: NearestNeighbourSearch,
    config: PatchCoreConfig,
    image_size: tuple[int, int],
    sigma: float = DEFAULT_SIGMA,
) -> Prediction:
    """The patch features [B*h*w, D] of a batch of working-size images of `image_size` (of
    their tiles, image-major, with tiled inspection) -> their `Prediction`."""
    tile = config.preprocessing.tile
    if tile is None:
        return score_features(features, grid, index, config, image_size, sigma)
    tile_rows, tile_columns = tile_indices(
        image_size, tile, config.preprocessing.tile_overlap, features.device
    )
    patch_scores, _ = score_patches(features, grid, index, config)
    stitched = stitch_tiles(patch_scores, tile_rows, tile_columns, image_size)
    cell = tile / grid[0]
    patch_grid = (max(1, round(image_size[0] / cell)), max(1, round(image_size[1] / cell)))
    stitched_patches = F.adaptive_avg_pool2d(stitched.unsqueeze(1), patch_grid).squeeze(1)
    if config.image_score == "max":
        image_scores = stitched.flatten(1).amax(dim=1)
    else:
        image_scores = image_scores_of(stitched_patches, config)
    return Prediction(image_scores, gaussian_blur(stitched, sigma), stitched_patches)
