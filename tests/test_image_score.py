"""The image-score option (`--image_score`, `PatchCoreConfig.image_score`): a high quantile or
the mean of the k largest patch scores instead of the largest (docs/how-to/wide-parts.md).

Scores are checked against numpy over the patch-score maps the model returns; the default
stays the largest patch score; the choice travels with saved, exported and older models.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import small_config
from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.errors import ConfigurationError
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import image_score_rule, image_scores_of

QUANTILE = dataclasses.replace(PatchCoreConfig(), image_score="quantile", image_score_quantile=0.9)
TOP_K = dataclasses.replace(PatchCoreConfig(), image_score="top_k_mean", image_score_top_k=5)


def numpy_rule(patch_scores, config: PatchCoreConfig) -> np.ndarray:
    """The rule computed independently, per image, in float64."""
    values = [np.asarray(single, dtype=np.float64).ravel() for single in patch_scores]
    if config.image_score == "quantile":
        return np.array([np.quantile(v, config.image_score_quantile) for v in values])
    if config.image_score == "top_k_mean":
        return np.array([np.sort(v)[::-1][: config.image_score_top_k].mean() for v in values])
    return np.array([v.max() for v in values])


@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 1, 1), (1, 28, 28), (4, 2, 3)])
@pytest.mark.parametrize("quantile", [0.01, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_the_quantile_equals_numpys_over_the_patch_scores(shape, quantile):
    patch_scores = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 100
    config = dataclasses.replace(QUANTILE, image_score_quantile=quantile)
    np.testing.assert_allclose(image_scores_of(patch_scores, config).double().numpy(),
                               numpy_rule(patch_scores, config), rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("k", [1, 5, 63, 500])
def test_the_top_k_mean_equals_numpys_and_max_is_the_largest(k):
    patch_scores = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(2))
    config = dataclasses.replace(TOP_K, image_score_top_k=k)
    np.testing.assert_allclose(image_scores_of(patch_scores, config).double().numpy(),
                               numpy_rule(patch_scores, config), rtol=1e-6)  # fmt: skip
    assert torch.equal(image_scores_of(patch_scores, PatchCoreConfig()),
                       patch_scores.flatten(1).max(dim=1).values)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_score": "median"}, "--image_score must be one of max, quantile, top_k_mean"),
        ({"image_score_quantile": 0.0}, r"--image_score_quantile must be a number in \(0, 1\]"),
        ({"image_score_quantile": float("nan")}, "--image_score_quantile must be"),
        ({"image_score_top_k": 0}, "--image_score_top_k must be an integer >= 1"),
        ({"image_score": "quantile", "score_reweighting": True}, "--score_reweighting"),
    ],
)
def test_bad_values_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigurationError, match=message) as raised:
        PatchCoreConfig(**changes)
    assert "\n" not in str(raised.value)


def test_the_training_command_refuses_bad_values_in_one_line(tmp_path):
    from patchcore.cli.runs import train_cli

    common = ["patch_core", "-b", "resnet18", "sampler", "identity", "dataset", "-d", "x",
              "mvtec", str(tmp_path)]  # fmt: skip
    for options, message in [
        (["--image_score", "quantile", "--image_score_quantile", "1.5"],
         "--image_score_quantile must be a number in (0, 1], got 1.5"),
        (["--image_score_top_k", "3"], "--image_score_top_k needs --image_score top_k_mean"),
        (["--image_score", "median"], "'median' is not one of 'max', 'quantile', 'top_k_mean'"),
    ]:  # fmt: skip
        outcome = CliRunner().invoke(train_cli, [str(tmp_path / "r"), *common[:3], *options,
                                                *common[3:]])  # fmt: skip
        assert outcome.exit_code == 2
        assert message in outcome.output
        assert len([line for line in outcome.output.splitlines() if line.startswith("Error")]) == 1


# ------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def fitted(config: PatchCoreConfig, images: torch.Tensor) -> PatchCore:
    model = PatchCore(config, search=SearchConfig(backend="torch"))
    model.fit([images[:2], images[2:3]])
    return model


@pytest.fixture(scope="module")
def quantile_model(images) -> PatchCore:
    config = small_config(sampler=SamplerConfig(name="identity"), image_score="quantile",
                          image_score_quantile=0.95)  # fmt: skip
    return fitted(config, images)


def test_model_scores_are_the_rule_over_its_patch_maps_and_max_stays_the_default(
    quantile_model, images
):
    prediction = quantile_model.predict(images)
    np.testing.assert_allclose(prediction.scores.double().numpy(),
                               numpy_rule(prediction.patch_scores, quantile_model.config),
                               rtol=1e-6)  # fmt: skip
    default = PatchCore(dataclasses.replace(quantile_model.config, image_score="max"),
                        search=SearchConfig(backend="torch"))  # fmt: skip
    default.set_memory_bank(quantile_model.memory_bank)
    plain = default.predict(images)
    assert torch.equal(plain.patch_scores, prediction.patch_scores)
    assert torch.equal(plain.scores, plain.patch_scores.flatten(1).amax(dim=1))
    assert prediction.scores[3] < plain.scores[3]  # an unseen image: below its maximum


def test_tiled_models_apply_the_rule_to_the_stitched_patch_grid(images):
    config = small_config(preprocessing=PreprocessingConfig(crop="none", resize=64, tile=32),
                          sampler=SamplerConfig(name="identity"), image_score="top_k_mean",
                          image_score_top_k=3)  # fmt: skip
    prediction = fitted(config, images).predict(images)
    np.testing.assert_allclose(prediction.scores.double().numpy(),
                               numpy_rule(prediction.patch_scores, config), rtol=1e-6)  # fmt: skip


def test_leave_one_out_calibration_thresholds_the_rules_scores(quantile_model, images):
    model = fitted(quantile_model.config, images)
    prediction = model.calibrate_leave_one_out([images[:2], images[2:3]], quantile=0.5)
    rule = numpy_rule(prediction.patch_scores, model.config)
    np.testing.assert_allclose(prediction.scores.double().numpy(), rule, rtol=1e-6)
    assert model.normal_statistics.threshold == pytest.approx(np.quantile(rule, 0.5), rel=1e-6)


def test_saved_models_record_the_rule_and_older_ones_load_as_max(quantile_model, images, tmp_path):
    from patchcore.apps.model_card import TrainingImages, model_card
    from patchcore.model.serialization import META_FILE, load_model, save_models

    save_models(tmp_path / "quantile", [quantile_model])
    meta = json.loads((tmp_path / "quantile" / META_FILE).read_text())
    assert meta["format_version"] == 7
    assert (meta["config"]["image_score"], meta["config"]["image_score_quantile"]) == ("quantile", 0.95)
    loaded = load_model(tmp_path / "quantile")
    assert loaded.config == quantile_model.config
    assert torch.equal(loaded.predict(images).scores, quantile_model.predict(images).scores)
    # the default is written as before, without the fields, in the older version
    default = dataclasses.replace(quantile_model.config, image_score="max")
    plain = PatchCore(default)
    plain.set_memory_bank(quantile_model.memory_bank)
    save_models(tmp_path / "max", [plain])
    plain_meta = json.loads((tmp_path / "max" / META_FILE).read_text())
    assert plain_meta["format_version"] == 6 and "image_score" not in plain_meta["config"]
    # an older folder (no field) scores by the largest patch score
    old = {**meta, "format_version": 6, "config": dict(meta["config"])}
    for name in ("image_score", "image_score_quantile", "image_score_top_k"):
        del old["config"][name]
    (tmp_path / "quantile" / META_FILE).write_text(json.dumps(old))
    older = load_model(tmp_path / "quantile")
    assert older.config.image_score == "max"
    prediction = older.predict(images)
    assert torch.equal(prediction.scores, prediction.patch_scores.flatten(1).amax(dim=1))
    card = model_card("x", [quantile_model], None, TrainingImages("/", ("/a.png",)))
    assert f"- image score: {image_score_rule(quantile_model.config)}" in card
    assert "0.95 quantile of the patch scores" in card


def test_the_exported_module_and_graphs_score_with_the_rule(quantile_model, images, tmp_path):
    from patchcore.apps.export import ExportOptions, export_model
    from patchcore.apps.runtimes import ExportRecord, open_exported
    from patchcore.data.preprocessing import to_model_input
    from patchcore.model.module import PatchCoreModule, config_blob

    inputs = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))  # unseen
    prediction = quantile_model.predict(to_model_input(inputs, quantile_model.config.preprocessing))
    expected = prediction.scores
    np.testing.assert_allclose(expected.double().numpy(),
                               numpy_rule(prediction.patch_scores, quantile_model.config),
                               rtol=1e-6)  # fmt: skip
    module = PatchCoreModule.from_patchcore(quantile_model)
    assert config_blob(quantile_model.config)["format_version"] == 5
    assert config_blob(dataclasses.replace(quantile_model.config, image_score="max"))[
        "format_version"] == 4  # fmt: skip
    restored = PatchCoreModule()
    restored.load_state_dict(module.state_dict())
    assert restored.config == quantile_model.config
    torch.testing.assert_close(restored(inputs)["pred_score"], expected, rtol=1e-5, atol=0)
    record = ExportRecord(quantile_model.config, (64, 64), None, None, 10, 10, 18, "fp32", "x")
    assert json.loads(record.to_json())["format_version"] == 4
    formats = ["torch"] + ["onnx"] * (importlib.util.find_spec("onnxruntime") is not None)
    options = ExportOptions(tuple(formats), (64, 64), bank_chunk_size=50)
    export_model(quantile_model, tmp_path, tmp_path, "q", options)
    runs = [("q.pth", "torch"), ("q.onnx", "onnxruntime")]
    runs += [("q.onnx", "openvino")] * (importlib.util.find_spec("openvino") is not None)
    for name, runtime in runs:
        if (tmp_path / name).is_file():
            exported = open_exported(tmp_path / name, runtime)
            assert exported.config.image_score == "quantile"
            np.testing.assert_allclose(exported.predict(inputs).scores, expected.numpy(),
                                       rtol=1e-4)  # fmt: skip


def test_synthetic_wide_parts_are_panels_with_an_exact_mask(tmp_path):
    from patchcore.data.synthetic import SyntheticSpec, generate_category, make_sample, sample_rng

    one = make_sample("texture", "stain", 64, sample_rng(0, "texture", 3, 0))
    same = make_sample("texture", "stain", 64, sample_rng(0, "texture", 3, 0), panels=1)
    assert np.array_equal(one.image, same.image)
    wide = make_sample("texture", "hole", 64, sample_rng(0, "texture", 4, 1), panels=3)
    assert wide.image.shape == (64, 192, 3) and wide.mask.shape == (64, 192)
    assert np.array_equal(wide.mask, np.any(wide.image != wide.clean, axis=-1))
    columns = np.nonzero(wide.mask.any(axis=0))[0]
    assert wide.mask.any() and columns.max() // 64 == columns.min() // 64  # one panel only
    with pytest.raises(ConfigurationError, match="panels must be an integer >= 1"):
        generate_category(tmp_path, "texture", SyntheticSpec(panels=0))


def test_training_records_the_rule_and_evaluation_scores_with_it(synthetic_root, tmp_path):
    """patchcore-train --image_score: the saved model, its card and patchcore-evaluate's
    records carry the rule; the evaluated scores are the rule over the records' patch maps."""
    from patchcore.cli.runs import evaluate_cli
    from patchcore.evaluation.records import read_predictions
    from patchcore.model.serialization import load_models
    from test_cli import SMALL_RANDOM, run, train

    rule = ["--image_score", "top_k_mean", "--image_score_top_k", "4"]
    outcome = train(tmp_path / "r", synthetic_root, [*SMALL_RANDOM, *rule],
                    ["--save_patchcore_model"])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    folder = tmp_path / "r" / "project" / "group" / "models" / "mvtec_texture"
    (model,) = load_models(folder)
    assert (model.config.image_score, model.config.image_score_top_k) == ("top_k_mean", 4)
    assert "mean of the 4 largest patch scores" in (folder / "MODEL_CARD.md").read_text()
    outcome = run(evaluate_cli, ["--gpu", "-1", "--save_predictions", tmp_path / "e",
                                 "patch_core_loader", "-p", folder,
                                 "dataset", "--num_workers", "0", "-d", "texture", "mvtec",
                                 synthetic_root])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    predictions = read_predictions(tmp_path / "e" / "predictions" / "mvtec_texture")
    np.testing.assert_allclose(predictions.scores, numpy_rule(predictions.patch_scores, model.config),
                               rtol=1e-6)  # fmt: skip


def test_the_dashboard_says_which_rule_scored_the_image():
    from patchcore.apps.dashboard.data import _relation

    note = _relation(2.0, 1.5, 1, TOP_K)
    assert note.startswith("The image score is the mean of the 5 largest patch scores")
    assert _relation(2.0, 2.0, 1, PatchCoreConfig()) == "This patch's score is the image score."
