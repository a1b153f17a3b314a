"""Exact k-nearest-neighbour search over the memory bank: FAISS (CPU or GPU) or pure torch.

Both return squared L2 distances, like FAISS's IndexFlatL2, sorted nearest first.
The FAISS index file (`nnscorer_search_index.faiss`) is also how a memory bank is stored,
so model folders stay readable by the reference implementation and vice versa.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch

from patchcore.config import SearchConfig
from patchcore.errors import ConfigurationError, ModelFormatError

LOGGER = logging.getLogger(__name__)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def faiss_has_gpu() -> bool:
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class TorchNearestNeighbours:
    """Exact search by chunked matrix products on the bank's device (CPU or CUDA)."""

    def __init__(self, device: torch.device, query_chunk_size: int = 4096) -> None:
        self.device = device
        self.query_chunk_size = query_chunk_size
        self.bank = torch.empty(0, 0)
        self.bank_squared_norms = torch.empty(0)

    def fit(self, bank: torch.Tensor) -> None:
        self.bank = bank.to(self.device, torch.float32).contiguous()
        self.bank_squared_norms = self.bank.square().sum(dim=1)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (squared distances [Q, k], indices [Q, k]) on the bank's device."""
        queries = queries.to(self.device, torch.float32)
        k = min(k, len(self.bank))
        distances, indices = [], []
        for chunk in queries.split(self.query_chunk_size):
            squared = torch.addmm(
                self.bank_squared_norms[None, :], chunk, self.bank.T, beta=1.0, alpha=-2.0
            )
            squared += chunk.square().sum(dim=1, keepdim=True)
            values, positions = torch.topk(squared, k, dim=1, largest=False, sorted=True)
            distances.append(values.clamp_min_(0.0))
            indices.append(positions)
        return torch.cat(distances), torch.cat(indices)


class FaissNearestNeighbours:
    """Exact search with a FAISS IndexFlatL2, moved to the GPU when asked and possible."""

    def __init__(self, on_gpu: bool = False, num_workers: int = 4) -> None:
        if not faiss_available():
            raise ConfigurationError(
                "nearest-neighbour backend 'faiss' needs faiss (pip install faiss-cpu, or "
                "faiss-gpu); or choose the 'torch' backend"
            )
        import faiss

        self._faiss = faiss
        faiss.omp_set_num_threads(num_workers)
        self.on_gpu = on_gpu and faiss_has_gpu()
        if on_gpu and not self.on_gpu:
            LOGGER.warning(
                "--faiss_on_gpu given but this faiss has no GPU support; searching on CPU"
            )
        self._gpu_resources = faiss.StandardGpuResources() if self.on_gpu else None
        self.index = None
        self.bank = torch.empty(0, 0)

    def fit(self, bank: torch.Tensor) -> None:
        self.bank = bank.detach().to("cpu", torch.float32).contiguous()
        index = self._faiss.IndexFlatL2(self.bank.shape[1])
        index.add(self.bank.numpy())
        if self.on_gpu:
            index = self._faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        self.index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, len(self.bank))
        array = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        distances, indices = self.index.search(array, k)
        return torch.from_numpy(distances), torch.from_numpy(indices)


def build_index(config: SearchConfig, device: torch.device):
    """The search backend named in `config`."""
    if config.backend == "torch":
        return TorchNearestNeighbours(device, config.query_chunk_size)
    return FaissNearestNeighbours(config.faiss_on_gpu, config.faiss_num_workers)


def write_memory_bank(bank: torch.Tensor, path: Path) -> None:
    """Stores the memory bank as a FAISS IndexFlatL2 file (the reference's format).

    The index is serialised in memory and written by Python: FAISS's own file writer only
    prints a failed close (a full disk) and returns, leaving a truncated file behind.
    """
    if not faiss_available():
        raise ConfigurationError("saving a model needs faiss (pip install faiss-cpu)")
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.detach().to("cpu", torch.float32).contiguous().numpy())
    data = faiss.serialize_index(index)
    with open(path, "wb") as handle:
        handle.write(memoryview(data))
        handle.flush()
        os.fsync(handle.fileno())


def read_memory_bank(path: Path) -> torch.Tensor:
    """Reads the vectors of a flat FAISS index file back into a [M, D] float32 tensor; a
    ModelFormatError names the file when it is missing, damaged, of another index type, or
    holds values that are not finite numbers."""
    if not faiss_available():
        raise ModelFormatError(f"{path}: reading a model needs faiss (pip install faiss-cpu)")
    import faiss

    if not path.is_file():
        raise ModelFormatError(f"{path}: memory bank file is missing")
    try:
        data = np.fromfile(path, dtype=np.uint8)
        index = faiss.deserialize_index(data)
    except OSError as error:
        raise ModelFormatError(f"{path}: cannot read the memory bank ({error.strerror})") from error
    except RuntimeError as error:
        raise ModelFormatError(
            f"{path}: not a readable FAISS index, the file is damaged or incomplete; save "
            "or train the model again"
        ) from error
    if not isinstance(index, faiss.IndexFlat):
        raise ModelFormatError(
            f"{path}: expected an exact flat FAISS index, found {type(index).__name__}"
        )
    vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d))
    bank = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    bad = int((~torch.isfinite(bank)).sum())
    if bad:
        raise ModelFormatError(
            f"{path}: the memory bank holds {bad} values that are not finite numbers (NaN or "
            "infinite), so it would score images wrongly; train the model again"
        )
    return bank

