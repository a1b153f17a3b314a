"""The challenge-format PatchCoreModule: equal to PatchCore.predict, weights files, export."""

import dataclasses
import runpy
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torchvision.transforms.v2 import functional as TF

from conftest import small_config
from patchcore.apps.export import category_name, export_challenge_models, requirements_text
from patchcore.cli.export import export_cli
from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.data.preprocessing import (
    crop_offsets,
    map_to_input_frame,
    open_image,
    resized_size,
)
from patchcore.errors import ConfigurationError, ModelFormatError
from patchcore.model.module import (
    CONFIG_KEY,
    PatchCoreModule,
    config_blob,
    decode_json,
    encode_json,
)
from patchcore.model.patchcore import PatchCore
from patchcore.model.serialization import load_models, save_models

REPO = Path(__file__).resolve().parents[1]
FULL_SIZE = PreprocessingConfig(resize=256, imagesize=224)


def fit_small_model(
    root: Path, category: str, config: PatchCoreConfig | None = None, calibrate: bool = True
) -> PatchCore:
    """A small random-weight model fitted (and calibrated) on a synthetic category."""
    config = config or small_config()
    model = PatchCore(config, search=SearchConfig(backend="torch"))
    dataset = ImageDataset(list_samples(root, category, "train"), config.preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6)
    model.fit(loader)
    if calibrate:
        model.calibrate(loader)
    return model


def as_input(path: Path) -> torch.Tensor:
    """An image file as the float [3, H, W] tensor in [0, 1] an evaluator would pass."""
    return TF.to_dtype(TF.to_image(open_image(path, "RGB")), torch.float32, scale=True)


@pytest.fixture(scope="module")
def full_size_model(synthetic_root) -> PatchCore:
    config = small_config(preprocessing=FULL_SIZE, sampler=SamplerConfig(name="identity"))
    return fit_small_model(synthetic_root, "texture", config, calibrate=False)


@pytest.fixture(scope="module")
def test_batch(synthetic_root) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 256 px test images (good, scratched): module inputs and the dataset's crops."""
    samples = list_samples(synthetic_root, "texture", "test")
    chosen = [samples[-1], samples[0]]
    dataset = ImageDataset(chosen, FULL_SIZE)
    crops = torch.stack([dataset[i]["image"] for i in range(len(chosen))])
    inputs = torch.stack([as_input(sample.image_path) for sample in chosen])
    return inputs, crops


@pytest.mark.parametrize(
    "changes",
    [{}, {"distance": "l2", "num_nn": 3, "score_reweighting": True, "reweighting_neighbours": 4}],
)
def test_module_scores_and_maps_equal_the_library(full_size_model, test_batch, changes):
    model = PatchCore(dataclasses.replace(full_size_model.config, **changes))
    model.set_memory_bank(full_size_model.memory_bank)
    inputs, crops = test_batch
    expected = model.predict(crops)
    outputs = PatchCoreModule.from_patchcore(model)(inputs)
    assert outputs["pred_score"].shape == (2,)
    assert outputs["anomaly_maps"].shape == outputs["anomaly_map"].shape == (2, 256, 256)
    torch.testing.assert_close(outputs["pred_score"], expected.scores, rtol=1e-4, atol=1e-6)
    top, left = crop_offsets((256, 256), 224)
    crop_region = outputs["anomaly_maps"][:, top : top + 224, left : left + 224]
    torch.testing.assert_close(crop_region, expected.maps, rtol=1e-4, atol=1e-5)


def test_border_outside_the_crop_repeats_the_crop_edge(full_size_model, test_batch):
    maps = PatchCoreModule.from_patchcore(full_size_model)(test_batch[0])["anomaly_maps"]
    torch.testing.assert_close(maps[:, :16, 16:240], maps[:, 16:17, 16:240].expand(-1, 16, -1))
    torch.testing.assert_close(maps[:, 16:240, 240:], maps[:, 16:240, 239:240].expand(-1, -1, 16))


def test_batch_of_two_equals_images_one_by_one(full_size_model, test_batch):
    module = PatchCoreModule.from_patchcore(full_size_model)
    inputs, _ = test_batch
    together = module(inputs)
    for index in range(2):
        alone = module(inputs[index : index + 1])
        for key in ("pred_score", "anomaly_maps"):
            torch.testing.assert_close(alone[key][0], together[key][index], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def small_model(synthetic_root) -> PatchCore:
    return fit_small_model(synthetic_root, "texture")


def test_round_trip_through_a_weights_file_is_exact(small_model, tmp_path):
    module = PatchCoreModule.from_patchcore(small_model)
    path = tmp_path / "texture.pth"
    torch.save(module.state_dict(), path)
    restored = PatchCoreModule()
    restored.load_state_dict(torch.load(path))  # the default, weights_only=True
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    expected, got = module(images), restored(images)
    assert set(got) == {"pred_score", "anomaly_maps", "anomaly_map", "pred_label"}
    for key in got:
        assert torch.equal(got[key], expected[key]), key
    assert restored.config == small_model.config
    assert restored.statistics() == small_model.normal_statistics
    assert restored.decision_threshold == small_model.normal_statistics.threshold
    assert torch.equal(got["pred_label"], got["pred_score"] > restored.decision_threshold)
    got["anomaly_maps"].mul_(2.0)  # evaluators may edit outputs in place


def test_version_1_files_with_their_key_names_still_load(small_model):
    module = PatchCoreModule.from_patchcore(small_model)
    state = module.state_dict()
    old = {
        key.replace("embedder.extractor.", "feature_extractor.", 1): value
        for key, value in state.items()
    }
    old[CONFIG_KEY] = encode_json(dict(decode_json(state[CONFIG_KEY]), format_version=1))
    restored = PatchCoreModule()
    restored.load_state_dict(old)
    images = torch.rand(1, 3, 80, 80, generator=torch.Generator().manual_seed(3))
    assert torch.equal(restored(images)["anomaly_map"], module(images)["anomaly_map"])


def test_backbone_weights_come_from_the_file(small_model):
    module = PatchCoreModule.from_patchcore(small_model)
    state = module.state_dict()
    conv = "embedder.extractor.graph.conv1.weight"
    state[conv] = state[conv] * 1.5
    restored = PatchCoreModule()
    restored.load_state_dict(state)
    assert torch.equal(restored.state_dict()[conv], state[conv])
    images = torch.rand(1, 3, 96, 96)
    assert not torch.equal(restored(images)["pred_score"], module(images)["pred_score"])


def test_loading_another_model_into_a_loaded_module_rebuilds_it(small_model, full_size_model):
    module = PatchCoreModule.from_patchcore(small_model)
    module.load_state_dict(PatchCoreModule.from_patchcore(full_size_model).state_dict())
    assert module.config == full_size_model.config
    assert module.memory_bank.shape == full_size_model.memory_bank.shape


def test_no_threshold_means_no_predicted_label(small_model):
    stripped = PatchCore(small_model.config)
    stripped.set_memory_bank(small_model.memory_bank)
    module = PatchCoreModule.from_patchcore(stripped)
    assert module.decision_threshold is None and module.statistics() is None
    restored = PatchCoreModule()
    restored.load_state_dict(module.state_dict())
    assert set(restored(torch.rand(1, 3, 64, 64))) == {"pred_score", "anomaly_maps", "anomaly_map"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda state: state.pop("memory_bank"), 'Missing key(s) in state_dict: "memory_bank"'),
        (lambda state: state.pop("threshold"), 'Missing key(s) in state_dict: "threshold"'),
        (
            lambda state: state.update(extra=torch.zeros(1)),
            'Unexpected key(s) in state_dict: "extra"',
        ),
        (lambda state: state.pop(CONFIG_KEY), f'Missing key(s) in state_dict: "{CONFIG_KEY}"'),
        (
            lambda state: state.pop("embedder.extractor.graph.conv1.weight"),
            '"embedder.extractor.graph.conv1.weight"',
        ),
    ],
)
def test_strict_loading_reports_missing_and_unexpected_keys(small_model, edit, message):
    state = PatchCoreModule.from_patchcore(small_model).state_dict()
    edit(state)
    with pytest.raises(RuntimeError) as raised:
        PatchCoreModule().load_state_dict(state)
    assert message in str(raised.value)


def test_non_strict_loading_ignores_unexpected_keys(small_model):
    state = PatchCoreModule.from_patchcore(small_model).state_dict()
    state["extra"] = torch.zeros(1)
    result = PatchCoreModule().load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["extra"] and not result.missing_keys


def test_newer_format_and_bad_bank_are_refused(small_model):
    state = PatchCoreModule.from_patchcore(small_model).state_dict()
    blob = decode_json(state[CONFIG_KEY])
    newer = dict(state, **{CONFIG_KEY: encode_json(dict(blob, format_version=99))})
    with pytest.raises(ModelFormatError, match="newer than this library understands"):
        PatchCoreModule().load_state_dict(newer)
    wrong_bank = dict(state, memory_bank=torch.zeros(4, 7))
    with pytest.raises(ModelFormatError, match=r"must have shape \[M > 0, 48\], got \[4, 7\]"):
        PatchCoreModule().load_state_dict(wrong_bank)


def test_config_blob_round_trips_nested_configuration():
    config = small_config(layers=("layer1", "layer2"), distance="l2")
    blob = decode_json(encode_json(config_blob(config)))
    assert blob["format"] == "patchcore-challenge-module"
    restored = PatchCoreModule()
    restored._configure(config)
    assert restored.config == config


def test_empty_module_and_bad_inputs_give_clear_errors(small_model):
    with pytest.raises(ModelFormatError, match="holds no model"):
        PatchCoreModule()(torch.rand(1, 3, 64, 64))
    module = PatchCoreModule.from_patchcore(small_model)
    with pytest.raises(ValueError, match=r"expects float RGB images \[B, 3, H, W\]"):
        module(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_any_input_size_gives_a_map_of_that_size(small_model):
    outputs = PatchCoreModule.from_patchcore(small_model)(torch.rand(1, 3, 100, 150))
    assert outputs["anomaly_maps"].shape == (1, 100, 150)
    assert torch.isfinite(outputs["anomaly_maps"]).all()


@pytest.mark.parametrize("size", [(256, 256), (200, 300), (301, 199), (257, 255)])
@pytest.mark.parametrize("crop", [80, 81])
def test_crop_geometry_follows_torchvision(size, crop):
    resize = 96
    image = torch.arange(size[0] * size[1], dtype=torch.float32).reshape(1, *size)
    resized = TF.resize(image, [resize], antialias=True)
    assert tuple(resized.shape[-2:]) == resized_size(size, resize)
    positions = torch.arange(resized[0].numel()).reshape(resized.shape[-2:])
    corner = TF.center_crop(positions[None], [crop])[0, 0, 0]
    assert (int(corner) // resized.shape[-1], int(corner) % resized.shape[-1]) == crop_offsets(
        resized.shape[-2:], crop
    )


def test_uncrop_is_the_identity_on_the_crop_region_without_resizing():
    maps = torch.rand(2, 80, 80)
    full = map_to_input_frame(maps, (96, 96), PreprocessingConfig(resize=96, imagesize=80))
    torch.testing.assert_close(full[:, 8:88, 8:88], maps)
    torch.testing.assert_close(map_to_input_frame(maps, (80, 80), PreprocessingConfig(80, 80)), maps)


def test_efficientnet_lite0_model_round_trips(tmp_path):
    config = small_config(
        backbone_name="efficientnet_lite0", layers=("_blocks.4", "_blocks.10"), pretrained=True
    )
    model = PatchCore(config, search=SearchConfig(backend="torch"))
    model.fit([torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))])
    module = PatchCoreModule.from_patchcore(model)
    torch.save(module.state_dict(), tmp_path / "lite.pth")
    restored = PatchCoreModule()
    restored.load_state_dict(torch.load(tmp_path / "lite.pth"))
    images = torch.rand(1, 3, 72, 72)
    assert torch.equal(restored(images)["anomaly_map"], module(images)["anomaly_map"])
    torch.testing.assert_close(restored.embedder.extractor.mean, torch.full((1, 3, 1, 1), 0.5))
    assert "efficientnet-lite-pytorch" in requirements_text([config])
    assert "efficientnet" not in requirements_text([small_config()])


@pytest.fixture(scope="module")
def run_folder(synthetic_root, small_model, tmp_path_factory) -> Path:
    """A training run's folder layout with two saved category models."""
    run = tmp_path_factory.mktemp("run")
    save_models(run / "models" / "mvtec_texture", [small_model])
    save_models(run / "models" / "mvtec_object", [fit_small_model(synthetic_root, "object")])
    return run


def test_export_writes_one_weights_file_per_category(run_folder, tmp_path):
    written = export_challenge_models([run_folder], tmp_path / "weights", also_pt=True)
    names = sorted(path.name for path in written)
    assert names == ["object.pt", "object.pth", "requirements.txt", "texture.pt", "texture.pth"]
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == names  # no temporaries
    requirements = (tmp_path / "weights" / "requirements.txt").read_text().splitlines()
    assert {"torch>=2.1", "torchvision>=0.16"} <= set(requirements)
    restored = PatchCoreModule()
    restored.load_state_dict(torch.load(tmp_path / "weights" / "texture.pth"))
    saved = load_models(run_folder / "models" / "mvtec_texture", search=SearchConfig("torch"))[0]
    images = torch.rand(1, 3, 256, 256)
    expected = PatchCoreModule.from_patchcore(saved)(images)
    assert torch.equal(restored(images)["pred_score"], expected["pred_score"])


def test_export_command_line_takes_model_folders(run_folder, tmp_path):
    outcome = CliRunner().invoke(
        export_cli, [str(run_folder / "models" / "mvtec_object"), "-o", str(tmp_path)]
    )
    assert outcome.exit_code == 0, outcome.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["object.pth", "requirements.txt"]


def test_export_refuses_ensembles_and_folders_without_models(small_model, tmp_path):
    save_models(tmp_path / "models" / "mvtec_pair", [small_model, small_model])
    outcome = CliRunner().invoke(export_cli, [str(tmp_path), "-o", str(tmp_path / "out")])
    assert outcome.exit_code == 1
    assert "an ensemble of 2 models cannot be exported" in outcome.output
    assert "combined normal-image scale" in outcome.output and "patchcore-predict" in outcome.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="no model folders found"):
        export_challenge_models([tmp_path / "empty"], tmp_path / "out")


def test_duplicate_categories_are_refused(run_folder, tmp_path):
    with pytest.raises(ConfigurationError, match="are both category 'texture'"):
        export_challenge_models(
            [run_folder / "models" / "mvtec_texture", run_folder], tmp_path / "out"
        )


def test_category_names_drop_the_dataset_prefix():
    assert category_name(Path("runs/models/mvtec_metal_nut")) == "metal_nut"
    assert category_name(Path("folder_tiles")) == "tiles"
    assert category_name(Path("my_parts")) == "my_parts"


def run_script_help(script: str, monkeypatch, capsys) -> str:
    """Runs bin/<script> --help in this process (no second interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "bin" / script), run_name="__main__")
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_export_script_is_a_thin_entry_point(monkeypatch, capsys):
    assert "SOURCES" in run_script_help("export_challenge_models.py", monkeypatch, capsys)


@pytest.mark.parametrize("tile", [None, 48])
def test_module_and_estimator_share_one_scorer_bit_for_bit(tile):
    preprocessing = PreprocessingConfig(resize=64, imagesize=64, tile=tile, tile_overlap=0.25)
    config = small_config(preprocessing=preprocessing, num_nn=2, distance="l2")
    model = PatchCore(config, search=SearchConfig(backend="torch"))
    # 8-bit pixels, as decoded files hold: the module reads its input as such
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(7)) / 255
    model.fit([images[:2]])
    expected = model.predict(images)
    outputs = PatchCoreModule.from_patchcore(model)(images)  # resize and crop are identities
    assert torch.equal(outputs["pred_score"], expected.scores)
    assert torch.equal(outputs["anomaly_map"], expected.maps)
