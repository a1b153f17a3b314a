"""Adding new normal images to a fitted model without refitting: the greedy coreset continued.

The memory bank of a greedy-coreset model is a farthest-point sequence: each feature was
the one farthest from everything chosen before it. Continuing it over new normal features
means starting every new feature's distance at its distance to the existing bank and
running the same farthest-point iterations (`samplers.farthest_point_selection`): each pick
is the new feature farthest from the bank plus the new features already picked. The old
bank is kept as it is; the picks are appended to it.

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
from patchcore.model.samplers import farthest_point_selection
from patchcore.model.search import build_index
from patchcore.progress import track

LOGGER = logging.getLogger(__name__)

FIRST_ROUND = 64  # picks per round double from here; the target is checked between rounds
LARGEST_ROUND = 2048


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
    """Squared distance from every query to its nearest bank row, by exact search: FAISS's
    blocked brute force straight on the bank's memory on the CPU (a mapped bank is not
    copied), chunked matrix products on an accelerator."""
    if device.type == "cpu":
        import faiss

        faiss.omp_set_num_threads(threads)
        array = queries.to(torch.float32).contiguous().numpy()
        distances, _ = faiss.knn(array, bank.numpy(), 1)
        return torch.from_numpy(distances[:, 0]).clamp_min(0.0)
    index = build_index(SearchConfig(backend="torch"), device)
    index.fit(bank)
    return index.search(queries, 1)[0][:, 0].clamp_min(0.0)


def continue_coreset(
    new_features: torch.Tensor, start_distances: torch.Tensor, count: int,
    target: float = -1.0,
) -> torch.Tensor:  # fmt: skip
    """Indices (into `new_features`) of up to `count` farthest-point picks continuing a
    coreset whose squared distances to the new features are `start_distances`.

    Picks are made in rounds (64, 128, ... 2048 picks) by `farthest_point_selection`, which keeps
    the minimum distances up to date between rounds; picking stops before the first pick
    whose distance is at most `target` (squared; -1: no target), and never picks a feature
    at distance 0 (already in the bank, or a copy of an earlier pick).
    """
    minimum = start_distances.to(new_features.device, torch.float32).clone()
    norms = new_features.square().sum(dim=1)
    picks: list[torch.Tensor] = []
    remaining, size = count, FIRST_ROUND
    floor = max(target, 0.0)
    while remaining > 0 and float(minimum.max()) > floor:
        before = minimum.clone()
        round_picks = farthest_point_selection(new_features, norms, minimum, min(size, remaining))
        distances = _pick_distances(new_features, before, round_picks)
        kept = int((distances > floor).int().cumprod(0).sum())
        picks.append(round_picks[:kept])
        if kept < len(round_picks):
            break
        remaining -= kept
        size = min(2 * size, LARGEST_ROUND)
    return torch.cat(picks).cpu() if picks else torch.empty(0, dtype=torch.long)


def _pick_distances(
    features: torch.Tensor, before: torch.Tensor, picks: torch.Tensor
) -> torch.Tensor:
    """The squared distance each pick of a round had when it was picked: to the bank and the
    earlier rounds (`before`) and to the earlier picks of its own round."""
    points = features[picks].double()
    pairwise = torch.cdist(points, points).square()
    earlier = torch.ones_like(pairwise, dtype=torch.bool).tril(diagonal=-1)
    within = torch.where(earlier, pairwise, torch.inf).amin(dim=1)
    return torch.minimum(before[picks].double(), within).float()


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
    parts = [model.training_features(images_of(batch))
             for batch in track(batches, "Extracting new features", unit="batch")]  # fmt: skip
    if not parts:
        raise DataError("no new images to add")
    new_features = torch.cat(parts)
    bank_size = len(model.memory_bank)
    target = limits.target(model)
    count = limits.count(model.config, len(new_features), bank_size, target is not None)
    start = nearest_squared_distances(model.memory_bank, new_features, model.device, threads)
    picks = continue_coreset(
        new_features, start, count, squared_target(target, model.config)
    )
    if len(picks):
        model.set_memory_bank(_extended_bank(model, new_features[picks.to(new_features.device)]))
    report = UpdateReport(len(new_features), len(picks), bank_size, len(model.memory_bank))
    LOGGER.info("Added %d of %d new patch features to the memory bank (%d -> %d); target "
                "score %s", report.added, report.new_features, report.bank_before,
                report.bank_after, "none" if target is None else f"{target:.6g}")  # fmt: skip
    return report
