"""Exact k-nearest-neighbour search over the memory bank: FAISS (CPU or GPU) or pure torch.

Both return squared L2 distances, like FAISS's IndexFlatL2, sorted nearest first.
The FAISS index file (`nnscorer_search_index.faiss`) is also how a memory bank is stored,
so model folders stay readable by the reference implementation and vice versa.
"""

from __future__ import annotations

import importlib.metadata
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


FAISS_GPU_DISTRIBUTIONS = ("faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11")


def faiss_gpu_problem() -> str | None:
    """Why FAISS cannot search on a GPU here, in one line, or None when it can.

    faiss-cpu (a dependency of this package) and faiss-gpu (the `gpu` extra) both install the
    module `faiss`; pip installs faiss-cpu after faiss-gpu, so its CPU build replaces the GPU
    build's files. `pip install --force-reinstall --no-deps faiss-gpu` puts them back."""
    if not faiss_available():
        return "faiss is not installed (pip install faiss-gpu, the gpu extra)"
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        installed = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
        gpu_builds = [name for name in FAISS_GPU_DISTRIBUTIONS if name in installed]
        if gpu_builds:
            return (
                f"{gpu_builds[0]} is installed but the module faiss is a CPU build (faiss-cpu, "
                "installed after it, replaced its files); run pip install --force-reinstall "
                f"--no-deps {gpu_builds[0]}"
            )
        return "this faiss is a CPU build; install faiss-gpu (the gpu extra: pip install -e '.[gpu]')"
    if faiss.get_num_gpus() == 0:
        return "faiss has GPU support but sees no CUDA device"
    return None


def faiss_has_gpu() -> bool:
    return faiss_gpu_problem() is None


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory still usable on `device`: on a GPU the driver's free memory plus what torch's
    caching allocator holds unused, on the CPU Linux's MemAvailable (free memory plus caches
    it can drop); None where it cannot be told."""
    if device.type == "cuda":
        unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(unused_cache)
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable" and value.split() and value.split()[0].isdigit():
            return int(value.split()[0]) * 1024
    return None


# bytes of the [queries x bank] distance products one search step holds at most (fewer
# queries per step for large banks, one at least)
SEARCH_PRODUCT_BUDGET = 256 * 2**20


def check_bank_fits_on_gpu(rows: int, dimension: int, device: torch.device, engine: str) -> None:
    """A one-line ConfigurationError, before anything is copied, when a memory bank of
    `rows` x `dimension` float32 values, its squared norms and one search step's products
    (SEARCH_PRODUCT_BUDGET at most) do not fit in the memory still usable on the GPU
    `device` (`available_memory_bytes`); nothing is checked on the CPU."""
    if device.type != "cuda":
        return
    needed = rows * (dimension + 1) * 4 + min(SEARCH_PRODUCT_BUDGET, rows * 4 * 4096)
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise ConfigurationError(
            f"the memory bank ({rows} features x {dimension}, with the search about "
            f"{needed / 2**30:.2f} GiB) does not fit in the {available / 2**30:.2f} GiB free on "
            f"{device} for {engine}; search on the CPU (--gpu -1 or --device cpu, without "
            "--faiss_on_gpu), keep the bank in a file (--bank_storage mmap), or fit a smaller "
            "bank (sampler -p)"
        )


class TorchNearestNeighbours:
    """Exact search by chunked matrix products on the bank's device (CPU or CUDA).

    Queries are searched in chunks of at most `query_chunk_size` rows, fewer when the
    chunk's products with the bank would exceed SEARCH_PRODUCT_BUDGET, so memory stays
    bounded for large banks. On a GPU, a bank that does not fit is refused in one line
    (`check_bank_fits_on_gpu`) instead of failing with a CUDA out-of-memory error."""

    def __init__(self, device: torch.device, query_chunk_size: int = 4096) -> None:
        self.device = torch.device(device)
        self.query_chunk_size = query_chunk_size
        self.bank = torch.empty(0, 0)
        self.bank_squared_norms = torch.empty(0)

    def fit(self, bank: torch.Tensor) -> None:
        check_bank_fits_on_gpu(bank.shape[0], bank.shape[1], self.device, "the torch search")
        self.bank = bank.to(self.device, torch.float32).contiguous()
        self.bank_squared_norms = self.bank.square().sum(dim=1)

    def chunk_rows(self) -> int:
        """Queries per search step: `query_chunk_size`, fewer for large banks."""
        affordable = SEARCH_PRODUCT_BUDGET // (4 * max(1, len(self.bank)))
        return max(1, min(self.query_chunk_size, affordable))

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
        for chunk in queries.split(self.chunk_rows()):
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
        problem = faiss_gpu_problem() if on_gpu else None
        self.on_gpu = on_gpu and problem is None
        if problem is not None:
            LOGGER.warning("--faiss_on_gpu given, but %s; searching on the CPU", problem)
        self._gpu_resources = faiss.StandardGpuResources() if self.on_gpu else None
        self.index = None
        self.bank = torch.empty(0, 0)

    def fit(self, bank: torch.Tensor) -> None:
        if self.on_gpu:
            check_bank_fits_on_gpu(
                bank.shape[0], bank.shape[1], torch.device("cuda", 0), "FAISS (--faiss_on_gpu)"
            )
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
