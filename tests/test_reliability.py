"""Reliability (issue 13): fail closed, never mis-read an image, one line for every fault.

Each test names the defect it guards against; every fault a user can meet must end in one
`Error: ...` line that names the file and the fix (never a traceback), and no fault may turn
a defective part into an accepted one.

Faults are simulated where the machine cannot produce them: a full disk by writing to
/dev/full (a real ENOSPC) or by raising ENOSPC where a write happens; a read-only folder by
chmod, or, when the tests run as root (who ignores permission bits), by making `os.mkdir`
in that folder fail as it would (every write of this package starts with an `os.mkdir`: of a
staging folder, a run folder or a write check).
"""

from __future__ import annotations

import ast
import builtins
import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import small_config
from patchcore.apps import predict as predict_app
from patchcore.apps.challenge import load_submission
from patchcore.apps.dashboard import data as dashboard_data
from patchcore.apps.export import export_challenge_models
from patchcore.apps.predict import PredictionDataset, resolve_inputs
from patchcore.cli.common import CommonOptions, resolve_device, run_guarded
from patchcore.cli.export import export_cli
from patchcore.cli.predict import predict_cli
from patchcore.cli.runs import evaluate_cli, train_cli
from patchcore.config import PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.data.datasets import ImageDataset, Sample, image_files
from patchcore.data.preprocessing import fixed_size_pair
from patchcore.errors import DataError, ModelFormatError, OutputError
from patchcore.evaluation import reporting, visualization
from patchcore.evaluation.records import write_predictions
from patchcore.evaluation.reporting import read_results_csv, write_results_csv
from patchcore.files import atomic_write_text, check_writable, is_staging, staged_path
from patchcore.layout import create_run_folder, new_run_folder
from patchcore.model import feature_store, search
from patchcore.model.calibration import decide
from patchcore.model.module import PatchCoreModule
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import Prediction
from patchcore.model.search import write_memory_bank
from patchcore.model.serialization import (
    INDEX_FILE,
    META_FILE,
    PARAMS_FILE,
    load_models,
    save_models,
)
from test_cli import SAME_LOADING, SMALL_RANDOM, category_copy, train
from test_deploy import fit_small_model

SOURCE = Path(__file__).resolve().parents[1] / "src" / "patchcore"
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


# ----------------------------------------------------------------------- helpers
def invoke(cli, arguments, env=None):
    """Runs a command in-process; an exception that is not turned into one line fails the
    test (catch_exceptions=False)."""
    return CliRunner().invoke(
        cli, [str(argument) for argument in arguments], env=env, catch_exceptions=False
    )


def one_error_line(outcome) -> str:
    """The command failed with exit code 1 and printed exactly one `Error:` line, no traceback."""
    assert outcome.exit_code == 1, outcome.output
    assert "Traceback" not in outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, outcome.output
    return errors[0]


@pytest.fixture
def read_only(monkeypatch):
    """Makes folders read-only (see the module docstring for how, as root)."""
    frozen: list[str] = []
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *, dir_fd=None):
        parent = os.path.dirname(os.path.abspath(path))
        if any(parent == folder or parent.startswith(folder + os.sep) for folder in frozen):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, mode, dir_fd=dir_fd)

    if ROOT:
        monkeypatch.setattr(os, "mkdir", mkdir)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if ROOT:
            frozen.append(os.path.abspath(folder))
        else:
            folder.chmod(0o555)
            made.append(folder)
        return folder

    made: list[Path] = []
    yield make
    for folder in made:
        folder.chmod(0o755)


def full_disk_open(path, mode="r", *args, **kwargs):
    """`open` whose files for writing all go to /dev/full: every flush fails with ENOSPC."""
    if not any(flag in mode for flag in "wax+"):
        return builtins.open(path, mode, *args, **kwargs)
    return builtins.open("/dev/full", "wb" if "b" in mode else "w", *args, **kwargs)


@pytest.fixture(scope="module")
def saved_model(synthetic_root, tmp_path_factory) -> Path:
    """A calibrated small random-weight model of the synthetic texture category."""
    folder = tmp_path_factory.mktemp("reliability_model") / "mvtec_texture"
    save_models(folder, [fit_small_model(synthetic_root, "texture")])
    return folder


@pytest.fixture
def model_copy(saved_model, tmp_path) -> Path:
    folder = tmp_path / "models" / "mvtec_texture"
    shutil.copytree(saved_model, folder)
    return folder


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    model = PatchCore(small_config(), search=SearchConfig("torch"))
    model.fit([images])
    return model


def predict(model: Path, inputs, output: Path, *options):
    return invoke(predict_cli, [model, *inputs, "--output", output, "--gpu", "-1",
                                "--num_workers", "0", *options])  # fmt: skip


def evaluate(model: Path, results: Path, root: Path, *main_options):
    return invoke(evaluate_cli, [
        "--gpu", "-1", *main_options, results, "patch_core_loader", "-p", model,
        "dataset", *SAME_LOADING, "-d", "texture", "mvtec", root,
    ])  # fmt: skip


# ------------------------------------------------- 1. 16-bit images are read correctly
def test_every_image_file_is_decoded_in_the_preprocessing_module():
    """Training, evaluation, predict, the challenge and the dashboard all decode through
    `preprocessing.open_image` (which scales 16-bit and float images): no other module
    opens an image file itself."""
    openers = [
        path.relative_to(SOURCE).as_posix()
        for path in SOURCE.rglob("*.py")
        if "Image.open(" in path.read_text() or "imread(" in path.read_text()
    ]
    assert openers == ["data/preprocessing.py"]


def test_sixteen_bit_copies_load_like_the_originals_in_every_pipeline(synthetic_root, tmp_path):
    """The 16-bit copy of a test image gives the same tensor as the 8-bit original in the
    training/evaluation dataset, in predict's dataset and in the challenge's loader."""
    original = min((synthetic_root / "texture" / "test" / "good").glob("*.png"))
    pixels = np.asarray(Image.open(original).convert("L"))
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(pixels.astype(np.uint16) * 257).save(sixteen)
    eight = tmp_path / "eight.png"
    Image.fromarray(pixels).save(eight)
    assert Image.open(sixteen).mode.startswith("I;16")
    preprocessing = PreprocessingConfig(resize=72, imagesize=64)
    tensors = []
    for path in (eight, sixteen):
        tensors.append((
            ImageDataset([Sample(path, None, "good", False)], preprocessing)[0]["image"],
            PredictionDataset([path], preprocessing, keep_originals=False)[0].image,
            fixed_size_pair(path, None, 256)[0],
        ))  # fmt: skip
    for from_eight, from_sixteen in zip(*tensors, strict=True):
        assert torch.equal(from_eight, from_sixteen)
    assert float(tensors[1][0].mean()) < 0.9  # not the all-white image of convert("RGB")


# ------------------------------------------------------------------ 2. fail closed
@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.full((1, 3, 64, 64), float("nan")), "not finite numbers"),
        (torch.full((1, 3, 64, 64), float("inf")), "not finite numbers"),
        (torch.rand(1, 3, 64, 64).index_put_((torch.tensor([0]), torch.tensor([2]),
                                             torch.tensor([5]), torch.tensor([9])),
                                            torch.tensor(float("nan"))),
         "hold 1 values that are not finite numbers"),  # one NaN among valid values
        (torch.rand(1, 3, 64, 64).index_put_((torch.tensor([0]), torch.tensor([0]),
                                             torch.tensor([0]), torch.tensor([0])),
                                            torch.tensor(float("-inf"))),
         "hold 1 values that are not finite numbers"),
        (torch.rand(1, 3, 64, 64) * 255, r"values from .* to .*; divide 8-bit pixels by 255"),
        (torch.rand(1, 3, 64, 64) * 2 - 1, "do not normalise"),
        (torch.rand(0, 3, 64, 64), "empty batch"),
    ],
)
def test_module_and_estimator_refuse_non_finite_out_of_range_and_empty_input(
    fitted, images, message
):
    module = PatchCoreModule.from_patchcore(fitted)
    with pytest.raises(DataError, match=f"PatchCoreModule: .*{message}"):
        module(images)
    with pytest.raises(DataError, match=message):
        fitted.predict(images)


def test_inputs_within_the_rounding_tolerance_are_accepted(fitted):
    images = torch.rand(2, 3, 64, 64).clamp(0.0, 1.0)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = -0.005, 1.005  # rounding of a resize
    outputs = PatchCoreModule.from_patchcore(fitted)(images)
    assert torch.isfinite(outputs["pred_score"]).all()


def test_a_non_finite_memory_bank_is_refused_at_fit_and_by_the_module(fitted):
    bank = fitted.memory_bank.clone()
    bank[0, 0] = float("nan")
    for backend in ("torch", "faiss"):
        model = PatchCore(fitted.config, search=SearchConfig(backend))
        with pytest.raises(DataError, match="memory bank holds 1 values that are not finite"):
            model.set_memory_bank(bank)
    with pytest.raises(DataError, match="not finite"):
        PatchCore(fitted.config).fit([torch.full((1, 3, 64, 64), float("nan"))])
    state = PatchCoreModule.from_patchcore(fitted).state_dict()
    state["memory_bank"] = bank
    with pytest.raises(ModelFormatError, match="'memory_bank' holds 1 values that are not finite"):
        PatchCoreModule().load_state_dict(state)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_a_saved_nan_memory_bank_is_refused_at_load_by_both_backends(
    model_copy, synthetic_root, tmp_path, backend
):
    """The issue's case: the torch backend accepted 12 of 12 images (9 defective), FAISS
    rejected all. Now both refuse the model, with the same one line."""
    bank = load_models(model_copy)[0].memory_bank.clone()
    bank[::7] = float("nan")
    write_memory_bank(bank, model_copy / INDEX_FILE)
    outcome = predict(model_copy, [synthetic_root / "texture" / "test"], tmp_path / "out.csv",
                      "--nn_backend", backend)  # fmt: skip
    line = one_error_line(outcome)
    assert f"{model_copy / INDEX_FILE}: the memory bank holds" in line and "train" in line
    assert not (tmp_path / "out.csv").exists()


def test_every_decision_goes_through_decide():
    """No module compares a score with a threshold itself (calibration.decide is the rule:
    above the threshold or not finite is a reject)."""
    comparisons = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Gt | ast.GtE | ast.Lt | ast.LtE) for op in node.ops):
                continue
            operands = [node.left, *node.comparators]
            names = [getattr(n, "id", getattr(n, "attr", "")) for n in operands]
            if any("threshold" in name.lower() for name in names):
                comparisons.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    assert len(comparisons) == 1 and comparisons[0].startswith("model/calibration.py:")


def test_non_finite_scores_and_pixels_are_rejected_everywhere(tmp_path):
    nan, inf = float("nan"), float("inf")
    assert decide([nan, inf, -inf, 0.5, 2.0], 1.0).tolist() == [True, True, True, False, True]
    assert visualization._title("x", nan, 1.0).endswith("not finite, threshold 1: reject")
    assert dashboard_data.rejected_mask(np.array([nan, 0.1]), 1.0).tolist() == [True, False]
    assert dashboard_data.decision_text(nan, 1.0) == "reject"
    outputs = predict_app.ImageOutputs(
        None, tmp_path, 0.5, (0.0, 1.0), PreprocessingConfig(resize=64, imagesize=64)
    )
    crop_map = torch.zeros(64, 64)
    crop_map[:8] = nan
    outputs.write(torch.zeros(3, 64, 64, dtype=torch.uint8), crop_map, "nan")
    mask = np.asarray(Image.open(tmp_path / "nan.png"))
    assert (mask[:6] == 255).all() and (mask[16:] == 0).all()


def test_non_finite_scores_in_the_metrics_name_the_dataset_and_image(
    saved_model, synthetic_root, tmp_path, monkeypatch
):
    real_predict = PatchCore.predict

    def nan_predict(self, images):
        prediction = real_predict(self, images)
        scores = torch.full_like(prediction.scores, float("nan"))
        return Prediction(scores, prediction.maps, prediction.patch_scores)

    monkeypatch.setattr(PatchCore, "predict", nan_predict)
    line = one_error_line(evaluate(saved_model, tmp_path / "results", synthetic_root))
    assert "mvtec_texture:" in line and "scores are not finite numbers" in line
    assert str(synthetic_root / "texture" / "test") in line


# ------------------------------------------------------- 3. weights files run no code
class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_hostile_weights_file_runs_no_code_even_when_torch_is_told_to_unpickle(
    tmp_path, monkeypatch
):
    marker = tmp_path / "code_ran"
    weights = tmp_path / "bottle.pth"
    torch.save({"payload": _Hostile(marker)}, weights)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ModelFormatError, match="bottle.pth: cannot read weights"):
        load_submission(PatchCoreModule, weights, torch.device("cpu"))
    assert not marker.exists()
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(weights)  # what a call without weights_only=True does under this variable
    assert marker.exists()


def test_every_torch_load_passes_weights_only():
    calls = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "torch.load", "weights.get_state_dict", "torch.hub.load_state_dict_from_url",
            ):  # fmt: skip
                safe = any(
                    keyword.arg == "weights_only" and getattr(keyword.value, "value", None) is True
                    for keyword in node.keywords
                )
                calls.append((f"{path.relative_to(SOURCE)}:{node.lineno}", safe))
    assert calls and all(safe for _, safe in calls), calls


# ------------------------------------------------------ 4. optional outputs lose nothing
def test_a_failing_optional_output_keeps_the_saved_model_and_results(
    synthetic_root, tmp_path, monkeypatch
):
    def broken_overlays(*args, **kwargs):
        raise OutputError("overlay writer failed")

    monkeypatch.setattr("patchcore.evaluation.visualization.save_segmentation_images",
                        broken_overlays)
    outcome = train(tmp_path, synthetic_root, SMALL_RANDOM,
                    ["--save_patchcore_model", "--save_segmentation_images"])  # fmt: skip
    assert one_error_line(outcome) == "Error: overlay writer failed"
    run_folder = tmp_path / "project" / "group"
    assert list(read_results_csv(run_folder / "results.csv")) == ["mvtec_texture", "Mean"]
    assert load_models(run_folder / "models" / "mvtec_texture")[0].memory_bank is not None


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # CJK titles in DejaVu Sans
def test_test_images_whose_names_collide_after_sanitising_all_get_overlays(
    synthetic_root, tmp_path
):
    category = category_copy(synthetic_root, tmp_path, "names")
    for folder in [*(category / "test").iterdir(), category / "ground_truth"]:
        if folder.name != "good":
            shutil.rmtree(folder)  # only good test images: four overlays are enough
    good = sorted((category / "test" / "good").glob("*.png"))
    for path, name in zip(good, ["bild äöü", "bild öäü", "傷痕 a", "傷痕:a"], strict=True):
        path.rename(path.with_name(f"{name}.png"))
    outcome = train(tmp_path / "results", tmp_path / "data", SMALL_RANDOM,
                    ["--save_segmentation_images"], categories=("names",))  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    overlays = sorted(
        p.name for p in (tmp_path / "results" / "project" / "group" / "segmentation_images"
                         / "mvtec_names").glob("good_*.png")
    )  # fmt: skip
    assert overlays == ["good_bild_äöü.png", "good_bild_öäü.png", "good_傷痕_a-2.png",
                        "good_傷痕_a.png"]  # fmt: skip


# ------------------------------------------------------ 5. symbolic links are followed
def test_folders_behind_symbolic_links_are_searched_once(tmp_path, caplog):
    picture = Image.new("RGB", (40, 40))
    root = tmp_path / "incoming"
    (root / "a").mkdir(parents=True)
    picture.save(root / "a" / "1.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    picture.save(elsewhere / "2.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    caplog.set_level(logging.WARNING)
    expected = [root / "a" / "1.png", root / "linked" / "2.png"]
    assert image_files(root, recursive=True) == expected
    assert resolve_inputs([str(root)]) == expected
    assert f"{root / 'a' / 'loop'}: skipped, a link to a folder already searched" in caplog.text
    assert f"{root / 'gone.png'}: skipped, a broken link" in caplog.text


# ------------------------------------------ 6-8. permissions, leftovers, atomic overlays
def test_saved_models_and_results_get_the_permissions_of_the_umask(fitted, tmp_path):
    previous = os.umask(0o022)
    try:
        save_models(tmp_path / "model", [fitted])
        write_results_csv(tmp_path / "results.csv", {"a": {"pro": 0.5}})
        run = create_run_folder(tmp_path, "project", "group")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "model" / INDEX_FILE).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "results.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE(run.stat().st_mode) == 0o755


def _ended_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _leftover(target: Path, mark: str, pid: int, scratch: Path) -> Path:
    """A leftover named as `staged_path` names them (this host, process `pid`), with a
    model's files inside."""
    with staged_path(scratch / "template", folder=True) as staging:
        host = staging.name.rpartition(".partial-")[2].split("-")[0]
    folder = target.parent / f".{target.name}{mark}{host}-{pid}-0123456789ab"
    folder.mkdir()
    (folder / PARAMS_FILE).write_bytes(b"unfinished")
    return folder


def test_crash_leftovers_are_skipped_by_every_reader_and_removed_by_the_next_save(
    fitted, tmp_path, caplog
):
    models = tmp_path / "run" / "models"
    target = models / "mvtec_texture"
    save_models(target, [fitted])
    dead = _ended_process_id()
    scratch = tmp_path / "scratch"
    stale = [_leftover(target, mark, dead, scratch) for mark in (".partial-", ".retired-")]
    live = _leftover(target, ".partial-", os.getppid(), scratch)  # a save still running
    caplog.set_level(logging.WARNING)
    written = export_challenge_models([tmp_path / "run"], tmp_path / "export")
    assert sorted(p.name for p in written) == ["requirements.txt", "texture.pth"]
    assert "an unfinished copy left by an interrupted save" in caplog.text
    with pytest.raises(ModelFormatError, match="unfinished copy left by an interrupted save"):
        load_models(stale[0])
    save_models(target, [fitted])
    assert not any(folder.exists() for folder in stale) and live.exists()
    assert sorted(p.name for p in models.iterdir() if not is_staging(p)) == ["mvtec_texture"]


def test_results_leftovers_are_not_taken_for_runs_or_categories(tmp_path):
    run = tmp_path / "project" / "group"
    write_results_csv(run / "results.csv", {"mvtec_a": {"pro": 0.5}})
    staging = run / ".results.csv.partial-host-1-0123456789ab"
    staging.mkdir()
    (staging / "results.csv").write_text("half")
    predictions = run / "predictions" / ".mvtec_b.partial-host-1-0123456789ab"
    predictions.mkdir(parents=True)
    (predictions / "summary.json").write_text("{}")
    assert [info.folder for info in dashboard_data.find_runs(tmp_path)] == [run]
    assert dashboard_data.list_categories(run) == []


def test_evaluate_refuses_a_leftover_given_as_the_model(model_copy, synthetic_root, tmp_path):
    leftover = model_copy.parent / f".{model_copy.name}.partial-host-1-0123456789ab"
    shutil.copytree(model_copy, leftover)
    line = one_error_line(evaluate(leftover, tmp_path / "results", synthetic_root))
    assert f"{leftover}: an unfinished copy left by an interrupted save" in line


def test_overlays_are_written_atomically(tmp_path, monkeypatch):
    def killed_while_saving(picture, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", killed_while_saving)
    with pytest.raises(OutputError, match=r"overlays/x.png: cannot write \(No space left"):
        visualization.save_segmentation_images(
            tmp_path / "overlays", torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16), [1.0], ["x"]
        )
    assert list((tmp_path / "overlays").iterdir()) == []


# ------------------------------------------------------ one line for every fault
def test_disk_full_while_writing_results_is_one_line(
    saved_model, synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.setattr(reporting, "open", full_disk_open, raising=False)
    line = one_error_line(evaluate(saved_model, tmp_path / "results", synthetic_root))
    assert line == (
        f"Error: {tmp_path / 'results' / 'results.csv'}: cannot write (No space left on "
        "device); free space on that disk, or write the output somewhere else"
    )
    assert not (tmp_path / "results").exists()  # the evaluation's own folder, removed empty


def test_disk_full_while_writing_the_index_is_one_line_and_never_a_truncated_file(
    fitted, tmp_path, monkeypatch
):
    """FAISS's own writer only prints a failed close of a full disk, leaving a truncated index
    in a model that looks complete; the bank is written by Python, which raises."""
    with pytest.raises(OSError) as raised:
        write_memory_bank(fitted.memory_bank, Path("/dev/full"))
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.setattr(search, "open", full_disk_open, raising=False)
    with pytest.raises(click.ClickException) as raised:
        run_guarded(lambda: save_models(tmp_path / "model", [fitted]), CommonOptions())
    assert raised.value.message == (
        f"{tmp_path / 'model'}: cannot write (No space left on device); free space on that "
        "disk, or write the output somewhere else"
    )
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_predictions_is_one_line(
    saved_model, synthetic_root, tmp_path, monkeypatch
):
    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predict_app.ResultWriter, "write", full)
    line = one_error_line(
        predict(saved_model, [synthetic_root / "texture" / "test" / "good"], tmp_path / "p.csv")
    )
    assert f"{tmp_path / 'p.csv'}: cannot write (No space left on device)" in line
    assert list(tmp_path.iterdir()) == []


def test_read_only_results_folder_for_train_is_one_line(synthetic_root, tmp_path, read_only):
    results = read_only(tmp_path / "results")
    line = one_error_line(train(results, synthetic_root, SMALL_RANDOM))
    assert line.startswith(f"Error: {results / 'project'}: cannot create the run folder")
    assert "choose a writable RESULTS_PATH" in line


def _no_work(*args, **kwargs):
    raise AssertionError("a model was loaded before the output was checked")


def test_read_only_output_for_evaluate_is_found_before_any_work(
    saved_model, synthetic_root, tmp_path, read_only, monkeypatch
):
    monkeypatch.setattr("patchcore.apps.runs.load_models", _no_work)
    results = read_only(tmp_path / "results")
    line = one_error_line(evaluate(saved_model, results / "evaluation", synthetic_root))
    assert line.startswith(f"Error: {results / 'evaluation'}: cannot write (Permission denied)")
    assert "choose another output location or change its permissions" in line


def test_read_only_output_for_predict_and_export_is_found_before_any_work(
    saved_model, synthetic_root, tmp_path, read_only, monkeypatch
):
    monkeypatch.setattr("patchcore.apps.predict.load_models", _no_work)
    monkeypatch.setattr("patchcore.apps.export.load_models", _no_work)
    folder = read_only(tmp_path / "out")
    line = one_error_line(predict(saved_model, [synthetic_root / "texture" / "test"],
                                  folder / "p.csv"))  # fmt: skip
    assert line.startswith(f"Error: {folder}: cannot write (Permission denied)")
    line = one_error_line(predict(saved_model, [synthetic_root / "texture" / "test"],
                                  tmp_path / "p.csv", "--heatmaps", folder / "maps"))  # fmt: skip
    assert line.startswith(f"Error: {folder / 'maps'}: cannot write (Permission denied)")
    line = one_error_line(invoke(export_cli, [saved_model, "-o", folder / "weights"]))
    assert line.startswith(f"Error: {folder / 'weights'}: cannot write (Permission denied)")


def test_every_writer_reports_a_read_only_folder_as_one_line(tmp_path, read_only):
    folder = read_only(tmp_path / "run")
    writers = {
        "results.csv": lambda: write_results_csv(folder / "results.csv", {"a": {"pro": 0.5}}),
        "overlays": lambda: visualization.save_segmentation_images(
            folder / "overlays", torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8), [1.0], ["x"]
        ),
        "predictions": lambda: write_predictions(folder / "predictions", None),
        "model": lambda: save_models(folder / "model", []),
    }
    for name, write in writers.items():
        with pytest.raises(OutputError, match=f"{folder / name}: cannot write \\(Permission"):
            write()


def test_a_full_temporary_folder_while_fitting_is_one_line(monkeypatch):
    def full_temporary_file(**_):
        return open("/dev/full", "r+b")

    monkeypatch.setattr(feature_store.tempfile, "TemporaryFile", full_temporary_file)
    model = PatchCore(small_config(), search=SearchConfig("torch"))
    with pytest.raises(OutputError, match="cannot write the temporary file of training features"):
        model.fit([torch.rand(2, 3, 64, 64)])


def test_a_writable_output_passes_the_check_and_leaves_nothing_behind(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(tmp_path / "file", "x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_writable(tmp_path / "file" / "below")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_faiss_index_is_one_line(model_copy, synthetic_root, tmp_path, damage):
    index = model_copy / INDEX_FILE
    content = index.read_bytes()
    index.write_bytes({"truncated": content[: len(content) // 2],
                       "garbage": os.urandom(512), "empty": b""}[damage])  # fmt: skip
    line = one_error_line(
        predict(model_copy, [synthetic_root / "texture" / "test"], tmp_path / "p.csv")
    )
    assert line == (
        f"Error: {index}: not a readable FAISS index, the file is damaged or incomplete; save "
        "or train the model again"
    )


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["config"].pop("layers"), "configuration field 'layers' is missing"),
        (
            lambda m: m["config"]["preprocessing"].update(resize="abc"),
            "configuration field 'preprocessing.resize' must be an integer, got \"abc\"",
        ),
        (
            lambda m: m["config"].update(layers="layer2"),
            "configuration field 'layers' must be a list of strings",
        ),
        (lambda m: m["config"].update(num_nn=0), "--anomaly_scorer_num_nn must be >= 1"),
        (lambda m: m["config"].update(preprocessing=[]), "'preprocessing' is not an object"),
        (
            lambda m: m["normal_statistics"].update(threshold=None),
            "'normal_statistics.threshold' must be a finite number, got null",
        ),
        (lambda m: m["normal_statistics"].pop("num_images"), "'normal_statistics' must hold"),
    ],
)
def test_a_malformed_meta_file_is_one_line(model_copy, synthetic_root, tmp_path, edit, message):
    _edit_meta(model_copy, edit)
    line = one_error_line(
        predict(model_copy, [synthetic_root / "texture" / "test"], tmp_path / "p.csv")
    )
    assert line.startswith(f"Error: {model_copy / META_FILE}: ") and message in line


def test_a_train_val_split_leaving_no_training_image_is_one_line(synthetic_root, tmp_path):
    outcome = invoke(train_cli, [
        "--gpu", "-1", tmp_path, "patch_core", *SMALL_RANDOM, "sampler", "identity",
        "dataset", "--train_val_split", "0.05", "-d", "texture", "mvtec", synthetic_root,
    ])  # fmt: skip
    line = one_error_line(outcome)
    assert "--train_val_split 0.05 leaves no training image of the 12" in line
    assert not (tmp_path / "project").exists()


def test_an_unexpected_os_error_is_still_one_line():
    def job():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/some/file")

    with pytest.raises(click.ClickException) as raised:
        run_guarded(job, CommonOptions())
    assert raised.value.message == (
        "/some/file: No such file or directory (--debug shows where it happened)"
    )


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback_instead_of_one_line(synthetic_root, tmp_path, how):
    arguments = [tmp_path, "patch_core", *SMALL_RANDOM, "sampler", "identity",
                 "dataset", "-d", "no_such_category", "mvtec", synthetic_root]  # fmt: skip
    quiet = CliRunner().invoke(train_cli, [str(a) for a in arguments])
    assert one_error_line(quiet).startswith("Error: category folder")
    flags, env = (["--debug"], None) if how == "flag" else ([], {"PATCHCORE_DEBUG": "1"})
    loud = CliRunner().invoke(train_cli, [*flags, *(str(a) for a in arguments)], env=env)
    assert loud.exit_code == 1 and isinstance(loud.exception, DataError)
    assert "Error:" not in loud.output


# ----------------------------------------------------------------- smaller defects
RUN_FOLDER_SCRIPT = """
import sys, time
from pathlib import Path
from patchcore.layout import create_run_folder
root, start, count = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
for _ in range(count):
    print(create_run_folder(root, "project", "group").name)
"""


def test_concurrent_processes_never_share_or_fail_to_get_a_run_folder(tmp_path):
    processes, count = 4, 60
    start = time.time() + 1.5
    children = [
        subprocess.Popen([sys.executable, "-c", RUN_FOLDER_SCRIPT, str(tmp_path), str(start),
                          str(count)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]  # fmt: skip
    names = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
        names += stdout.split()
    assert len(names) == len(set(names)) == processes * count
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == sorted(names)


def test_a_run_that_fails_leaves_no_empty_run_folder(tmp_path):
    with pytest.raises(DataError), new_run_folder(tmp_path, "project", "group") as folder:
        raise DataError("bad input")
    assert not folder.exists()
    with pytest.raises(DataError), new_run_folder(tmp_path, "project", "group") as folder:
        write_results_csv(folder / "results.csv", {"a": {"pro": 0.5}})
        raise DataError("failed after the first dataset")
    assert (folder / "results.csv").is_file()  # what was written stays


def test_a_bad_test_image_is_reported_before_fitting_and_leaves_no_run_folder(
    synthetic_root, tmp_path, caplog
):
    category = category_copy(synthetic_root, tmp_path, "damaged")
    broken = max((category / "test" / "good").glob("*.png"))
    broken.write_bytes(broken.read_bytes()[:-200])  # a truncated copy: its header is fine
    caplog.set_level(logging.INFO)
    outcome = train(tmp_path / "results", tmp_path / "data", SMALL_RANDOM, categories=("damaged",))
    assert one_error_line(outcome).startswith(f"Error: {broken}: cannot read image")
    assert "Extracting training features" not in caplog.text
    assert not (tmp_path / "results" / "project" / "group").exists()


def test_a_failure_after_the_run_folder_exists_removes_it(synthetic_root, tmp_path):
    outcome = train(tmp_path, synthetic_root, ["-b", "resnet9000"])
    assert one_error_line(outcome).startswith("Error: unknown backbone 'resnet9000'")
    assert list((tmp_path / "project").iterdir()) == []


def test_k_larger_than_the_bank_warns_and_the_saved_model_records_the_k_used(tmp_path, caplog):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    config = small_config(num_nn=50, sampler=SamplerConfig("approx_greedy_coreset", 0.1))
    model = PatchCore(config, search=SearchConfig("torch"))
    caplog.set_level(logging.WARNING)
    model.fit([images])
    size = len(model.memory_bank)
    assert size < 50 and model.config.num_nn == size
    assert (
        f"The memory bank holds {size} features, fewer than k = 50 nearest neighbours "
        f"(--anomaly_scorer_num_nn); scoring uses {size}, and a saved model records it"
    ) in caplog.text
    save_models(tmp_path / "model", [model])
    meta = json.loads((tmp_path / "model" / META_FILE).read_text())
    assert meta["config"]["num_nn"] == size
    assert load_models(tmp_path / "model")[0].config.num_nn == size


def test_a_repeated_sub_command_is_refused(tmp_path, synthetic_root):
    outcome = CliRunner().invoke(train_cli, [
        str(tmp_path), "patch_core", "sampler", "-p", "0.1", "identity", "sampler", "identity",
        "dataset", "-d", "texture", "mvtec", str(synthetic_root),
    ])  # fmt: skip
    assert outcome.exit_code == 2
    assert "sub-command 'sampler' is given twice; give it once" in outcome.output


def test_tiny_training_images_are_counted_in_a_warning(tmp_path, caplog):
    folder = tmp_path / "train"
    folder.mkdir()
    Image.new("RGB", (300, 300)).save(folder / "big.png")
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    Image.new("RGB", (100, 120)).save(folder / "small.png")
    samples = [Sample(path, None, "good", False) for path in sorted(folder.iterdir())]
    caplog.set_level(logging.WARNING)
    ImageDataset(samples, PreprocessingConfig(resize=256, imagesize=224)).working_sizes()
    assert (
        f"2 of 3 images are smaller than the model's input and are upsampled; the smallest is "
        f"{folder / 'dot.png'} (1x1, inspected at 224x224)"
    ) in caplog.text


def test_gpu_minus_one_is_logged_as_such(caplog):
    caplog.set_level(logging.INFO)
    assert resolve_device((-1,), None) == torch.device("cpu")
    assert "Running on the CPU (--gpu -1)" in caplog.text
    assert "no --gpu given" not in caplog.text
