"""Where training patch features wait while the coreset is selected.

Fitting needs every training feature once more only to copy out the selected rows, so on
the CPU the features are spilled to an anonymous temporary file as they are extracted and
only the selected rows are read back: resident memory stays independent of the training
set's size, and the values are bit-identical. On a GPU they stay in device memory.

The spill's writes (a few milliseconds per 224 px image into the page cache) can run on a
writer thread beside the backbone, which releases the interpreter while it computes
(`feature_store_for` chooses it where a core is free for it); at most
SPILL_QUEUE_BATCHES appended batches wait for it, so resident memory stays bounded. The
file holds the same bytes in the same order either way (`background=False` writes on the
calling thread); a write's failure is raised by the next append or gather.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import torch

from patchcore.config import usable_cores
from patchcore.errors import OutputError

SPILL_QUEUE_BATCHES = 4  # appended batches that may wait for the writer thread


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

    def span(self, start: int, count: int) -> torch.Tensor:
        """The `count` rows from row `start` on, as one [count, D] tensor."""
        return self.gather(torch.arange(start, start + count))

    def close(self) -> None:
        self.chunks.clear()


class SpilledFeatureStore:
    """Writes appended float32 feature batches to an anonymous temporary file, on a writer
    thread (`background=True`, see the module docstring) or on the calling thread."""

    def __init__(self, directory: str | None = None, background: bool = True) -> None:
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
        self._failure: OSError | None = None
        self._pending: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        if background:
            self._pending = queue.Queue(maxsize=SPILL_QUEUE_BATCHES)
            self._writer = threading.Thread(
                target=self._write_pending, name="patchcore-feature-spill", daemon=True
            )
            self._writer.start()

    def __len__(self) -> int:
        return self._rows

    def append(self, features: torch.Tensor) -> None:
        """Queues `features` [N, D] for the file. The store keeps a reference until the rows
        are written: the caller must not modify the tensor afterwards (fit never does)."""
        array = features.detach().to("cpu", torch.float32).contiguous().numpy()
        if self._dimension is None:
            self._dimension = array.shape[1]
        self._raise_failure()
        if self._pending is None:
            self._write(array)
        else:
            self._pending.put(array)  # waits while SPILL_QUEUE_BATCHES are queued
        self._rows += len(array)

    def _write(self, array: np.ndarray) -> None:
        try:
            self._file.write(array.data)
        except OSError as error:
            raise self._error(error) from error

    def _write_pending(self) -> None:
        """The writer thread: writes queued batches in order until the None that close()
        queues; after a failure it only drains the queue (the failure is raised on the
        caller's thread)."""
        while True:
            array = self._pending.get()
            try:
                if array is None:
                    return
                if self._failure is None:
                    self._file.write(array.data)
            except OSError as error:
                self._failure = error
            finally:
                self._pending.task_done()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._error(self._failure) from self._failure

    def _finish_writes(self) -> None:
        """Waits until every appended batch is in the file, and flushes it."""
        if self._pending is not None:
            self._pending.join()
        self._raise_failure()
        try:
            self._file.flush()
        except OSError as error:
            raise self._error(error) from error

    def _error(self, error: OSError) -> OutputError:
        return OutputError(
            f"{self._directory}: cannot write the temporary file of training features "
            f"({error.strerror}); free space there, or set TMPDIR to a folder with room"
        )

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows `indices` (in that order) as a float32 [len(indices), D] tensor.

        Rows are read one by one with pread rather than through a memory map, whose
        read-around would make much of the file resident."""
        self._finish_writes()
        descriptor = self._file.fileno()
        row_bytes = self._dimension * 4
        rows = np.empty((len(indices), self._dimension), dtype=np.float32)
        for position, index in enumerate(indices.cpu().tolist()):
            rows[position] = np.frombuffer(
                os.pread(descriptor, row_bytes, index * row_bytes), dtype=np.float32
            )
        return torch.from_numpy(rows)

    def span(self, start: int, count: int) -> torch.Tensor:
        """The `count` rows from row `start` on, as a float32 [count, D] tensor (one read)."""
        self._finish_writes()
        rows = np.empty((count, self._dimension), dtype=np.float32)
        read = os.preadv(self._file.fileno(), [rows], start * rows.itemsize * self._dimension)
        if read != rows.nbytes:
            raise OutputError(
                f"{self._directory}: the temporary file of training features ends before row "
                f"{start + count}; it was changed or truncated while in use"
            )
        return torch.from_numpy(rows)

    def close(self) -> None:
        """Stops the writer thread and deletes the file (whatever was written)."""
        if self._writer is not None and self._writer.is_alive():
            self._pending.put(None)
            self._writer.join()
        self._file.close()


def feature_store_for(device: torch.device) -> InMemoryFeatureStore | SpilledFeatureStore:
    """A spilling store on the CPU, an in-memory one on accelerators. The spill writes on a
    writer thread only where a core is left beside torch's threads: on 2 cores with 2 torch
    threads a third busy thread made every parallel torch operation wait for it (fitting's
    extraction 25.4 -> 39.4 ms per image, docs/explanations/performance-inference.md)."""
    if device.type != "cpu":
        return InMemoryFeatureStore()
    return SpilledFeatureStore(background=usable_cores() > torch.get_num_threads())


@dataclass(frozen=True)
class StoredImage:
    """Where one training image's patch features lie in a feature store: `rows` rows from
    `first_row` on (all its tiles' with tiled inspection, image-major), on a patch `grid`
    (of a tile, when tiled), from a working image of (height, width) `size`."""

    first_row: int
    rows: int
    grid: tuple[int, int]
    size: tuple[int, int]


class TrainingFeatures:
    """The training images' patch features as `PatchCore.fit` extracted them, kept (in the
    store fit spilled them to) so that leave-one-image-out calibration scores exactly the
    features the memory bank was selected from, without a second pass of the backbone."""

    def __init__(self, store: InMemoryFeatureStore | SpilledFeatureStore,
                 images: list[StoredImage]) -> None:  # fmt: skip
        self.store = store
        self.images = images

    def features_of(self, image: int) -> torch.Tensor:
        """The patch features [rows, D] of training image `image` (0-based, in fit order)."""
        stored = self.images[image]
        return self.store.span(stored.first_row, stored.rows)

    def close(self) -> None:
        self.store.close()
