"""Where training patch features wait while the coreset is selected.

Fitting needs every training feature once more only to copy out the selected rows, so on
the CPU the features are spilled to an anonymous temporary file as they are extracted and
only the selected rows are read back: resident memory stays independent of the training
set's size, and the values are bit-identical. On a GPU they stay in device memory.

Where the backbone's layer maps are much smaller than the patch features computed from them
(EfficientNet-Lite0: 68 values per patch against 1,024), the maps are spilled instead
(`SpilledLayerMaps`), and a part's features are computed again from its maps, by the same
aggregation on the same bytes in the same layout, when its rows are read back: bit-identical
to the features fit projected, at a fifteenth of the writes.

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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from patchcore.config import usable_cores
from patchcore.errors import OutputError

SPILL_QUEUE_BATCHES = 4  # appended batches that may wait for the writer thread
# Layer maps are spilled instead of the features where they take at most this share of the
# features' bytes: the saving must pay for computing every part's features again when the
# bank is gathered (EfficientNet-Lite0: 7 % of the bytes, 0.55 ms per 224 px image to
# aggregate again; WideResNet50's layer2 + layer3: 75 %, 1.3 ms, so its features are spilled).
MAP_SPILL_MAX_SHARE = 0.25


def gather_rows(chunks: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Rows `indices` of the row-wise concatenation of `chunks`, without concatenating them."""
    return gather_chunk_rows([len(chunk) for chunk in chunks], chunks.__getitem__, indices)


def gather_chunk_rows(sizes: list[int], chunk: Callable[[int], torch.Tensor],
                      indices: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Rows `indices` of the row-wise concatenation of chunks of `sizes` rows, chunk `i`
    being `chunk(i)`: each chunk that holds any of the rows is asked for once."""
    sizes = torch.tensor(sizes)
    ends = torch.cumsum(sizes, 0)
    indices = indices.cpu()
    chunk_of_row = torch.searchsorted(ends, indices, right=True)
    offsets = indices - (ends - sizes)[chunk_of_row]
    rows = None
    for position in torch.unique(chunk_of_row).tolist() or [0]:
        values = chunk(position)
        if rows is None:
            rows = torch.empty(len(indices), values.shape[1], dtype=values.dtype,
                               device=values.device)  # fmt: skip
        wanted = torch.nonzero(chunk_of_row == position)[:, 0]
        if len(wanted):
            rows[wanted.to(rows.device)] = values[offsets[wanted].to(values.device)]
    return rows


class InMemoryFeatureStore:
    """Keeps the appended feature batches as they are (on their device)."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def append(self, features: torch.Tensor, maps: list[torch.Tensor] | None = None) -> None:
        self.chunks.append(features)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.chunks, indices)

    def span(self, start: int, count: int) -> torch.Tensor:
        """The `count` rows from row `start` on, as one [count, D] tensor."""
        return self.gather(torch.arange(start, start + count))

    def close(self) -> None:
        self.chunks.clear()


class SpillFile:
    """An anonymous temporary file that float32 arrays are appended to (on a writer thread,
    `background=True`, see the module docstring, or on the calling thread) and read back
    from by byte offset; deleted by close()."""

    def __init__(self, directory: str | None = None, background: bool = True) -> None:
        self.directory = directory or tempfile.gettempdir()
        try:
            # The spill owns the file for its whole life and closes it in close().
            self.handle = tempfile.TemporaryFile(  # noqa: SIM115
                prefix="patchcore-features-", dir=directory
            )
        except OSError as error:
            raise self._error(error) from error
        self.size = 0  # bytes appended
        self._failure: OSError | None = None
        self._pending: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        if background:
            self._pending = queue.Queue(maxsize=SPILL_QUEUE_BATCHES)
            self._writer = threading.Thread(
                target=self._write_pending, name="patchcore-feature-spill", daemon=True
            )
            self._writer.start()

    def append(self, array: np.ndarray) -> int:
        """Queues a contiguous `array` for the file and returns its byte offset there. The
        file keeps a reference until it is written: the caller must not modify it."""
        self._raise_failure()
        if self._pending is None:
            try:
                self.handle.write(array.data)
            except OSError as error:
                raise self._error(error) from error
        else:
            self._pending.put(array)  # waits while SPILL_QUEUE_BATCHES are queued
        offset = self.size
        self.size += array.nbytes
        return offset

    def _write_pending(self) -> None:
        """The writer thread: writes queued arrays in order until the None that close()
        queues; after a failure it only drains the queue (the failure is raised on the
        caller's thread)."""
        while True:
            array = self._pending.get()
            try:
                if array is None:
                    return
                if self._failure is None:
                    self.handle.write(array.data)
            except OSError as error:
                self._failure = error
            finally:
                self._pending.task_done()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._error(self._failure) from self._failure

    def finish_writes(self) -> int:
        """Waits until every appended array is in the file, flushes it, and returns its
        descriptor for reads."""
        if self._pending is not None:
            self._pending.join()
        self._raise_failure()
        try:
            self.handle.flush()
        except OSError as error:
            raise self._error(error) from error
        return self.handle.fileno()

    def read_into(self, arrays: list[np.ndarray], offset: int) -> list[np.ndarray]:
        """Fills the contiguous `arrays`, one after another, from byte `offset` on (one
        read)."""
        size = sum(array.nbytes for array in arrays)
        if os.preadv(self.finish_writes(), arrays, offset) != size:
            raise OutputError(
                f"{self.directory}: the temporary file of training features ends before byte "
                f"{offset + size}; it was changed or truncated while in use"
            )
        return arrays

    def _error(self, error: OSError) -> OutputError:
        return OutputError(
            f"{self.directory}: cannot write the temporary file of training features "
            f"({error.strerror}); free space there, or set TMPDIR to a folder with room"
        )

    @property
    def closed(self) -> bool:
        return self.handle.closed

    def close(self) -> None:
        """Stops the writer thread and deletes the file (whatever was written)."""
        if self._writer is not None and self._writer.is_alive():
            self._pending.put(None)
            self._writer.join()
        self.handle.close()


class SpilledFeatureStore:
    """Writes appended float32 feature batches to a `SpillFile`."""

    def __init__(self, directory: str | None = None, background: bool = True) -> None:
        self._file = SpillFile(directory, background)
        self._rows = 0
        self._dimension: int | None = None

    def __len__(self) -> int:
        return self._rows

    def append(self, features: torch.Tensor, maps: list[torch.Tensor] | None = None) -> None:
        """Queues `features` [N, D] for the file (the layer maps are not kept). The store
        keeps a reference until the rows are written: the caller must not modify the
        tensor afterwards (fit never does)."""
        array = features.detach().to("cpu", torch.float32).contiguous().numpy()
        if self._dimension is None:
            self._dimension = array.shape[1]
        self._file.append(array)
        self._rows += len(array)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows `indices` (in that order) as a float32 [len(indices), D] tensor.

        Rows are read one by one with pread rather than through a memory map, whose
        read-around would make much of the file resident."""
        descriptor = self._file.finish_writes()
        row_bytes = self._dimension * 4
        rows = np.empty((len(indices), self._dimension), dtype=np.float32)
        for position, index in enumerate(indices.cpu().tolist()):
            rows[position] = np.frombuffer(
                os.pread(descriptor, row_bytes, index * row_bytes), dtype=np.float32
            )
        return torch.from_numpy(rows)

    def span(self, start: int, count: int) -> torch.Tensor:
        """The `count` rows from row `start` on, as a float32 [count, D] tensor (one read)."""
        rows = np.empty((count, self._dimension), dtype=np.float32)
        self._file.read_into([rows], start * rows.itemsize * self._dimension)
        return torch.from_numpy(rows)

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class SpilledPart:
    """One appended part in `SpilledLayerMaps`: its feature rows [first_row, first_row +
    rows), and its layer maps at byte `offset` of the file, each of `shapes[i]` ([B, C, H,
    W]) and numpy `dtypes[i]`, stored in its own memory layout (`channels_last[i]`: as
    [B, H, W, C])."""

    first_row: int
    rows: int
    offset: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    channels_last: tuple[bool, ...]


class SpilledLayerMaps:
    """Writes appended parts' layer maps to a `SpillFile` and gives their features back by
    computing them again with `aggregate` (maps -> (features [N, D], grid)), the
    aggregation that made them: the same function on the same bytes in the same layout, so
    bit-identical rows (see the module docstring). The last part computed is kept, so that
    reading the images of one part one after another aggregates it once."""

    def __init__(self, aggregate: Callable[[list[torch.Tensor]], tuple],
                 directory: str | None = None, background: bool = True) -> None:  # fmt: skip
        self._aggregate = aggregate
        self._file = SpillFile(directory, background)
        self._parts: list[SpilledPart] = []
        self._rows = 0
        self._last: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self._rows

    def append(self, features: torch.Tensor, maps: list[torch.Tensor] | None = None) -> None:
        """Writes the layer `maps` that `features` [N, D] were aggregated from (the
        features themselves are not kept). The store keeps references until the maps are
        written: the caller must not modify them."""
        shapes, dtypes, layouts, offset = [], [], [], self._file.size
        for layer_map in maps:
            layer_map = layer_map.detach().to("cpu")
            channels_last = (layer_map.is_contiguous(memory_format=torch.channels_last)
                             and not layer_map.is_contiguous())  # fmt: skip
            stored = layer_map.permute(0, 2, 3, 1) if channels_last else layer_map
            array = stored.contiguous().numpy()
            self._file.append(array)
            shapes.append(tuple(layer_map.shape))
            dtypes.append(array.dtype)
            layouts.append(channels_last)
        self._parts.append(SpilledPart(self._rows, len(features), offset, tuple(shapes),
                                       tuple(dtypes), tuple(layouts)))  # fmt: skip
        self._rows += len(features)

    def _features_of(self, number: int) -> torch.Tensor:
        """The features of part `number`, aggregated again from its stored maps."""
        if self._last is not None and self._last[0] == number:
            return self._last[1]
        part = self._parts[number]
        stored = []
        for shape, dtype, channels_last in zip(part.shapes, part.dtypes, part.channels_last,
                                               strict=True):  # fmt: skip
            batch, channels, height, width = shape
            layout = (batch, height, width, channels) if channels_last else shape
            stored.append(np.empty(layout, dtype=dtype))
        maps = [
            torch.from_numpy(values).permute(0, 3, 1, 2) if channels_last
            else torch.from_numpy(values)
            for values, channels_last in zip(self._file.read_into(stored, part.offset),
                                             part.channels_last, strict=True)
        ]  # fmt: skip
        with torch.inference_mode():
            features = self._aggregate(maps)[0]
        if len(features) != part.rows:
            raise OutputError(
                f"{self._file.directory}: part {number} of the temporary file of training "
                f"features gives {len(features)} rows, not {part.rows}"
            )
        self._last = (number, features)
        return features

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows `indices` (in that order) as a float32 [len(indices), D] tensor; each
        part holding any of them is aggregated once."""
        sizes = [part.rows for part in self._parts]
        return gather_chunk_rows(sizes, self._features_of, indices)

    def span(self, start: int, count: int) -> torch.Tensor:
        """The `count` rows from row `start` on, as a float32 [count, D] tensor."""
        return self.gather(torch.arange(start, start + count))

    def close(self) -> None:
        self._last = None
        self._file.close()


def feature_store_for(device: torch.device, aggregate: Callable | None = None) -> (
        InMemoryFeatureStore | SpilledFeatureStore | SpilledLayerMaps):  # fmt: skip
    """A spilling store on the CPU, an in-memory one on accelerators. On the CPU the layer
    maps are spilled where `aggregate` is given (see `spills_layer_maps`), the features
    otherwise. The spill writes on a writer thread only where a core is left beside torch's
    threads: on 2 cores with 2 torch threads a third busy thread made every parallel torch
    operation wait for it (fitting's extraction 25.4 -> 39.4 ms per image,
    docs/explanations/performance-inference.md)."""
    if device.type != "cpu":
        return InMemoryFeatureStore()
    background = usable_cores() > torch.get_num_threads()
    if aggregate is not None:
        return SpilledLayerMaps(aggregate, background=background)
    return SpilledFeatureStore(background=background)


def spills_layer_maps(map_values_per_patch: float, feature_dimension: int) -> bool:
    """Whether a fit spills layer maps rather than features: where the maps take at most
    MAP_SPILL_MAX_SHARE of the features' bytes."""
    return map_values_per_patch <= MAP_SPILL_MAX_SHARE * feature_dimension


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
