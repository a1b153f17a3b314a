"""Adding new normal images to a fitted model without refitting: the greedy coreset continued.

The memory bank of a greedy-coreset model is a farthest-point sequence: each feature was
the one farthest from everything chosen before it. Continuing it over new normal features
is the training sampler's own selection (`samplers.select_farthest_points`) started from
every new feature's distance to the existing bank: each pick is the new feature farthest
from the bank plus the new features already picked. The old bank is kept as it is; the
picks are appended to it.

The continuation runs in the space the model scores in (the full patch features, squared
L2; fitting projects them to 128 dimensions only to make the pass over all training
features affordable), so its distances are the scores the new features would get, and it
stops when the farthest remaining new feature would score at most `target_score` (default:
the model's decision threshold): with k = 1 every added image then scores at or below the
threshold. Caps: `percentage` of the new features (default: none when there is a target;
the model's own sampler fraction for a model without threshold) and `max_bank_size`.
Features already in the bank (distance 0) are never picked.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from patchcore.config import PatchCoreConfig, SearchConfig
from patchcore.errors import ConfigurationError, DataError
from patchcore.model.bank_file import row_blocks, temporary_bank_file
from patchcore.model.indexes import bank_storage_of
from patchcore.model.patchcore import PatchCore, images_of
from patchcore.model.samplers import select_farthest_points
from patchcore.model.scoring import neighbour_distances
from patchcore.model.search import build_index
from patchcore.progress import track

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateLimits:
    """When the continuation stops: the coverage target and the caps."""

    percentage: float | None = None
    max_bank_size: int | None = None
    target_score: float | None = None

    def __post_init__(self) -> None:
        if self.percentage is not None and not 0.0 < self.percentage <= 1.0:
            raise ConfigurationError(f"--percentage must be in (0, 1], got {self.percentage}")
        if self.max_bank_size is not None and self.max_bank_size < 1:
            raise ConfigurationError(f"--max_bank_size must be >= 1, got {self.max_bank_size}")
        if self.target_score is not None and not (
            math.isfinite(self.target_score) and self.target_score >= 0
        ):
            raise ConfigurationError(
                f"--target_score must be a finite number >= 0, got {self.target_score}"
            )

    def target(self, model: PatchCore) -> float | None:
        """The score the new features are covered to: --target_score, else the threshold."""
        if self.target_score is not None:
            return self.target_score
        statistics = model.normal_statistics
        return statistics.threshold if statistics is not None else None

    def count(self, config: PatchCoreConfig, new_features: int, bank_size: int,
              has_target: bool) -> int:  # fmt: skip
        """Most new features that may be picked for a bank of `bank_size`."""
        fraction = self.percentage
        if fraction is None:
            fraction = 1.0 if has_target else config.sampler.percentage
        count = new_features if fraction >= 1.0 else max(1, int(new_features * fraction))
        if self.max_bank_size is not None:
            count = min(count, max(0, self.max_bank_size - bank_size))
        return count


@dataclass(frozen=True)
class UpdateReport:
    """What one model's update did."""

    new_features: int
    added: int
    bank_before: int
    bank_after: int


def squared_target(target: float | None, config: PatchCoreConfig) -> float:
    """A score target in squared L2 (scores are L2 with `distance="l2"`); -1 for none."""
    if target is None:
        return -1.0
    return target * target if config.distance == "l2" else target


def nearest_squared_distances(
    bank: torch.Tensor, queries: torch.Tensor, device: torch.device, threads: int
) -> torch.Tensor:
    """Squared distance from every query to its nearest bank row. The row is found by exact
    search (FAISS's blocked brute force straight on the bank's memory on the CPU, so a mapped
    bank is not copied; chunked matrix products on an accelerator); the distance is then
    computed from the differences, as the scorer computes scores (`neighbour_distances`)."""
    if device.type == "cpu":
        import faiss

        faiss.omp_set_num_threads(threads)
        array = queries.to(torch.float32).contiguous().numpy()
        nearest = torch.from_numpy(faiss.knn(array, bank.numpy(), 1)[1])
    else:
        index = build_index(SearchConfig(backend="torch"), device)
        index.fit(bank)
        nearest = index.search(queries, 1)[1]
    return neighbour_distances(queries, bank, nearest)[:, 0]


def _extended_bank(model: PatchCore, rows: torch.Tensor):
    """The old bank with `rows` appended, kept the way the model keeps its bank."""
    if bank_storage_of(model.index) != "mmap":
        return torch.cat([model.memory_bank.to(rows.device, torch.float32), rows])
    old_blocks = (block for _, block in row_blocks(model.memory_bank))
    size, dimension = model.memory_bank.shape
    return temporary_bank_file(itertools.chain(old_blocks, [rows]), size + len(rows), dimension)


@torch.inference_mode()
def add_normal_images(
    model: PatchCore, batches: Iterable, limits: UpdateLimits, threads: int = 4
) -> UpdateReport:
    """Appends to `model`'s bank the coreset continuation over the batches' patch features;
    the index is rebuilt over the new bank. The normal statistics are left as they were."""
    if model.memory_bank is None:
        raise DataError("the model has no memory bank: fit or load it before updating")
    parts = [part for batch in track(batches, "Extracting new features", unit="batch")
             for part, _ in model.training_features(images_of(batch))]  # fmt: skip
    if not parts:
        raise DataError("no new images to add")
    new_features = torch.cat(parts)
    bank_size = len(model.memory_bank)
    target = limits.target(model)
    count = limits.count(model.config, len(new_features), bank_size, target is not None)
    start = nearest_squared_distances(model.memory_bank, new_features, model.device, threads)
    # Features at distance 0 (already in the bank, or copies of a pick) are never picked.
    stop_at = max(squared_target(target, model.config), 0.0)
    picks = select_farthest_points(new_features, start, count, stop_at=stop_at).cpu()
    if len(picks):
        model.set_memory_bank(_extended_bank(model, new_features[picks.to(new_features.device)]))
    report = UpdateReport(len(new_features), len(picks), bank_size, len(model.memory_bank))
    LOGGER.info("Added %d of %d new patch features to the memory bank (%d -> %d); target "
                "score %s", report.added, report.new_features, report.bank_before,
                report.bank_after, "none" if target is None else f"{target:.6g}")  # fmt: skip
    return report
