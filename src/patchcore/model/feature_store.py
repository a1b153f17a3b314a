"""Where training patch features wait while the coreset is selected.

Fitting needs every training feature once more only to copy out the selected rows, so on
the CPU the features are spilled to an anonymous temporary file as they are extracted and
only the selected rows are read back: resident memory stays independent of the training
set's size, and the values are bit-identical. On a GPU they stay in device memory.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from patchcore.errors import OutputError


def gather_rows(chunks: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Rows `indices` of the row-wise concatenation of `chunks`, without concatenating them."""
    sizes = torch.tensor([len(chunk) for chunk in chunks])
    ends = torch.cumsum(sizes, 0)
    indices = indices.cpu()
    chunk_of_row = torch.searchsorted(ends, indices, right=True)
    offsets = indices - (ends - sizes)[chunk_of_row]
    rows = torch.empty(len(indices), chunks[0].shape[1], dtype=chunks[0].dtype,
                       device=chunks[0].device)  # fmt: skip
    for position, chunk in enumerate(chunks):
        wanted = torch.nonzero(chunk_of_row == position)[:, 0]
        if len(wanted):
            rows[wanted.to(rows.device)] = chunk[offsets[wanted].to(chunk.device)]
    return rows


class InMemoryFeatureStore:
    """Keeps the appended feature batches as they are (on their device)."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def append(self, features: torch.Tensor) -> None:
        self.chunks.append(features)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.chunks, indices)

    def close(self) -> None:
        self.chunks.clear()


class SpilledFeatureStore:
    """Writes appended float32 feature batches to an anonymous temporary file."""

    def __init__(self, directory: str | None = None) -> None:
        self._directory = directory or tempfile.gettempdir()
        try:
            # The store owns the file for its whole life and closes it in close().
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                prefix="patchcore-features-", dir=directory
            )
        except OSError as error:
            raise self._error(error) from error
        self._rows = 0
        self._dimension: int | None = None

    def __len__(self) -> int:
        return self._rows

    def append(self, features: torch.Tensor) -> None:
        array = features.detach().to("cpu", torch.float32).contiguous().numpy()
        if self._dimension is None:
            self._dimension = array.shape[1]
        try:
            self._file.write(array.data)
        except OSError as error:
            raise self._error(error) from error
        self._rows += len(array)

    def _error(self, error: OSError) -> OutputError:
        return OutputError(
            f"{self._directory}: cannot write the temporary file of training features "
            f"({error.strerror}); free space there, or set TMPDIR to a folder with room"
        )

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows `indices` (in that order) as a float32 [len(indices), D] tensor.

        Rows are read one by one with pread rather than through a memory map, whose
        read-around would make much of the file resident."""
        try:
            self._file.flush()
        except OSError as error:
            raise self._error(error) from error
        descriptor = self._file.fileno()
        row_bytes = self._dimension * 4
        rows = np.empty((len(indices), self._dimension), dtype=np.float32)
        for position, index in enumerate(indices.cpu().tolist()):
            rows[position] = np.frombuffer(
                os.pread(descriptor, row_bytes, index * row_bytes), dtype=np.float32
            )
        return torch.from_numpy(rows)

    def close(self) -> None:
        self._file.close()


def feature_store_for(device: torch.device) -> InMemoryFeatureStore | SpilledFeatureStore:
    """A spilling store on the CPU, an in-memory one on accelerators."""
    return SpilledFeatureStore() if device.type == "cpu" else InMemoryFeatureStore()
