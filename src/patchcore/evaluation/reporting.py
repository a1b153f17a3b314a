"""Per-dataset metric tables: `results.csv` on disk and a fixed-width console table.

`results.csv` keeps the layout that existing comparison scripts expect: the first header
cell is `Row Names`, then one row per evaluated dataset (e.g. `mvtec_bottle`) in the
order given, then a final `Mean` row. Values are fractions in [0, 1]. A metric that is not
available for a dataset (NaN, e.g. no defective images or no masks) is an empty cell, and
the `Mean` row averages each column over the datasets that have a value.

Floats are written with `repr`, the shortest text that reads back to the identical float,
so a write followed by a read loses nothing.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from patchcore.errors import DataError
from patchcore.evaluation.metrics import METRIC_NAMES
from patchcore.files import atomic_write, exclusive_lock

LOGGER = logging.getLogger(__name__)

ROW_NAMES_HEADER = "Row Names"
MEAN_ROW = "Mean"
MISSING_TEXT = "-"

COLUMN_TITLES = {
    "instance_auroc": "image AUROC",
    "full_pixel_auroc": "pixel AUROC",
    "anomaly_pixel_auroc": "anomaly-pixel AUROC",
    "pro": "PRO",
    "instance_f1max": "image F1max",
    "pixel_f1max": "pixel F1max",
}

Rows = Mapping[str, Mapping[str, float]]


def _check_rows(rows: Rows) -> None:
    """Raise DataError unless `rows` names at least one dataset and none is called Mean."""
    if not rows:
        raise DataError("rows: no datasets to report")
    if MEAN_ROW in rows:
        raise DataError(f"rows: a dataset may not be named {MEAN_ROW!r}; that row is computed")


def result_columns(rows: Rows) -> list[str]:
    """Metric columns of `rows`: known metrics in METRIC_NAMES order, then others by first use."""
    seen: dict[str, None] = {}
    for metrics in rows.values():
        seen.update(dict.fromkeys(metrics))
    known = [name for name in METRIC_NAMES if name in seen]
    others = [name for name in seen if name not in METRIC_NAMES]
    return known + others


def _nan_mean(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN; NaN when there are none."""
    present = [float(value) for value in values if not math.isnan(value)]
    if not present:
        return math.nan
    return math.fsum(present) / len(present)


def mean_row(rows: Rows, columns: Sequence[str]) -> dict[str, float]:
    """Per-column mean over datasets, ignoring NaN and metrics a dataset does not have."""
    return {
        column: _nan_mean(metrics.get(column, math.nan) for metrics in rows.values())
        for column in columns
    }


def _format_cell(value: float) -> str:
    """CSV text of one value: empty for NaN, otherwise the shortest exact float text."""
    number = float(value)
    return "" if math.isnan(number) else repr(number)


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf)", re.IGNORECASE)


def _parse_cell(text: str, where: str) -> float:
    """Inverse of `_format_cell`: an empty cell reads as NaN; anything but a number is a
    DataError naming `where` (file, row and column)."""
    stripped = text.strip()
    if not stripped:
        return math.nan
    if _NUMBER.fullmatch(stripped) is None:
        raise DataError(f"{where}: expected a number or an empty cell, got {stripped[:40]!r}")
    return float(stripped)


def _csv_records(rows: Rows) -> list[list[str]]:
    """Header, one record per dataset, then the Mean record, all as text cells."""
    columns = result_columns(rows)
    records = [[ROW_NAMES_HEADER, *columns]]
    for name, metrics in rows.items():
        records.append([name, *(_format_cell(metrics.get(c, math.nan)) for c in columns)])
    means = mean_row(rows, columns)
    records.append([MEAN_ROW, *(_format_cell(means[c]) for c in columns)])
    return records


def write_results_csv(path: Path, rows: Rows) -> Path:
    """Write `rows` (dataset -> metric -> fraction) to `path` atomically; return the path.

    Readers never see a partial file: on failure nothing is written and the error
    propagates. Parent folders are created as needed.
    """
    _check_rows(rows)
    path = Path(path)
    records = _csv_records(rows)

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(records)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)
    LOGGER.info("Wrote results of %d dataset(s) to %s", len(rows), path)
    return path


def merge_results_csv(path: Path, rows: Rows, order: Sequence[str] = ()) -> dict:
    """Adds `rows` to the `results.csv` at `path` (replacing rows of the same name) and
    returns all rows. Safe when several processes merge into one file at once: each holds
    an exclusive lock (`patchcore.files.exclusive_lock`) while it reads and rewrites, and
    the rewrite is atomic. Rows named in `order` come first, in that order; the others keep
    their place. The `Mean` row is recomputed over all rows."""
    _check_rows(rows)
    path = Path(path)
    with exclusive_lock(path):
        merged = read_results_csv(path) if path.is_file() else {}
        merged.pop(MEAN_ROW, None)
        merged.update(rows)
        rank = {name: position for position, name in enumerate(order)}
        names = sorted(merged, key=lambda name: rank.get(name, len(rank)))  # stable
        merged = {name: merged[name] for name in names}
        write_results_csv(path, merged)
    return merged


def read_results_csv(path: Path) -> dict[str, dict[str, float]]:
    """Read a `results.csv` back: row name -> metric -> float, empty cells as NaN.

    The `Mean` row is included like any other row. Raises DataError if the first header
    cell is not `Row Names` or a row has the wrong number of cells.
    """
    with Path(path).open(newline="", encoding="utf-8") as handle:
        records = list(csv.reader(handle))
    if not records or not records[0] or records[0][0] != ROW_NAMES_HEADER:
        raise DataError(f"{path}: first header cell must be {ROW_NAMES_HEADER!r}")
    columns = records[0][1:]
    table: dict[str, dict[str, float]] = {}
    for line_number, record in enumerate(records[1:], start=2):
        if not record:
            continue
        if len(record) != len(columns) + 1:
            raise DataError(
                f"{path}:{line_number}: expected {len(columns) + 1} cells, got {len(record)}"
            )
        table[record[0]] = {
            c: _parse_cell(cell, f"{path}:{line_number}: row {record[0]!r}, column {c!r}")
            for c, cell in zip(columns, record[1:], strict=True)
        }
    return table


def _percent_text(value: float) -> str:
    """A fraction shown as a percentage with two decimals, or '-' when NaN."""
    number = float(value)
    return MISSING_TEXT if math.isnan(number) else f"{100.0 * number:.2f}"


def format_results_table(rows: Rows) -> str:
    """A fixed-width text table of `rows` in percent, with a rule line and a Mean line.

    `rows` is the same mapping `write_results_csv` takes (without a `Mean` entry); NaN
    shows as '-'. Known metrics get short titles, other metric keys are shown as they are.
    """
    _check_rows(rows)
    columns = result_columns(rows)
    means = mean_row(rows, columns)
    header = ["dataset", *(COLUMN_TITLES.get(c, c) for c in columns)]
    body = [
        [name, *(_percent_text(metrics.get(c, math.nan)) for c in columns)]
        for name, metrics in rows.items()
    ]
    footer = [MEAN_ROW, *(_percent_text(means[c]) for c in columns)]
    widths = [max(len(line[i]) for line in (header, *body, footer)) for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([render(header), rule, *(render(r) for r in body), rule, render(footer)])
