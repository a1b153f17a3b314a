"""Coreset samplers: same selections as a straightforward N x N implementation, O(N) memory."""

import math

import pytest
import torch

from patchcore.config import SamplerConfig
from patchcore.errors import ConfigurationError
from patchcore.model.samplers import (
    ApproximateGreedyCoresetSampler,
    GreedyCoresetSampler,
    IdentitySampler,
    build_sampler,
    farthest_point_selection,
    pruned_farthest_point_selection,
)


def pairwise_distances(a, b):
    return torch.cdist(a.double(), b.double())


def naive_exact_greedy(projected, count):
    """The reference algorithm as written: full distance matrix, row norms as start."""
    distances = pairwise_distances(projected, projected)
    minimum = torch.linalg.vector_norm(distances, dim=1)
    chosen = []
    for _ in range(count):
        index = int(torch.argmax(minimum))
        chosen.append(index)
        minimum = torch.minimum(minimum, distances[:, index])
    return chosen


def naive_approximate_greedy(projected, count, starts):
    minimum = pairwise_distances(projected, projected[starts]).mean(dim=1)
    chosen = []
    for _ in range(count):
        index = int(torch.argmax(minimum))
        chosen.append(index)
        minimum = torch.minimum(minimum, pairwise_distances(projected, projected[[index]])[:, 0])
    return chosen


@pytest.fixture
def clustered_features():
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(12, 200, generator=generator) * 5
    labels = torch.randint(0, 12, (600,), generator=generator)
    return centres[labels] + torch.randn(600, 200, generator=generator)


def test_exact_greedy_equals_naive_implementation(clustered_features):
    sampler = GreedyCoresetSampler(percentage=0.1, projection_dimension=32, seed=7)
    selected = sampler.select(clustered_features)
    projected = sampler.project(clustered_features)
    assert selected.tolist() == naive_exact_greedy(projected, 60)


def test_approximate_greedy_equals_naive_implementation(clustered_features):
    sampler = ApproximateGreedyCoresetSampler(
        0.1, projection_dimension=32, seed=7, num_starting_points=10
    )
    selected = sampler.select(clustered_features)
    projected = sampler.project(clustered_features)
    starts = torch.randperm(600, generator=torch.Generator().manual_seed(8))[:10]
    assert selected.tolist() == naive_approximate_greedy(projected, 60, starts)


def coverage_radius(features, selected):
    return float(pairwise_distances(features, features[selected]).min(dim=1).values.max())


@pytest.mark.parametrize("sampler_class", [GreedyCoresetSampler, ApproximateGreedyCoresetSampler])
def test_coreset_covers_better_than_random_subsets(sampler_class):
    # Features on a 4-d manifold in 200-d with clusters of very unequal size, as patch
    # features are: random subsets miss the rare regions, farthest-point sampling does not.
    generator = torch.Generator().manual_seed(5)
    sizes = [400, 120, 40, 20, 10, 5, 5]
    latent = torch.cat(
        [
            torch.randn(n, 4, generator=generator) * 0.3
            + 4 * torch.randn(1, 4, generator=generator)
            for n in sizes
        ]
    )
    features = latent @ torch.randn(4, 200, generator=generator)
    sampler = sampler_class(0.05, projection_dimension=128, seed=0)
    selected = sampler.select(features)
    assert len(selected) == 30 and len(set(selected.tolist())) == 30
    random_radii = [
        coverage_radius(features, torch.randperm(len(features), generator=generator)[:30])
        for _ in range(20)
    ]
    assert coverage_radius(features, selected) < min(random_radii)


def test_deterministic_for_a_seed_and_different_across_seeds(clustered_features):
    first = build_sampler(SamplerConfig(percentage=0.1, seed=3)).select(clustered_features)
    again = build_sampler(SamplerConfig(percentage=0.1, seed=3)).select(clustered_features)
    other = build_sampler(SamplerConfig(percentage=0.1, seed=4)).select(clustered_features)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_count_is_int_of_n_times_percentage_and_identity_keeps_all():
    features = torch.randn(333, 16)
    assert len(GreedyCoresetSampler(0.1, 8).select(features)) == math.floor(333 * 0.1)
    assert len(GreedyCoresetSampler(1.0, 8).select(features)) == 333
    assert torch.equal(IdentitySampler().select(features), torch.arange(333))


def test_projection_skipped_when_already_low_dimensional():
    features = torch.randn(50, 128)
    assert torch.equal(GreedyCoresetSampler(0.1, 128).project(features), features)


@pytest.mark.parametrize("percentage", [0.0, -0.1, 1.5])
def test_percentage_outside_unit_interval_is_refused(percentage):
    with pytest.raises(ConfigurationError, match="percentage"):
        SamplerConfig(percentage=percentage)


@pytest.mark.parametrize("duplicates", [False, True])
def test_pruned_selection_equals_the_full_sweep(duplicates):
    generator = torch.Generator().manual_seed(11)
    latent = torch.randn(3000, 6, generator=generator)
    features = latent @ torch.randn(6, 32, generator=generator) + 0.05 * torch.randn(
        3000, 32, generator=generator
    )
    if duplicates:  # identical rows (flat image regions) make exact ties
        features[1000:1400] = features[7]
    norms = features.square().sum(dim=1)
    start = torch.cdist(features, features[:5]).mean(dim=1).square()
    full = farthest_point_selection(features, norms, start.clone(), 400)
    pruned = pruned_farthest_point_selection(features, norms, start.clone(), 400, chunk_size=32)
    assert torch.equal(full, pruned)
