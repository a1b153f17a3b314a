import pytest
import torch

from patchcore.model.search import (
    FaissNearestNeighbours,
    TorchNearestNeighbours,
    read_memory_bank,
    write_memory_bank,
)


@pytest.fixture
def bank_and_queries():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(500, 32, generator=generator), torch.randn(300, 32, generator=generator)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_torch_and_faiss_find_the_brute_force_neighbours(bank_and_queries, k):
    bank, queries = bank_and_queries
    expected = torch.cdist(queries.double(), bank.double()).square()
    expected_distances, expected_indices = expected.topk(k, dim=1, largest=False)
    for index in (
        TorchNearestNeighbours(torch.device("cpu"), query_chunk_size=64),
        FaissNearestNeighbours(),
    ):
        index.fit(bank)
        distances, indices = index.search(queries, k)
        assert distances.shape == indices.shape == (300, k)
        assert torch.equal(indices.long(), expected_indices)
        torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-4, atol=1e-4)


def test_k_larger_than_bank_is_clipped(bank_and_queries):
    bank, queries = bank_and_queries
    index = TorchNearestNeighbours(torch.device("cpu"))
    index.fit(bank[:4])
    distances, _ = index.search(queries, 10)
    assert distances.shape == (300, 4)


def test_memory_bank_round_trips_through_a_faiss_file(tmp_path, bank_and_queries):
    bank, _ = bank_and_queries
    write_memory_bank(bank, tmp_path / "index.faiss")
    assert torch.equal(read_memory_bank(tmp_path / "index.faiss"), bank)
