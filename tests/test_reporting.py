"""Tests of results.csv writing/reading and the console results table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from patchcore.errors import OutputError
from patchcore.evaluation import reporting
from patchcore.evaluation.metrics import METRIC_NAMES as METRIC_COLUMNS
from patchcore.evaluation.reporting import (
    format_results_table,
    read_results_csv,
    result_columns,
    write_results_csv,
)

NAN = float("nan")


def _example_rows() -> dict[str, dict[str, float]]:
    """Three datasets with some unavailable (NaN) and some missing metrics."""
    return {
        "mvtec_bottle": {
            "instance_auroc": 1.0,
            "full_pixel_auroc": 0.98612345678901234,
            "anomaly_pixel_auroc": 0.9512,
            "pro": 0.9421,
            "instance_f1max": 0.99206349206,
            "pixel_f1max": 0.7734,
        },
        "mvtec_cable": {
            "pixel_f1max": 0.61,
            "instance_auroc": 0.9921,
            "full_pixel_auroc": 0.9843,
            "anomaly_pixel_auroc": NAN,
            "pro": 0.9102,
            "instance_f1max": 0.97,
        },
        "own_images": {
            "instance_auroc": 0.8,
            "full_pixel_auroc": NAN,
            "anomaly_pixel_auroc": NAN,
            "pro": NAN,
            "instance_f1max": 0.75,
            "pixel_f1max": NAN,
        },
    }


def _assert_same(actual: dict[str, float], expected: dict[str, float]) -> None:
    """Metric dicts are equal, with NaN equal to NaN."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            assert actual[key] == value, key


def test_round_trip_is_exact(tmp_path: Path) -> None:
    rows = _example_rows()
    path = write_results_csv(tmp_path / "results.csv", rows)
    table = read_results_csv(path)
    assert list(table) == [*rows, "Mean"]
    for name, metrics in rows.items():
        _assert_same(table[name], {c: metrics[c] for c in METRIC_COLUMNS})


def test_header_starts_with_row_names_and_keeps_metric_order(tmp_path: Path) -> None:
    path = write_results_csv(tmp_path / "results.csv", _example_rows())
    with path.open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["Row Names", *METRIC_COLUMNS]


def test_mean_row_matches_numpy_nanmean(tmp_path: Path) -> None:
    rows = _example_rows()
    table = read_results_csv(write_results_csv(tmp_path / "results.csv", rows))
    for column in METRIC_COLUMNS:
        values = np.array([metrics[column] for metrics in rows.values()])
        assert table["Mean"][column] == pytest.approx(np.nanmean(values), abs=1e-12)


def test_all_nan_column_gives_empty_mean(tmp_path: Path) -> None:
    rows = {"a": {"pro": NAN, "instance_auroc": 0.5}, "b": {"pro": NAN, "instance_auroc": 0.7}}
    table = read_results_csv(write_results_csv(tmp_path / "results.csv", rows))
    assert math.isnan(table["Mean"]["pro"])
    assert table["Mean"]["instance_auroc"] == pytest.approx(0.6)


def test_nan_cells_are_written_empty(tmp_path: Path) -> None:
    path = write_results_csv(tmp_path / "results.csv", _example_rows())
    text = path.read_text()
    assert "nan" not in text.lower()
    lines = text.splitlines()
    assert lines[3] == "own_images,0.8,,,,0.75,"


def test_columns_known_first_then_unknown_in_first_seen_order() -> None:
    rows = {
        "a": {"zeta": 1.0, "pro": 0.5},
        "b": {"alpha": 0.2, "instance_auroc": 0.9, "zeta": 0.3},
    }
    assert result_columns(rows) == ["instance_auroc", "pro", "zeta", "alpha"]


def test_missing_metric_is_empty_and_ignored_in_mean(tmp_path: Path) -> None:
    rows = {"a": {"instance_auroc": 0.9, "extra": 0.1}, "b": {"instance_auroc": 0.7}}
    table = read_results_csv(write_results_csv(tmp_path / "results.csv", rows))
    assert math.isnan(table["b"]["extra"])
    assert table["Mean"]["extra"] == pytest.approx(0.1)


def test_creates_parent_folders_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "results.csv"
    write_results_csv(path, {"a": {"pro": 0.1}})
    write_results_csv(path, {"b": {"pro": 0.2}})
    assert list(read_results_csv(path)) == ["b", "Mean"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.csv"]


def test_failed_replace_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(source: object, target: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(reporting.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="results.csv: cannot write \\(disk on fire\\)"):
        write_results_csv(tmp_path / "results.csv", _example_rows())
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writer = csv.writer

    class FailingWriter:
        """A csv writer that writes the header, then fails."""

        def __init__(self, handle: object) -> None:
            self.inner = real_writer(handle)

        def writerows(self, records: list[list[str]]) -> None:
            self.inner.writerow(records[0])
            raise RuntimeError("failed midway")

    monkeypatch.setattr(reporting.csv, "writer", FailingWriter)
    with pytest.raises(RuntimeError, match="failed midway"):
        write_results_csv(tmp_path / "results.csv", _example_rows())
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_results_csv(tmp_path / "results.csv", {"old": {"pro": 0.5}})
    before = path.read_text()

    def failing_fsync(descriptor: int) -> None:
        raise OSError("flush failed")

    monkeypatch.setattr(reporting.os, "fsync", failing_fsync)
    with pytest.raises(OutputError, match="results.csv: cannot write \\(flush failed\\)"):
        write_results_csv(path, _example_rows())
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_rejects_empty_rows_and_mean_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no datasets"):
        write_results_csv(tmp_path / "results.csv", {})
    with pytest.raises(ValueError, match="Mean"):
        write_results_csv(tmp_path / "results.csv", {"Mean": {"pro": 0.1}})
    assert not (tmp_path / "results.csv").exists()


def test_read_rejects_foreign_header(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("name,pro\na,0.1\n")
    with pytest.raises(ValueError, match="Row Names"):
        read_results_csv(path)


def test_reads_file_written_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("Row Names,instance_auroc,pro\nmvtec_bottle,1.0,\nMean,1.0,\n")
    table = read_results_csv(path)
    assert table["mvtec_bottle"]["instance_auroc"] == 1.0
    assert math.isnan(table["Mean"]["pro"])


def test_table_shows_names_mean_and_percentages() -> None:
    table = format_results_table(_example_rows())
    lines = table.splitlines()
    for name in ("mvtec_bottle", "mvtec_cable", "own_images", "Mean"):
        assert any(line.startswith(name) for line in lines), name
    for text in ("image AUROC", "pixel AUROC", "anomaly-pixel AUROC", "PRO", "pixel F1max"):
        assert text in lines[0]
    assert "100.00" in table
    assert "99.21" in table
    assert "95.12" in table
    assert set(lines[1]) == {"-"} and set(lines[-2]) == {"-"}
    assert lines[-1].startswith("Mean")
    assert "nan" not in table.lower()
    assert " -" in lines[4]  # own_images has unavailable metrics
    assert len({len(line) for line in lines[:2]}) == 1  # header is as wide as the rule


def test_table_columns_are_aligned() -> None:
    table = format_results_table({"a": {"instance_auroc": 0.5}, "long_name": {"custom": 0.25}})
    lines = table.splitlines()
    assert "custom" in lines[0]
    assert lines[0].index("image AUROC") + len("image AUROC") == lines[2].index("50.00") + 5
    assert lines[3].rstrip().endswith("25.00")
    assert lines[-1].split() == ["Mean", "50.00", "25.00"]
