"""The job behind `patchcore-compare RUN_OR_CSV...`: several runs' results side by side.

Inputs are `results.csv` files (any name), run folders holding one, or folders of runs (a
`<log_project>` folder: every sub-folder with a `results.csv`, in name order). A run is
named after its run folder (or a CSV's own stem when it is not `results.csv`); clashing
names get their parent folder prefixed.

The table has one row per category (in order of first appearance), the runs as column
groups with one column per metric, and a `Mean` row: each run's mean over its own
categories (what its results.csv reports). When the runs do not share all categories, a
`Mean (shared)` row averages over the categories every run has, so the means compare like
with like. Every metric is higher-is-better; the best value of each row and metric is
marked (all of them on a tie; only where two runs or more have a value). A metric or category a run lacks is an empty cell.

Outputs: the console table (percent), `comparison.csv` (fractions, two header rows: run
and metric, then a `best` group naming the best run(s) per metric), optional Markdown, and
optional bar charts, one figure per metric.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from patchcore.errors import ConfigurationError, DataError
from patchcore.evaluation.reporting import (
    COLUMN_TITLES,
    MEAN_ROW,
    MISSING_TEXT,
    read_results_csv,
    result_columns,
)
from patchcore.files import atomic_write, atomic_write_text
from patchcore.layout import RESULTS_FILE

SHARED_MEAN_ROW = "Mean (shared)"
BEST_GROUP = "best"
BEST_MARK = "*"


@dataclass(frozen=True)
class RunResults:
    """One run's per-category metrics (the `Mean` row left out: it is recomputed)."""

    name: str
    path: Path
    rows: dict[str, dict[str, float]]


def _csv_files(text: str) -> list[Path]:
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / RESULTS_FILE).is_file():
            return [path / RESULTS_FILE]
        runs = sorted(child / RESULTS_FILE for child in path.iterdir()
                      if (child / RESULTS_FILE).is_file())  # fmt: skip
        if runs:
            return runs
        raise DataError(f"{path}: no {RESULTS_FILE} in this folder or in its sub-folders")
    raise DataError(f"{path}: no such results file or run folder")


def _run_names(paths: list[Path]) -> list[str]:
    """Run folder names (a CSV's stem unless it is results.csv), parents prefixed to clashes."""
    parts = [
        [*path.resolve().parent.parts] if path.name == RESULTS_FILE
        else [*path.resolve().parent.parts, path.stem]
        for path in paths
    ]  # fmt: skip
    depth = [1] * len(paths)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clashes = {name for name in names if names.count(name) > 1}
        if not clashes:
            return names
        grown = False
        for position, name in enumerate(names):
            if name in clashes and depth[position] < len(parts[position]):
                depth[position] += 1
                grown = True
        if not grown:  # the same file given twice
            return [f"{name}#{i + 1}" if name in clashes else name for i, name in enumerate(names)]


def read_runs(inputs: Sequence[str], names: Sequence[str] = ()) -> list[RunResults]:
    """The runs named by `inputs`, named by `names` when given (one per run)."""
    paths = [path for text in inputs for path in _csv_files(text)]
    if not paths:
        raise ConfigurationError("give at least one results.csv or run folder")
    if names and len(names) != len(paths):
        raise ConfigurationError(
            f"--names: {len(names)} name(s) for {len(paths)} run(s) "
            f"({', '.join(str(p) for p in paths)})"
        )
    labels = list(names) if names else _run_names(paths)
    runs = []
    for label, path in zip(labels, paths, strict=True):
        rows = read_results_csv(path)
        rows.pop(MEAN_ROW, None)
        runs.append(RunResults(label, path, rows))
    return runs


@dataclass(frozen=True)
class Comparison:
    """The compared values: row -> run -> metric -> fraction (NaN when missing)."""

    runs: list[str]
    metrics: list[str]
    rows: dict[str, dict[str, dict[str, float]]]

    def value(self, row: str, run: str, metric: str) -> float:
        return self.rows[row][run].get(metric, math.nan)

    def best(self, row: str, metric: str) -> list[str]:
        """The runs with the highest value of `metric` in `row`; empty unless at least two
        runs have a value there (a lone value is not compared with anything)."""
        values = {run: self.value(row, run, metric) for run in self.runs}
        present = {run: value for run, value in values.items() if not math.isnan(value)}
        if len(present) < 2:
            return []
        top = max(present.values())
        return [run for run, value in present.items() if value == top]


def _mean(values: list[float]) -> float:
    present = [value for value in values if not math.isnan(value)]
    return math.fsum(present) / len(present) if present else math.nan


def compare(runs: list[RunResults], metrics: Sequence[str] = ()) -> Comparison:
    """The comparison of `runs` on `metrics` (default: every metric any run has)."""
    names = [run.name for run in runs]
    available = result_columns(
        dict(enumerate(values for run in runs for values in run.rows.values()))
    )
    chosen = list(metrics) or available
    unknown = [metric for metric in chosen if metric not in available]
    if unknown:
        raise ConfigurationError(
            f"--metrics: {', '.join(unknown)} not in any run (available: {', '.join(available)})"
        )
    categories = list(dict.fromkeys(row for run in runs for row in run.rows))
    nan = math.nan
    rows = {
        category: {run.name: {m: run.rows.get(category, {}).get(m, nan) for m in chosen}
                   for run in runs}
        for category in categories
    }  # fmt: skip
    rows[MEAN_ROW] = {
        run.name: {m: _mean([values.get(m, nan) for values in run.rows.values()]) for m in chosen}
        for run in runs
    }  # fmt: skip
    shared = [c for c in categories if all(c in run.rows for run in runs)]
    if shared and len(shared) < len(categories):
        rows[SHARED_MEAN_ROW] = {
            run.name: {m: _mean([run.rows[c].get(m, nan) for c in shared]) for m in chosen}
            for run in runs
        }  # fmt: skip
    return Comparison(names, chosen, rows)


# ----------------------------------------------------------------------- outputs
def _title(metric: str) -> str:
    return COLUMN_TITLES.get(metric, metric)


def _percent(value: float) -> str:
    return "" if math.isnan(value) else f"{100.0 * value:.2f}"


def format_comparison(comparison: Comparison) -> str:
    """The console table: percent, best values marked with '*', missing ones '-'."""
    header_runs, header_metrics = [""], ["category"]
    for run in comparison.runs:
        for position, metric in enumerate(comparison.metrics):
            header_runs.append(run if position == 0 else "")
            header_metrics.append(_title(metric))
    body = []
    for row in comparison.rows:
        cells = [row]
        for run in comparison.runs:
            for metric in comparison.metrics:
                text = _percent(comparison.value(row, run, metric)) or MISSING_TEXT
                best = run in comparison.best(row, metric)
                cells.append(text + (BEST_MARK if best else " "))
        body.append(cells)
    lines = [header_runs, header_metrics, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header_metrics))]
    group = len(comparison.metrics)

    def render(cells: list[str], pad=str.rjust) -> str:
        parts = [cells[0].ljust(widths[0])]
        for i in range(1, len(cells)):
            separator = " | " if (i - 1) % group == 0 else "  "
            parts.append(separator + pad(cells[i], widths[i]))
        return "".join(parts).rstrip()

    rule = "-" * len(render(header_metrics))
    mean_at = 2 + len([row for row in comparison.rows if row not in (MEAN_ROW, SHARED_MEAN_ROW)])
    rendered = [render(header_runs, str.ljust), render(header_metrics), rule]
    rendered += [render(cells) for cells in body[: mean_at - 2]] + [rule]
    rendered += [render(cells) for cells in body[mean_at - 2 :]]
    note = f"{BEST_MARK} best of the row for that metric; {MISSING_TEXT} missing"
    return "\n".join(rendered + ["", note])


def comparison_csv_text(comparison: Comparison) -> str:
    """comparison.csv: two header rows (run, metric), fractions as exact floats, empty cells
    for missing values, then the `best` group naming the best run(s) per metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    runs = [run for run in comparison.runs for _ in comparison.metrics]
    writer.writerow(["Row Names", *runs, *[BEST_GROUP] * len(comparison.metrics)])
    writer.writerow(["", *comparison.metrics * (len(comparison.runs) + 1)])
    for row in comparison.rows:
        values = [
            "" if math.isnan(value := comparison.value(row, run, metric)) else repr(value)
            for run in comparison.runs
            for metric in comparison.metrics
        ]
        best = [";".join(comparison.best(row, metric)) for metric in comparison.metrics]
        writer.writerow([row, *values, *best])
    return buffer.getvalue()


def comparison_markdown(comparison: Comparison) -> str:
    """A GitHub-flavoured Markdown table: percent, best values in bold, missing ones empty."""
    header = ["category"] + [f"{run}<br>{_title(metric)}" for run in comparison.runs
                             for metric in comparison.metrics]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in comparison.rows:
        cells = [f"**{row}**" if row in (MEAN_ROW, SHARED_MEAN_ROW) else row]
        for run in comparison.runs:
            for metric in comparison.metrics:
                text = _percent(comparison.value(row, run, metric))
                best = run in comparison.best(row, metric)
                cells.append(f"**{text}**" if best else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_paths(path: Path, metrics: Sequence[str]) -> dict[str, Path]:
    """One PNG per metric: `path` itself for one metric, `<stem>_<metric><suffix>` for several."""
    path = Path(path)
    if len(metrics) == 1:
        return {metrics[0]: path}
    suffix = path.suffix or ".png"
    return {metric: path.with_name(f"{path.stem}_{metric}{suffix}") for metric in metrics}


def write_plots(comparison: Comparison, path: Path) -> list[Path]:
    """Grouped bar charts (categories and means on the x axis, one bar per run), one figure
    per metric, written atomically; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(comparison.rows)
    written = []
    width = 0.8 / max(len(comparison.runs), 1)
    for metric, target in plot_paths(path, comparison.metrics).items():
        bars = len(rows) * max(1, len(comparison.runs))
        figure, axes = plt.subplots(figsize=(max(6.0, 0.45 * bars), 4.0))
        for position, run in enumerate(comparison.runs):
            values = [100.0 * comparison.value(row, run, metric) for row in rows]
            offsets = [i + (position - (len(comparison.runs) - 1) / 2) * width
                       for i in range(len(rows))]  # fmt: skip
            axes.bar(offsets, values, width, label=run)
        axes.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
        axes.set_ylabel(f"{_title(metric)} (%)")
        axes.set_title(_title(metric))
        shown = [100.0 * comparison.value(row, run, metric) for row in rows
                 for run in comparison.runs]  # fmt: skip
        shown = [value for value in shown if not math.isnan(value)]
        if shown:  # differences between runs are small: start the axis near the lowest bar
            axes.set_ylim(max(0.0, 5.0 * math.floor(min(shown) / 5.0) - 5.0),
                          max(100.0, max(shown)))  # fmt: skip
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        atomic_write(target, lambda temporary, f=figure: f.savefig(temporary, format="png", dpi=120))
        plt.close(figure)
        written.append(target)
    return written


@dataclass(frozen=True)
class CompareOptions:
    """A comparison job."""

    inputs: tuple[str, ...]
    output: Path = Path("comparison.csv")
    markdown: Path | None = None
    plot: Path | None = None
    metrics: tuple[str, ...] = ()
    names: tuple[str, ...] = ()


def run_compare(options: CompareOptions) -> tuple[str, list[Path]]:
    """Reads the runs, writes the outputs; returns the console table and the files written."""
    comparison = compare(read_runs(options.inputs, options.names), options.metrics)
    written = [atomic_write_text(options.output, comparison_csv_text(comparison))]
    if options.markdown is not None:
        written.append(atomic_write_text(options.markdown, comparison_markdown(comparison)))
    if options.plot is not None:
        written += write_plots(comparison, options.plot)
    return format_comparison(comparison), written
