"""patchcore-export and the runtimes: exported graphs score like the torch model.

Tolerances (FP32 graphs against torch, same float inputs): image scores within a relative
1e-4, anomaly maps within 1e-4 of the largest map value, identical decisions. Measured
differences are about 100 times smaller (see docs/explanations/fidelity.md, exported graphs).
OpenVINO IR with FP16 weights: scores within a relative 2e-2, maps within 2e-2.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import SHARED_MAGNETIC_TILE, small_config
from patchcore.apps.export import (
    ExportOptions,
    export_model,
    export_models,
    parse_input_size,
    write_openvino,
)
from patchcore.apps.runtimes import ExportRecord, open_exported
from patchcore.cli.export import export_deployment_cli
from patchcore.cli.predict import predict_cli
from patchcore.config import PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.data.preprocessing import (
    image_tensor,
    open_image,
    to_model_input,
    to_tensor,
)
from patchcore.errors import ConfigurationError, DataError, MissingDependencyError
from patchcore.model.calibration import decide, threshold_for_dtype
from patchcore.model.chunked_search import BankChunkedSearch
from patchcore.model.module import FixedSizePatchCore, PatchCoreModule
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import neighbour_distances
from patchcore.model.search import TorchNearestNeighbours
from patchcore.model.serialization import save_models
from test_deploy import fit_small_model

HAVE_ONNXRUNTIME = all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript"))
HAVE_OPENVINO = HAVE_ONNXRUNTIME and importlib.util.find_spec("openvino") is not None
needs_onnxruntime = pytest.mark.skipif(
    not HAVE_ONNXRUNTIME, reason="needs the export extra (onnx, onnxscript, onnxruntime)"
)
needs_openvino = pytest.mark.skipif(
    not HAVE_OPENVINO, reason="needs the export and openvino extras"
)


def skip_unless_installed(runtime: str) -> None:
    installed = {"onnxruntime": HAVE_ONNXRUNTIME, "openvino": HAVE_OPENVINO}[runtime]
    if not installed:
        pytest.skip(f"{runtime} is not installed")


SCORE_RTOL = 1e-4
MAP_TOLERANCE = 1e-4  # of the largest map value
FP16_TOLERANCE = 2e-2
INPUT_SIZE = (90, 110)  # not square, not the model's size: the graph resizes and crops
CHUNK = 96  # several bank chunks for the small model's bank


def images_at(paths, size: tuple[int, int]) -> torch.Tensor:
    """Image files resized (PIL bilinear) to `size`: float RGB [N, 3, H, W] in [0, 1]."""
    return torch.stack(
        [to_tensor(open_image(path, "RGB").resize((size[1], size[0]))) for path in paths]
    )


def assert_same_outputs(outputs, scores, maps, labels, map_tolerance=MAP_TOLERANCE,
                        score_rtol=SCORE_RTOL) -> None:  # fmt: skip
    scores, maps = np.asarray(scores), np.asarray(maps)
    np.testing.assert_allclose(outputs.scores, scores, rtol=score_rtol, atol=0)
    assert outputs.maps.shape == maps.shape
    assert np.abs(outputs.maps - maps).max() <= map_tolerance * np.abs(maps).max()
    if labels is not None:
        assert np.array_equal(outputs.labels, np.asarray(labels))


# ----------------------------------------------------------------- building blocks
@pytest.mark.parametrize(
    ("size", "preprocessing"),
    [
        ((90, 110), PreprocessingConfig(72, 64)),
        ((256, 256), PreprocessingConfig(256, 224)),
        ((301, 199), PreprocessingConfig(96, 80)),
        ((50, 60), PreprocessingConfig(72, 64)),  # enlarged
        ((120, 300), PreprocessingConfig(72, 64, crop="none", max_size=150)),
        ((64, 64), PreprocessingConfig(64, 64)),  # identity
    ],
)
def test_tensor_preprocessing_equals_the_pil_chain_bit_for_bit(size, preprocessing):
    """The tensor path (exported module and graphs) on a decoded 8-bit image gives the very
    tensor the file path (`image_tensor`, Pillow) gives."""
    generator = np.random.default_rng(0)
    pictures = [
        Image.fromarray(generator.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(2)
    ]
    expected = torch.stack([image_tensor(picture, preprocessing) for picture in pictures])
    got = to_model_input(torch.stack([to_tensor(picture) for picture in pictures]), preprocessing)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("chunk", [1, 7, 100, 500, 10_000])
@pytest.mark.parametrize("k", [1, 3])
def test_bank_chunked_search_finds_the_brute_force_neighbours(chunk, k):
    generator = torch.Generator().manual_seed(4)
    bank, queries = (
        torch.randn(500, 16, generator=generator),
        torch.randn(120, 16, generator=generator),
    )
    expected = torch.cdist(queries.double(), bank.double()).square()
    expected_distances, expected_indices = expected.topk(k, dim=1, largest=False)
    distances, indices = BankChunkedSearch(bank, chunk).search(queries, k)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-4, atol=1e-4)
    assert BankChunkedSearch(bank[:2], chunk).search(queries, 5)[0].shape == (120, 2)


def test_bank_chunked_search_returns_the_scorers_distances_and_reads_rows_by_chunk():
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(300, 16, generator=generator) * 30 + 100  # long, close vectors
    queries = bank[:50] + torch.randn(50, 16, generator=generator)
    reference = TorchNearestNeighbours(torch.device("cpu"))
    reference.fit(bank)
    _, expected_indices = reference.search(queries, 3)
    expected = neighbour_distances(queries, bank, expected_indices)
    for chunk in (7, 64, 300):
        search = BankChunkedSearch(bank, chunk)
        distances, indices = search.search(queries, 3)
        assert torch.equal(indices, expected_indices)
        assert torch.equal(distances, expected)
        picked = torch.tensor([[0, 6, 7], [299, 64, 63]])
        assert torch.equal(search.rows(picked), bank[picked])
    exact = (queries.double()[:, None] - bank.double()[expected_indices]).square().sum(-1)
    torch.testing.assert_close(expected.double(), exact, rtol=1e-6, atol=0)


def test_float32_decisions_equal_float64_decisions_at_the_threshold():
    threshold = 0.3  # float32(0.3) lies above 0.3
    scores = torch.tensor([np.float32(0.3), np.nextafter(np.float32(0.3), np.float32(0))])
    assert decide(scores, threshold).tolist() == [decide(float(s), threshold) for s in scores]
    assert decide(scores, threshold).tolist() == [True, False]
    assert threshold_for_dtype(1e39, torch.float32) == float(np.finfo(np.float32).max)
    assert threshold_for_dtype(0.3, torch.float64) == 0.3
    nan = torch.tensor([float("nan"), float("inf")])
    assert decide(nan, 1e9).tolist() == [True, True]


def test_input_size_parsing():
    assert parse_input_size("480x640") == (480, 640)
    assert parse_input_size("256") == (256, 256)
    with pytest.raises(ConfigurationError, match="must be HEIGHTxWIDTH"):
        parse_input_size("480,640")
    with pytest.raises(ConfigurationError, match="at least 32 pixels"):
        parse_input_size("16x640")


# ------------------------------------------------------------------ exported model
@pytest.fixture(scope="module")
def calibrated(synthetic_root) -> PatchCore:
    """A small model whose threshold is the median score of the test images (good and
    defective), so both decisions occur and the runtimes' agreement on them means something."""
    model = fit_small_model(synthetic_root, "texture", small_config(num_nn=3), calibrate=False)
    test = ImageDataset(list_samples(synthetic_root, "texture", "test"), model.config.preprocessing)
    model.calibrate(torch.utils.data.DataLoader(test, batch_size=6), quantile=0.5)
    return model


@pytest.fixture(scope="module")
def model_folder(calibrated, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "mvtec_texture"
    save_models(folder, [calibrated])
    return folder


@pytest.fixture(scope="module")
def exported(model_folder, tmp_path_factory) -> Path:
    """The calibrated model exported once by `patchcore-export` in every installed format,
    and its ONNX graph converted to OpenVINO IR with FP16 weights (in fp16/)."""
    folder = tmp_path_factory.mktemp("exported")
    formats = ["torch"] + ["onnx"] * HAVE_ONNXRUNTIME + ["openvino"] * HAVE_OPENVINO
    code, output = run_export(
        model_folder, "-o", folder, *[f"--format={name}" for name in formats],
        "--input_size", "x".join(map(str, INPUT_SIZE)), "--bank_chunk_size", CHUNK,
    )  # fmt: skip
    assert code == 0, output
    if HAVE_OPENVINO:
        record = dataclasses.replace(open_exported(folder / "texture.xml").record, precision="fp16")
        write_openvino(folder / "texture.onnx", folder / "fp16" / "texture.xml", record, fp16=True)
    return folder


@pytest.fixture(scope="module")
def synthetic_inputs(synthetic_root) -> torch.Tensor:
    """Eight synthetic test images (good and defective) at the export's input size."""
    samples = list_samples(synthetic_root, "texture", "test")
    chosen = [samples[i] for i in np.linspace(0, len(samples) - 1, 8).astype(int)]
    return images_at([sample.image_path for sample in chosen], INPUT_SIZE)


def library_prediction(model: PatchCore, images: torch.Tensor):
    """The torch model's own prediction (`PatchCore.predict`, torch search) on the same
    float inputs, preprocessed on tensors."""
    return model.predict(to_model_input(images, model.config.preprocessing))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("batch", [1, 8])
def test_exported_graph_scores_like_the_torch_model(
    exported, calibrated, synthetic_inputs, runtime, batch
):
    skip_unless_installed(runtime)
    suffix = ".onnx" if runtime == "onnxruntime" else ".xml"
    model = open_exported(exported / f"texture{suffix}", runtime)
    module = PatchCoreModule.from_patchcore(calibrated)
    expected = module(synthetic_inputs)
    outputs = [model.predict(synthetic_inputs[i : i + batch]) for i in range(0, 8, batch)]
    scores = np.concatenate([o.scores for o in outputs])
    maps = np.concatenate([o.maps for o in outputs])
    labels = np.concatenate([o.labels for o in outputs])
    got = type(outputs[0])(scores, maps, labels)
    assert_same_outputs(
        got, expected["pred_score"], expected["anomaly_map"], expected["pred_label"]
    )
    threshold = calibrated.normal_statistics.threshold
    assert labels.tolist() == [bool(decide(float(score), threshold)) for score in scores]
    assert 0 < labels.sum() < 8  # both decisions occur, so agreement means something
    # the library's PatchCore.predict on the same inputs: same scores; its maps are on the
    # model's input frame, which is the crop of the exported map
    library = library_prediction(calibrated, synthetic_inputs)
    np.testing.assert_allclose(scores, library.scores.numpy(), rtol=SCORE_RTOL)


@needs_openvino
def test_openvino_ir_holds_the_bank_once(exported, calibrated):
    """OpenVINO's converter folds the search's bank slices into constants of their own; the
    graph reads rows through the chunks only, so no whole copy of the bank remains."""
    import openvino

    model = openvino.Core().read_model(exported / "texture.xml")
    dimension = calibrated.memory_bank.shape[1]
    bank_rows = [
        op.get_output_partial_shape(0)[0].get_length()
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
        and op.get_output_partial_shape(0).rank.get_length() == 2
        and op.get_output_partial_shape(0)[1].get_length() == dimension
        and op.get_output_partial_shape(0)[0].get_length() > 1
    ]
    assert sum(bank_rows) == len(calibrated.memory_bank)
    assert max(bank_rows) <= CHUNK


@needs_openvino
def test_fp16_openvino_stays_within_its_tolerance(exported, calibrated, synthetic_inputs):
    model = open_exported(exported / "fp16" / "texture.xml")
    assert model.record.precision == "fp16"
    expected = PatchCoreModule.from_patchcore(calibrated)(synthetic_inputs)
    outputs = model.predict(synthetic_inputs)
    assert_same_outputs(outputs, expected["pred_score"], expected["anomaly_map"], None,
                        map_tolerance=FP16_TOLERANCE, score_rtol=FP16_TOLERANCE)  # fmt: skip
    file_size = (exported / "fp16" / "texture.bin").stat().st_size
    assert file_size < 0.6 * (exported / "texture.bin").stat().st_size


@needs_onnxruntime
def test_onnx_graph_is_described_and_searches_in_bank_chunks(exported, calibrated):
    import onnx

    path = exported / "texture.onnx"
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 18
    (images,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, *INPUT_SIZE]  # dynamic batch
    assert [output.name for output in model.graph.output] == [
        "pred_score",
        "anomaly_map",
        "pred_label",
    ]
    shapes = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in model.graph.value_info
    }
    bank_size = len(calibrated.memory_bank)
    products = [
        shapes[node.output[0]] for node in model.graph.node if node.op_type in ("Gemm", "MatMul")
    ]
    # [patches, chunk] distance products (the maps' separable resizing and smoothing are
    # batched [B, h, w] products)
    distance_products = [s for s in products if len(s) == 2 and isinstance(s[0], str)]
    assert len(distance_products) == -(-bank_size // CHUNK)  # one per bank chunk
    assert all(shape[-1] <= CHUNK for shape in distance_products)  # never [patches x bank]
    initializers = {item.name: list(item.dims) for item in model.graph.initializer}
    assert list(initializers.values()).count([bank_size, calibrated.memory_bank.shape[1]]) == 1
    record = open_exported(path).record
    assert record.config == calibrated.config
    assert record.threshold == calibrated.normal_statistics.threshold
    assert record.normal_statistics == calibrated.normal_statistics
    assert (record.input_size, record.bank_size, record.bank_chunk_size) == (
        INPUT_SIZE,
        bank_size,
        CHUNK,
    )
    assert record.onnx_opset == 18 and record.precision == "fp32"
    assert ExportRecord.from_json(record.to_json(), "here") == record


def test_torch_format_is_the_challenge_module(exported, calibrated, synthetic_inputs):
    model = open_exported(exported / "texture.pth")
    assert model.input_size is None and model.threshold == calibrated.normal_statistics.threshold
    images = torch.rand(1, 3, 77, 133)  # any size
    expected = PatchCoreModule.from_patchcore(calibrated)(images)
    outputs = model.predict(images)
    assert np.array_equal(outputs.scores, expected["pred_score"].numpy())
    assert outputs.maps.shape == (1, 77, 133)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_wrong_input_size_is_a_one_line_error(exported, runtime):
    skip_unless_installed(runtime)
    model = open_exported(exported / "texture.onnx", runtime)
    with pytest.raises(
        DataError,
        match=r"takes 90x110 \(height x width\) images, the size fixed at export, got 64x64",
    ):
        model.predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(DataError, match=r"takes float RGB images \[B, 3, 90, 110\]"):
        model.predict(np.zeros((1, 90, 110), dtype=np.float32))


# -------------------------------------------------------------- graph variants
@needs_onnxruntime
@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [
        {"distance": "l2", "num_nn": 3, "score_reweighting": True, "reweighting_neighbours": 4},
        {"preprocessing": PreprocessingConfig(72, 64, crop="none", tile=48, tile_overlap=0.25)},
    ],
    ids=["eq7-l2-k3", "tiles-whole-image"],
)
def test_graph_variants_score_like_torch(calibrated, synthetic_inputs, tmp_path, changes):
    """Eq. 7 with L2 distances and k = 3; tiles of whole images. Neither model carries a
    threshold, so their graphs have no decision output."""
    model = PatchCore(dataclasses.replace(calibrated.config, **changes))
    model.set_memory_bank(calibrated.memory_bank)
    module = PatchCoreModule.from_patchcore(model)
    assert FixedSizePatchCore(module, INPUT_SIZE).output_names == ("pred_score", "anomaly_map")
    options = ExportOptions(("onnx",), INPUT_SIZE, bank_chunk_size=CHUNK)
    export_model(model, Path("variant"), tmp_path, "variant", options)
    graph = open_exported(tmp_path / "variant.onnx")
    assert graph.threshold is None
    expected = module(synthetic_inputs)
    outputs = graph.predict(synthetic_inputs)
    assert outputs.labels is None
    assert_same_outputs(outputs, expected["pred_score"], expected["anomaly_map"], None)


# ------------------------------------------------------------------------- real data
@needs_openvino
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MAGNETIC_TILE.is_dir(), reason="../shared magnetic_tile is absent")
def test_real_magnetic_tile_images_score_alike_in_every_runtime(tmp_path):
    """EfficientNet-Lite0 (ImageNet weights) on real, grayscale, non-square tiles."""
    root = SHARED_MAGNETIC_TILE.parent
    config = small_config(
        backbone_name="efficientnet_lite0", layers=("_blocks.4", "_blocks.10"), pretrained=True,
        pretrain_embed_dimension=256, target_embed_dimension=256,
        preprocessing=PreprocessingConfig(128, 112), sampler=SamplerConfig(percentage=0.1),
    )  # fmt: skip
    model = PatchCore(config, search=SearchConfig(backend="torch"))
    train = list_samples(root, "magnetic_tile", "train")
    loader = torch.utils.data.DataLoader(ImageDataset(train[:8], config.preprocessing), 4)
    model.fit(loader)
    calibration = ImageDataset(train[8:14], config.preprocessing)
    model.calibrate(torch.utils.data.DataLoader(calibration, 8))
    test = list_samples(root, "magnetic_tile", "test")
    chosen = [test[i] for i in np.linspace(0, len(test) - 1, 8).astype(int)]
    size = (160, 144)
    images = images_at([sample.image_path for sample in chosen], size)
    options = ExportOptions(("torch", "onnx", "openvino"), size, bank_chunk_size=1000)
    export_model(model, Path("tile"), tmp_path, "tile", options)
    expected = PatchCoreModule.from_patchcore(model)(images)
    assert 0 < int(expected["pred_label"].sum()) < 8
    for name, runtime in (
        ("tile.onnx", "onnxruntime"),
        ("tile.xml", "openvino"),
        ("tile.pth", "torch"),
    ):
        exported_model = open_exported(tmp_path / name, runtime)
        for batch in (1, 8):
            parts = [exported_model.predict(images[i : i + batch]) for i in range(0, 8, batch)]
            outputs = type(parts[0])(
                np.concatenate([p.scores for p in parts]),
                np.concatenate([p.maps for p in parts]),
                np.concatenate([p.labels for p in parts]),
            )
            assert_same_outputs(outputs, expected["pred_score"], expected["anomaly_map"],
                                expected["pred_label"])  # fmt: skip
    library = library_prediction(model, images)
    np.testing.assert_allclose(
        expected["pred_score"].numpy(), library.scores.numpy(), rtol=SCORE_RTOL
    )


# ------------------------------------------------------------------------- commands
def run_export(*arguments) -> tuple[int, str]:
    outcome = CliRunner().invoke(export_deployment_cli, [str(a) for a in arguments])
    return outcome.exit_code, outcome.output


def run_predict(*arguments) -> tuple[int, str]:
    arguments = [*arguments, "--gpu", "-1", "--num_workers", "0"]
    outcome = CliRunner().invoke(predict_cli, [str(a) for a in arguments])
    return outcome.exit_code, outcome.output


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def input_folder(synthetic_root, tmp_path_factory) -> Path:
    """Test images saved at the export's input size, as a camera would deliver them."""
    folder = tmp_path_factory.mktemp("incoming")
    samples = list_samples(synthetic_root, "texture", "test")
    for sample in samples[::3]:
        picture = open_image(sample.image_path, "RGB").resize(INPUT_SIZE[::-1])
        picture.save(folder / f"{sample.defect_type}_{sample.image_path.name}")
    return folder


@needs_openvino
def test_predict_gives_the_same_decisions_in_every_runtime(exported, input_folder, tmp_path):
    folder = exported
    runs = {
        "torch": (folder / "texture.pth", ()),
        "onnxruntime": (folder / "texture.onnx", ()),
        "openvino": (folder / "texture.xml", ()),
        "openvino-from-onnx": (folder / "texture.onnx", ("--runtime", "openvino")),
        "export-folder": (folder, ("--runtime", "onnxruntime")),
    }
    results = {}
    for name, (model, options) in runs.items():
        code, output = run_predict(model, input_folder, "-o", tmp_path / f"{name}.csv",
                                   "--heatmaps", tmp_path / f"{name}-heat",
                                   "--masks", tmp_path / f"{name}-masks", *options)  # fmt: skip
        results[name] = read_rows(tmp_path / f"{name}.csv")
        rejected = any(row["decision"] == "reject" for row in results[name])
        assert code == (3 if rejected else 0), output
    reference = results["torch"]
    assert {row["decision"] for row in reference} == {"accept", "reject"}
    for name, rows in results.items():
        assert [row["path"] for row in rows] == [row["path"] for row in reference]
        assert [row["decision"] for row in rows] == [row["decision"] for row in reference], name
        scores = [float(row["score"]) for row in rows]
        expected = [float(row["score"]) for row in reference]
        np.testing.assert_allclose(scores, expected, rtol=SCORE_RTOL)
        for heat in (tmp_path / f"{name}-heat").iterdir():
            heat_map = np.asarray(Image.open(heat))  # the image, then the colour bar below
            assert heat_map.shape[1:] == (INPUT_SIZE[1], 3) and heat_map.shape[0] > INPUT_SIZE[0]
            mask = np.asarray(Image.open(tmp_path / f"{name}-masks" / heat.name))
            assert mask.shape == INPUT_SIZE


@needs_onnxruntime
def test_predict_gives_images_of_another_size_an_error_row(exported, synthetic_root, tmp_path):
    image = synthetic_root / "texture" / "test" / "good" / "000.png"  # 256 x 256
    code, output = run_predict(exported / "texture.onnx", image, "-o", tmp_path / "o.csv")
    assert code == 4, output
    (row,) = read_rows(tmp_path / "o.csv")
    assert row["decision"] == "error" and row["score"] == ""
    assert row["error"].startswith(
        f"{image}: image is 256x256 (height x width) but texture.onnx takes 90x110"
    )
    assert row["model_format"].startswith("patchcore-export/") and len(row["model_id"]) == 16


def test_predict_runtime_errors(exported, model_folder, input_folder, tmp_path):
    code, output = run_predict(model_folder, input_folder, "--runtime", "onnxruntime")
    assert code == 1
    assert "is a saved model folder, which runs in torch; for --runtime onnxruntime export it " \
           "first: patchcore-export" in output  # fmt: skip
    code, output = run_predict(exported / "texture.pth", input_folder, "--runtime", "openvino")
    assert code == 1 and "runtime 'openvino' does not read .pth files" in output
    code, output = run_predict(model_folder, input_folder, "--runtime", "tensorrt")
    assert code == 2 and "'tensorrt' is not one of 'torch', 'onnxruntime', 'openvino'" in output


def test_export_command_writes_every_format(exported, model_folder, calibrated):
    names = ["texture.pth"] + ["texture.onnx"] * HAVE_ONNXRUNTIME
    names += ["texture.bin", "texture.xml"] * HAVE_OPENVINO
    assert sorted(p.name for p in exported.iterdir() if p.is_file()) == sorted(names)
    if HAVE_OPENVINO:
        record = open_exported(exported / "texture.xml").record
        assert record.input_size == INPUT_SIZE and record.bank_chunk_size == CHUNK
        assert record.source == str(model_folder) and record.precision == "fp32"
        assert record.bank_size == len(calibrated.memory_bank)


def test_export_errors_are_one_line(calibrated, model_folder, tmp_path, monkeypatch):
    code, output = run_export(model_folder, "-o", tmp_path, "-f", "tflite")
    assert code == 2
    assert "Error: unknown export format 'tflite'; choose from torch, onnx, openvino" in output
    save_models(tmp_path / "pair", [calibrated, calibrated])
    code, output = run_export(tmp_path / "pair", "-o", tmp_path / "out", "-f", "torch")
    assert code == 1
    assert "an ensemble of 2 models cannot be exported: an exported graph holds one" in output
    assert "combined normal-image scale" in output and "patchcore-predict" in output
    code, output = run_export(model_folder, "-o", tmp_path, "-f", "onnx", "--fp16")
    assert code == 2 and "--fp16 applies to OpenVINO IR; add --format openvino" in output
    real_find_spec = importlib.util.find_spec

    def without(*names):
        return lambda name, *args: None if name in names else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without("onnx", "onnxscript"))
    code, output = run_export(model_folder, "-o", tmp_path / "out", "-f", "onnx")
    assert code == 1
    assert 'Error: exporting to ONNX or OpenVINO needs the package onnx: pip install ' \
           '"patchcore[export]"' in output  # fmt: skip
    monkeypatch.setattr(importlib.util, "find_spec", without("openvino"))
    with pytest.raises(MissingDependencyError, match=r'pip install "patchcore\[openvino\]"'):
        export_models([model_folder], tmp_path / "out", ExportOptions(("openvino",)))
    monkeypatch.setattr(importlib.util, "find_spec", without("onnxruntime"))
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(
        MissingDependencyError, match=r'onnxruntime: pip install "patchcore\[export\]"'
    ):
        open_exported(tmp_path / "model.onnx")
    assert not (tmp_path / "out").exists()


def test_default_input_size_is_the_resize_square(calibrated):
    assert calibrated.config.preprocessing.resize == 72
    assert ExportOptions(("onnx",)).size_for(calibrated.config) == (72, 72)
    assert ExportOptions(("onnx",), (480, 640)).size_for(calibrated.config) == (480, 640)
