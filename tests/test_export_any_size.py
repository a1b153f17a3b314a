"""Exported graphs of any input size: one ONNX / OpenVINO graph for images of mixed sizes.

Against the torch module (`PatchCoreModule`, which takes any size) on the same float
inputs: image scores within a relative 1e-4, maps within 1e-4 of the largest map value,
identical decisions; sizes odd, non-square and in both of Pillow's resampling orders.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import small_config
from patchcore.apps.export import ExportOptions, export_model, parse_input_size
from patchcore.apps.runtimes import ExportRecord, open_exported
from patchcore.cli.export import export_deployment_cli
from patchcore.cli.predict import predict_cli
from patchcore.config import PreprocessingConfig
from patchcore.data.datasets import list_samples
from patchcore.data.preprocessing import (
    input_size_problem,
    open_image,
    resamples_rows_first,
    to_tensor,
)
from patchcore.errors import ConfigurationError, DataError
from patchcore.model.module import AnySizePatchCore, PatchCoreModule, any_size_inputs
from patchcore.model.patchcore import PatchCore
from test_deploy import fit_small_model
from test_export import HAVE_ONNXRUNTIME, HAVE_OPENVINO, needs_onnxruntime

RUNTIMES = {"onnxruntime": ".onnx", "openvino": ".xml"}

SCORE_RTOL = 1e-4
MAP_TOLERANCE = 1e-4  # of the largest map value
WHOLE_IMAGE = PreprocessingConfig(72, 64, crop="none", scale=0.5)
# (height, width): odd, non-square, square; (301, 77) shrinks its height most, which Pillow
# 13 resamples rows first
SIZES = [(90, 110), (129, 77), (64, 201), (101, 101), (301, 77)]
TOO_SMALL = (40, 90)  # 20 x 45 once scaled: below the 32 pixels the patch grid needs


def skip_unless_installed(runtime: str) -> None:
    if not {"onnxruntime": HAVE_ONNXRUNTIME, "openvino": HAVE_OPENVINO}[runtime]:
        pytest.skip(f"{runtime} is not installed")


def mixed_images(root: Path, sizes) -> list[torch.Tensor]:
    """One synthetic test image per size (resized there by Pillow): float [1, 3, H, W]."""
    samples = list_samples(root, "texture", "test")
    chosen = [samples[i] for i in np.linspace(0, len(samples) - 1, len(sizes)).astype(int)]
    return [
        to_tensor(open_image(sample.image_path, "RGB").resize((size[1], size[0])))[None]
        for sample, size in zip(chosen, sizes, strict=True)
    ]


def variant(model: PatchCore, preprocessing: PreprocessingConfig) -> PatchCore:
    """`model`'s bank under another preprocessing (the bank's features keep their meaning
    for the scoring mechanics under test)."""
    other = PatchCore(dataclasses.replace(model.config, preprocessing=preprocessing))
    other.set_memory_bank(model.memory_bank)
    return other


@pytest.fixture(scope="module")
def whole_image_model(synthetic_root) -> PatchCore:
    return fit_small_model(synthetic_root, "texture", small_config(preprocessing=WHOLE_IMAGE),
                           calibrate=False)  # fmt: skip


@pytest.fixture(scope="module")
def median_threshold(whole_image_model, synthetic_root) -> float:
    """Halfway between the two middle torch scores of the mixed-size images: both decisions
    occur, and no score lies within rounding of the threshold."""
    module = PatchCoreModule.from_patchcore(whole_image_model)
    images = mixed_images(synthetic_root, SIZES)
    scores = sorted(float(module(image)["pred_score"][0]) for image in images)
    middle = len(scores) // 2
    assert scores[middle] - scores[middle - 1] > 1e-3 * scores[middle]
    return (scores[middle - 1] + scores[middle]) / 2


@pytest.fixture(scope="module")
def any_size_export(whole_image_model, median_threshold, tmp_path_factory) -> Path:
    """The whole-image model exported with the default options (any size for --crop none)."""
    folder = tmp_path_factory.mktemp("any-size")
    formats = ("torch",) + ("onnx",) * HAVE_ONNXRUNTIME + ("openvino",) * HAVE_OPENVINO
    options = ExportOptions(formats, threshold=median_threshold, bank_chunk_size=64)
    export_model(whole_image_model, Path("whole"), folder, "texture", options)
    return folder


def assert_same(outputs, expected: dict) -> None:
    np.testing.assert_allclose(
        outputs.scores, expected["pred_score"].numpy(), rtol=SCORE_RTOL, atol=0
    )
    maps = expected["anomaly_map"].numpy()
    assert outputs.maps.shape == maps.shape
    assert np.abs(outputs.maps - maps).max() <= MAP_TOLERANCE * np.abs(maps).max()
    if "pred_label" in expected:
        assert np.array_equal(outputs.labels, expected["pred_label"].numpy())


# ------------------------------------------------------------------ graph in torch
@pytest.mark.parametrize(
    "preprocessing",
    [WHOLE_IMAGE, PreprocessingConfig(72, 64),
     PreprocessingConfig(72, 64, crop="none", scale=0.5, tile=32, tile_overlap=0.25)],
    ids=["whole-image", "centre-crop", "tiles"],
)  # fmt: skip
def test_any_size_graph_computes_what_the_module_computes(
    whole_image_model, synthetic_root, preprocessing
):
    """The graph's form (geometry as inputs, index-based tiles, map by taps) in eager
    torch against the module, size by size: the same scores and maps."""
    model = variant(whole_image_model, preprocessing)
    module = PatchCoreModule.from_patchcore(model).eval()
    graph = AnySizePatchCore(module).eval()
    assert any(resamples_rows_first(size, (size[0] // 2, size[1] // 2)) for size in SIZES)
    for image in mixed_images(synthetic_root, SIZES):
        batch = torch.cat([image, image.flip(-1)])
        expected = module(batch)
        outputs = graph(batch, *any_size_inputs(tuple(batch.shape[-2:]), model.config).values())
        torch.testing.assert_close(outputs[0], expected["pred_score"], rtol=1e-5, atol=0)
        scale = float(expected["anomaly_map"].abs().max())
        assert float((outputs[1] - expected["anomaly_map"]).abs().max()) <= 1e-5 * scale


def test_geometry_inputs_refuse_sizes_the_model_cannot_take(whole_image_model):
    with pytest.raises(DataError, match="smaller than the 32 pixels the patch grid needs"):
        any_size_inputs(TOO_SMALL, whole_image_model.config, "small.png")
    tiled = variant(whole_image_model, dataclasses.replace(WHOLE_IMAGE, tile=48)).config
    with pytest.raises(DataError, match="--tile 48 is larger than the working image"):
        any_size_inputs((80, 200), tiled)


@pytest.mark.parametrize(
    ("preprocessing", "size", "reason"),
    [(WHOLE_IMAGE, TOO_SMALL, "the working image is 45x20 pixels, smaller than the 32 pixels"),
     (dataclasses.replace(WHOLE_IMAGE, tile=48), (80, 200), "--tile 48 is larger than"),
     (PreprocessingConfig(48, crop="none"), (3300, 3200),
      "a resize from 3300 to 49 pixels shrinks the image 67 times, more than the about 60")],
    ids=["below-patch-grid", "below-tile", "shrinks-too-much"],
)  # fmt: skip
def test_input_size_problem_is_the_rule_the_geometry_inputs_raise(
    whole_image_model, preprocessing, size, reason
):
    """One rule: the reason `input_size_problem` gives, naming the file or the size, is the
    error `any_size_inputs` raises; sizes the model takes have none."""
    config = dataclasses.replace(whole_image_model.config, preprocessing=preprocessing)
    assert input_size_problem((200, 300), preprocessing) is None
    problem = input_size_problem(size, preprocessing, "part.png")
    assert problem.startswith(f"part.png: {reason}")
    unnamed = input_size_problem(size, preprocessing)
    assert unnamed == f"a {size[0]}x{size[1]} image: {problem.removeprefix('part.png: ')}"
    with pytest.raises(DataError) as raised:
        any_size_inputs(size, config, "part.png")
    assert str(raised.value) == problem


# ---------------------------------------------------------------- exported graphs
@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_one_graph_scores_mixed_sizes_like_torch(
    any_size_export, whole_image_model, median_threshold, synthetic_root, runtime
):
    skip_unless_installed(runtime)
    model = open_exported(any_size_export / f"texture{RUNTIMES[runtime]}", runtime)
    assert model.any_size and model.input_size is None
    module = PatchCoreModule.from_patchcore(whole_image_model, median_threshold)
    labels = []
    for image in mixed_images(synthetic_root, SIZES):
        for batch in (image, torch.cat([image, image.flip(-2)])):  # dynamic batch too
            outputs = model.predict(batch)
            assert_same(outputs, module(batch))
            labels.extend(outputs.labels.tolist())
    assert 0 < sum(labels) < len(labels)  # both decisions occur
    problem = model.size_problem(TOO_SMALL, "small.png")
    assert problem.startswith("small.png: the working image is 45x20 pixels, smaller than")
    with pytest.raises(DataError, match="the working image is 45x20 pixels"):
        model.predict(torch.rand(1, 3, *TOO_SMALL))


@needs_onnxruntime
def test_any_size_record_has_the_any_size_format_and_names_its_inputs(any_size_export, whole_image_model):
    model = open_exported(any_size_export / "texture.onnx")
    assert model.record.format_version == 5 and model.record.input_size is None
    names = [node.name for node in model.session.get_inputs()]
    assert names == ["images", *(f"{name}_{part}" for name in
                                 ("resize1", "resize2", "resize3", "map_rows", "map_columns")
                                 for part in ("indices", "weights"))]  # fmt: skip
    shape = model.session.get_inputs()[0].shape
    assert shape[1] == 3 and all(isinstance(dim, str) for dim in (shape[0], shape[2], shape[3]))
    again = ExportRecord.from_json(model.record.to_json(), "again")
    assert again == model.record
    fixed = dataclasses.replace(model.record, input_size=(90, 110))
    assert fixed.format_version < 5  # fixed-size exports keep their older version
    assert ExportRecord.from_json(fixed.to_json(), "fixed").input_size == (90, 110)


@needs_onnxruntime
@pytest.mark.slow
@pytest.mark.parametrize(
    "preprocessing",
    [PreprocessingConfig(72, 64, crop="none", scale=0.5, tile=32, tile_overlap=0.25),
     # the shorter side resized to the tile: one row or one column of tiles, whichever
     # way the image lies (a square: one tile)
     PreprocessingConfig(64, 64, crop="none", tile=64),
     PreprocessingConfig(72, 64)],
    ids=["tiles", "tile-as-long-as-the-shorter-side", "centre-crop-any"],
)  # fmt: skip
def test_tiled_and_centre_crop_graphs_of_any_size(
    whole_image_model, synthetic_root, tmp_path, preprocessing
):
    model = variant(whole_image_model, preprocessing)
    options = ExportOptions(("onnx",), any_size=True, bank_chunk_size=64)
    export_model(model, Path("variant"), tmp_path, "variant", options)
    graph = open_exported(tmp_path / "variant.onnx")
    module = PatchCoreModule.from_patchcore(model)
    for image in mixed_images(synthetic_root, SIZES):
        assert_same(graph.predict(image), module(image))


# --------------------------------------------------------------------- commands
def run(command, *arguments) -> tuple[int, str]:
    outcome = CliRunner().invoke(command, [str(argument) for argument in arguments])
    return outcome.exit_code, outcome.output


@pytest.fixture(scope="module")
def mixed_folder(synthetic_root, tmp_path_factory) -> Path:
    """Images of the mixed sizes saved as PNG files, and one too small to score."""
    folder = tmp_path_factory.mktemp("mixed")
    for index, image in enumerate(mixed_images(synthetic_root, [*SIZES, TOO_SMALL])):
        pixels = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return folder


def test_predict_scores_a_folder_of_mixed_sizes_in_every_runtime(
    any_size_export, mixed_folder, tmp_path
):
    runs = {"torch": any_size_export / "texture.pth"}
    runs.update({runtime: any_size_export / f"texture{suffix}" for runtime, suffix in
                 RUNTIMES.items() if {"onnxruntime": HAVE_ONNXRUNTIME, "openvino": HAVE_OPENVINO}[runtime]})  # fmt: skip
    results = {}
    for runtime, path in runs.items():
        output = tmp_path / f"{runtime}.csv"
        code, text = run(predict_cli, path, mixed_folder, "-o", output, "--runtime", runtime,
                         "--gpu", "-1", "--num_workers", "0")  # fmt: skip
        assert code == 4, text  # the too-small image is an error row, the run goes on
        with output.open(newline="") as handle:
            results[runtime] = list(csv.DictReader(handle))
    reference = results["torch"]
    assert [row["decision"] for row in reference[:-1]].count("reject") not in (0, len(SIZES))
    small = reference[-1]
    assert small["decision"] == "error" and small["score"] == ""
    assert small["error"].startswith(f"{mixed_folder / '05.png'}: the working image is 45x20")
    for runtime, rows in results.items():
        assert [row["decision"] for row in rows] == [row["decision"] for row in reference]
        scores = [float(row["score"]) for row in rows[:-1]]
        expected = [float(row["score"]) for row in reference[:-1]]
        np.testing.assert_allclose(scores, expected, rtol=SCORE_RTOL, err_msg=runtime)


def test_input_size_any_and_what_export_refuses(whole_image_model, tmp_path):
    assert parse_input_size("any") is None and parse_input_size(" ANY ") is None
    assert ExportOptions(("onnx",)).size_for(whole_image_model.config) is None
    centre = variant(whole_image_model, PreprocessingConfig(72, 64)).config
    assert ExportOptions(("onnx",)).size_for(centre) == (72, 72)  # as before
    assert ExportOptions(("onnx",), any_size=True).size_for(centre) is None
    with pytest.raises(ConfigurationError, match="either HEIGHTxWIDTH or 'any', not both"):
        ExportOptions(("onnx",), (90, 110), any_size=True)
    options = ExportOptions(("torch", "onnx"), (40, 90))
    with pytest.raises(ConfigurationError) as refused:
        export_model(whole_image_model, Path("whole"), tmp_path, "small", options)
    message = str(refused.value)
    assert "--input_size 40x90 cannot be scored by this model" in message
    assert "smaller than the 32 pixels the patch grid needs" in message
    assert "\n" not in message and not list(tmp_path.iterdir())
    code, output = run(export_deployment_cli, tmp_path, "-o", tmp_path / "o", "-f", "onnx",
                       "--input_size", "big")  # fmt: skip
    assert code == 2 and "HEIGHTxWIDTH (e.g. 480x640), one number or 'any', got 'big'" in output


@needs_onnxruntime
def test_a_tiled_model_with_an_area_insensitive_image_score_is_refused_any_size(
        whole_image_model, tmp_path):  # fmt: skip
    """Its image score pools the stitched map to a size-dependent patch grid: one line, no file."""
    tiled = variant(whole_image_model, dataclasses.replace(WHOLE_IMAGE, tile=48))
    quantile = PatchCore(dataclasses.replace(tiled.config, image_score="quantile"))
    quantile.set_memory_bank(whole_image_model.memory_bank)
    with pytest.raises(ConfigurationError) as refused:
        export_model(quantile, Path("tiled"), tmp_path, "tiled",
                     ExportOptions(("onnx",), any_size=True))  # fmt: skip
    assert "--image_score quantile exports for one input size only" in str(refused.value)
    assert "\n" not in str(refused.value) and not list(tmp_path.iterdir())
