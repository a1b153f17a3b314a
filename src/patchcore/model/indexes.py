"""Memory-bank indexes beyond in-RAM exact search: FAISS approximate indexes and a
memory-mapped bank searched in blocks.

`build_bank_index` is the one hook `PatchCore` calls: it returns the exact search of
`patchcore.model.search` for the default (exact search, bank in RAM), and otherwise
- `MappedExactIndex`: exact search of a bank kept in a memory-mapped file
  (`SearchConfig.bank_storage="mmap"`), by FAISS's blocked brute-force kNN directly on the
  mapping; results are identical to IndexFlatL2's;
- `ApproximateIndex`: a FAISS IndexIVFFlat (`ivf`), IndexIVFPQ (`ivfpq`) or IndexHNSWFlat
  (`hnsw`) built from the bank (`IndexConfig`), saved with the model and read back on load.

Every index exposes `bank` (the full vectors, in RAM or mapped: the scorer's distances,
Eq. 7 re-weighting, saving, export and model updates need them) and `search(queries, k)`
returning squared L2 distances and bank indices, nearest first, as the scorer expects. The
scorer recomputes the found neighbours' distances from the bank vectors
(`scoring.neighbour_distances`), so FAISS's distances only rank: IVF-PQ's, estimated from
the codes, never become scores.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from patchcore.config import IndexConfig, SearchConfig
from patchcore.errors import ConfigurationError, ModelFormatError
from patchcore.model.bank_file import (
    MappedBank,
    bank_in_file,
    bank_in_memory,
    row_blocks,
    temporary_bank_file,
)
from patchcore.model.search import build_index, faiss_available, faiss_has_gpu

LOGGER = logging.getLogger(__name__)

FAISS_CLASSES = {"ivf": "IndexIVFFlat", "ivfpq": "IndexIVFPQ", "hnsw": "IndexHNSWFlat"}
TRAINING_POINTS_PER_CELL = 256  # FAISS's own cap on k-means training points per centroid
MIN_POINTS_PER_CELL = 39  # below this FAISS warns that k-means is under-trained
GATHER_BLOCK_ROWS = 65536


def _faiss(feature: str):
    if not faiss_available():
        raise ConfigurationError(f"{feature} needs faiss (pip install faiss-cpu)")
    import faiss

    return faiss


def faiss_class(kind: str):
    """The FAISS index class of an approximate `kind`; a one-line error if FAISS lacks it."""
    faiss = _faiss(f"--search {kind}")
    name = FAISS_CLASSES[kind]
    if not hasattr(faiss, name):
        raise ConfigurationError(
            f"--search {kind} needs faiss.{name}, which this FAISS ({faiss.__version__}) "
            "lacks; upgrade faiss-cpu or choose another --search"
        )
    return getattr(faiss, name)


def build_bank_index(index: IndexConfig, search: SearchConfig, device: torch.device):
    """The search structure of a model: `search.index` (a run-time override) or the model's
    own `index`, with the bank in RAM or memory-mapped as `search.bank_storage` says."""
    if index.approximate:
        return ApproximateIndex(index, search)
    if search.bank_storage == "mmap":
        return MappedExactIndex(search)
    return build_index(search, device)


def bank_storage_of(index) -> str:
    """'mmap' for an index that keeps its bank in a mapped file, else 'memory'."""
    return getattr(index, "bank_storage", "memory")


def gather_bank(index, store, selected: torch.Tensor, device: torch.device):
    """The selected rows of a feature store as the bank `index` wants: a tensor on `device`,
    or, for a memory-mapped bank, a MappedBank written block by block (never whole in RAM)."""
    if bank_storage_of(index) != "mmap":
        return store.gather(selected).to(device)
    blocks = (store.gather(selected[start : start + GATHER_BLOCK_ROWS])
              for start in range(0, len(selected), GATHER_BLOCK_ROWS))  # fmt: skip
    dimension = store.gather(selected[:1]).shape[1]
    return temporary_bank_file(blocks, len(selected), dimension)


def _stored_bank(bank, storage: str):
    """(mapped bank or None, bank tensor) for `bank` kept the way `storage` says."""
    if storage == "mmap":
        mapped = bank_in_file(bank)
        return mapped, mapped.tensor
    return None, bank_in_memory(bank)


def _queries_array(queries: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())


class MappedExactIndex:
    """Exact k-NN over a bank in a memory-mapped file: FAISS's blocked brute-force search
    (`faiss.knn`, the code IndexFlatL2 runs) reads the mapping directly, 1024 bank rows at
    a time, so resident memory is the queries, a block of distances and the pages of the
    bank the kernel keeps cached."""

    bank_storage = "mmap"

    def __init__(self, search: SearchConfig) -> None:
        self._faiss = _faiss("--bank_storage mmap")
        self._faiss.omp_set_num_threads(search.faiss_num_workers)
        if search.faiss_on_gpu:
            LOGGER.warning("--faiss_on_gpu: a memory-mapped bank is searched on the CPU")
        self.mapped: MappedBank | None = None
        self.bank = torch.empty(0, 0)

    def fit(self, bank) -> None:
        self.mapped, self.bank = _stored_bank(bank, "mmap")

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, len(self.bank))
        distances, indices = self._faiss.knn(_queries_array(queries), self.mapped.array, k)
        return torch.from_numpy(distances), torch.from_numpy(indices)


def default_nlist(bank_size: int) -> int:
    """About 4 sqrt(M) cells (FAISS's guideline is 4 to 16 sqrt(M)), at most M / 39 so each
    cell's k-means centroid has the training points FAISS asks for, and at least 1."""
    return max(1, min(round(4 * math.sqrt(bank_size)), bank_size // MIN_POINTS_PER_CELL))


def default_pq_m(dimension: int) -> int:
    """The largest divisor of the dimension that is at most dimension / 16 (64 sub-vectors
    of 16 values for 1024-d features: 64 bytes per vector at 8 bits)."""
    limit = max(1, dimension // 16)
    return max(m for m in range(1, limit + 1) if dimension % m == 0)


def resolved_parameters(config: IndexConfig, bank_size: int, dimension: int) -> dict:
    """The FAISS parameters an index of `config` over a [bank_size, dimension] bank is built
    with (None defaults resolved); ConfigurationError for parameters FAISS would refuse."""
    parameters: dict = {"kind": config.kind}
    if config.kind in ("ivf", "ivfpq"):
        nlist = config.nlist or default_nlist(bank_size)
        if nlist > bank_size:
            raise ConfigurationError(
                f"--nlist {nlist} is larger than the memory bank ({bank_size} features); "
                "use fewer cells"
            )
        parameters.update(nlist=nlist, nprobe=min(config.nprobe, nlist))
    if config.kind == "ivfpq":
        pq_m = config.pq_m or default_pq_m(dimension)
        if dimension % pq_m:
            raise ConfigurationError(
                f"--pq_m {pq_m} must divide the feature dimension {dimension} "
                "(--target_embed_dimension)"
            )
        if bank_size < 2**config.pq_bits:
            raise ConfigurationError(
                f"--search ivfpq with --pq_bits {config.pq_bits} needs at least "
                f"{2**config.pq_bits} bank features to train its codebooks, the bank has "
                f"{bank_size}; use fewer --pq_bits or a larger bank"
            )
        parameters.update(pq_m=pq_m, pq_bits=config.pq_bits)
    if config.kind == "hnsw":
        parameters.update(
            hnsw_m=config.hnsw_m, ef_construction=config.ef_construction,
            ef_search=config.ef_search,
        )  # fmt: skip
    return parameters


def _training_sample(bank: torch.Tensor, count: int, seed: int = 0) -> np.ndarray:
    """`count` rows of the bank drawn without replacement (all rows if fewer), in bank order
    (so a mapped bank is read front to back), as one float32 array."""
    if count >= len(bank):
        return np.ascontiguousarray(bank.detach().to("cpu", torch.float32).numpy())
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(bank), generator=generator)[:count].sort().values
    return np.ascontiguousarray(bank[rows].to(torch.float32).numpy())


class ApproximateIndex:
    """A FAISS approximate index of the bank (IVF-Flat, IVF-PQ or HNSW-Flat).

    `fit(bank)` builds it (k-means cells trained on up to 256 rows per cell, then every row
    added block by block), or adopts the index `read` from a saved model. Queries that
    probed only empty cells (an IVF index can return fewer than k results) are answered
    exactly instead of with FAISS's placeholder distance.
    """

    def __init__(self, config: IndexConfig, search: SearchConfig) -> None:
        self.config = config
        self._class = faiss_class(config.kind)
        self._faiss = _faiss(f"--search {config.kind}")
        self._faiss.omp_set_num_threads(search.faiss_num_workers)
        self.bank_storage = search.bank_storage
        self.on_gpu = search.faiss_on_gpu and faiss_has_gpu() and config.kind != "hnsw"
        if search.faiss_on_gpu and not self.on_gpu:
            LOGGER.warning(
                "--faiss_on_gpu: %s; searching on the CPU",
                "FAISS has no GPU HNSW index" if config.kind == "hnsw"
                else "this faiss has no GPU support",
            )  # fmt: skip
        self.mapped: MappedBank | None = None
        self.bank = torch.empty(0, 0)
        self.parameters: dict = {}
        self.faiss_index = None
        self._search_index = None
        self._saved = None

    # --------------------------------------------------------------- building
    def _new_index(self, dimension: int, parameters: dict):
        faiss = self._faiss
        if self.config.kind == "hnsw":
            index = self._class(dimension, parameters["hnsw_m"])
            index.hnsw.efConstruction = parameters["ef_construction"]
            return index
        quantizer = faiss.IndexFlatL2(dimension)
        if self.config.kind == "ivf":
            index = self._class(quantizer, dimension, parameters["nlist"], faiss.METRIC_L2)
        else:
            index = self._class(
                quantizer, dimension, parameters["nlist"], parameters["pq_m"],
                parameters["pq_bits"],
            )  # fmt: skip
        return index  # FAISS's Python wrapper keeps the quantizer alive with the index

    def _build(self, bank: torch.Tensor, parameters: dict):
        index = self._new_index(bank.shape[1], parameters)
        if "nlist" in parameters:
            cells = parameters["nlist"]
            needed = 2 ** parameters["pq_bits"] if "pq_bits" in parameters else cells
            count = max(TRAINING_POINTS_PER_CELL * cells, needed * MIN_POINTS_PER_CELL)
            index.train(_training_sample(bank, count))
        for _, block in row_blocks(bank):
            index.add(block)
        return index

    def _apply_search_parameters(self, index) -> None:
        if self.config.kind == "hnsw":
            index.hnsw.efSearch = self.parameters["ef_search"]
        else:
            index.nprobe = self.parameters["nprobe"]

    def fit(self, bank) -> None:
        self.mapped, self.bank = _stored_bank(bank, self.bank_storage)
        size, dimension = self.bank.shape
        self.parameters = resolved_parameters(self.config, size, dimension)
        saved, self._saved = self._saved, None
        action = "Read the saved" if saved is not None else "Built an"
        if saved is not None:
            if saved.ntotal != size or saved.d != dimension:
                raise ModelFormatError(
                    f"saved {self.config.kind} index holds {saved.ntotal} x {saved.d} vectors "
                    f"but the memory bank is {size} x {dimension}"
                )
            self.faiss_index = saved
            if "nlist" in self.parameters:
                self.parameters["nlist"] = saved.nlist
                self.parameters["nprobe"] = min(self.config.nprobe, saved.nlist)
        else:
            self.faiss_index = self._build(self.bank, self.parameters)
        self._apply_search_parameters(self.faiss_index)
        self._search_index = self.faiss_index
        if self.on_gpu:
            resources = self._faiss.StandardGpuResources()
            self._search_index = self._faiss.index_cpu_to_gpu(resources, 0, self.faiss_index)
        LOGGER.info("%s %s index over %d bank features: %s (%.1f MiB)", action,
                    self.config.kind, size, self.parameters, self.size_bytes() / 2**20)  # fmt: skip

    # -------------------------------------------------------------- searching
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, len(self.bank))
        array = _queries_array(queries)
        distances, indices = self._search_index.search(array, k)
        missing = np.nonzero((indices < 0).any(axis=1))[0]
        if len(missing):
            bank = np.ascontiguousarray(self.bank.numpy())
            distances[missing], indices[missing] = self._faiss.knn(array[missing], bank, k)
        return torch.from_numpy(distances), torch.from_numpy(indices)

    # -------------------------------------------------------- saving, loading
    def size_bytes(self) -> int:
        """Size of the index as FAISS serialises it (what it takes in memory, about)."""
        return int(self._faiss.serialize_index(self.faiss_index).nbytes)

    def write(self, path: Path) -> None:
        self._faiss.write_index(self.faiss_index, str(path))

    def read(self, path: Path) -> None:
        """Reads a saved index; the next `fit(bank)` adopts it instead of building one."""
        path = Path(path)
        if not path.is_file():
            raise ModelFormatError(f"{path}: the model's {self.config.kind} index file is missing")
        try:
            index = self._faiss.read_index(str(path))
        except RuntimeError as error:
            raise ModelFormatError(f"{path}: not a readable FAISS index ({error})") from error
        expected = self._class.__name__  # read_index returns the most derived class
        if type(index).__name__ != expected:
            raise ModelFormatError(
                f"{path}: expected a FAISS {expected} for --search {self.config.kind}, found "
                f"{type(index).__name__}"
            )
        self._saved = index

    def describe(self) -> dict:
        """What the saved model's meta records about the index."""
        return {**self.parameters, "ntotal": int(self.faiss_index.ntotal),
                "bytes": self.size_bytes()}  # fmt: skip
