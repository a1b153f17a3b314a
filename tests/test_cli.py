"""Both command lines end to end on synthetic data, and their errors."""

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchcore.cli.runs import evaluate_cli, train_cli
from patchcore.evaluation.records import read_predictions
from patchcore.evaluation.reporting import read_results_csv

REPO = Path(__file__).resolve().parents[1]
SAME_LOADING = ["--num_workers", "0", "--batch_size", "4"]  # same batches: bit-identical maps
SMALL_RANDOM = ["-b", "resnet18", "--random_backbone_weights", "--pretrain_embed_dimension", "64",
                "--target_embed_dimension", "64"]  # fmt: skip
SMALL_DATA = ["--resize", "144", "--imagesize", "128", *SAME_LOADING]


def run(cli, arguments):
    result = CliRunner().invoke(cli, [str(a) for a in arguments], catch_exceptions=False)
    return result


def train(results, data, backbone_args, extra_main=(), categories=("texture",),
          dataset_kind="mvtec"):  # fmt: skip
    subsets = [flag for category in categories for flag in ("-d", category)]
    return run(train_cli, [
        "--gpu", "-1", *extra_main, results, "patch_core", *backbone_args,
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", *SMALL_DATA, *subsets, dataset_kind, data,
    ])  # fmt: skip


LITE0 = ["-b", "efficientnet_lite0", "-le", "_blocks.4", "-le", "_blocks.10"]


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    outcome = train(results, synthetic_root, LITE0,
                    ["--save_patchcore_model", "--save_segmentation_images", "--save_predictions"],
                    categories=("texture", "object"))  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    return results / "project" / "group", outcome.output


def test_training_writes_results_models_and_overlays(trained_run, synthetic_root):
    run_folder, output = trained_run
    rows = read_results_csv(run_folder / "results.csv")
    assert list(rows) == ["mvtec_texture", "mvtec_object", "Mean"]
    assert rows["mvtec_texture"]["instance_auroc"] >= 0.9
    header = (run_folder / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["Row Names", "instance_auroc", "full_pixel_auroc",
                          "anomaly_pixel_auroc", "pro"]  # fmt: skip
    for category in ("texture", "object"):
        model_folder = run_folder / "models" / f"mvtec_{category}"
        assert (model_folder / "patchcore_params.pkl").is_file()
        assert (model_folder / "nnscorer_search_index.faiss").is_file()
        overlays = sorted((run_folder / "segmentation_images" / f"mvtec_{category}").glob("*.png"))
        test_images = sorted((synthetic_root / category / "test").glob("*/*.png"))
        assert len(overlays) == len(test_images)
    assert "Mean" in output and "image AUROC" in output


def test_predictions_are_saved_per_image(trained_run, synthetic_root):
    run_folder, _ = trained_run
    saved = read_predictions(run_folder / "predictions" / "mvtec_object")
    test_images = sorted((synthetic_root / "object" / "test").glob("*/*.png"))
    assert len(saved.scores) == len(test_images) == len(saved.maps) == len(saved.masks)
    assert {m.shape for m in saved.maps} == {(128, 128)} and saved.patch_grid == (16, 16)
    assert saved.metrics == read_results_csv(run_folder / "results.csv")["mvtec_object"]
    assert saved.threshold is not None
    assert sorted(Path(p).name for p in saved.image_paths) == sorted(p.name for p in test_images)
    assert saved.is_anomaly.sum() == sum(p.parent.name != "good" for p in test_images)


def test_evaluating_saved_models_reproduces_the_training_metrics(
    trained_run, tmp_path, synthetic_root
):
    run_folder, _ = trained_run
    outcome = run(evaluate_cli, [
        "--gpu", "-1", tmp_path, "patch_core_loader",
        "-p", run_folder / "models" / "mvtec_texture", "-p", run_folder / "models" / "mvtec_object",
        "dataset", *SAME_LOADING, "-d", "texture", "-d", "object", "mvtec", synthetic_root,
    ])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert read_results_csv(tmp_path / "results.csv") == read_results_csv(
        run_folder / "results.csv"
    )


def test_contradicting_the_saved_preprocessing_is_an_error(trained_run, tmp_path, synthetic_root):
    run_folder, _ = trained_run
    outcome = run(evaluate_cli, [
        tmp_path, "patch_core_loader", "-p", run_folder / "models" / "mvtec_texture",
        "dataset", "--imagesize", "224", "-d", "texture", "mvtec", synthetic_root,
    ])  # fmt: skip
    assert outcome.exit_code == 1
    assert "--imagesize 224 contradicts the model" in outcome.output
    assert not (tmp_path / "results.csv").exists()


def test_two_backbone_ensemble_saves_members_and_reloads(tmp_path, synthetic_root):
    backbones = ["-b", "efficientnet_lite0", "-b", "resnet18.seed-4", "--random_backbone_weights",
                 "-le", "0._blocks.4", "-le", "0._blocks.10", "-le", "1.layer2",
                 "--pretrain_embed_dimension", "256", "--target_embed_dimension", "128"]  # fmt: skip
    outcome = train(tmp_path / "train", synthetic_root, backbones, ["--save_patchcore_model"])
    assert outcome.exit_code == 0, outcome.output
    models = tmp_path / "train" / "project" / "group" / "models" / "mvtec_texture"
    assert sorted(p.name for p in models.glob("*.pkl")) == [
        "Ensemble-1-2_patchcore_params.pkl", "Ensemble-2-2_patchcore_params.pkl"]  # fmt: skip
    outcome = run(evaluate_cli, [
        "--gpu", "-1", tmp_path / "eval", "patch_core_loader", "-p", models,
        "dataset", *SAME_LOADING, "-d", "texture", "mvtec", synthetic_root,
    ])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert read_results_csv(tmp_path / "eval" / "results.csv") == read_results_csv(
        tmp_path / "train" / "project" / "group" / "results.csv")  # fmt: skip


def test_existing_run_folder_is_never_overwritten(tmp_path, synthetic_root, caplog):
    caplog.set_level(logging.INFO)
    for _ in range(2):
        assert train(tmp_path, synthetic_root, SMALL_RANDOM).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["group", "group_0"]
    assert "Running on the CPU" in caplog.text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["patch_core", "sampler", "-p", "0.1", "random_sampler"], "Invalid value for '{identity"),
        (["patch_core", "sampler", "-p", "0", "identity"], "percentage must be in (0, 1]"),
        (["patch_core", "--patchoverlap", "0.5"], "--patchoverlap 0.5 is not supported"),
        (["patch_core", "--aggregation", "mlp"], "--aggregation mlp is not supported"),
        (["patch_core", "sampler", "identity"], "missing sub-command(s): dataset"),
    ],
)
def test_invalid_command_lines_give_usage_errors(tmp_path, arguments, message):
    outcome = CliRunner().invoke(train_cli, [str(tmp_path), *arguments])
    assert outcome.exit_code == 2
    assert message in outcome.output


def test_bad_data_gives_one_line_error(tmp_path, synthetic_root):
    outcome = train(tmp_path, synthetic_root, ["-b", "resnet18", "--random_backbone_weights"],
                    categories=("no_such_category",))  # fmt: skip
    assert outcome.exit_code == 1
    error_lines = [line for line in outcome.output.splitlines() if line.startswith("Error:")]
    missing = synthetic_root / "no_such_category"
    assert error_lines == [f"Error: category folder {missing} does not exist"]


def test_unknown_backbone_gives_one_line_error(tmp_path, synthetic_root):
    outcome = train(tmp_path, synthetic_root, ["-b", "resnet9000"])
    assert outcome.exit_code == 1
    assert "Error: unknown backbone 'resnet9000'" in outcome.output


def test_bin_scripts_are_thin_entry_points():
    for script in ("run_patchcore.py", "load_and_evaluate_patchcore.py"):
        completed = subprocess.run([sys.executable, str(REPO / "bin" / script), "--help"],
                                   capture_output=True, text=True, check=False)  # fmt: skip
        assert completed.returncode == 0 and "RESULTS_PATH" in completed.stdout


def category_copy(synthetic_root: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the synthetic texture category, named `name`, under tmp_path/data."""
    target = tmp_path / "data" / name
    shutil.copytree(synthetic_root / "texture", target)
    return target


def results_lines_after_training(tmp_path: Path, name: str, kind: str) -> list[str]:
    outcome = train(tmp_path / "results", tmp_path / "data", SMALL_RANDOM, categories=(name,),
                    dataset_kind=kind)  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    return (tmp_path / "results" / "project" / "group" / "results.csv").read_text().splitlines()


def test_folder_dataset_without_masks_reports_image_metrics_and_empty_pixel_cells(
    tmp_path, synthetic_root
):
    category = category_copy(synthetic_root, tmp_path, "own_parts")
    shutil.rmtree(category / "ground_truth")
    (category / "train" / "good").rename(category / "train" / "batch_2024")
    row = results_lines_after_training(tmp_path, "own_parts", "folder")[1].split(",")
    assert row[0] == "folder_own_parts" and 0.0 <= float(row[1]) <= 1.0
    assert row[2] == row[3] == row[4] == "" and row[6] == ""


def test_dataset_without_defective_images_gives_empty_cells_not_a_crash(tmp_path, synthetic_root):
    category = category_copy(synthetic_root, tmp_path, "only_good")
    for folder in (category / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    shutil.rmtree(category / "ground_truth")
    lines = results_lines_after_training(tmp_path, "only_good", "mvtec")
    assert lines[1] == "mvtec_only_good" + "," * 6
