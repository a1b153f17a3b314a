"""The memory bank as a file: the reference's flat FAISS index, written in blocks and mapped.

A saved model keeps its bank as a FAISS IndexFlatL2 file (`nnscorer_search_index.faiss`):
a 45-byte header, then the float32 rows one after another. This module writes that file
block by block from any [M, D] tensor (one in RAM, or one that is itself a mapped file),
byte for byte what `faiss.write_index` writes, and maps it back as a tensor without
reading it: pages are read when a search touches them and, being clean file pages, the
kernel can drop them again under memory pressure. So a bank larger than RAM can be
fitted, saved, loaded and searched (see `patchcore.model.indexes.MappedExactIndex`).

While fitting, a bank that is not yet saved lives in a temporary file under TMPDIR,
unlinked as soon as it is mapped, so nothing is left behind whatever happens.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from patchcore.errors import ModelFormatError, OutputError

# FAISS's layout of an IndexFlatL2 file (faiss/impl/index_write.cpp): fourcc "IxF2", then the
# index header (d: int32, ntotal: int64, two int64 placeholders of 2^20, is_trained: bool,
# metric_type: int32; METRIC_L2 = 1), then the codes as a vector: its length in floats
# (uint64) and the float32 rows.
FLAT_L2_FOURCC = b"IxF2"
HEADER = struct.Struct("<4siqqq?iQ")
FAISS_HEADER_PLACEHOLDER = 1 << 20
METRIC_L2 = 1
BLOCK_ROWS = 65536


def _header(rows: int, dimension: int) -> bytes:
    return HEADER.pack(
        FLAT_L2_FOURCC, dimension, rows, FAISS_HEADER_PLACEHOLDER, FAISS_HEADER_PLACEHOLDER,
        True, METRIC_L2, rows * dimension,
    )  # fmt: skip


def row_blocks(bank: torch.Tensor, block_rows: int = BLOCK_ROWS):
    """(start, float32 C-contiguous numpy block) pairs covering the rows of `bank`; blocks of
    a mapped or CPU float32 bank are views, nothing is copied."""
    for start in range(0, len(bank), block_rows):
        block = bank[start : start + block_rows].detach().to("cpu", torch.float32)
        yield start, np.ascontiguousarray(block.numpy())


def _write_rows(handle, bank: torch.Tensor) -> None:
    for _, block in row_blocks(bank):
        handle.write(block.data)


def write_bank_file(bank: torch.Tensor, path: Path) -> None:
    """Writes `bank` [M, D] to `path` as a FAISS IndexFlatL2 file, block by block."""
    rows, dimension = bank.shape
    try:
        with open(path, "wb") as handle:
            handle.write(_header(rows, dimension))
            _write_rows(handle, bank)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OutputError(f"{path}: cannot write the memory bank ({error.strerror})") from error


def read_bank_header(path: Path) -> tuple[int, int]:
    """(rows, dimension) of a flat FAISS L2 index file; ModelFormatError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: memory bank file is missing")
    with open(path, "rb") as handle:
        raw = handle.read(HEADER.size)
    if len(raw) < HEADER.size or raw[:4] != FLAT_L2_FOURCC:
        raise ModelFormatError(
            f"{path}: not an exact flat FAISS L2 index (fourcc {raw[:4]!r}); it cannot be "
            "memory-mapped, load it with --bank_storage memory"
        )
    _, dimension, rows, _, _, _, metric, count = HEADER.unpack(raw)
    expected_size = HEADER.size + 4 * rows * dimension
    if metric != METRIC_L2 or count != rows * dimension or path.stat().st_size != expected_size:
        raise ModelFormatError(
            f"{path}: flat FAISS index header does not match its size ({rows} x {dimension} "
            f"floats, metric {metric}, {path.stat().st_size} bytes)"
        )
    return rows, dimension


class MappedBank:
    """A [M, D] float32 memory bank read through a memory map of its flat FAISS file.

    `tensor` is a CPU tensor backed by the mapping (copy-on-write, so the file is never
    modified); `array` is the same memory as numpy. It has the shape attributes a bank
    tensor has, so `PatchCore.set_memory_bank` accepts it as it is.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        rows, dimension = read_bank_header(self.path)
        self.array = np.memmap(
            self.path, dtype=np.float32, mode="c", offset=HEADER.size, shape=(rows, dimension)
        )
        self.tensor = torch.from_numpy(self.array)

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return len(self.tensor)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes


def temporary_bank_file(blocks, rows: int, dimension: int) -> MappedBank:
    """A MappedBank of `rows` x `dimension` written from `blocks` (float32 arrays or tensors
    of rows, in order) to a temporary file under TMPDIR, which is unlinked once mapped."""
    descriptor, name = tempfile.mkstemp(prefix="patchcore-bank-", suffix=".faiss")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(_header(rows, dimension))
            written = 0
            for block in blocks:
                array = block.detach().to("cpu", torch.float32).contiguous().numpy() \
                    if isinstance(block, torch.Tensor) else np.ascontiguousarray(block, np.float32)  # fmt: skip
                handle.write(array.data)
                written += len(array)
        if written != rows:
            raise ModelFormatError(f"memory bank: expected {rows} rows, got {written}")
        return MappedBank(Path(name))
    except OSError as error:
        raise OutputError(
            f"{name}: cannot write a temporary memory bank ({error.strerror}); set TMPDIR to a "
            "folder with room"
        ) from error
    finally:
        Path(name).unlink(missing_ok=True)


def bank_in_file(bank: torch.Tensor | MappedBank) -> MappedBank:
    """`bank` as a MappedBank: itself if it already is one, else a temporary file copy."""
    if isinstance(bank, MappedBank):
        return bank
    return temporary_bank_file((block for _, block in row_blocks(bank)), *bank.shape)


def bank_in_memory(bank: torch.Tensor | MappedBank) -> torch.Tensor:
    """`bank` as a contiguous float32 CPU tensor in RAM (a mapped bank is read in)."""
    if isinstance(bank, MappedBank):
        return bank.tensor.clone()
    return bank.detach().to("cpu", torch.float32).contiguous()
