"""Tests for the seeded synthetic MVTec-style dataset generator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchcore.cli.synthetic import synthetic_cli
from patchcore.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    SyntheticSpec,
    defect_types,
    generate_category,
    generate_dataset,
    make_sample,
    sample_rng,
)

SMALL = SyntheticSpec(
    image_size=64, num_train=3, num_test_good=2, num_test_defective_per_type=2, seed=1
)
ALL_DEFECTS = [(cat, defect) for cat in SYNTHETIC_CATEGORIES for defect in defect_types(cat)]


def _file_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_layout_counts_and_masks(tmp_path: Path) -> None:
    assert generate_dataset(tmp_path, spec=SMALL) == tmp_path
    for category in SYNTHETIC_CATEGORIES:
        base = tmp_path / category
        assert len(list((base / "train" / "good").glob("*.png"))) == SMALL.num_train
        assert len(list((base / "test" / "good").glob("*.png"))) == SMALL.num_test_good
        assert not (base / "ground_truth" / "good").exists()
        defects = defect_types(category)
        assert len(defects) >= 2
        test_dirs = {p.name for p in (base / "test").iterdir()}
        assert test_dirs == {"good", *defects}
        assert {p.name for p in (base / "ground_truth").iterdir()} == set(defects)
        for defect in defects:
            images = sorted((base / "test" / defect).glob("*.png"))
            masks = sorted((base / "ground_truth" / defect).glob("*.png"))
            assert len(images) == len(masks) == SMALL.num_test_defective_per_type
            for image_path in images:
                image = Image.open(image_path)
                mask = Image.open(base / "ground_truth" / defect / f"{image_path.stem}_mask.png")
                assert image.mode == "RGB" and image.size == (SMALL.image_size,) * 2
                assert mask.mode == "L" and mask.size == image.size
                values = np.unique(np.asarray(mask))
                assert set(values.tolist()) == {0, 255}
        for good in (base / "train" / "good").glob("*.png"):
            assert Image.open(good).mode == "RGB"


def test_generate_category_returns_its_folder(tmp_path: Path) -> None:
    assert generate_category(tmp_path, "object", SMALL) == tmp_path / "object"


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    first = _file_bytes(generate_dataset(tmp_path / "a", spec=SMALL))
    second = _file_bytes(generate_dataset(tmp_path / "b", spec=SMALL))
    assert first == second
    other_spec = SyntheticSpec(**{**SMALL.__dict__, "seed": SMALL.seed + 1})
    other = _file_bytes(generate_dataset(tmp_path / "c", spec=other_spec))
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first if "train" in name)


def test_seeding_does_not_depend_on_the_process(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from patchcore.data.synthetic import *; "
        "generate_dataset(Path(sys.argv[1]), spec=SyntheticSpec(image_size=32, num_train=1, "
        "num_test_good=1, num_test_defective_per_type=1, seed=5))"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        target = tmp_path / hash_seed
        subprocess.run([sys.executable, "-c", script, str(target)], check=True, env=env)
        outputs.append(_file_bytes(target))
    assert outputs[0] == outputs[1]


def test_categories_use_independent_streams() -> None:
    a = sample_rng(0, "texture", 0, 0).random(4)
    b = sample_rng(0, "object", 0, 0).random(4)
    c = sample_rng(0, "texture", 0, 1).random(4)
    assert not np.allclose(a, b) and not np.allclose(a, c)


def test_regenerating_into_existing_folder_is_consistent(tmp_path: Path) -> None:
    bigger = SyntheticSpec(**{**SMALL.__dict__, "num_train": 5, "num_test_defective_per_type": 3})
    generate_dataset(tmp_path / "reused", spec=bigger)
    generate_dataset(tmp_path / "reused", spec=SMALL)
    generate_dataset(tmp_path / "fresh", spec=SMALL)
    assert _file_bytes(tmp_path / "reused") == _file_bytes(tmp_path / "fresh")


@pytest.mark.parametrize(("category", "defect"), ALL_DEFECTS)
def test_defect_changes_exactly_its_mask_and_clearly(category: str, defect: str) -> None:
    size = 256
    for index in range(3):
        sample = make_sample(category, defect, size, sample_rng(7, category, 2, index))
        mask = sample.mask
        assert mask.shape == (size, size) and mask.dtype == bool
        changed = np.any(sample.image != sample.clean, axis=-1)
        np.testing.assert_array_equal(changed, mask)
        ys, xs = np.nonzero(mask)
        assert mask.sum() >= 60
        assert max(np.ptp(ys), np.ptp(xs)) >= 12, "defect too small to be seen by patch features"
        diff = np.abs(sample.image.astype(int) - sample.clean.astype(int)).max(axis=-1)
        assert diff[mask].mean() > 40, f"{category}/{defect} is not clearly visible"


def test_missing_piece_shows_dark_background() -> None:
    sample = make_sample("object", "missing", 128, sample_rng(0, "object", 3, 0))
    brightness = sample.image.astype(float).mean(axis=-1)
    assert brightness[sample.mask].mean() < 80
    assert sample.clean.astype(float).mean(axis=-1)[sample.mask].mean() > 100


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_normal_images_vary_and_have_no_mask(category: str) -> None:
    first = make_sample(category, None, 64, sample_rng(0, category, 0, 0))
    second = make_sample(category, None, 64, sample_rng(0, category, 0, 1))
    assert not first.mask.any()
    assert np.array_equal(first.image, first.clean)
    assert not np.array_equal(first.image, second.image)
    assert np.abs(first.image.astype(int) - second.image.astype(int)).mean() > 5


def test_unknown_category_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'carpet'.*texture, object"):
        generate_dataset(tmp_path, categories=["texture", "carpet"], spec=SMALL)
    assert not (tmp_path / "texture").exists(), "nothing is written before validation"
    with pytest.raises(ValueError, match="carpet"):
        generate_category(tmp_path, "carpet", SMALL)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_train", 0),
        ("num_test_good", -1),
        ("num_test_defective_per_type", 0),
        ("image_size", 16),
        ("image_size", 64.0),
        ("seed", -3),
    ],
)
def test_invalid_spec_is_rejected(tmp_path: Path, field: str, value: object) -> None:
    spec = SyntheticSpec(**{**SMALL.__dict__, field: value})
    with pytest.raises(ValueError, match=field):
        generate_dataset(tmp_path, spec=spec)


def test_unknown_defect_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="scratch"):
        make_sample("object", "scratch", 64, sample_rng(0, "object", 0, 0))


def test_cli_writes_dataset_and_reports_it(tmp_path: Path) -> None:
    argv = [str(tmp_path), "--categories", "texture", "--image_size", "48", "--num_train", "2"]
    argv += ["--num_test_good", "1", "--num_defective", "1", "--seed", "3"]
    outcome = CliRunner().invoke(synthetic_cli, argv)
    assert outcome.exit_code == 0, outcome.output
    assert len(list((tmp_path / "texture" / "train" / "good").glob("*.png"))) == 2
    assert not (tmp_path / "object").exists()
    assert "texture" in outcome.output and str(tmp_path) in outcome.output


def test_cli_reports_bad_arguments(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(synthetic_cli, [str(tmp_path), "--num_train", "0"])
    assert outcome.exit_code == 1
    assert "num_train must be an integer >= 1" in outcome.output
