"""What a quality team reads beside `results.csv` (which keeps the reference's columns):

- `inspection_coverage.csv`: per dataset, the defective test images whose defect mask lies
  wholly or partly outside the inspected region (a centre crop never sees the border), so
  their decisions say nothing about the defect; a warning names the option that inspects
  them (`inspection_coverage`, `coverage_warning`).
- `results_by_type.csv`: per dataset and test folder (`good`, each defect type, and all
  defective images together), the image AUROC of that type's images against the good ones
  and the share rejected at the saved threshold: on `good` the false-reject rate, on a
  defect type its recall, on `defective` 1 - the escape rate (`type_rows`).

Both are rewritten atomically, one dataset's rows replaced at a time under a lock, so
several processes of one run (patchcore-sweep) can add theirs. Decisions go through
`patchcore.model.calibration.decide`, AUROCs through `patchcore.evaluation.metrics`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchcore.data.datasets import Sample, mask_for
from patchcore.data.preprocessing import inspected_region, open_mask
from patchcore.evaluation.metrics import instance_auroc
from patchcore.files import atomic_write_text, exclusive_lock
from patchcore.model.calibration import decide

LOGGER = logging.getLogger(__name__)

COVERAGE_FILE = "inspection_coverage.csv"
BY_TYPE_FILE = "results_by_type.csv"
COVERAGE_COLUMNS = ("dataset", "defective_images", "with_mask", "wholly_outside",
                    "partly_outside", "inspected")  # fmt: skip
BY_TYPE_COLUMNS = ("dataset", "defect_type", "images", "image_auroc", "threshold", "rejected",
                   "rejected_rate")  # fmt: skip
ALL_DEFECTIVE = "defective"
GOOD = "good"


# ------------------------------------------------------------------------ coverage
@dataclass(frozen=True)
class Coverage:
    """How much of the defective test images' defects the inspected region holds."""

    defective_images: int
    with_mask: int
    wholly_outside: tuple[str, ...]  # image paths: no defect pixel inside the region
    partly_outside: tuple[str, ...]  # image paths: some defect pixels outside it
    inspected: str  # the region, in words

    def row(self, dataset: str) -> dict:
        return {
            "dataset": dataset, "defective_images": self.defective_images,
            "with_mask": self.with_mask, "wholly_outside": len(self.wholly_outside),
            "partly_outside": len(self.partly_outside), "inspected": self.inspected,
        }  # fmt: skip


def inspected_words(preprocessing) -> str:
    """The inspected region of `preprocessing`, in words."""
    if preprocessing.crop == "center":
        return f"centre crop {preprocessing.imagesize} of {preprocessing.resize}"
    return "whole image, tiled" if preprocessing.tile is not None else "whole image"


def defect_outside(mask: np.ndarray, region: np.ndarray) -> str:
    """'wholly' when no defect pixel of `mask` lies in `region`, 'partly' when some do and
    some do not, '' when all do (or the mask marks nothing)."""
    defect = int(mask.sum())
    inside = int((mask & region).sum())
    if defect == 0 or inside == defect:
        return ""
    return "wholly" if inside == 0 else "partly"


def mask_outside(mask_path: Path, preprocessing) -> str:
    """`defect_outside` of one mask file (a pixel is defective at half intensity or more, at
    the mask's own size) against the region `preprocessing` inspects."""
    mask = np.asarray(open_mask(mask_path)) >= 128
    return defect_outside(mask, inspected_region(mask.shape, preprocessing).numpy())


def outside_note(where: str, preprocessing) -> str:
    """One image's note for `defect_outside`'s answer, or '' when the defect is inside."""
    if not where:
        return ""
    return f"defect {where} outside the inspected region ({inspected_words(preprocessing)})"


def ground_truth_note(image_path: Path, preprocessing, defect_type: str | None = None) -> str:
    """`outside_note` for a test image of the MVTec layout (`<category>/test/<type>/<name>`)
    whose ground-truth mask exists (`<category>/ground_truth/<type>/`); '' when its defect
    lies inside the inspected region, no mask is known or no preprocessing is. `defect_type`
    defaults to the image's folder name."""
    if preprocessing is None:
        return ""
    path = Path(image_path)
    mask = mask_for(path.parent.parent.parent, defect_type or path.parent.name, path)
    if mask is None:
        return ""
    return outside_note(mask_outside(mask, preprocessing), preprocessing)


def inspection_coverage(samples: Sequence[Sample], preprocessing) -> Coverage:
    """Counts the defective `samples` whose mask (a pixel is defective at half intensity or
    more, at the mask's own size) reaches outside `inspected_region`."""
    defective = [sample for sample in samples if sample.is_anomaly]
    with_mask = [sample for sample in defective if sample.mask_path is not None]
    outside: dict[str, list[str]] = {"wholly": [], "partly": []}
    for sample in with_mask:
        where = mask_outside(sample.mask_path, preprocessing)
        if where:
            outside[where].append(str(sample.image_path))
    return Coverage(len(defective), len(with_mask), tuple(outside["wholly"]),
                    tuple(outside["partly"]), inspected_words(preprocessing))  # fmt: skip


def coverage_warning(dataset: str, coverage: Coverage) -> str | None:
    """The warning for defects the inspected region misses, or None when it sees them all."""
    wholly, partly = len(coverage.wholly_outside), len(coverage.partly_outside)
    if not wholly and not partly:
        return None
    examples = ", ".join(Path(path).name for path in coverage.wholly_outside[:3])
    return (
        f"{dataset}: of {coverage.with_mask} defective test images with masks, {wholly} have "
        f"their defect wholly outside the inspected region ({coverage.inspected})"
        f"{' (e.g. ' + examples + ')' if examples else ''} and {partly} partly; they still "
        "count as defective in the metrics. --crop none (whole images; with --tile or "
        "--scale for large ones) would inspect them, though not always with better results "
        f"(counts in {COVERAGE_FILE})"
    )


# ------------------------------------------------------------------- by defect type
def _auroc(scores: np.ndarray, good: np.ndarray, chosen: np.ndarray) -> float:
    selected = good | chosen
    if not good.any() or not chosen.any():
        return math.nan
    return instance_auroc(scores[selected], chosen[selected])


def type_rows(
    dataset: str, scores, defect_types: Sequence[str], labels, threshold: float | None
) -> list[dict]:
    """One row per test folder (good first, then each defect type in name order, then all
    defective images): images, image AUROC against the good images (NaN for good), the
    threshold and how many and what share are rejected at it (empty without a threshold)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    types = np.asarray(list(defect_types))
    good = ~labels
    groups = [(GOOD, good)]
    groups += [(name, (types == name) & labels) for name in sorted(set(types[labels]))]
    groups.append((ALL_DEFECTIVE, labels))
    rows = []
    for name, chosen in groups:
        count = int(chosen.sum())
        rejected = None if threshold is None else int(decide(scores[chosen], threshold).sum())
        rows.append({
            "dataset": dataset, "defect_type": name, "images": count,
            "image_auroc": math.nan if name == GOOD else _auroc(scores, good, chosen),
            "threshold": threshold, "rejected": rejected,
            "rejected_rate": None if rejected is None or not count else rejected / count,
        })  # fmt: skip
    return rows


def rates_line(rows: Sequence[dict]) -> str | None:
    """'<dataset> at threshold T: false-reject rate ..., escape rate ...' from `type_rows`,
    or None without a threshold."""
    by_type = {row["defect_type"]: row for row in rows}
    good, defective = by_type[GOOD], by_type[ALL_DEFECTIVE]
    if good["threshold"] is None:
        return None
    parts = [f"{rows[0]['dataset']} at the saved threshold {good['threshold']:.6g}:"]
    if good["images"]:
        parts.append(f"false-reject rate {good['rejected_rate']:.1%} "
                     f"({good['rejected']} of {good['images']} good images rejected)")  # fmt: skip
    if defective["images"]:
        escaped = defective["images"] - defective["rejected"]
        parts.append(f"escape rate {escaped / defective['images']:.1%} "
                     f"({escaped} of {defective['images']} defective images accepted)")  # fmt: skip
    return " ".join(parts[:1]) + " " + "; ".join(parts[1:])


# ------------------------------------------------------------------------- writing
def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def replace_dataset_rows(
    path: Path, columns: Sequence[str], dataset: str, rows: list[dict], shared: bool = False
) -> None:
    """Rewrites the CSV at `path` (atomically; with `shared`, under a lock that several
    processes writing one run take turns on) with `dataset`'s rows replaced by `rows`; other
    datasets' rows keep their place."""
    path = Path(path)
    with exclusive_lock(path) if shared else contextlib.nullcontext():
        kept: list[dict] = []
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                kept = [row for row in csv.DictReader(handle) if row.get("dataset") != dataset]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for row in kept:
            writer.writerow([row.get(column, "") for column in columns])
        for row in rows:
            writer.writerow([_cell(row[column]) for column in columns])
        atomic_write_text(path, buffer.getvalue())


def record_quality(
    folder: Path, dataset: str, coverage: Coverage, by_type: list[dict], shared: bool = False
) -> None:
    """Writes a dataset's coverage and per-type rows beside its run's results.csv (`shared`:
    other processes write the same files) and logs the coverage warning and decision rates."""
    folder = Path(folder)
    replace_dataset_rows(folder / COVERAGE_FILE, COVERAGE_COLUMNS, dataset,
                         [coverage.row(dataset)], shared)  # fmt: skip
    warning = coverage_warning(dataset, coverage)
    if warning:
        LOGGER.warning(warning)
    replace_dataset_rows(folder / BY_TYPE_FILE, BY_TYPE_COLUMNS, dataset, by_type, shared)
    line = rates_line(by_type)
    if line:
        LOGGER.info(line)


def summary_lines(folder: Path) -> list[str]:
    """The decision-rate and coverage lines of a run folder's files, for the summary printed
    after the results table."""
    lines = []
    by_type = Path(folder) / BY_TYPE_FILE
    if by_type.is_file():
        with by_type.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        for dataset in dict.fromkeys(row["dataset"] for row in rows):
            typed = [_typed(row) for row in rows if row["dataset"] == dataset]
            line = rates_line(typed)
            if line:
                lines.append(line)
    coverage = Path(folder) / COVERAGE_FILE
    if coverage.is_file():
        with coverage.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if int(row["wholly_outside"]) or int(row["partly_outside"]):
                    lines.append(
                        f"{row['dataset']}: {row['wholly_outside']} of {row['with_mask']} "
                        f"defective test images have their defect wholly outside the inspected "
                        f"region ({row['inspected']}), {row['partly_outside']} partly; "
                        "--crop none would inspect them"
                    )
    return lines


def _typed(row: dict) -> dict:
    def number(text: str, kind):
        return None if text == "" else kind(text)

    return {**row, "images": int(row["images"]), "threshold": number(row["threshold"], float),
            "rejected": number(row["rejected"], int),
            "rejected_rate": number(row["rejected_rate"], float)}  # fmt: skip
