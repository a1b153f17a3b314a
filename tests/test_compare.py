"""patchcore-compare: runs side by side from results.csv files and run folders."""

import csv
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from patchcore.apps.compare import compare, read_runs
from patchcore.cli.compare import compare_cli
from patchcore.evaluation.reporting import write_results_csv

RUN_A = {
    "mvtec_bottle": {"instance_auroc": 0.99, "full_pixel_auroc": 0.98, "pro": 0.90},
    "mvtec_cable": {"instance_auroc": 0.95, "full_pixel_auroc": 0.97, "pro": math.nan},
}
RUN_B = {
    "mvtec_bottle": {"instance_auroc": 1.0, "full_pixel_auroc": 0.97},
    "mvtec_screw": {"instance_auroc": 0.90, "full_pixel_auroc": 0.95},
}


@pytest.fixture
def project(tmp_path) -> Path:
    write_results_csv(tmp_path / "project" / "run_a" / "results.csv", RUN_A)
    write_results_csv(tmp_path / "project" / "run_b" / "results.csv", RUN_B)
    return tmp_path / "project"


def run(*arguments) -> tuple[int, str]:
    outcome = CliRunner().invoke(compare_cli, [str(a) for a in arguments])
    return outcome.exit_code, outcome.output


def read_comparison(path: Path) -> tuple[list[list[str]], dict[str, list[str]]]:
    with path.open(newline="") as handle:
        records = list(csv.reader(handle))
    return records[:2], {record[0]: record[1:] for record in records[2:]}


def test_csv_has_runs_as_column_groups_categories_as_rows_and_means(project, tmp_path):
    code, output = run(project / "run_a", project / "run_b" / "results.csv",
                       "--output", tmp_path / "comparison.csv")  # fmt: skip
    assert code == 0, output
    header, rows = read_comparison(tmp_path / "comparison.csv")
    metrics = ["instance_auroc", "full_pixel_auroc", "pro"]
    assert header[0] == ["Row Names", *["run_a"] * 3, *["run_b"] * 3, *["best"] * 3]
    assert header[1] == ["", *metrics * 3]
    assert list(rows) == ["mvtec_bottle", "mvtec_cable", "mvtec_screw", "Mean", "Mean (shared)"]
    assert rows["mvtec_bottle"] == ["0.99", "0.98", "0.9", "1.0", "0.97", "", "run_b", "run_a", ""]
    assert rows["mvtec_cable"][:6] == ["0.95", "0.97", "", "", "", ""]  # missing: empty cells
    assert rows["mvtec_screw"][:6] == ["", "", "", "0.9", "0.95", ""]
    mean_a = [(0.99 + 0.95) / 2, (0.98 + 0.97) / 2, 0.90]
    mean_b = [(1.0 + 0.90) / 2, (0.97 + 0.95) / 2]
    assert [float(v) for v in rows["Mean"][:5]] == pytest.approx(mean_a + mean_b)
    assert rows["Mean"][5:] == ["", "run_a", "run_a", ""]  # a lone value is not "best"
    assert [float(v) for v in rows["Mean (shared)"][:5]] == pytest.approx([0.99, 0.98, 0.9, 1.0, 0.97])


def test_the_console_table_marks_the_best_value_of_each_row(project, tmp_path):
    code, output = run(project, "--output", tmp_path / "c.csv", "-m", "instance_auroc")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split() == ["|", "run_a", "|", "run_b"]
    bottle = next(line for line in lines if line.startswith("mvtec_bottle"))
    assert bottle.split() == ["mvtec_bottle", "|", "99.00", "|", "100.00*"]
    cable = next(line for line in lines if line.startswith("mvtec_cable"))
    assert cable.split() == ["mvtec_cable", "|", "95.00", "|", "-"]
    mean = next(line for line in lines if line.startswith("Mean "))
    assert mean.split() == ["Mean", "|", "97.00*", "|", "95.00"]


def test_markdown_and_one_plot_per_metric(project, tmp_path):
    code, output = run(project, "--output", tmp_path / "c.csv", "--markdown", tmp_path / "c.md",
                       "--plot", tmp_path / "plot.png")  # fmt: skip
    assert code == 0, output
    markdown = (tmp_path / "c.md").read_text().splitlines()
    assert markdown[0].startswith("| category | run_a<br>image AUROC |")
    assert "| mvtec_bottle | 99.00 | **98.00** | 90.00 | **100.00** | 97.00 |  |" in markdown
    for metric in ("instance_auroc", "full_pixel_auroc", "pro"):
        with Image.open(tmp_path / f"plot_{metric}.png") as image:
            assert image.format == "PNG" and image.width > 100
    code, _ = run(project, "--output", tmp_path / "c.csv", "-m", "pro", "--plot", tmp_path / "one.png")
    assert code == 0 and (tmp_path / "one.png").is_file()


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path):
    for project in ("first", "second"):
        write_results_csv(tmp_path / project / "group" / "results.csv", RUN_A)
    runs = read_runs([str(tmp_path / "first" / "group"), str(tmp_path / "second" / "group")])
    assert [run.name for run in runs] == ["first/group", "second/group"]
    named = read_runs([str(tmp_path / "first" / "group")], names=["baseline"])
    assert named[0].name == "baseline"
    comparison = compare(runs)
    assert comparison.best("mvtec_bottle", "instance_auroc") == ["first/group", "second/group"]


def test_bad_input_gets_one_line_errors(project, tmp_path):
    code, output = run(tmp_path / "nowhere", "--output", tmp_path / "c.csv")
    assert code == 1 and output.strip() == f"Error: {tmp_path / 'nowhere'}: no such results file or run folder"
    (tmp_path / "empty").mkdir()
    code, output = run(tmp_path / "empty")
    assert code == 1 and "no results.csv in this folder or in its sub-folders" in output
    code, output = run(project, "-m", "recall", "--output", tmp_path / "c.csv")
    assert code == 2 and "--metrics: recall not in any run" in output
    code, output = run(project, "--names", "only_one", "--output", tmp_path / "c.csv")
    assert code == 2 and "--names: 1 name(s) for 2 run(s)" in output
    (tmp_path / "bad.csv").write_text("name,auroc\nx,1\n")
    code, output = run(tmp_path / "bad.csv", "--output", tmp_path / "c.csv")
    assert code == 1 and "first header cell must be 'Row Names'" in output
