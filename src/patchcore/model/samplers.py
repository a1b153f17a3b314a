"""Memory-bank subsampling: identity, exact greedy coreset, approximate greedy coreset.

Both greedy samplers follow the reference implementation: features are mapped to a
low dimension by a random bias-free linear projection, then farthest-point iterations pick
the feature farthest from everything picked so far. Memory stays O(N): no N x N matrix is
ever built (the reference's exact sampler builds one; the starting distances it derives
from that matrix have a closed form that we use instead).

Distances are tracked squared: the square root is monotonic, so every arg-max, and hence
every selection, is the one the reference makes on square-rooted distances.
"""

from __future__ import annotations

import logging
import math

import torch

from patchcore.config import SamplerConfig
from patchcore.progress import track

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

    def __init__(self, percentage: float, projection_dimension: int = 128, seed: int = 0):
        self.percentage = percentage
        self.projection_dimension = projection_dimension
        self.seed = seed

    def _projection(self, dimension: int, device: torch.device) -> torch.Tensor:
        """[projection_dimension, dimension] weights drawn like torch.nn.Linear's default
        initialisation, U(-1/sqrt(D), 1/sqrt(D)), from the sampler's seed."""
        bound = 1.0 / math.sqrt(dimension)
        weights = torch.empty(self.projection_dimension, dimension)
        weights.uniform_(-bound, bound, generator=torch.Generator().manual_seed(self.seed))
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
        count = self.num_samples(len(projected))
        if projected.device.type == "cpu":
            return pruned_farthest_point_selection(
                projected, squared_norms, start_distances, count, self.seed
            )
        return farthest_point_selection(projected, squared_norms, start_distances, count)

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
    ):
        super().__init__(percentage, projection_dimension, seed)
        self.num_starting_points = num_starting_points

    def _starting_squared_distances(
        self, projected: torch.Tensor, squared_norms: torch.Tensor
    ) -> torch.Tensor:
        count = min(self.num_starting_points, len(projected))
        generator = torch.Generator().manual_seed(self.seed + 1)
        starts = torch.randperm(len(projected), generator=generator)[:count].to(projected.device)
        squared = squared_distances_to_points(projected, squared_norms, starts)
        return squared.sqrt().mean(dim=1).square()


def squared_distances_to_points(
    features: torch.Tensor, squared_norms: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """[N, len(indices)] squared L2 distances from every feature to features[indices]."""
    points = features[indices]
    products = features @ points.T
    return (squared_norms[:, None] - 2.0 * products + squared_norms[indices][None, :]).clamp_min(0)


def farthest_point_selection(
    features: torch.Tensor,
    squared_norms: torch.Tensor,
    min_squared_distances: torch.Tensor,
    num_samples: int,
) -> torch.Tensor:
    """Greedy farthest-point iterations, each a full sweep over all features.

    `min_squared_distances` is updated in place. This is the straightforward form (used on
    GPUs, where a sweep is cheap, and as the baseline the pruned form is tested against).
    """
    selected = torch.empty(num_samples, dtype=torch.long, device=features.device)
    for step in track(range(num_samples), "Coreset subsampling"):
        index = torch.argmax(min_squared_distances)
        selected[step] = index
        distances = squared_distances_to_points(features, squared_norms, index.view(1)).squeeze(1)
        torch.minimum(min_squared_distances, distances, out=min_squared_distances)
    return selected


_BLOCK = 16384  # rows per block where a full-size temporary would be needed otherwise


class _ChunkedFeatures:
    """Features regrouped into spatially compact chunks of at most `chunk_size` rows.

    Rows are clustered around `num_pivots` centres (a few seeded k-means steps), and each
    cluster is cut into chunks in original row order. Every chunk knows its pivot and a
    radius bounding its rows' distance to the pivot, so one distance from a new coreset
    point to the pivot bounds the distances to all rows of the chunk (triangle inequality).
    Padding rows have minimum distance -inf and are never selected or updated.
    """

    def __init__(self, features, squared_norms, min_squared, chunk_size, num_pivots, seed):
        assignment, centres = _kmeans(features, num_pivots, seed)
        order = torch.argsort(assignment, stable=True)  # original order within a cluster
        sorted_assignment = assignment[order]
        counts = torch.bincount(sorted_assignment, minlength=len(centres))
        starts = torch.cumsum(counts, 0) - counts
        position_in_cluster = torch.arange(len(order)) - starts[sorted_assignment]
        chunk_in_cluster = position_in_cluster // chunk_size
        chunks_per_cluster = (counts + chunk_size - 1) // chunk_size
        first_chunk = torch.cumsum(chunks_per_cluster, 0) - chunks_per_cluster
        chunk_of_row = first_chunk[sorted_assignment] + chunk_in_cluster
        slot_of_row = position_in_cluster % chunk_size
        num_chunks = int(chunks_per_cluster.sum())
        dimension = features.shape[1]
        # Chunk and slot of each row in original order (no reordered copy of the features).
        chunk_of = torch.empty_like(chunk_of_row).index_copy_(0, order, chunk_of_row)
        slot_of = torch.empty_like(slot_of_row).index_copy_(0, order, slot_of_row)
        self.rows = torch.full((num_chunks, chunk_size), -1, dtype=torch.long)
        self.rows[chunk_of, slot_of] = torch.arange(len(order))
        self.features = torch.zeros(num_chunks, chunk_size, dimension)
        self.features[chunk_of, slot_of] = features
        self.squared_norms = torch.zeros(num_chunks, chunk_size)
        self.squared_norms[chunk_of, slot_of] = squared_norms
        self.min_squared = torch.full((num_chunks, chunk_size), -math.inf)
        self.min_squared[chunk_of, slot_of] = min_squared
        chunk_cluster = torch.repeat_interleave(torch.arange(len(centres)), chunks_per_cluster)
        self.pivots = centres[chunk_cluster]
        offsets = torch.cat([
            torch.linalg.vector_norm(block - centres[cluster], dim=1)
            for block, cluster in zip(features.split(_BLOCK), assignment.split(_BLOCK))
        ])  # fmt: skip
        self.radii = torch.zeros(num_chunks).scatter_reduce_(
            0, chunk_of, offsets, "amax", include_self=True
        )
        self.radii = self.radii * (1 + 1e-5) + 1e-6  # float rounding margin
        self.chunk_max, positions = self.min_squared.max(dim=1)
        self.chunk_argmax = self.rows.gather(1, positions[:, None]).squeeze(1)


def _kmeans(features: torch.Tensor, count: int, seed: int, steps: int = 4, sample: int = 32768):
    """Seeded Lloyd steps on a sample, then one assignment of all rows.

    Returns (cluster of each row, cluster centres), with no empty cluster."""
    generator = torch.Generator().manual_seed(seed + 2)
    order = torch.randperm(len(features), generator=generator)
    subset = features[order[:sample]]
    centres = subset[:count].clone()
    for _ in range(steps):
        assignment = torch.cdist(subset, centres).argmin(dim=1)
        used = torch.unique(assignment)
        centres = torch.zeros(len(centres), features.shape[1]).index_add_(0, assignment, subset)
        centres = centres[used] / torch.bincount(assignment)[used][:, None]
    assignment = torch.cat([
        torch.cdist(block, centres, compute_mode="use_mm_for_euclid_dist").argmin(dim=1)
        for block in features.split(_BLOCK)
    ])  # fmt: skip
    used, assignment = torch.unique(assignment, return_inverse=True)
    return assignment, centres[used]


def pruned_farthest_point_selection(
    features: torch.Tensor,
    squared_norms: torch.Tensor,
    min_squared_distances: torch.Tensor,
    num_samples: int,
    seed: int = 0,
    chunk_size: int = 128,
) -> torch.Tensor:
    """The same selections as `farthest_point_selection`, skipping rows that cannot change.

    A row's minimum distance can only drop if the new point is closer than its current
    minimum; whole chunks whose pivot bound rules that out are skipped. Late iterations,
    when minimum distances are small, touch a small fraction of the rows, so the loop
    stays in cache instead of sweeping all features every time. Ties are broken towards
    the lowest row index, as `torch.argmax` does in the straightforward form. CPU only.
    """
    num_pivots = max(16, min(1024, int(math.sqrt(len(features)))))
    chunks = _ChunkedFeatures(
        features, squared_norms, min_squared_distances, chunk_size, num_pivots, seed
    )
    # Absolute slack for the rounding of squared distances expanded as |x|^2 - 2xc + |c|^2.
    slack = 1e-5 * 2 * float(squared_norms.max())
    selected = torch.empty(num_samples, dtype=torch.long)
    # Reused every iteration: no large allocation (and page faults) inside the loop.
    block_buffer = torch.empty_like(chunks.features)
    product_buffer = torch.empty(chunks.features.shape[:2])
    for step in track(range(num_samples), "Coreset subsampling"):
        best = chunks.chunk_max.max()
        index = chunks.chunk_argmax[chunks.chunk_max == best].min()
        selected[step] = index
        point = features[index]
        lower = torch.linalg.vector_norm(chunks.pivots - point, dim=1) - chunks.radii
        active = torch.nonzero((lower <= 0) | (lower * lower <= chunks.chunk_max + slack))[:, 0]
        block = torch.index_select(chunks.features, 0, active, out=block_buffer[: len(active)])
        products = torch.matmul(block, point, out=product_buffer[: len(active)])
        distances = (chunks.squared_norms.index_select(0, active) - 2.0 * products
                     + squared_norms[index]).clamp_min_(0.0)  # fmt: skip
        updated = torch.minimum(chunks.min_squared.index_select(0, active), distances)
        chunks.min_squared.index_copy_(0, active, updated)
        maxima, positions = updated.max(dim=1)
        chunks.chunk_max.index_copy_(0, active, maxima)
        chunks.chunk_argmax.index_copy_(
            0, active, chunks.rows.index_select(0, active).gather(1, positions[:, None])[:, 0]
        )
    return selected


def build_sampler(config: SamplerConfig):
    """The sampler named in `config`."""
    if config.name == "identity":
        return IdentitySampler()
    if config.name == "greedy_coreset":
        return GreedyCoresetSampler(config.percentage, config.projection_dimension, config.seed)
    return ApproximateGreedyCoresetSampler(
        config.percentage, config.projection_dimension, config.seed, config.num_starting_points
    )
