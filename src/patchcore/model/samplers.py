"""Memory-bank subsampling: identity, exact greedy coreset, approximate greedy coreset.

Both greedy samplers follow the reference implementation: features are mapped to a
low dimension by a random bias-free linear projection, then farthest-point iterations pick
the feature farthest from everything picked so far. Memory stays O(N): no N x N matrix is
ever built (the reference's exact sampler builds one; the starting distances it derives
from that matrix have a closed form that we use instead).

Distances are tracked squared: the square root is monotonic, so every arg-max, and hence
every selection, is the one the reference makes on square-rooted distances.

Continuing a selection (`patchcore-update` adding new normal features to a fitted bank) is
the same selection started from each candidate's squared distance to what is already
selected, and stopped before the first pick that would be at most a given distance away:
`select_farthest_points(features, start, count, stop_at=...)`.

On the CPU every selection path compares the same exact float32 distances (see
`exact_squared_distances`), so the fast path (`pruned_farthest_point_selection`: lazy tile
updates, triangle-inequality pruning, low-precision matrix products bounding distances, with
exact rechecks) selects exactly what the plain sweep (`farthest_point_selection`) selects,
ties included, whichever product path (`product_path`: AMX, AVX512-BF16, AVX2, portable C or
torch, chosen per CPU at run time or forced with $PATCHCORE_PRODUCTS) computes the products.
The hot loops are compiled C (`patchcore.model.native`); without a C compiler both paths
fall back to pure torch with the same results.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy
import torch

from patchcore.config import SamplerConfig
from patchcore.errors import ConfigurationError
from patchcore.model.native import coreset_kernels
from patchcore.progress import track, track_blocks

LOGGER = logging.getLogger(__name__)


class IdentitySampler:
    """Keeps every feature.

    Samplers work in two steps so features can be streamed: `project` maps each batch of
    features to what the sampler needs to remember of them (nothing, here), and
    `select_projected` picks rows from all projected rows at once.
    """

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features.new_empty(len(features), 0)

    def select_projected(self, projected: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(projected), device=projected.device)

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """Indices (into `features`) of the selected rows, in selection order."""
        return self.select_projected(self.project(features))


class GreedyCoresetSampler(IdentitySampler):
    """Exact greedy coreset (farthest-point sampling) on randomly projected features.

    The first pick is the feature with the largest root-sum-square distance to all others,
    as in the reference.
    """

    def __init__(self, percentage: float, projection_dimension: int = 128, seed: int = 0,
                 projection_state: torch.Tensor | None = None) -> None:  # fmt: skip
        self.percentage = percentage
        self.projection_dimension = projection_dimension
        self.seed = seed
        self.projection_state = projection_state

    def _projection(self, dimension: int, device: torch.device) -> torch.Tensor:
        """[projection_dimension, dimension] weights drawn as the reference's
        `torch.nn.Linear(dimension, projection_dimension, bias=False)` initialises its weight
        (`kaiming_uniform_` with a = sqrt(5): U(-1/sqrt(D), 1/sqrt(D))), from the CPU
        generator state `projection_state` (where the reference's global generator stands
        when its sampler builds that layer: `PatchCore.reference_projection_state`) or,
        without one, from a generator seeded with the sampler's seed."""
        generator = torch.Generator()
        if self.projection_state is None:
            generator.manual_seed(self.seed)
        else:
            generator.set_state(self.projection_state)
        weights = torch.empty(self.projection_dimension, dimension)
        torch.nn.init.kaiming_uniform_(weights, a=math.sqrt(5), generator=generator)
        return weights.to(device)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Random bias-free linear map to `projection_dimension` (identity if already that size)."""
        if self.percentage >= 1.0:
            return super().project(features)
        dimension = features.shape[1]
        if dimension == self.projection_dimension:
            return features.float()
        return features.float() @ self._projection(dimension, features.device).T

    def num_samples(self, num_features: int) -> int:
        return max(1, int(num_features * self.percentage))

    def select_projected(self, projected: torch.Tensor) -> torch.Tensor:
        if self.percentage >= 1.0:
            return super().select_projected(projected)
        squared_norms = projected.square().sum(dim=1)
        start_distances = self._starting_squared_distances(projected, squared_norms)
        return select_farthest_points(
            projected, start_distances, self.num_samples(len(projected)), seed=self.seed,
            squared_norms=squared_norms,
        )  # fmt: skip

    def _starting_squared_distances(
        self, projected: torch.Tensor, squared_norms: torch.Tensor
    ) -> torch.Tensor:
        # sum_j |x_i - x_j|^2 = N |x_i|^2 - 2 x_i . sum_j x_j + sum_j |x_j|^2, in float64.
        projected64 = projected.double()
        total = projected64.sum(dim=0)
        sums = (
            len(projected) * squared_norms.double()
            - 2.0 * (projected64 @ total)
            + squared_norms.double().sum()
        )
        return sums.clamp_min(0.0).float()


class ApproximateGreedyCoresetSampler(GreedyCoresetSampler):
    """Greedy coreset whose starting distances are the mean distance to a few random points."""

    def __init__(
        self,
        percentage: float,
        projection_dimension: int = 128,
        seed: int = 0,
        num_starting_points: int = 10,
        projection_state: torch.Tensor | None = None,
    ):
        super().__init__(percentage, projection_dimension, seed, projection_state)
        self.num_starting_points = num_starting_points

    def _starting_squared_distances(
        self, projected: torch.Tensor, squared_norms: torch.Tensor
    ) -> torch.Tensor:
        # the reference's draw, numpy's legacy generator seeded by its fix_seeds(seed)
        count = min(self.num_starting_points, len(projected))
        chosen = numpy.random.RandomState(self.seed).choice(len(projected), count, replace=False)
        starts = torch.as_tensor(chosen, dtype=torch.long, device=projected.device)
        squared = squared_distances_to_points(projected, squared_norms, starts)
        return squared.sqrt().mean(dim=1).square()


def squared_distances_to_points(
    features: torch.Tensor, squared_norms: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """[N, len(indices)] squared L2 distances from every feature to features[indices]
    (matrix-product form, for starting distances and accelerators)."""
    points = features[indices]
    products = features @ points.T
    return (squared_norms[:, None] - 2.0 * products + squared_norms[indices][None, :]).clamp_min(0)


# ------------------------------------------------------------------ exact distances
def exact_squared_distances(features: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """The coreset's exact squared distances on the CPU, in pure torch: for each row, the
    float32 sum over dimensions, in dimension order, of (row_j - point_j)^2, each product
    and sum rounded separately. The compiled kernels (`patchcore.model.native`) compute
    exactly these values; every CPU selection path compares only such values, which is what
    makes their selections identical."""
    total = torch.zeros(len(features), dtype=torch.float32)
    for block_start in range(0, len(features), _BLOCK):
        columns = features[block_start : block_start + _BLOCK].T.contiguous()
        partial = torch.zeros(columns.shape[1], dtype=torch.float32)
        for column, value in zip(columns, point):
            difference = column - value
            partial = partial + difference * difference
        total[block_start : block_start + _BLOCK] = partial
    return total


_BLOCK = 16384  # rows per block where a full-size temporary would be needed otherwise
_PLAIN_SWEEP_ROWS = 8192  # up to this many rows the plain sweep, in cache, is as fast
_LANES = 16  # rows per transposed block of the compiled plain sweep


def select_farthest_points(
    features: torch.Tensor,
    start_squared_distances: torch.Tensor,
    count: int,
    stop_at: float | None = None,
    seed: int = 0,
    squared_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of up to `count` rows of `features`, in selection order, each the row farthest
    from the rows selected before it, where `start_squared_distances` are the rows' squared
    distances to whatever counts as selected already (a fitted bank, when a coreset is
    continued; the reference's starting distances for a new coreset). With `stop_at`, the
    selection ends before the first pick whose squared distance is at most `stop_at`. The
    lazy path on the CPU for large inputs, the plain sweep otherwise; both select the same
    rows. `start_squared_distances` is not modified."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    if squared_norms is None:
        squared_norms = features.square().sum(dim=1)
    minimum = start_squared_distances.to(features.device, torch.float32).clone()
    if features.device.type == "cpu" and len(features) > _PLAIN_SWEEP_ROWS:
        return pruned_farthest_point_selection(
            features, squared_norms, minimum, count, seed, stop_at=stop_at
        )
    return farthest_point_selection(features, squared_norms, minimum, count, stop_at=stop_at)


def _stops(distance: float, stop_at: float | None) -> bool:
    return stop_at is not None and distance <= stop_at


def farthest_point_selection(
    features: torch.Tensor,
    squared_norms: torch.Tensor,
    min_squared_distances: torch.Tensor,
    num_samples: int,
    stop_at: float | None = None,
) -> torch.Tensor:
    """Greedy farthest-point iterations, each a full sweep over all features.

    `min_squared_distances` is updated in place. Ties go to the lowest row index. With
    `stop_at`, fewer rows are returned when the farthest remaining row is at most that far
    (squared) from the selection (see `select_farthest_points`). On the
    CPU, distances are the exact ones of `exact_squared_distances` (compiled kernel when
    available, both cores); elsewhere (GPUs, where a sweep is cheap) the matrix-product
    form with `squared_norms`. This is the plain form the fast CPU path is tested against
    and the baseline it is measured against.
    """
    if features.device.type != "cpu":
        return _matrix_product_sweep(
            features, squared_norms, min_squared_distances, num_samples, stop_at
        )
    kernels = coreset_kernels()
    features = features.float().contiguous()
    if kernels is None:
        return _torch_exact_sweep(features, min_squared_distances, num_samples, stop_at)
    return _compiled_sweep(kernels, features, min_squared_distances, num_samples, stop_at)


def _matrix_product_sweep(features, squared_norms, min_squared_distances, num_samples,
                          stop_at=None):  # fmt: skip
    selected = torch.empty(num_samples, dtype=torch.long, device=features.device)
    for step in track(range(num_samples), "Coreset subsampling"):
        index = torch.argmax(min_squared_distances)
        if _stops(float(min_squared_distances[index]), stop_at):
            return selected[:step]
        selected[step] = index
        distances = squared_distances_to_points(features, squared_norms, index.view(1)).squeeze(1)
        torch.minimum(min_squared_distances, distances, out=min_squared_distances)
    return selected


def _torch_exact_sweep(features, min_squared_distances, num_samples, stop_at=None):
    selected = torch.empty(num_samples, dtype=torch.long)
    for step in track(range(num_samples), "Coreset subsampling"):
        index = torch.argmax(min_squared_distances)  # first maximum: lowest index
        if _stops(float(min_squared_distances[index]), stop_at):
            return selected[:step]
        selected[step] = index
        distances = exact_squared_distances(features, features[index])
        torch.minimum(min_squared_distances, distances, out=min_squared_distances)
    return selected


def _compiled_sweep(kernels, features, min_squared_distances, num_samples, stop_at=None):
    """The plain sweep with the compiled kernel, on rows transposed in blocks of 16 (so the
    vector lanes hold 16 rows), split between the intra-op threads."""
    count, dimension = features.shape
    blocks = -(-count // _LANES)
    transposed = torch.empty(blocks, dimension, _LANES)
    kernels.transpose_blocks(features.data_ptr(), count, dimension, 0, blocks,
                             transposed.data_ptr())  # fmt: skip
    minimum = min_squared_distances.float().contiguous()
    threads = max(1, min(torch.get_num_threads(), blocks // 64))
    edges = [blocks * part // threads for part in range(threads + 1)]
    values = (ctypes.c_float * threads)()
    rows = (ctypes.c_int64 * threads)()
    point = torch.empty(dimension)

    def sweep_part(part: int) -> None:
        kernels.sweep_blocks(
            transposed.data_ptr(), dimension, edges[part], edges[part + 1], point.data_ptr(),
            minimum.data_ptr(), count, ctypes.addressof(values) + 4 * part,
            ctypes.addressof(rows) + 8 * part,
        )  # fmt: skip

    selected = torch.empty(num_samples, dtype=torch.long)
    index = int(torch.argmax(minimum))
    with ThreadPoolExecutor(threads) as pool:
        for step in track(range(num_samples), "Coreset subsampling"):
            if _stops(float(minimum[index]), stop_at):
                selected = selected[:step]
                break
            selected[step] = index
            point.copy_(features[index])
            list(pool.map(sweep_part, range(threads)))
            best = max(range(threads), key=lambda part: (values[part], -rows[part]))
            index = rows[best]
    if minimum.data_ptr() != min_squared_distances.data_ptr():
        min_squared_distances.copy_(minimum)
    return selected


# ----------------------------------------------------------- lazy, pruned selection
def pruned_farthest_point_selection(
    features: torch.Tensor,
    squared_norms: torch.Tensor,
    min_squared_distances: torch.Tensor,
    num_samples: int,
    seed: int = 0,
    chunk_size: int = 1024,
    stop_at: float | None = None,
    products: str | None = None,
) -> torch.Tensor:
    """The same selections as `farthest_point_selection` (CPU), computed lazily, with the same
    `stop_at`.

    Rows are grouped into tiles of `chunk_size` consecutive rows (neighbouring patches of
    an image). A tile's largest minimum distance, once known, stays an upper bound while
    coreset points are added, so a tile is brought up to date only when it could hold the
    next farthest point, and then with every point added since, as one product of the
    tile's rows with those points (compute-bound, where a sweep is bound by memory
    bandwidth; on AMX tiles in the compiled loop where the CPU and kernel allow, otherwise a
    few points' products there and more with `torch.mm`; AVX2 or plain C float32 products
    in the compiled loop where the CPU has no bfloat16 instructions: see `product_path`,
    `products` forces one). Points that the triangle inequality (tile centre and radius)
    shows cannot change the tile are skipped. The product uses copies of the rows centred
    on their tile, bfloat16 or float32 by the path; a pair is computed exactly whenever the
    product's rounding bound cannot rule out that it lowers the row's minimum distance, so
    every minimum distance that decides a selection is the exact one, and ties go to the
    lowest row index as in the sweep. `min_squared_distances` is not modified;
    `squared_norms` and `seed` are unused (kept for the shared signature).
    """
    del squared_norms
    features = features.float().contiguous()
    kernels = coreset_kernels()
    if kernels is None or features.device.type != "cpu":
        return farthest_point_selection(
            features, features.square().sum(dim=1), min_squared_distances.clone(), num_samples,
            stop_at,
        )  # fmt: skip
    del seed  # tiles are consecutive rows; kept for the signature
    tiles = _LazyTiles(kernels, features, min_squared_distances, chunk_size, products)
    return tiles.run(num_samples, stop_at)


_PENDING_BATCH = 4096  # coreset points per matrix product
_PRODUCT_WIDTHS = [16 * 2 ** (k // 2) * (3 if k % 2 else 2) // 2 for k in range(24)]
SMALL_BATCH = 16  # pending points up to which AVX512-BF16 computes a tile's products itself
# A second thread shares each tile update's rows (in chunks) where torch may use two or more
# threads.
USE_HELPER_THREAD = True
_UNIT_ROUNDOFF = 2.0**-24

# Product paths, numbered as in coreset_kernels.c (PATH_*), and the order of preference.
PRODUCT_PATHS = ("torch", "amx", "avx512bf16", "avx2", "portable")
BFLOAT16_PATHS = ("amx", "avx512bf16")
# The default path of each use, fastest first where both run. The lazy selection's AVX2
# kernel (outer products, 6 rows x 16 points) beat its AVX512-BF16 kernel (one dot product
# per pair) on the AVX512-BF16 CPU measured, 9.4 s against 11.3 s at 1 % of magnetic tile
# (docs/explanations/performance-kernels.md); the search's bfloat16 pass (one torch.mm)
# beats its float32 one.
SELECTION_PREFERENCE = ("amx", "avx2", "avx512bf16", "portable", "torch")
SEARCH_PREFERENCE = ("amx", "avx512bf16", "avx2", "portable", "torch")
PRODUCTS_VARIABLE = "PATCHCORE_PRODUCTS"


def _product_width(count: int) -> int:
    """Column count of a product, from a short list of sizes (one compiled kernel each)."""
    return _PRODUCT_WIDTHS[bisect.bisect_left(_PRODUCT_WIDTHS, count)]


def native_product_paths(
    kernels, preference: tuple[str, ...] = SEARCH_PREFERENCE
) -> tuple[str, ...]:
    """The product paths that `kernels` (a build of coreset_kernels.c, or None) run on this
    CPU, in the order of `preference` (by default: AMX tiles (x86-64 with AMX-BF16, where
    Linux grants the process the tile state), AVX512-BF16 dot products, AVX2/FMA float32
    products, portable C float32 products (any CPU), torch.mm (always))."""
    if kernels is None:
        return ("torch",)
    mask = int(kernels.product_paths())
    return tuple(name for name in preference if mask >> PRODUCT_PATHS.index(name) & 1)


def check_product_path(name: str, source: str) -> str:
    """`name` if it names a product path, else a ConfigurationError naming `source`."""
    if name not in PRODUCT_PATHS:
        raise ConfigurationError(
            f"{source}: unknown product path {name!r}; expected one of {', '.join(SEARCH_PREFERENCE)}"
        )
    return name


def product_path(
    kernels, requested: str | None = None, preference: tuple[str, ...] = SELECTION_PREFERENCE
) -> str:
    """The product path of the lazy selection (or, with `SEARCH_PREFERENCE`, of the
    re-ranking search): `requested`, else $PATCHCORE_PRODUCTS, else the first of
    `preference` that `kernels` run on this CPU. A path named that this CPU or build cannot
    run is a ConfigurationError."""
    source = "products"
    if requested is None and os.environ.get(PRODUCTS_VARIABLE):
        requested, source = os.environ[PRODUCTS_VARIABLE], PRODUCTS_VARIABLE
    available = native_product_paths(kernels, preference)
    if requested is None:
        return available[0]
    check_product_path(requested, source)
    if requested not in available:
        raise ConfigurationError(
            f"{source}: product path {requested!r} cannot run on this CPU and build; it runs "
            f"{', '.join(available)}"
        )
    return requested


def products_rounding_eta(dimension: int, bfloat16: bool) -> float:
    """Bound of a product's error relative to (|x~|^2 + |c~|^2) / 2 (x~, c~ the copies), with
    margin for evaluating the test in float32. A float32 sum of d products, in any order and
    with or without fused multiply-adds, passes each term through at most d + 8 roundings
    here (see coreset_kernels.c), so its error is at most gamma_{d+8} sum |x~_j c~_j| <=
    gamma_{d+8} (|x~|^2 + |c~|^2) / 2; bfloat16 output rounds that sum once more (2^-8)."""
    roundings = dimension + 8
    gamma = roundings * _UNIT_ROUNDOFF / (1 - roundings * _UNIT_ROUNDOFF)
    output_rounding = 2.0**-8 if bfloat16 else 0.0
    return output_rounding * (1 + gamma) + gamma + 64 * _UNIT_ROUNDOFF


class _LazyTiles:
    """State of a lazy, pruned farthest-point selection (see
    `pruned_farthest_point_selection`). Tile t holds rows order[edges[t]:edges[t + 1]]."""

    def __init__(self, kernels, features, min_squared_distances, tile_size, products=None,
                 emulate=False):  # fmt: skip
        """`products` names the product path (see `product_path`); with `emulate`, that
        path's arithmetic (copies' precision, rounding, bound) with every product computed
        by torch, on any CPU: bfloat16 products as float32 products of the bfloat16 copies
        rounded once to bfloat16, as AMX and AVX512-BF16 compute them."""
        self.kernels = kernels
        if emulate:
            self.path = check_product_path(products, "products")
        else:
            self.path = product_path(kernels, products)
        self.emulated = emulate
        self.native_path = 0 if emulate else PRODUCT_PATHS.index(self.path)
        self.features = features
        count, dimension = features.shape
        self.dimension = dimension
        self.minimum = min_squared_distances.detach().float().clone().contiguous()
        num_tiles = max(1, -(-count // tile_size))
        self.num_tiles = num_tiles
        self.order = torch.arange(count)  # tiles of consecutive rows: neighbouring patches
        self.edges = torch.tensor([count * tile // num_tiles for tile in range(num_tiles + 1)])
        self.half = int(self.path in BFLOAT16_PATHS)
        self.eta = products_rounding_eta(dimension, bool(self.half))
        # the exact distance's relative rounding
        self.shrink = 1.0 - (2 * dimension + 64) * _UNIT_ROUNDOFF
        # 16 zero rows past the end: AMX and AVX2 products read whole blocks of rows
        self.copies = torch.zeros(count + 16, dimension, dtype=self.low_precision)[:count]
        self.row_norms = torch.empty(count)
        self.row_errors = torch.empty(count)
        self.centres = torch.empty(num_tiles, dimension)
        self.radii = numpy.empty(num_tiles, dtype=numpy.float32)
        self.bounds = numpy.empty(num_tiles, dtype=numpy.float32)  # upper bound if stale
        self.argmax = numpy.empty(num_tiles, dtype=numpy.int64)
        self.stale = numpy.zeros(num_tiles, dtype=numpy.uint8)
        self.applied = numpy.zeros(num_tiles, dtype=numpy.int64)  # points applied so far
        self._prepare(0, num_tiles)

    @property
    def low_precision(self) -> torch.dtype:
        return torch.bfloat16 if self.half else torch.float32

    def _prepare(self, first: int, last: int) -> None:
        sums = torch.empty(self.dimension, dtype=torch.float64)
        self.kernels.prepare_tiles(
            self.features.data_ptr(), self.dimension, self.order.data_ptr(),
            self.edges.data_ptr(), first, last, self.shrink, self.minimum.data_ptr(),
            self.half, self.copies.data_ptr(), self.row_norms.data_ptr(),
            self.row_errors.data_ptr(), self.centres.data_ptr(), self.radii.ctypes.data,
            self.bounds.ctypes.data, self.argmax.ctypes.data, sums.data_ptr(),
        )  # fmt: skip

    def run(self, num_samples: int, stop_at: float | None = None) -> torch.Tensor:
        """Selects `num_samples` rows (fewer with `stop_at`).

        The steps run in the compiled `lazy_steps`; it hands back only the batches of
        pending points whose products it does not compute itself (none on the AMX, AVX2 and
        portable paths), for `_LargeBatches` to compute with `torch.mm`. Where torch may use
        two or more threads, a second thread of `lazy_steps` takes chunks of each tile's rows
        (the same selection). torch's thread count is restored afterwards."""
        self.selected = torch.empty(num_samples, dtype=torch.long)
        large = _LargeBatches(self, num_samples)
        selected_rows = torch.empty(num_samples, self.dimension)  # read as a stream in C
        previous_threads = torch.get_num_threads()
        state = _LazySelectionState(
            x=self.features.data_ptr(), d=self.dimension, num_tiles=self.num_tiles,
            order=self.order.data_ptr(), edges=self.edges.data_ptr(),
            copies=self.copies.data_ptr(), row_norms=self.row_norms.data_ptr(),
            row_errors=self.row_errors.data_ptr(), centres=self.centres.data_ptr(),
            radii=self.radii.ctypes.data, bounds=self.bounds.ctypes.data,
            stale=self.stale.ctypes.data, argmax=self.argmax.ctypes.data,
            applied=self.applied.ctypes.data, m=self.minimum.data_ptr(),
            selected=self.selected.data_ptr(), selected_rows=selected_rows.data_ptr(),
            half=self.half,
            small=SMALL_BATCH, path=self.native_path,
            pending_batch=_PENDING_BATCH, has_stop=int(stop_at is not None),
            helper=int(USE_HELPER_THREAD and previous_threads >= 2),
            eta=self.eta, shrink=self.shrink, stop_at=0.0 if stop_at is None else stop_at,
            point_copies=large.copies.data_ptr(), point_norms=large.norms.data_ptr(),
            point_errors=large.errors.data_ptr(), point_ids=large.ids.data_ptr(),
            scratch=large.scratch.data_ptr(), products=large.products.data_ptr(),
            point_pairs=large.point_pairs.data_ptr(),
        )  # fmt: skip
        block = max(1, num_samples // 100)  # steps per call: progress in about 1 % steps
        torch.set_num_threads(1)  # many small products: threads would only synchronise
        try:
            for until in track_blocks(num_samples, block, "Coreset subsampling"):
                outcome = self.kernels.lazy_steps(ctypes.byref(state), until)
                while outcome == _NEEDS_PRODUCT:
                    large.apply(state)
                    outcome = self.kernels.lazy_steps(ctypes.byref(state), until)
                if outcome == _STOPPED:
                    self.selected = self.selected[: state.step]
                    break
        finally:
            torch.set_num_threads(previous_threads)
        self.stats = {"updates": state.updates, "pairs": state.pairs, "checks": state.checks,
                      "shared": state.shared, "path": self.path}  # fmt: skip
        LOGGER.debug("Lazy coreset: %s", self.stats)
        return self.selected


_STOPPED, _NEEDS_PRODUCT = 1, 2  # lazy_steps' outcomes besides done (0)


class _LazySelectionState(ctypes.Structure):
    """`LazySelection` of coreset_kernels.c, field for field."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("d", ctypes.c_int64), ("num_tiles", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in (
            "order", "edges", "copies", "row_norms", "row_errors", "centres", "radii",
            "bounds", "stale", "argmax", "applied", "m", "selected", "selected_rows")],
        *[(name, ctypes.c_int64) for name in ("half", "small", "path", "pending_batch",
                                              "has_stop", "helper")],
        *[(name, ctypes.c_double) for name in ("eta", "shrink", "stop_at")],
        *[(name, ctypes.c_void_p) for name in (
            "point_copies", "point_norms", "point_errors", "point_ids", "scratch", "products",
            "point_pairs")],
        *[(name, ctypes.c_int64) for name in (
            "step", "tile", "start", "kept", "updates", "pairs", "checks", "shared")],
    ]  # fmt: skip


class _LargeBatches:
    """Scratch space of the pending points, and the large batches' products.

    A tile is usually behind by a few points; `lazy_steps` computes the products of every
    batch itself on the AMX, AVX2 and portable paths, of batches of at most `SMALL_BATCH`
    points on the AVX512-BF16 path, and hands other batches back (all of them on the torch
    path and when a path is emulated), for `apply`: one `torch.mm`, rounded alike, so
    selections do not depend on the split (tested)."""

    def __init__(self, tiles: _LazyTiles, num_samples: int):
        self.tiles = tiles
        capacity = _product_width(min(num_samples, _PENDING_BATCH))
        dimension = tiles.dimension
        self.copies = torch.zeros(capacity, dimension, dtype=tiles.low_precision)
        self.norms = torch.empty(capacity)
        self.errors = torch.empty(capacity)
        self.ids = torch.empty(capacity, dtype=torch.long)
        self.scratch = torch.empty(capacity)
        self.products = torch.empty(int(max(tiles.edges.diff())) * capacity,
                                    dtype=tiles.low_precision)  # fmt: skip
        self.point_pairs = torch.empty(dimension * 16, dtype=tiles.low_precision)  # AMX scratch
        self.best_value = ctypes.c_float()
        self.best_row = ctypes.c_int64()

    def apply(self, state: _LazySelectionState) -> None:
        """Applies the batch `lazy_steps` handed back (tile, first point, kept points)."""
        tiles = self.tiles
        tile, kept = state.tile, state.kept
        low, high = int(tiles.edges[tile]), int(tiles.edges[tile + 1])
        rows = high - low
        width = _product_width(kept)
        products = self.products[: rows * width].view(rows, width)
        if tiles.emulated and tiles.half:  # float32 sums of exact products, rounded once
            products.copy_(torch.mm(tiles.copies[low:high].float(), self.copies[:width].float().T))
        else:
            torch.mm(tiles.copies[low:high], self.copies[:width].T, out=products)
        checks = tiles.kernels.apply_points(
            tiles.features.data_ptr(), tiles.dimension, tiles.order.data_ptr() + 8 * low, rows,
            products.data_ptr(), tiles.half, kept, width, self.ids.data_ptr(),
            self.norms.data_ptr(), self.errors.data_ptr(),
            tiles.row_norms.data_ptr() + 4 * low, tiles.row_errors.data_ptr() + 4 * low,
            tiles.eta, tiles.shrink, self.scratch.data_ptr(), tiles.minimum.data_ptr(),
            ctypes.addressof(self.best_value), ctypes.addressof(self.best_row),
        )  # fmt: skip
        tiles.bounds[tile] = self.best_value.value
        tiles.argmax[tile] = self.best_row.value
        # The tile stays stale: `lazy_steps` applies any later batch and marks it up to date.
        tiles.applied[tile] = min(state.step, state.start + _PENDING_BATCH)
        state.updates += 1
        state.pairs += rows * kept
        state.checks += checks


def build_sampler(config: SamplerConfig, projection_state: torch.Tensor | None = None):
    """The sampler named in `config`; `projection_state`: see `GreedyCoresetSampler`."""
    if config.name == "identity":
        return IdentitySampler()
    if config.name == "greedy_coreset":
        return GreedyCoresetSampler(config.percentage, config.projection_dimension, config.seed,
                                    projection_state)  # fmt: skip
    return ApproximateGreedyCoresetSampler(
        config.percentage, config.projection_dimension, config.seed, config.num_starting_points,
        projection_state,
    )  # fmt: skip
