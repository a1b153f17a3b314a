"""Both command lines end to end on synthetic data, and their errors."""

import dataclasses
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchcore.cli.runs import evaluate_cli, train_cli
from patchcore.config import PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.evaluation.records import read_predictions
from patchcore.evaluation.reporting import read_results_csv
from patchcore.model.serialization import load_models

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


def test_training_writes_per_type_results_and_rates_checked_with_sklearn(trained_run):
    import csv

    import numpy as np
    from sklearn.metrics import roc_auc_score

    run_folder, output = trained_run
    with (run_folder / "results_by_type.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for dataset in ("mvtec_texture", "mvtec_object"):
        saved = read_predictions(run_folder / "predictions" / dataset)
        types = np.array(saved.defect_types)
        good = ~saved.is_anomaly
        mine = {row["defect_type"]: row for row in rows if row["dataset"] == dataset}
        assert next(iter(mine)) == "good" and list(mine)[-1] == "defective"
        assert set(mine) == {"good", "defective", *types[saved.is_anomaly]}
        for name, row in mine.items():
            chosen = good if name == "good" else saved.is_anomaly if name == "defective" else (
                (types == name) & saved.is_anomaly)  # fmt: skip
            assert int(row["images"]) == chosen.sum()
            rejected = int((saved.scores[chosen] > saved.threshold).sum())
            assert int(row["rejected"]) == rejected
            assert float(row["threshold"]) == pytest.approx(saved.threshold, rel=1e-5)
            if name != "good":
                selected = good | chosen
                expected = roc_auc_score(chosen[selected], saved.scores[selected])
                assert float(row["image_auroc"]) == pytest.approx(expected, abs=1e-5)
        good_row, defective_row = mine["good"], mine["defective"]
        assert (f"{dataset} at the saved threshold" in output
                and f"({good_row['rejected']} of {good_row['images']} good images rejected)" in output)  # fmt: skip
        escaped = int(defective_row["images"]) - int(defective_row["rejected"])
        assert f"({escaped} of {defective_row['images']} defective images accepted)" in output
    coverage = (run_folder / "inspection_coverage.csv").read_text().splitlines()
    assert coverage[0] == "dataset,defective_images,with_mask,wholly_outside,partly_outside,inspected"
    assert len(coverage) == 3
    header = (run_folder / "results.csv").read_text().splitlines()[0]
    assert "defect_type" not in header and "wholly_outside" not in header


def test_predictions_are_saved_per_image(trained_run, synthetic_root):
    run_folder, _ = trained_run
    saved = read_predictions(run_folder / "predictions" / "mvtec_object")
    test_images = sorted((synthetic_root / "object" / "test").glob("*/*.png"))
    assert len(saved.scores) == len(test_images) == len(saved.maps) == len(saved.masks)
    assert {m.shape for m in saved.maps} == {(128, 128)} and set(saved.patch_grids) == {(16, 16)}
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


def test_evaluating_into_a_used_folder_writes_a_new_one_and_says_so(
    trained_run, tmp_path, synthetic_root
):
    run_folder, _ = trained_run
    arguments = [
        "--gpu", "-1", tmp_path / "evaluation", "patch_core_loader",
        "-p", run_folder / "models" / "mvtec_texture",
        "dataset", *SAME_LOADING, "-d", "texture", "mvtec", synthetic_root,
    ]  # fmt: skip
    first = run(evaluate_cli, arguments)
    assert first.exit_code == 0, first.output
    written = (tmp_path / "evaluation" / "results.csv").read_bytes()
    second = subprocess.run(
        [sys.executable, "-c", "from patchcore.cli.runs import evaluate_main; evaluate_main()",
         *map(str, arguments)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "evaluation" / "results.csv").read_bytes() == written  # untouched
    new = tmp_path / "evaluation_0"
    assert f"already holds a results.csv from an earlier run; writing this evaluation to {new}" in (
        second.stderr
    )
    assert f"Results: {new / 'results.csv'}" in second.stdout
    texture = read_results_csv(run_folder / "results.csv")["mvtec_texture"]
    assert read_results_csv(new / "results.csv")["mvtec_texture"] == texture


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
    # Mixed members: EfficientNet-Lite0 with its ImageNet weights, a random-weight ResNet-18.
    backbones = ["-b", "efficientnet_lite0", "-b", "resnet18.seed-4.random",
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
    members = load_models(models)
    assert [(m.config.backbone_name, m.config.pretrained, m.config.seed) for m in members] == [
        ("efficientnet_lite0", True, 0), ("resnet18", False, 4)]  # fmt: skip


def test_ensemble_members_can_mix_pretrained_and_random_weights():
    from patchcore.cli.runs import ModelOptions, split_member_name

    assert split_member_name("resnet18") == ("resnet18", None, False)
    assert split_member_name("resnet18.random") == ("resnet18", None, True)
    assert split_member_name("resnet18.seed-4.random") == ("resnet18", 4, True)
    assert split_member_name("resnet18.random.seed-4") == ("resnet18", 4, True)
    options = ModelOptions(
        backbones=("efficientnet_lite0", "resnet18.seed-4.random"), layers=(),
        pretrain_embed_dimension=64, target_embed_dimension=32, patchsize=3, num_nn=1,
        distance="squared_l2", score_reweighting=False, random_backbone_weights=False,
        search=SearchConfig(backend="torch"),
    )  # fmt: skip
    configs = options.configs(SamplerConfig(), 0, PreprocessingConfig())
    assert [(c.backbone_name, c.pretrained, c.seed) for c in configs] == [
        ("efficientnet_lite0", True, 0), ("resnet18", False, 4)]  # fmt: skip
    every = dataclasses.replace(options, random_backbone_weights=True)
    assert [c.pretrained for c in every.configs(SamplerConfig(), 0, PreprocessingConfig())] == [
        False, False]  # fmt: skip


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


def mixed_size_copy(source: Path, target: Path) -> Path:
    """The synthetic texture category with every other image cropped to a wide shape, so
    images (and their masks) come in two sizes."""
    shutil.copytree(source / "texture", target / "texture")
    from PIL import Image

    for index, path in enumerate(sorted((target / "texture").rglob("*.png"))):
        stem = path.stem.removesuffix("_mask")
        if int(stem) % 2 == 0:
            with Image.open(path) as image:
                image.crop((0, 40, image.width, image.height - 40)).save(path)
    return target


@pytest.mark.parametrize("tiles", [[], ["--tile", "64", "--tile_overlap", "0.25"]])
def test_whole_image_mode_with_mixed_sizes_end_to_end(tmp_path, synthetic_root, tiles):
    data = mixed_size_copy(synthetic_root, tmp_path / "data")
    outcome = run(train_cli, [
        "--gpu", "-1", "--save_patchcore_model", "--save_predictions", "--save_segmentation_images",
        tmp_path / "results", "patch_core", *SMALL_RANDOM,
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", "--resize", "96", "--crop", "none", *tiles, *SAME_LOADING,
        "-d", "texture", "mvtec", data,
    ])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    run_folder = tmp_path / "results" / "project" / "group"
    saved = read_predictions(run_folder / "predictions" / "mvtec_texture")
    assert {m.shape for m in saved.maps} == {(96, 96), (96, 139)}  # 256x176: int(96 * 256 / 176)
    assert all(mask.shape == m.shape for mask, m in zip(saved.masks, saved.maps, strict=True))
    rows = read_results_csv(run_folder / "results.csv")
    assert 0.5 < rows["mvtec_texture"]["full_pixel_auroc"] <= 1.0
    overlays = list((run_folder / "segmentation_images" / "mvtec_texture").glob("*.png"))
    assert len(overlays) == len(saved.scores)
    evaluated = run(evaluate_cli, [
        "--gpu", "-1", tmp_path / "evaluated", "patch_core_loader",
        "-p", run_folder / "models" / "mvtec_texture",
        "dataset", *SAME_LOADING, "-d", "texture", "mvtec", data,
    ])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert read_results_csv(tmp_path / "evaluated" / "results.csv") == rows


def test_reference_format_folder_gives_the_reference_metrics(tmp_path, synthetic_root, caplog):
    """A folder as the reference writes it (no meta file) evaluated by our command equals
    the reference's evaluation, transcribed: its transform chains on the files, and sklearn
    on masks where only 1.0 is defective and any nonzero mask selects an image."""
    import pickle

    import numpy as np
    import torch
    from PIL import Image
    from sklearn.metrics import roc_auc_score
    from torchvision import transforms

    from conftest import small_config
    from patchcore.config import PreprocessingConfig, SamplerConfig
    from patchcore.data.datasets import list_samples
    from patchcore.model.patchcore import PatchCore
    from patchcore.model.serialization import META_FILE, PARAMS_FILE, load_models, save_models

    preprocessing = PreprocessingConfig(resize=100, imagesize=96)
    config = small_config(
        backbone_name="efficientnet_lite0", layers=("_blocks.4", "_blocks.10"), pretrained=True,
        preprocessing=preprocessing, sampler=SamplerConfig("identity"),
    )  # fmt: skip
    chain = transforms.Compose(
        [transforms.Resize(100), transforms.CenterCrop(96), transforms.ToTensor()]
    )
    train = [chain(Image.open(s.image_path).convert("RGB"))
             for s in list_samples(synthetic_root, "object", "train")]  # fmt: skip
    model = PatchCore(config)
    model.fit([torch.stack(train)])
    folder = tmp_path / "reference_model"
    save_models(folder, [model])
    (folder / META_FILE).unlink()
    assert pickle.loads((folder / PARAMS_FILE).read_bytes())["input_shape"] == (3, 96, 96)
    with caplog.at_level(logging.INFO, logger="patchcore"):
        outcome = run(evaluate_cli, [
            "--gpu", "-1", tmp_path / "evaluated", "patch_core_loader", "-p", folder,
            "dataset", "--resize", "100", *SAME_LOADING, "-d", "object", "mvtec", synthetic_root,
        ])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert "images are resized to 100 (--resize) and centre-cropped to 96" in caplog.text
    # Without --resize the reference's 256 is used, and the log says so.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="patchcore"):
        load_models(folder)
    assert "does not record its resize step; images are resized to 256 (--resize)" in caplog.text
    ours = read_results_csv(tmp_path / "evaluated" / "results.csv")["mvtec_object"]
    samples = list_samples(synthetic_root, "object", "test")
    images = torch.stack([chain(Image.open(s.image_path).convert("RGB")) for s in samples])
    masks = np.stack([
        chain(Image.open(s.mask_path)).numpy()[0] if s.mask_path else np.zeros((96, 96))
        for s in samples
    ])  # fmt: skip
    prediction = model.predict(images)
    labels = [int(s.defect_type != "good") for s in samples]
    assert ours["instance_auroc"] == pytest.approx(roc_auc_score(labels, prediction.scores))
    maps = prediction.maps.numpy()
    assert ours["full_pixel_auroc"] == pytest.approx(
        roc_auc_score(masks.ravel().astype(int), maps.ravel())
    )
    chosen = [i for i in range(len(masks)) if np.sum(masks[i]) > 0]
    assert ours["anomaly_pixel_auroc"] == pytest.approx(
        roc_auc_score(masks[chosen].ravel().astype(int), maps[chosen].ravel())
    )


def test_a_run_logged_to_a_file_stays_short_and_readable(tmp_path, synthetic_root):
    """Output redirected to a file (not a terminal): no progress bars, a few log lines."""
    log = tmp_path / "train.log"
    with log.open("w") as handle:
        completed = subprocess.run(
            [sys.executable, str(REPO / "bin" / "run_patchcore.py"), "--gpu", "-1",
             "--save_segmentation_images", str(tmp_path / "results"),
             "patch_core", *SMALL_RANDOM, "sampler", "-p", "0.1", "approx_greedy_coreset",
             "dataset", *SMALL_DATA, "-d", "texture", "-d", "object", "mvtec", str(synthetic_root)],
            stdout=handle, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    text = log.read_text()
    assert completed.returncode == 0, text
    lines = text.splitlines()
    assert len(lines) < 60, text
    assert "\r" not in text  # no carriage-return progress updates
    assert any("Coreset subsampling:" in line and " in " in line for line in lines)


def test_sweep_scripts_run_with_the_python_they_are_given(tmp_path):
    """The sample sweeps call $PYTHON (default python3), not a bare `python`, and say what
    to do when it cannot import patchcore."""
    recorder = tmp_path / "python"
    calls = tmp_path / "calls.txt"
    recorder.write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exit 0; fi\necho "$@" >> {calls}\n'
    )
    recorder.chmod(0o755)
    environment = {"PATH": "/usr/bin:/bin", "PYTHON": str(recorder), "GPU": "-1"}
    for script, arguments, entry in (
        ("sample_training.sh", [tmp_path / "mvtec", tmp_path / "results",
                                "IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1"], "run_patchcore.py"),
        ("sample_evaluation.sh", [tmp_path / "mvtec", tmp_path / "run"],
         "load_and_evaluate_patchcore.py"),
    ):  # fmt: skip
        calls.unlink(missing_ok=True)
        done = subprocess.run(["bash", REPO / script, *map(str, arguments)], env=environment,
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        (call,) = calls.read_text().splitlines()
        assert call.split()[0] == str(REPO / "bin" / entry) and "--gpu -1" in call
        missing = subprocess.run(["bash", REPO / script, *map(str, arguments)],
                                 env={**environment, "PYTHON": "/bin/false"},
                                 capture_output=True, text=True, check=False)  # fmt: skip
        assert missing.returncode == 2
        assert "'/bin/false' cannot import patchcore" in missing.stderr
        assert "PYTHON=/path/to/venv/bin/python" in missing.stderr
        assert call.count(" -d ") == 15 and "-d bottle" in call and "-d zipper" in call
        calls.unlink()
        chosen = subprocess.run(["bash", REPO / script, *map(str, arguments)],
                                env={**environment, "CATEGORIES": "magnetic_tile,tile screw"},
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert chosen.returncode == 0, chosen.stderr
        (call,) = calls.read_text().splitlines()
        assert call.count(" -d ") == 3 and "-d magnetic_tile -d tile -d screw" in call


def test_saved_models_carry_a_model_card_that_predict_describes(trained_run, synthetic_root):
    import hashlib
    import json

    from patchcore.cli.predict import predict_cli
    from patchcore.model.identity import model_identity

    run_folder, _ = trained_run
    folder = run_folder / "models" / "mvtec_texture"
    card = (folder / "MODEL_CARD.md").read_text()
    train_folder = synthetic_root / "texture" / "train"
    names = sorted(str(p.relative_to(train_folder)) for p in train_folder.glob("*/*.png"))
    list_hash = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    meta = json.loads((folder / "patchcore_meta.json").read_text())
    threshold = meta["normal_statistics"]["threshold"]
    assert f"- {len(names)} normal images from `{train_folder}`" in card
    assert f"hash of their sorted file list (SHA-256, 16 hex digits): {list_hash}" in card
    assert "- backbone: efficientnet_lite0 (ImageNet weights), layers _blocks.4, _blocks.10" in card
    assert f"- memory bank: {meta['memory_bank_shape'][0]} features" in card
    assert "- calibration: training images, leave-one-image-out" in card
    assert f"- threshold: {threshold:.6g} (the 0.99 quantile of {len(names)} normal" in card
    assert "- resize: 144" in card and "- instance_auroc: " in card and "| good |" in card
    assert "- torch: " in card
    described = CliRunner().invoke(predict_cli, [str(folder), "--describe"])
    assert described.exit_code == 0, described.output
    assert f"Content hash (model_id): {model_identity(folder)}" in described.output
    assert "Format: patchcore-model/" in described.output and card in described.output


def test_a_run_that_draws_nothing_does_not_import_matplotlib(synthetic_root, tmp_path):
    """matplotlib (0.6 to 0.7 s of every run's start) is imported only by runs that draw
    (--save_plots, --save_segmentation_images); checked in a fresh interpreter."""
    arguments = ["--gpu", "-1", str(tmp_path), "patch_core", *SMALL_RANDOM, "sampler", "-p",
                 "0.1", "approx_greedy_coreset", "dataset", *SMALL_DATA, "-d", "texture",
                 "mvtec", str(synthetic_root)]  # fmt: skip
    script = (
        "import sys\n"
        "from patchcore.cli.runs import train_cli\n"
        f"train_cli({arguments!r}, standalone_mode=False)\n"
        "print('matplotlib imported:', 'matplotlib' in sys.modules)\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "matplotlib imported: False" in finished.stdout
