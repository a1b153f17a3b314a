"""Exact k-nearest-neighbour search in chunks of the memory bank, with bounded memory.

The search of `PatchCoreModule` and therefore of every exported graph (ONNX, OpenVINO).
For each chunk of `chunk_size` bank features, squared L2 distances of all queries are
computed by one matrix product (||q||^2 - 2 q.b + ||b||^2, the formula of
`patchcore.model.search.TorchNearestNeighbours`), the chunk's k nearest are kept and merged
with the best k so far. No [queries x bank] matrix exists beyond one chunk, so memory grows
with queries x chunk_size, not with the bank; the loop over chunks is fixed by the bank's
size, so an exported graph keeps a dynamic number of queries (a dynamic batch).
"""

from __future__ import annotations

import torch

from patchcore.errors import ConfigurationError

DEFAULT_BANK_CHUNK_SIZE = 4096


class BankChunkedSearch:
    """Exact search over `bank` [M, D] in chunks of `chunk_size` rows (see the module doc)."""

    def __init__(self, bank: torch.Tensor, chunk_size: int = DEFAULT_BANK_CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ConfigurationError(f"--bank_chunk_size must be >= 1, got {chunk_size}")
        self.bank = bank
        self.chunk_size = chunk_size

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (squared distances [Q, k], bank indices [Q, k]), nearest first."""
        queries = queries.to(self.bank.device, torch.float32)
        size = self.bank.shape[0]
        k = min(k, size)
        query_norms = queries.square().sum(dim=1, keepdim=True)
        best_distances = best_indices = None
        for start in range(0, size, self.chunk_size):
            chunk = self.bank[start : start + self.chunk_size]
            squared = torch.addmm(
                chunk.square().sum(dim=1)[None, :], queries, chunk.T, beta=1.0, alpha=-2.0
            )
            squared = squared + query_norms
            distances, positions = torch.topk(
                squared, min(k, chunk.shape[0]), dim=1, largest=False, sorted=True
            )
            positions = positions + start
            if best_distances is None:
                best_distances, best_indices = distances, positions
                continue
            merged = torch.cat((best_distances, distances), dim=1)
            merged_indices = torch.cat((best_indices, positions), dim=1)
            best_distances, order = torch.topk(
                merged, min(k, merged.shape[1]), dim=1, largest=False, sorted=True
            )
            best_indices = merged_indices.gather(1, order)
        return best_distances.clamp_min(0.0), best_indices
