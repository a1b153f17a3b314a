"""Shared fixtures: small random-weight models for mechanics, synthetic data for accuracy."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig

SHARED_MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"


@pytest.fixture(autouse=True)
def _quiet_faiss_loader():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def small_config(**changes) -> PatchCoreConfig:
    """A fast random-weight resnet18 configuration for tests of mechanics."""
    fields = {
        "backbone_name": "resnet18",
        "pretrained": False,
        "pretrain_embed_dimension": 64,
        "target_embed_dimension": 48,
        "preprocessing": PreprocessingConfig(resize=72, imagesize=64),
        "sampler": SamplerConfig(name="approx_greedy_coreset", percentage=0.25),
    }
    fields.update(changes)
    return PatchCoreConfig(**fields)


@pytest.fixture
def random_images() -> torch.Tensor:
    return torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout dataset with both categories (generated once)."""
    from patchcore.data.synthetic import SyntheticSpec, generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(
        root,
        spec=SyntheticSpec(num_train=12, num_test_good=4, num_test_defective_per_type=3, seed=3),
    )
    return root


# ------------------------------------------------------------------ dashboard runs
DASHBOARD_CATEGORY = "mvtec_object"
DASHBOARD_GOOD_ONLY = "mvtec_clean"
DASHBOARD_ENSEMBLE_RUN = "ensemble/normal_stats"
DASHBOARD_LOADING = ["--resize", "144", "--imagesize", "128", "--num_workers", "0",
                     "--batch_size", "4", "--train_val_split", "0.75"]  # fmt: skip


def _train_dashboard_run(arguments: list) -> None:
    from click.testing import CliRunner

    from patchcore.cli.runs import train_cli

    outcome = CliRunner().invoke(train_cli, [str(a) for a in arguments], catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output


def make_dashboard_runs(synthetic_root: Path, root: Path) -> Path:
    """A results folder as an operator finds it, returned with its runs:
    - `project/group` (newest): one real-weight model, a good-only category `clean` (sorted
      first) and `object` with defects; model and predictions saved;
    - `ensemble/normal_stats`: two random-weight members combined on their normal-image
      scale, with held-out normal images, model and predictions saved;
    - `older/no_predictions`: only a results.csv."""
    import math
    import shutil

    from patchcore.evaluation.reporting import write_results_csv

    data = root.parent / f"{root.name}_data"
    shutil.copytree(synthetic_root / "object", data / "object")
    shutil.copytree(synthetic_root / "texture", data / "clean")
    for folder in (data / "clean" / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    shutil.rmtree(data / "clean" / "ground_truth")
    results = root / "results"
    old_run = results / "older" / "no_predictions" / "results.csv"
    write_results_csv(old_run, {"mvtec_object": {"instance_auroc": 0.5, "pro": math.nan}})
    os.utime(old_run, (1_000_000_000, 1_000_000_000))
    saved = ["--gpu", "-1", "--save_patchcore_model", "--save_predictions"]
    _train_dashboard_run([
        *saved, "--log_project", "ensemble", "--log_group", "normal_stats",
        "--ensemble_normalisation", "normal_stats", results,
        "patch_core", "-b", "resnet18", "-b", "resnet18.seed-1", "--random_backbone_weights",
        "--pretrain_embed_dimension", "64", "--target_embed_dimension", "64",
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", *DASHBOARD_LOADING, "-d", "object", "mvtec", data,
    ])  # fmt: skip
    ensemble_csv = results / "ensemble" / "normal_stats" / "results.csv"
    os.utime(ensemble_csv, (1_500_000_000, 1_500_000_000))
    _train_dashboard_run([
        *saved, results,
        "patch_core", "-b", "efficientnet_lite0", "-le", "_blocks.4", "-le", "_blocks.10",
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", *DASHBOARD_LOADING, "-d", "clean", "-d", "object", "mvtec", data,
    ])  # fmt: skip
    _add_scoring_folders_and_escapes(data, results)
    return results


def _add_scoring_folders_and_escapes(data: Path, results: Path) -> None:
    """Inside the results folder: `incoming/object_test` (copies of the object test images,
    named <defect>_<name>) and `incoming/mixed` (three crack images and an unreadable file) to
    score. Symbolic links that lead outside it, which the dashboard must not follow:
    `outside_images` (a folder of images), `leak/results.csv` (a run's results), and
    `stolen/predictions` (a run's predictions; its results.csv is real)."""
    import shutil

    outside = results.parent / "outside"
    (outside / "predictions").mkdir(parents=True)
    for image in sorted((data / "object" / "test").rglob("*.png")):
        target = results / "incoming" / "object_test" / f"{image.parent.name}_{image.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
        if image.parent.name == "crack":
            (results / "incoming" / "mixed").mkdir(exist_ok=True)
            shutil.copy(image, results / "incoming" / "mixed" / image.name)
    (results / "incoming" / "mixed" / "unreadable.png").write_bytes(b"no image here")
    (results / "outside_images").symlink_to(data / "object" / "test" / "crack")
    shutil.copy(results / "project" / "group" / "results.csv", outside / "results.csv")
    (results / "leak").mkdir()
    (results / "leak" / "results.csv").symlink_to(outside / "results.csv")
    shutil.copytree(results / "project" / "group" / "predictions" / DASHBOARD_CATEGORY,
                    outside / "predictions" / DASHBOARD_CATEGORY)  # fmt: skip
    (results / "stolen").mkdir()
    shutil.copy(outside / "results.csv", results / "stolen" / "results.csv")
    os.utime(results / "stolen" / "results.csv", (1_100_000_000, 1_100_000_000))
    (results / "stolen" / "predictions").symlink_to(outside / "predictions")


@pytest.fixture(scope="session")
def dashboard_results(synthetic_root, tmp_path_factory) -> Path:
    """The results folder of `make_dashboard_runs`, built once per test session (read-only)."""
    return make_dashboard_runs(synthetic_root, tmp_path_factory.mktemp("dashboard"))


def pytest_terminal_summary(terminalreporter):
    """Which product paths (tests/test_product_paths.py) ran natively on this machine; the
    others ran in emulation only."""
    from patchcore.model.native import coreset_kernels
    from patchcore.model.samplers import PRODUCT_PATHS, native_product_paths

    native = native_product_paths(coreset_kernels())
    emulated = [path for path in PRODUCT_PATHS if path not in native]
    terminalreporter.write_line(
        f"product paths run natively here: {', '.join(native)}; emulated only: "
        f"{', '.join(emulated) or 'none'}"
    )
