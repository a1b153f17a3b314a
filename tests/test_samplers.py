"""Coreset samplers: same selections as a straightforward N x N implementation, O(N) memory."""

import math

import numpy as np
import pytest
import torch

from patchcore.config import SamplerConfig
from patchcore.errors import ConfigurationError
from patchcore.model import native, samplers
from patchcore.model.native import coreset_kernels
from patchcore.model.samplers import (
    ApproximateGreedyCoresetSampler,
    GreedyCoresetSampler,
    IdentitySampler,
    build_sampler,
    exact_squared_distances,
    farthest_point_selection,
    pruned_farthest_point_selection,
)

THREADS = torch.get_num_threads()


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
    saved = np.random.get_state()
    np.random.seed(7)  # the reference's fix_seeds(seed), then its draw of the starting points
    starts = np.random.choice(600, 10, replace=False).tolist()
    np.random.set_state(saved)
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


# ------------------------------------------------- exact arithmetic, fast path identity
def _start(features):
    """Approximate-greedy starting distances (mean distance to 5 rows, squared)."""
    return torch.cdist(features.double(), features[:5].double()).mean(dim=1).square().float()


def _hard_cases():
    """Data on which a wrong bound or tie-break would show: structure, exact ties (repeated
    rows, integer grids), near ties (rows one float32 step apart) and very unequal scales."""
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(2500, 6, generator=generator)
    manifold = latent @ torch.randn(6, 24, generator=generator)
    manifold += 0.05 * torch.randn(2500, 24, generator=generator)
    repeated = manifold.clone()
    repeated[1000:1400] = repeated[7]
    repeated[1400:1500] = repeated[11]
    grid = torch.randint(0, 4, (2000, 20), generator=generator).float()  # many equal distances
    near = torch.randn(300, 16, generator=generator).repeat(6, 1)
    near[300:] = torch.nextafter(near[300:], near[300:] + 1)  # one step apart
    near[600:] = torch.nextafter(near[600:], near[600:] + 1)
    clusters = torch.cat([torch.randn(400, 32, generator=generator) * 0.01 + 50.0 * k
                          for k in range(5)])  # fmt: skip
    scales = torch.randn(2000, 16, generator=generator) * torch.logspace(-3, 3, 2000)[:, None]
    return {"manifold": manifold, "repeated": repeated, "grid": grid, "near": near,
            "clusters": clusters, "scales": scales}  # fmt: skip


HARD_CASES = _hard_cases()


def test_compiled_distances_are_the_exact_torch_ones():
    kernels = coreset_kernels()
    if kernels is None:
        pytest.skip("no C compiler")
    for name, features in HARD_CASES.items():
        features = features.contiguous()
        rows = torch.arange(len(features))
        compiled = torch.empty(len(features))
        for point in (features[0], features[len(features) // 2]):
            point = point.contiguous()
            kernels.exact_distances(features.data_ptr(), features.shape[1], rows.data_ptr(),
                                    len(rows), point.data_ptr(), compiled.data_ptr())  # fmt: skip
            assert torch.equal(compiled, exact_squared_distances(features, point)), name


@pytest.mark.parametrize("name", sorted(HARD_CASES))
def test_fast_selection_is_the_plain_sweep_ties_included(name):
    features = HARD_CASES[name]
    count = len(features) // 4
    start = _start(features)
    plain = farthest_point_selection(features, None, start.clone(), count)
    assert torch.equal(pruned_farthest_point_selection(features, None, start, count), plain)
    small_tiles = pruned_farthest_point_selection(features, None, start, count, chunk_size=40)
    assert torch.equal(small_tiles, plain)
    if name == "grid":  # the plain sweep in pure torch (no compiler) selects the same too
        assert torch.equal(samplers._torch_exact_sweep(features, start.clone(), count), plain)


def test_fast_selection_is_the_same_with_float32_products_and_one_thread(monkeypatch):
    features = HARD_CASES["repeated"]
    start = _start(features)
    plain = farthest_point_selection(features, None, start.clone(), 600)
    monkeypatch.setenv("PATCHCORE_PRODUCTS", "torch")  # float32 products, torch.mm
    assert torch.equal(pruned_farthest_point_selection(features, None, start, 600), plain)
    torch.set_num_threads(1)
    try:
        assert torch.equal(pruned_farthest_point_selection(features, None, start, 600), plain)
    finally:
        torch.set_num_threads(THREADS)


def test_selection_without_a_compiler_is_the_same(monkeypatch, tmp_path):
    features = HARD_CASES["manifold"][:800]
    start = _start(features)
    compiled = pruned_farthest_point_selection(features, None, start, 100)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.build_kernels.cache_clear()
    try:
        assert native.coreset_kernels() is None
        assert torch.equal(pruned_farthest_point_selection(features, None, start, 100), compiled)
    finally:
        native.build_kernels.cache_clear()


def test_plain_sweep_updates_the_minimum_distances_in_place():
    features = HARD_CASES["manifold"]
    start = _start(features)
    minimum = start.clone()
    selected = farthest_point_selection(features, None, minimum, 50)
    expected = start.clone()
    for index in selected:
        expected = torch.minimum(expected, exact_squared_distances(features, features[index]))
    assert torch.equal(minimum, expected)


@pytest.mark.parametrize("use_helper", [False, True])
@pytest.mark.parametrize("path", ["amx", "avx512bf16"])
@pytest.mark.parametrize("small_batch", [0, 16, 10**6])
@pytest.mark.parametrize("name", ["manifold", "repeated", "clusters", "scales"])
def test_small_batches_products_select_as_torch_mm_does(monkeypatch, name, small_batch, path,
                                                        use_helper):  # fmt: skip
    """Tiles are brought up to date with batches of pending points whose products the compiled
    loop computes itself (on AMX tiles for every batch, or up to SMALL_BATCH points with
    AVX512-BF16), with or without the helper thread taking chunks of each tile's rows, or
    torch.mm computes: any split selects what the plain sweep selects. Dimensions here are
    multiples of 32 (the compiled products' condition). A path this CPU cannot run is
    emulated (every batch by torch, rounded as the path rounds)."""
    kernels = coreset_kernels()
    if kernels is None:
        pytest.skip("no C compiler")
    emulate = path not in samplers.native_product_paths(kernels)
    features = HARD_CASES[name]
    features = torch.cat([features, features.flip(1)], dim=1)[:, :32].contiguous()
    count = len(features) // 4
    start = _start(features)
    plain = farthest_point_selection(features, None, start.clone(), count)
    monkeypatch.setattr(samplers, "SMALL_BATCH", small_batch)
    monkeypatch.setattr(samplers, "USE_HELPER_THREAD", use_helper)
    for chunk_size in (1024, 40):
        tiles = samplers._LazyTiles(kernels, features, start, chunk_size, path, emulate)
        assert torch.equal(tiles.run(count), plain), chunk_size


def test_lazy_selection_stops_where_the_plain_sweep_stops():
    features = HARD_CASES["manifold"]
    start = _start(features)
    plain = farthest_point_selection(features, None, start.clone(), 600)
    minimum = start.clone()
    farthest_point_selection(features, None, minimum, 300)
    stop_at = float(minimum.max())  # the 301st point's distance: stop there
    stopped = pruned_farthest_point_selection(features, None, start, 600, stop_at=stop_at)
    swept = farthest_point_selection(features, None, start.clone(), 600, stop_at=stop_at)
    assert torch.equal(stopped, swept) and len(stopped) == 300
    assert torch.equal(stopped, plain[:300])


def test_amx_tiles_compute_every_batch_where_the_process_may_use_them(monkeypatch):
    """Where AMX is usable, no batch of pending points goes back to torch.mm, and the
    selection is still the plain sweep's (rows of 64 values: two 32-value tile blocks).
    (Elsewhere the AMX path's rounding is tested in emulation: tests/test_product_paths.py.)"""
    kernels = coreset_kernels()
    if kernels is None or "amx" not in samplers.native_product_paths(kernels):
        pytest.skip("no AMX tiles for this process (CPU, kernel or compiler)")
    handed_back = []

    def refuse(self, state):  # a handed-back batch would otherwise be handed back forever
        handed_back.append(state.kept)
        raise AssertionError("a batch of pending points went back to torch.mm")

    monkeypatch.setattr(samplers._LargeBatches, "apply", refuse)
    monkeypatch.setattr(samplers, "SMALL_BATCH", 0)
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(5000, 64, generator=generator) * torch.rand(5000, 1, generator=generator)
    start = _start(features)
    plain = farthest_point_selection(features, None, start.clone(), 700)
    selected = pruned_farthest_point_selection(features, None, start, 700, chunk_size=333,
                                               products="amx")  # fmt: skip
    assert torch.equal(selected, plain) and not handed_back
