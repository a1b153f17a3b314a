"""Coverage of defects by the inspected region, and per-type results at the threshold."""

import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from patchcore.config import PreprocessingConfig
from patchcore.data.datasets import list_samples
from patchcore.evaluation.quality import (
    BY_TYPE_COLUMNS,
    BY_TYPE_FILE,
    COVERAGE_FILE,
    coverage_warning,
    defect_outside,
    inspection_coverage,
    rates_line,
    record_quality,
    summary_lines,
    type_rows,
)


def _category(root, masks: dict) -> None:
    """An MVTec-layout category of 72 x 72 images; masks: name -> (rows, columns) slices."""
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (root / "part" / folder).mkdir(parents=True)
    picture = Image.fromarray(np.full((72, 72, 3), 90, dtype=np.uint8))
    picture.save(root / "part" / "train" / "good" / "000.png")
    picture.save(root / "part" / "test" / "good" / "000.png")
    for name, (rows, columns) in masks.items():
        picture.save(root / "part" / "test" / "dent" / f"{name}.png")
        mask = np.zeros((72, 72), dtype=np.uint8)
        mask[rows, columns] = 255
        Image.fromarray(mask).save(root / "part" / "ground_truth" / "dent" / f"{name}_mask.png")


def test_defects_outside_a_centre_crop_are_counted(tmp_path):
    _category(tmp_path, {
        "corner": (slice(0, 3), slice(0, 3)),  # within the 4-pixel border a 72 -> 64 crop drops
        "centre": (slice(30, 40), slice(30, 40)),
        "edge": (slice(0, 10), slice(30, 40)),  # straddles the border
    })  # fmt: skip
    samples = list_samples(tmp_path, "part", "test")
    crop = PreprocessingConfig(resize=72, imagesize=64)
    coverage = inspection_coverage(samples, crop)
    assert coverage.defective_images == coverage.with_mask == 3
    assert [p.rsplit("/", 1)[-1] for p in coverage.wholly_outside] == ["corner.png"]
    assert [p.rsplit("/", 1)[-1] for p in coverage.partly_outside] == ["edge.png"]
    warning = coverage_warning("mvtec_part", coverage)
    assert "1 have their defect wholly outside the inspected region (centre crop 64 of 72)" in warning
    assert "(e.g. corner.png) and 1 partly" in warning and "--crop none" in warning
    whole = inspection_coverage(samples, PreprocessingConfig(resize=72, crop="none"))
    assert whole.wholly_outside == whole.partly_outside == ()
    assert coverage_warning("mvtec_part", whole) is None
    record_quality(tmp_path / "run", "mvtec_part", coverage, type_rows(
        "mvtec_part", [0.1, 0.9, 0.2, 0.3], ["good", "dent", "dent", "dent"],
        [0, 1, 1, 1], 0.5))  # fmt: skip
    assert (tmp_path / "run" / COVERAGE_FILE).read_text().splitlines()[1] == (
        "mvtec_part,3,3,1,1,centre crop 64 of 72")
    lines = summary_lines(tmp_path / "run")
    assert lines[0] == ("mvtec_part at the saved threshold 0.5: false-reject rate 0.0% (0 of 1 "
                        "good images rejected); escape rate 66.7% (2 of 3 defective images "
                        "accepted)")  # fmt: skip
    assert lines[1].startswith("mvtec_part: 1 of 3 defective test images have their defect wholly")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([BY_TYPE_FILE, COVERAGE_FILE])


def test_defect_outside_cases():
    region = np.zeros((4, 4), dtype=bool)
    region[1:3, 1:3] = True
    mask = np.zeros((4, 4), dtype=bool)
    assert defect_outside(mask, region) == ""  # marks nothing
    mask[1, 1] = True
    assert defect_outside(mask, region) == ""
    mask[0, 0] = True
    assert defect_outside(mask, region) == "partly"
    mask[1, 1] = False
    assert defect_outside(mask, region) == "wholly"


def test_type_rows_match_sklearn_and_count_decisions():
    generator = np.random.default_rng(0)
    types = ["good"] * 20 + ["crack"] * 7 + ["hole"] * 5
    labels = np.array([t != "good" for t in types])
    scores = generator.normal(size=32) + labels * np.array([0] * 20 + [1.5] * 7 + [0.3] * 5)
    threshold = 0.8
    rows = {row["defect_type"]: row for row in type_rows("d", scores, types, labels, threshold)}
    assert list(rows) == ["good", "crack", "hole", "defective"]
    for name in ("good", "crack", "hole", "defective"):
        chosen = {"good": ~labels, "defective": labels}.get(name)
        if chosen is None:
            chosen = np.array([t == name for t in types])
        if name != "good":
            selected = ~labels | chosen
            expected_auroc = roc_auc_score(chosen[selected], scores[selected])
            assert rows[name]["image_auroc"] == pytest.approx(expected_auroc)
        expected = int((scores[chosen] > threshold).sum())
        assert rows[name]["images"] == chosen.sum() and rows[name]["rejected"] == expected
        assert rows[name]["rejected_rate"] == pytest.approx(expected / chosen.sum())
    assert 0 < rows["good"]["rejected"] < 20 and 0 < rows["crack"]["rejected"] < 7
    assert math.isnan(rows["good"]["image_auroc"])
    assert set(rows["good"]) == set(BY_TYPE_COLUMNS)
    without = type_rows("d", scores, types, labels, None)
    assert all(row["rejected"] is None for row in without) and rates_line(without) is None
