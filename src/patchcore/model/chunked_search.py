"""Exact k-nearest-neighbour search in chunks of the memory bank, with bounded memory.

The search of `PatchCoreModule` and therefore of every exported graph (ONNX, OpenVINO).
For each chunk of `chunk_size` bank features, the queries are ranked against the chunk by
one matrix product (||q||^2 - 2 q.b + ||b||^2, the ranking of
`patchcore.model.search.TorchNearestNeighbours`), the chunk's k best are kept, their
distances computed from the differences (`patchcore.model.scoring.neighbour_distances`,
what the scorer would do), and they are merged with the best k so far by the same ranking.
So the neighbours, their order and their distances are those of the torch search followed
by the scorer's recomputation, whatever the chunk size.

No [queries x bank] matrix exists beyond one chunk: memory grows with queries x
chunk_size, not with the bank. The loop over chunks is fixed by the bank's size, so an
exported graph keeps a dynamic number of queries (a dynamic batch). Bank rows are read
through the chunks only (`rows` gathers by global index), so a graph converter that folds
the chunks into constants of their own keeps no second, whole copy of the bank.
"""

from __future__ import annotations

import torch

from patchcore.config import DEFAULT_BANK_CHUNK_SIZE
from patchcore.errors import ConfigurationError
from patchcore.model.scoring import neighbour_distances

__all__ = ["DEFAULT_BANK_CHUNK_SIZE", "BankChunkedSearch"]


class BankChunkedSearch:
    """Exact search over `bank` [M, D] in chunks of `chunk_size` rows (see the module doc)."""

    exact_distances = True  # search() returns distances computed from the differences

    def __init__(self, bank: torch.Tensor, chunk_size: int = DEFAULT_BANK_CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ConfigurationError(f"--bank_chunk_size must be >= 1, got {chunk_size}")
        self.bank = bank
        self.chunk_size = chunk_size
        self.starts = list(range(0, bank.shape[0], chunk_size))
        self.chunks = [bank[start : start + chunk_size] for start in self.starts]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (squared distances [Q, k], bank indices [Q, k]), nearest first."""
        queries = queries.to(self.bank.device, torch.float32)
        k = min(k, self.bank.shape[0])
        query_norms = queries.square().sum(dim=1, keepdim=True)
        best = None  # (ranking values, exact distances, bank indices), each [Q, <= k]
        for start, chunk in zip(self.starts, self.chunks, strict=True):
            ranking = torch.addmm(
                chunk.square().sum(dim=1)[None, :], queries, chunk.T, beta=1.0, alpha=-2.0
            )
            ranking = ranking + query_norms
            values, positions = torch.topk(
                ranking, min(k, chunk.shape[0]), dim=1, largest=False, sorted=True
            )
            found = (values, neighbour_distances(queries, chunk, positions), positions + start)
            if best is not None:
                merged = [torch.cat(pair, dim=1) for pair in zip(best, found, strict=True)]
                _, order = torch.topk(
                    merged[0], min(k, merged[0].shape[1]), dim=1, largest=False, sorted=True
                )
                found = tuple(part.gather(1, order) for part in merged)
            best = found
        return best[1], best[2]

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Bank features at global `indices` (any shape) -> [*indices.shape, D], read through
        the chunks (each row from the one chunk holding it; the others add zeros)."""
        flat = indices.reshape(-1).to(self.bank.device)
        result = None
        for start, chunk in zip(self.starts, self.chunks, strict=True):
            local = flat - start
            inside = ((local >= 0) & (local < chunk.shape[0]))[:, None]
            part = torch.where(inside, chunk[local.clamp(0, chunk.shape[0] - 1)], 0.0)
            result = part if result is None else result + part
        return result.reshape(*indices.shape, self.bank.shape[1])
