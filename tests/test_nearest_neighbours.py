import pytest
import torch

from patchcore.config import SearchConfig
from patchcore.model.search import (
    FaissNearestNeighbours,
    RerankedNearestNeighbours,
    TorchNearestNeighbours,
    build_index,
    read_memory_bank,
    reranking_applies,
    write_memory_bank,
)

needs_reranking = pytest.mark.skipif(
    not reranking_applies(torch.device("cpu")),
    reason="re-ranking search needs a C compiler",
)


@pytest.fixture
def bank_and_queries():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(500, 32, generator=generator), torch.randn(300, 32, generator=generator)


def brute_force(queries, bank, k):
    """float64 distances; ties broken towards the lower bank index."""
    squared = torch.cdist(queries.double(), bank.double()).square()
    order = torch.argsort(squared, dim=1, stable=True)[:, :k]
    return squared.gather(1, order), order


def all_indexes():
    indexes = [TorchNearestNeighbours(torch.device("cpu"), query_chunk_size=64),
               FaissNearestNeighbours()]  # fmt: skip
    if reranking_applies(torch.device("cpu")):
        indexes.append(RerankedNearestNeighbours(max_chunk_rows=64))
    return indexes


@pytest.mark.parametrize("k", [1, 3, 7])
def test_every_backend_finds_the_brute_force_neighbours(bank_and_queries, k):
    bank, queries = bank_and_queries
    expected_distances, expected_indices = brute_force(queries, bank, k)
    for index in all_indexes():
        index.fit(bank)
        distances, indices = index.search(queries, k)
        assert distances.shape == indices.shape == (300, k)
        assert torch.equal(indices.long(), expected_indices)
        torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-4, atol=1e-4)


def _hard_banks():
    """Banks where a loose bound would show: far from the origin (large norms, small
    distances), repeated and nearly repeated rows, integer grids (exact ties), queries that
    are bank rows, a dimension that is not a multiple of the vector width."""
    generator = torch.Generator().manual_seed(4)
    cases = {}
    far = 300.0 + 0.01 * torch.randn(800, 64, generator=generator)
    cases["far"] = (far, far[::3] + 1e-3 * torch.randn(267, 64, generator=generator))
    repeated = torch.randn(400, 48, generator=generator).repeat(3, 1)
    repeated[400:800] = torch.nextafter(repeated[400:800], repeated[400:800] + 1)
    cases["repeated"] = (
        repeated,
        torch.cat([repeated[:50], torch.randn(50, 48, generator=generator)]),
    )
    grid = torch.randint(0, 3, (1000, 20), generator=generator).float()
    cases["grid"] = (grid, torch.randint(0, 3, (200, 20), generator=generator).float())
    odd = torch.randn(700, 1027, generator=generator).abs()  # non-negative, like CNN features
    cases["wide"] = (odd, odd[:100] + 0.05 * torch.randn(100, 1027, generator=generator))
    return cases


@needs_reranking
@pytest.mark.parametrize("name", sorted(_hard_banks()))
def test_reranked_search_is_exact_on_hard_banks(name):
    bank, queries = _hard_banks()[name]
    index = RerankedNearestNeighbours(max_chunk_rows=96)
    index.fit(bank)
    for k in (1, 4):
        expected_distances, expected_indices = brute_force(queries, bank, k)
        distances, indices = index.search(queries, k)
        torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-5, atol=1e-4)
        # equal distances (up to float32 rounding) may be listed in either order
        same = indices == expected_indices
        tied = (distances.double() - expected_distances).abs() <= 1e-5 * expected_distances + 1e-4
        assert bool((same | tied).all())
        assert torch.equal(torch.sort(indices, dim=1).values[same.all(dim=1)],
                           torch.sort(expected_indices, dim=1).values[same.all(dim=1)])  # fmt: skip


def test_default_backend_is_exact_and_falls_back_where_reranking_does_not_apply(monkeypatch):
    from patchcore.model import search

    index = build_index(SearchConfig(), torch.device("cpu"))
    expected = RerankedNearestNeighbours if search.reranking_pays(torch.device("cpu")) else (
        FaissNearestNeighbours)  # fmt: skip
    assert isinstance(index, expected)
    monkeypatch.setattr(search, "reranking_pays", lambda device: False)
    assert isinstance(build_index(SearchConfig(), torch.device("cpu")), FaissNearestNeighbours)


def test_k_larger_than_bank_is_clipped(bank_and_queries):
    bank, queries = bank_and_queries
    for index in all_indexes():
        index.fit(bank[:4])
        distances, indices = index.search(queries, 10)
        assert distances.shape == (300, 4)
        assert torch.equal(torch.sort(indices, dim=1).values[0].long(), torch.arange(4))


def test_memory_bank_round_trips_through_a_faiss_file(tmp_path, bank_and_queries):
    bank, _ = bank_and_queries
    write_memory_bank(bank, tmp_path / "index.faiss")
    assert torch.equal(read_memory_bank(tmp_path / "index.faiss"), bank)
