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
import tqdm

from patchcore.config import SamplerConfig

LOGGER = logging.getLogger(__name__)


class IdentitySampler:
    """Keeps every feature."""

    def select(self, features: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(features), device=features.device)


class GreedyCoresetSampler:
    """Exact greedy coreset (farthest-point sampling) on randomly projected features.

    The first pick is the feature with the largest root-sum-square distance to all others,
    as in the reference.
    """

    def __init__(self, percentage: float, projection_dimension: int = 128, seed: int = 0):
        self.percentage = percentage
        self.projection_dimension = projection_dimension
        self.seed = seed

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Random bias-free linear map to `projection_dimension` (identity if already that size).

        Weights are drawn like torch.nn.Linear's default initialisation, U(-1/sqrt(D), 1/sqrt(D)).
        """
        dimension = features.shape[1]
        if dimension == self.projection_dimension:
            return features.float()
        bound = 1.0 / math.sqrt(dimension)
        weights = torch.empty(self.projection_dimension, dimension)
        weights.uniform_(-bound, bound, generator=self._generator())
        return features.float() @ weights.to(features.device).T

    def num_samples(self, num_features: int) -> int:
        return max(1, int(num_features * self.percentage))

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """Indices (into `features`) of the selected coreset, in selection order."""
        if self.percentage >= 1.0:
            return torch.arange(len(features), device=features.device)
        projected = self.project(features)
        squared_norms = projected.square().sum(dim=1)
        start_distances = self._starting_squared_distances(projected, squared_norms)
        return farthest_point_selection(
            projected, squared_norms, start_distances, self.num_samples(len(features))
        )

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
    """Greedy farthest-point iterations; `min_squared_distances` is updated in place."""
    selected = torch.empty(num_samples, dtype=torch.long, device=features.device)
    for step in tqdm.trange(num_samples, desc="Coreset subsampling", leave=False):
        index = torch.argmax(min_squared_distances)
        selected[step] = index
        distances = squared_distances_to_points(features, squared_norms, index.view(1)).squeeze(1)
        torch.minimum(min_squared_distances, distances, out=min_squared_distances)
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
