"""Exact k-nearest-neighbour search over the memory bank: FAISS (CPU or GPU) or pure torch.

Both return squared L2 distances, like FAISS's IndexFlatL2, sorted nearest first.
The FAISS index file (`nnscorer_search_index.faiss`) is also how a memory bank is stored,
so model folders stay readable by the reference implementation and vice versa.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from patchcore.config import SearchConfig
from patchcore.errors import ConfigurationError, ModelFormatError
from patchcore.tensors import count_non_finite

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
        return self._search(queries, k, None)

    def search_excluding(self, queries: torch.Tensor, k: int, excluded: torch.Tensor):
        """`search` of the bank without the rows marked in `excluded` ([M] bool, at least k
        rows left; see `scoring.ExcludingSearch`): their distances count as infinite."""
        return self._search(queries, k, torch.nonzero(excluded.to(self.device)).squeeze(1))

    def _search(self, queries: torch.Tensor, k: int, excluded: torch.Tensor | None):
        queries = queries.to(self.device, torch.float32)
        k = min(k, len(self.bank))
        distances, indices = [], []
        for chunk in queries.split(self.query_chunk_size):
            squared = torch.addmm(
                self.bank_squared_norms[None, :], chunk, self.bank.T, beta=1.0, alpha=-2.0
            )
            squared += chunk.square().sum(dim=1, keepdim=True)
            if excluded is not None:
                squared[:, excluded] = float("inf")
            values, positions = torch.topk(squared, k, dim=1, largest=False, sorted=True)
            distances.append(values.clamp_min_(0.0))
            indices.append(positions)
        return torch.cat(distances), torch.cat(indices)


class RerankedNearestNeighbours:
    """Exact search in two passes: a low-precision product pass bounds every distance, then
    only the bank rows whose bound can reach a query's k nearest are ranked with float32
    distances of the original vectors.

    The product pass multiplies centred copies extended by their squared norms (split in
    two parts), so it yields approximate squared distances directly; their error is bounded
    from the copies' rounding, float32 accumulation and the output's rounding (see
    `rerank_neighbours` in `coreset_kernels.c`). The copies are bfloat16 on the bfloat16
    product paths (AMX, AVX512-BF16: torch.mm runs them on those instructions) and float32
    on the others (AVX2, portable, torch: torch's float32 matrix product, AVX2/FMA where the
    CPU has it); `products` forces a path (see `samplers.product_path`), `emulate` runs a
    bfloat16 path's rounding on any CPU (float32 products of the bfloat16 copies, rounded
    once). The results are those of a brute-force float32 search: the same neighbours (ties
    to the lower index) and distances equal within float32 rounding. Needs the compiled
    kernels (`patchcore.model.native`; `build_index` falls back to FAISS without them).
    """

    # bytes of products held at once: queries are searched in chunks of at most
    # `max_chunk_rows` rows, fewer for large banks (64 at least)
    PRODUCT_BUDGET = 128 * 2**20

    def __init__(self, max_chunk_rows: int = 1024, products: str | None = None,
                 emulate: bool = False, kernels=None) -> None:  # fmt: skip
        from patchcore.model.native import coreset_kernels
        from patchcore.model.samplers import (
            BFLOAT16_PATHS,
            SEARCH_PREFERENCE,
            check_product_path,
            product_path,
        )

        self.kernels = kernels if kernels is not None else coreset_kernels()
        if emulate:
            self.path = check_product_path(products, "products")
        else:
            self.path = product_path(self.kernels, products, SEARCH_PREFERENCE)
        self.emulated = emulate
        self.half = self.path in BFLOAT16_PATHS
        self.dtype = torch.bfloat16 if self.half else torch.float32
        self.max_chunk_rows = max_chunk_rows
        self.bank = torch.empty(0, 0)
        # threads that re-rank beside the calling thread; made on the first search that
        # splits its queries and kept (starting threads per search costs more than it saves
        # on small banks)
        self._helpers: ThreadPoolExecutor | None = None

    def fit(self, bank: torch.Tensor) -> None:
        self.bank = bank.detach().to("cpu", torch.float32).contiguous()
        self.centre = self.bank.double().mean(dim=0).float()
        # bfloat16 rows are padded to whole 32-value blocks, float32 rows to 8 values
        multiple = 32 if self.half else 8
        self.width = -(-(self.bank.shape[1] + 4) // multiple) * multiple
        copies, norms, errors = self._extended_copies(self.bank, bank_side=True)
        self.bank_copies = copies
        self.bank_norm = float(norms.max()) if len(norms) else 0.0
        self.bank_error = float(errors.max()) if len(errors) else 0.0

    def _extended_copies(self, rows: torch.Tensor, bank_side: bool):
        """Extended copies [len(rows), width], their norms and error norms (see
        `extended_copies` in `coreset_kernels.c`)."""
        copies = torch.empty(len(rows), self.width, dtype=self.dtype)
        norms, errors = torch.empty(len(rows)), torch.empty(len(rows))
        self.kernels.extended_copies(
            rows.data_ptr(), len(rows), rows.shape[1], self.centre.data_ptr(), int(bank_side),
            int(self.half), copies.data_ptr(), self.width, norms.data_ptr(), errors.data_ptr(),
        )  # fmt: skip
        return copies, norms, errors

    def _products(self, copies: torch.Tensor) -> torch.Tensor:
        """The product pass of a chunk of queries' copies with the bank's."""
        if self.emulated and self.half:  # float32 sums of exact products, rounded once
            return torch.mm(copies.float(), self.bank_copies.float().T).bfloat16()
        return torch.mm(copies, self.bank_copies.T)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (squared distances [Q, k], indices [Q, k]), nearest first.

        The product pass uses torch's intra-op threads; the re-ranking splits the queries
        between as many threads: this one and kept helpers."""
        return self._search(queries, k, None)

    def search_excluding(self, queries: torch.Tensor, k: int, excluded: torch.Tensor):
        """`search` of the bank without the rows marked in `excluded` ([M] bool, at least k
        rows left; see `scoring.ExcludingSearch`). Their approximate distances are made
        infinite after the product pass: the k smallest approximate values, and so the
        bound, then come from the other rows, and an infinite value is never a candidate."""
        return self._search(queries, k, torch.nonzero(excluded.cpu()).squeeze(1))

    def _search(self, queries: torch.Tensor, k: int, excluded: torch.Tensor | None):
        queries = queries.detach().to("cpu", torch.float32).contiguous()
        k = min(k, len(self.bank))
        distances = torch.empty(len(queries), k)
        indices = torch.empty(len(queries), k, dtype=torch.long)
        threads = max(1, min(torch.get_num_threads(), len(queries) // 64))
        if threads > 1 and self._helpers is None:
            self._helpers = ThreadPoolExecutor(torch.get_num_threads() - 1)
        affordable = self.PRODUCT_BUDGET // (self.dtype.itemsize * max(1, len(self.bank)))
        chunk_rows = min(self.max_chunk_rows, max(64, affordable))
        for start in range(0, len(queries), chunk_rows):
            chunk = queries[start : start + chunk_rows]
            copies, norms, errors = self._extended_copies(chunk, bank_side=False)
            approximate = self._products(copies)
            if excluded is not None:
                approximate[:, excluded] = float("inf")
            edges = [start + len(chunk) * part // threads for part in range(threads + 1)]
            parts = [(queries, approximate, norms, errors, start, first, last, k,
                      distances, indices) for first, last in itertools.pairwise(edges)]  # fmt: skip
            helping = [self._helpers.submit(self._rerank, *part) for part in parts[1:]]
            self._rerank(*parts[0])
            for task in helping:
                task.result()
        return distances.clamp_min_(0.0), indices

    def _rerank(self, queries, approximate, norms, errors, offset, first, last, k,
                distances, indices) -> None:  # fmt: skip
        """Exact ranking of queries [first, last) (rows first - offset.. of the chunk's
        product pass, norms and errors) into distances and indices."""
        if first == last:
            return
        row = first - offset
        # float32 accumulation of `width` terms; the squared norms split in two parts leave
        # 2^-16 (bfloat16) or 2^-48 (float32) of them
        gamma = (self.width + 8) * 2.0**-24 * 1.01 + (2.0**-16 if self.half else 2.0**-40)
        candidates = torch.empty(len(self.bank), dtype=torch.long)
        smallest = torch.empty(k)
        self.kernels.rerank_neighbours(
            queries[first].data_ptr(), self.bank.data_ptr(), self.bank.shape[1], last - first,
            len(self.bank), approximate[row].data_ptr(), int(self.half), approximate.shape[1],
            norms[row].data_ptr(), errors[row].data_ptr(), self.bank_norm, self.bank_error,
            gamma, k, smallest.data_ptr(), candidates.data_ptr(), distances[first].data_ptr(),
            indices[first].data_ptr(),
        )  # fmt: skip


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


def reranking_applies(device: torch.device) -> bool:
    """The re-ranking search runs on the CPU, with the compiled kernels (bfloat16 products
    where the CPU has bfloat16 instructions, float32 products elsewhere)."""
    from patchcore.model.native import coreset_kernels

    return device.type == "cpu" and coreset_kernels() is not None


def reranking_pays(device: torch.device) -> bool:
    """Whether `rerank` is the search where it was asked for (the default): where it applies
    and its product pass is bfloat16 (AMX, AVX512-BF16), or a product path is forced
    ($PATCHCORE_PRODUCTS). With float32 products it does FAISS's arithmetic and more: on
    magnetic tile's 59,662-feature bank it took 1,039 ms per image against FAISS's 627 ms
    (docs/explanations/performance-kernels.md), so such CPUs keep FAISS by default."""
    from patchcore.model.native import coreset_kernels
    from patchcore.model.samplers import (
        BFLOAT16_PATHS,
        PRODUCTS_VARIABLE,
        SEARCH_PREFERENCE,
        product_path,
    )

    if not reranking_applies(device):
        return False
    return bool(os.environ.get(PRODUCTS_VARIABLE)) or (
        product_path(coreset_kernels(), preference=SEARCH_PREFERENCE) in BFLOAT16_PATHS
    )


def build_index(config: SearchConfig, device: torch.device):
    """The search backend named in `config` (`rerank` where it pays: see SearchConfig)."""
    backend = config.backend
    if backend == "rerank":
        if reranking_pays(device):
            return RerankedNearestNeighbours()
        use_faiss = faiss_available() and (config.faiss_on_gpu or device.type != "cuda")
        backend = "faiss" if use_faiss else "torch"
        LOGGER.debug("re-ranking search does not pay here; searching with %s", backend)
    if backend == "torch":
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
    bad = count_non_finite(bank)
    if bad:
        raise ModelFormatError(
            f"{path}: the memory bank holds {bad} values that are not finite numbers (NaN or "
            "infinite), so it would score images wrongly; train the model again"
        )
    return bank
