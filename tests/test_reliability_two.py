"""Reliability, round two (issue 30): concurrent evaluations, termination, masks, option
conflicts and bounds, one-line errors. Each test fails without its fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from patchcore.apps.runs import evaluation_folder

SOURCE = Path(__file__).resolve().parents[1] / "src"
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(SOURCE)}


# ------------------------------------------------------------- lost work: run folders
CLAIMING_EVALUATION = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from patchcore.apps.runs import evaluation_folder
    from patchcore.evaluation.reporting import write_results_csv

    results, start, tag = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    while time.time() < start:
        time.sleep(0.0005)
    with evaluation_folder(results) as folder:
        time.sleep(0.5)  # evaluating
        write_results_csv(folder / "results.csv", {tag: {"pro": 0.5}})
    print(folder)
""")


def test_concurrent_evaluations_into_one_new_results_path_each_get_their_own_folder(tmp_path):
    results = tmp_path / "evaluation"
    start = time.time() + 1.5
    children = [
        subprocess.Popen([sys.executable, "-c", CLAIMING_EVALUATION, str(results), str(start),
                          f"run{index}"], env=ENVIRONMENT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for index in range(4)
    ]  # fmt: skip
    folders = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
        folders.append(stdout.strip())
    assert len(set(folders)) == 4, folders
    written = sorted(Path(folder, "results.csv").read_text().splitlines()[1] for folder in folders)
    assert [line.split(",")[0] for line in written] == ["run0", "run1", "run2", "run3"]


def test_an_evaluation_that_fails_removes_the_results_folder_it_created(tmp_path):
    with pytest.raises(RuntimeError), evaluation_folder(tmp_path / "new") as folder:
        raise RuntimeError("failed")
    assert folder == tmp_path / "new" and not folder.exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError), evaluation_folder(tmp_path / "mine") as folder:
        raise RuntimeError("failed")
    assert folder.is_dir()  # made beforehand by the user: kept


TERMINATED_TRAINING = textwrap.dedent("""
    import os, signal, sys, time
    from patchcore.model.patchcore import PatchCore

    def fit(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    PatchCore.fit = fit
    from patchcore.cli.runs import train_main
    sys.argv = ["patchcore-train", *sys.argv[1:]]
    train_main()
""")


def test_sigterm_during_training_removes_the_empty_run_folder(synthetic_root, tmp_path):
    from test_cli import SMALL_DATA, SMALL_RANDOM

    arguments = ["--gpu", "-1", str(tmp_path / "results"), "patch_core", *SMALL_RANDOM,
                 "sampler", "-p", "0.1", "approx_greedy_coreset",
                 "dataset", *SMALL_DATA, "-d", "texture", "mvtec", str(synthetic_root)]  # fmt: skip
    child = subprocess.run([sys.executable, "-c", TERMINATED_TRAINING, *arguments],
                           env=ENVIRONMENT, capture_output=True, text=True, timeout=300,
                           check=False)  # fmt: skip
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-2000:]
    assert "Traceback" not in child.stderr
    assert list((tmp_path / "results" / "project").iterdir()) == []


# ---------------------------------------------------------- silent wrong answers: masks
def _recoded_masks(source: Path, target: Path, encoding: str) -> Path:
    """A copy of the synthetic texture category whose masks are re-saved as red on black
    RGB ("rgb") or as 16-bit 0/1 ("16-bit")."""
    import shutil

    import numpy as np
    from PIL import Image

    shutil.copytree(source / "texture", target / "texture")
    for path in (target / "texture" / "ground_truth").glob("*/*.png"):
        defect = np.asarray(Image.open(path)) > 127
        if encoding == "rgb":
            red = np.zeros((*defect.shape, 3), np.uint8)
            red[defect, 0] = 255
            Image.fromarray(red, mode="RGB").save(path)
        else:
            sixteen_bit = Image.fromarray(defect.astype(np.uint16))
            assert sixteen_bit.mode == "I;16"
            sixteen_bit.save(path)
    return target


@pytest.mark.parametrize("encoding", ["rgb", "16-bit"])
@pytest.mark.parametrize("rule", ["reference", "binary"])
def test_rgb_and_sixteen_bit_masks_read_like_grey_ones_with_one_warning(
    synthetic_root, tmp_path, caplog, encoding, rule
):
    import logging

    import torch
    from PIL import Image

    from patchcore.config import PreprocessingConfig
    from patchcore.data.datasets import ImageDataset, list_samples

    recoded = _recoded_masks(synthetic_root, tmp_path, encoding)
    preprocessing = PreprocessingConfig(resize=72, imagesize=64)
    original = ImageDataset(list_samples(synthetic_root, "texture", "test"), preprocessing, rule)
    caplog.set_level(logging.WARNING)
    dataset = ImageDataset(list_samples(recoded, "texture", "test"), preprocessing, rule)
    dataset.working_sizes()
    defective = [i for i, sample in enumerate(dataset.samples) if sample.mask_path is not None]
    for index in defective:
        size = dataset.original_sizes()[index]
        assert Image.open(dataset.samples[index].mask_path).mode in ("RGB", "I;16")
        expected = original.load_mask(original.samples[index], size)
        mask = dataset.load_mask(dataset.samples[index], size)
        assert expected.sum() > 0 and torch.equal(mask, expected), dataset.samples[index]
    warnings = [r.getMessage() for r in caplog.records if "masks are not 8-bit grey" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{len(defective)} of {len(defective)}")


def test_a_gpu_id_on_a_machine_without_cuda_is_an_error(monkeypatch):
    import torch

    from patchcore.cli.common import resolve_device
    from patchcore.errors import ConfigurationError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigurationError, match=r"^--gpu 3: CUDA is not available on this "
                                                 r"machine; use --gpu -1 or --device cpu"):
        resolve_device((3,), None)
    assert resolve_device((-1,), None) == torch.device("cpu")


@pytest.mark.parametrize(("options", "message"), [
    (["--crop", "center", "--max_size", "200"],
     "--max_size has no effect with --crop center: the centre crop is --imagesize square"),
    (["--max_size", "300"], "--max_size has no effect with --crop center (the default)"),
    (["--tile_overlap", "0.5"], "--tile_overlap has no effect without --tile"),
    (["--crop", "none", "--imagesize", "64"], "--imagesize has no effect with --crop none"),
])  # fmt: skip
def test_preprocessing_options_without_effect_are_refused_naming_both(
    synthetic_root, tmp_path, options, message
):
    from click.testing import CliRunner

    from patchcore.cli.runs import train_cli

    outcome = CliRunner().invoke(train_cli, [
        "--gpu", "-1", str(tmp_path / "results"), "patch_core", "-b", "resnet18",
        "--random_backbone_weights", "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", "--resize", "256", *options, "-d", "texture", "mvtec", str(synthetic_root),
    ])  # fmt: skip
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {message}"), outcome.output
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------ one line for every fault
@pytest.mark.parametrize(("options", "message"), [
    (["--threshold_quantile", "nan"], ("Invalid value for '--threshold_quantile': 'nan' is not "
                                      "a number in [0, 1]")),
    (["--seed", "99999999999999999999999"], ("Invalid value for '--seed': 99999999999999999999999"
                                            " is not in the range 0<=x<=4294967295")),
])  # fmt: skip
def test_a_nan_quantile_and_a_huge_seed_are_one_line(synthetic_root, tmp_path, options, message):
    from click.testing import CliRunner

    from patchcore.cli.runs import train_cli

    outcome = CliRunner().invoke(train_cli, [
        "--gpu", "-1", *options, str(tmp_path / "results"), "patch_core", "-b", "resnet18",
        "--random_backbone_weights", "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", "-d", "texture", "mvtec", str(synthetic_root),
    ])  # fmt: skip
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {message}."], outcome.output


def test_quantiles_and_seeds_are_checked_by_the_configurations_too():
    from patchcore.apps.runs import OutputOptions
    from patchcore.config import PatchCoreConfig, SamplerConfig, split_seeded_name
    from patchcore.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"--threshold_quantile must be a number in"):
        OutputOptions(threshold_quantile=float("nan"))
    with pytest.raises(ConfigurationError, match=r"--seed must be an integer between 0 and"):
        PatchCoreConfig(seed=10**23)
    with pytest.raises(ConfigurationError, match=r"the sampler's seed must be an integer"):
        SamplerConfig(seed=-1)
    with pytest.raises(ConfigurationError, match=r"backbone name 'resnet18.seed-1.{23}': the seed"):
        split_seeded_name(f"resnet18.seed-{10**23}")


def test_compare_names_the_file_row_and_column_of_a_non_numeric_cell(tmp_path):
    from click.testing import CliRunner

    from patchcore.cli.compare import compare_cli

    results = tmp_path / "results.csv"
    results.write_text("Row Names,instance_auroc,pro\nmvtec_a,0.9,0.8\nmvtec_b,0.7,n/a\n")
    outcome = CliRunner().invoke(compare_cli, [str(results), "--output", str(tmp_path / "c.csv")])
    assert outcome.exit_code == 1 and "Traceback" not in outcome.output, outcome.output
    assert outcome.output.strip() == (
        f"Error: {results}:3: row 'mvtec_b', column 'pro': expected a number or an empty "
        "cell, got 'n/a'"
    )


def test_a_required_option_after_a_positional_gets_the_order_hint(synthetic_root, tmp_path):
    from click.testing import CliRunner

    from patchcore.cli.common import ORDER_HINT
    from patchcore.cli.runs import train_cli

    head = ["--gpu", "-1", str(tmp_path / "results"), "patch_core", "-b", "resnet18", "sampler",
            "-p", "0.1", "approx_greedy_coreset", "dataset"]  # fmt: skip
    misplaced = CliRunner().invoke(train_cli, [*head, "mvtec", str(synthetic_root), "-d", "texture"])
    assert misplaced.exit_code == 2
    assert f"Error: Missing option '--subdatasets' / '-d'. {ORDER_HINT.strip()}" in misplaced.output
    forgotten = CliRunner().invoke(train_cli, [*head, "mvtec", str(synthetic_root)])
    assert forgotten.exit_code == 2 and ORDER_HINT.strip() not in forgotten.output


class _Payload:
    """A pickle that would create `marker` when unpickled by a trusting loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def small_model_folder(tmp_path_factory) -> Path:
    import torch

    from conftest import small_config
    from patchcore.config import SearchConfig
    from patchcore.model.patchcore import PatchCore
    from patchcore.model.serialization import save_models

    model = PatchCore(small_config(), search=SearchConfig("torch"))
    model.fit([torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))])
    folder = tmp_path_factory.mktemp("files") / "model"
    save_models(folder, [model])
    return folder


def test_a_hostile_exported_pth_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import torch

    from patchcore.apps.runtimes import TorchModel
    from patchcore.errors import ModelFormatError

    marker = tmp_path / "code_ran"
    weights = tmp_path / "bottle.pth"
    torch.save({"payload": _Payload(marker)}, weights)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ModelFormatError) as raised:
        TorchModel(weights)
    assert str(raised.value).startswith(f"{weights}: cannot read weights (")
    assert "\n" not in str(raised.value) and not marker.exists()


def _model_copy(source: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, tmp_path / "model"))


@pytest.mark.parametrize("damage", ["hostile params", "wrong width", "no rows", "nan mapped"])
def test_errors_about_a_model_file_name_the_file(small_model_folder, tmp_path, damage):
    import pickle

    from patchcore.config import SearchConfig
    from patchcore.errors import ModelFormatError
    from patchcore.model.bank_file import write_bank_file
    from patchcore.model.search import write_memory_bank
    from patchcore.model.serialization import INDEX_FILE, PARAMS_FILE, load_models

    folder = _model_copy(small_model_folder, tmp_path)
    bank = load_models(folder)[0].memory_bank
    search = SearchConfig("torch")
    if damage == "hostile params":
        named = folder / PARAMS_FILE
        named.write_bytes(pickle.dumps(_Payload(tmp_path / "code_ran")))
        expected = "refusing to load 'pathlib.Path.touch'"
    elif damage == "wrong width":
        named = folder / INDEX_FILE
        write_memory_bank(bank[:, :10].contiguous(), named)
        expected = "the memory bank"
    elif damage == "no rows":
        named = folder / INDEX_FILE
        write_memory_bank(bank[:0].contiguous(), named)
        expected = "the memory bank"
    else:
        named = folder / INDEX_FILE
        poisoned = bank.clone()
        poisoned[0, 0] = float("nan")
        write_bank_file(poisoned, named)
        search = SearchConfig("torch", bank_storage="mmap")
        expected = "the memory bank holds 1 values that are not finite"
    with pytest.raises(ModelFormatError) as raised:
        load_models(folder, search=search)
    message = str(raised.value)
    assert message.startswith(f"{named}: ") and expected in message, message
    assert "\n" not in message and not (tmp_path / "code_ran").exists()


# ------------------------------------------------------------------ bounded memory
def _blank_png(path: Path, width: int, height: int) -> Path:
    from PIL import Image

    Image.new("L", (width, height)).save(path)
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_or_a_strip_is_refused_from_its_header(
    tmp_path, monkeypatch
):
    from PIL import ImageFile

    from patchcore.data.preprocessing import image_header, open_image, open_mask
    from patchcore.errors import DataError

    huge = _blank_png(tmp_path / "huge.png", 10000, 10000)
    strip = _blank_png(tmp_path / "strip.png", 200000, 1)
    assert strip.stat().st_size < 1024

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for read in (image_header, open_image, open_mask):
        with pytest.raises(DataError, match=(
            rf"^{huge}: 10000x10000 pixels, more than the limit of 67108864 for one image "
            r"\(PATCHCORE_MAX_IMAGE_PIXELS\)")):  # fmt: skip
            read(huge)
        with pytest.raises(DataError, match=rf"^{strip}: 200000x1 pixels, sides more than 100 "
                                            r"times apart"):  # fmt: skip
            read(strip)
    monkeypatch.setenv("PATCHCORE_MAX_IMAGE_PIXELS", str(10**8))
    assert image_header(huge) == ((10000, 10000), "L")


def test_an_image_whose_working_size_is_over_the_limit_is_refused_before_resizing(
    tmp_path, monkeypatch
):
    from patchcore.apps.predict import PredictionDataset
    from patchcore.config import PreprocessingConfig
    from patchcore.data.datasets import ImageDataset, Sample
    from patchcore.errors import DataError

    image = _blank_png(tmp_path / "large.png", 300, 200)
    whole = PreprocessingConfig(crop="none", scale=1.0)
    monkeypatch.setenv("PATCHCORE_MAX_WORKING_PIXELS", "50000")
    dataset = ImageDataset([Sample(image, None, "good", False)], whole)
    with pytest.raises(DataError, match=rf"^{image}: resized to 300x200 pixels, more than the "
                                        r"working limit of 50000 \(PATCHCORE_MAX_WORKING"):  # fmt: skip
        dataset.working_sizes()
    loaded = PredictionDataset([image], whole, keep_originals=False)[0]
    assert loaded.image is None and "more than the working limit of 50000" in loaded.error
    monkeypatch.delenv("PATCHCORE_MAX_WORKING_PIXELS")
    assert dataset.working_sizes() == [(200, 300)]


def test_options_beyond_the_working_limit_are_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from patchcore.cli.runs import train_cli
    from patchcore.cli.synthetic import synthetic_cli

    outcome = CliRunner().invoke(train_cli, [
        "--gpu", "-1", str(tmp_path / "results"), "patch_core", "-b", "resnet18", "sampler",
        "approx_greedy_coreset", "dataset", "--resize", "20000", "--imagesize", "20000",
        "-d", "texture", "mvtec", str(tmp_path),
    ])  # fmt: skip
    assert outcome.exit_code == 2 and "Error: --resize 20000 makes working images of at least " \
        "20000x20000 pixels, more than the limit of 16777216 (PATCHCORE_MAX_WORKING_PIXELS); " \
        "use at most 4096" in outcome.output, outcome.output
    outcome = CliRunner().invoke(synthetic_cli, [str(tmp_path / "data"), "--image_size", "60000"])
    assert outcome.exit_code == 1 and outcome.output.strip() == (
        "Error: SyntheticSpec.image_size must be at most 4096 (the working image limit, "
        "PATCHCORE_MAX_WORKING_PIXELS), got 60000"
    ), outcome.output
    assert not (tmp_path / "data").exists()


def test_an_absurd_preprocessing_value_in_a_meta_file_is_refused_at_load(
    small_model_folder, tmp_path
):
    import json

    from patchcore.errors import ModelFormatError
    from patchcore.model.serialization import META_FILE, load_models

    folder = _model_copy(small_model_folder, tmp_path)
    meta = json.loads((folder / META_FILE).read_text())
    meta["config"]["preprocessing"]["resize"] = 100000
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=rf"^{folder / META_FILE}: --resize 100000 makes "
                                               r"working images of at least 100000x100000"):  # fmt: skip
        load_models(folder)


# ------------------------------------------------- file names that are not UTF-8
BAD_NAME = os.fsdecode(b"bad\xffname.png")


def test_a_name_that_is_not_utf8_is_escaped_reversibly_and_others_are_unchanged():
    from patchcore.files import name_of_printable, printable_name

    assert printable_name("good name ü.png") == "good name ü.png"
    printed = printable_name(BAD_NAME)
    assert printed == "bad\\xffname.png" and printed.encode("utf-8")
    assert name_of_printable(printed) == BAD_NAME
    tricky = os.fsdecode(b"a\\xff\\b\xfe")
    assert name_of_printable(printable_name(tricky)) == tricky


def test_every_output_keeps_a_name_that_is_not_utf8(synthetic_root, tmp_path):
    """Predict's CSV, training's predictions and overlays, for a test image named with a
    byte that is not UTF-8."""
    import shutil

    from click.testing import CliRunner

    from patchcore.cli.predict import predict_cli
    from patchcore.cli.runs import train_cli
    from test_cli import SMALL_DATA, SMALL_RANDOM

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "texture", data / "texture")
    good = min((data / "texture" / "test" / "good").glob("*.png"))
    bad = good.parent / BAD_NAME
    good.rename(bad)
    outcome = CliRunner().invoke(train_cli, [
        "--gpu", "-1", "--save_patchcore_model", "--save_predictions",
        "--save_segmentation_images", str(tmp_path / "results"), "patch_core", *SMALL_RANDOM,
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", *SMALL_DATA, "-d", "texture", "mvtec", str(data),
    ], catch_exceptions=False)  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    run = tmp_path / "results" / "project" / "group"
    records = (run / "predictions" / "mvtec_texture" / "predictions.csv").read_text("utf-8")
    assert "bad\\xffname" in records
    assert any("bad_name" in p.name for p in (run / "segmentation_images").rglob("*.png"))
    csv_path = tmp_path / "scores.csv"
    outcome = CliRunner().invoke(predict_cli, [
        str(run / "models" / "mvtec_texture"), str(bad), "--output", str(csv_path),
        "--gpu", "-1", "--num_workers", "0",
    ], catch_exceptions=False)  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert f"{bad.parent}/bad\\xffname.png" in csv_path.read_text("utf-8")


# ----------------------------------------------------------------------- dashboard
def test_a_dashboard_path_holding_a_nul_byte_is_one_line_and_no_traceback_reaches_a_browser(
    tmp_path,
):
    from patchcore.apps.dashboard import data
    from patchcore.apps.dashboard.launch import streamlit_command
    from patchcore.errors import DataError

    root = data.ResultsRoot.of(tmp_path)
    with pytest.raises(DataError, match=r"^images\\0x: a path cannot hold a NUL byte"):
        data.folder_images(root, "images\x00x")
    with pytest.raises(DataError, match=r"a path cannot hold a NUL byte"):
        data.ResultsRoot.of(f"{tmp_path}\x00")
    command = streamlit_command(tmp_path, 8501, "127.0.0.1", True, allow_scoring=True)
    assert command[command.index("--client.showErrorDetails") + 1] == "false"


@pytest.mark.parametrize(("changes", "message"), [
    ({"patchsize": 99999}, ("--patchsize 99999 is larger than the smallest feature map allows "
                           "(4x4 for layer strides up to 16 on a 64 px input")),
    ({"pretrain_embed_dimension": 100_000_000}, ("--pretrain_embed_dimension 100000000 is above "
                                                "the 3456 values of the layers' patch features")),
    ({"target_embed_dimension": 5000}, ("--target_embed_dimension 5000 is above the 128 values "
                                       "of 2 layer(s)")),
])  # fmt: skip
def test_model_options_beyond_what_the_backbone_can_use_are_refused_before_any_work(
    changes, message
):
    from conftest import small_config
    from patchcore.errors import ConfigurationError
    from patchcore.model.patchcore import PatchCore

    with pytest.raises(ConfigurationError) as raised:
        PatchCore(small_config(**changes))
    assert str(raised.value).startswith(message), str(raised.value)
    PatchCore(small_config(patchsize=7))  # 2 x 4 - 1: still reaches feature-map cells
    PatchCore(small_config(target_embed_dimension=1024))  # repeats values, as the reference


def test_the_fit_memory_is_estimated_and_a_fit_that_cannot_fit_is_refused_first(
    synthetic_root, tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from conftest import small_config
    from patchcore.cli.runs import train_cli
    from patchcore.model import patchcore
    from patchcore.model.patchcore import PatchCore
    from test_cli import SMALL_DATA, SMALL_RANDOM

    model = PatchCore(small_config())  # resnet18 layer2 and layer3: an 8 x 8 grid at 64 px
    estimate = model.fit_memory_estimate([(64, 64)] * 10)
    assert estimate.patch_features == 640
    assert estimate.bytes == 640 * (128 + 3) * 4 + 160 * 48 * 4  # projections, bank of 25 %
    assert patchcore.available_memory_bytes(model.device) > 0

    monkeypatch.setattr(patchcore, "available_memory_bytes", lambda device: 2**20)
    fitted = []
    monkeypatch.setattr(PatchCore, "fit", lambda self, batches: fitted.append(True))
    outcome = CliRunner().invoke(train_cli, [
        "--gpu", "-1", str(tmp_path / "results"), "patch_core", *SMALL_RANDOM,
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", *SMALL_DATA, "-d", "texture", "mvtec", str(synthetic_root),
    ])  # fmt: skip
    assert outcome.exit_code == 1 and not fitted, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: mvtec_texture: fitting needs about")
    assert "GiB of memory (" in errors[0] and "more than the 0.0 GiB available on cpu" in errors[0]
    assert list((tmp_path / "results" / "project").iterdir()) == []
