"""Challenge-style evaluation of exported modules, with and without seeded drift."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from patchcore.apps.challenge import (
    ChallengeOptions,
    DriftParameters,
    apply_drift,
    drift_generator,
    load_module_class,
    load_test_pair,
    run_challenge,
    sample_drift,
)
from patchcore.apps.export import export_challenge_models
from patchcore.cli.challenge import challenge_cli
from patchcore.data.datasets import list_samples
from patchcore.errors import ConfigurationError
from patchcore.evaluation.reporting import read_results_csv
from patchcore.model.module import PatchCoreModule
from patchcore.model.serialization import save_models
from test_deploy import REPO, fit_small_model, run_script_help

MODULE_FILE = REPO / "src" / "patchcore" / "model" / "module.py"
NO_CHANGE = DriftParameters(
    horizontal_flip=False, vertical_flip=False, angle=0.0, brightness=1.0, contrast=1.0,
    saturation=1.0, hue=0.0, colour_order=(0, 1, 2, 3), blur_sigma=0.1,
)  # fmt: skip
COLUMNS = ["instance_auroc", "full_pixel_auroc", "instance_f1max", "pixel_f1max"]


@pytest.fixture(scope="module")
def weights(synthetic_root, tmp_path_factory) -> Path:
    """Exported <category>.pth files of small models trained on both synthetic categories."""
    run = tmp_path_factory.mktemp("challenge_run")
    for category in ("texture", "object"):
        model = fit_small_model(synthetic_root, category)
        save_models(run / "models" / f"mvtec_{category}", [model])
    export_challenge_models([run], run / "weights")
    return run / "weights"


def options(weights: Path, root: Path, output: Path, **changes) -> ChallengeOptions:
    fields = {
        "module_path": "patchcore.model.module",
        "class_name": "PatchCoreModule",
        "weights_path": weights,
        "dataset_path": root,
        "categories": ("texture",),
        "seed": 42,
        "drift": True,
        "output": output,
        "device": torch.device("cpu"),
    }
    fields.update(changes)
    return ChallengeOptions(**fields)


def test_command_line_writes_rows_per_category_and_the_mean(weights, synthetic_root, tmp_path):
    output = tmp_path / "challenge.csv"
    outcome = CliRunner().invoke(challenge_cli, [
        "--module_path", str(MODULE_FILE), "--class_name", "PatchCoreModule",
        "--weights_path", str(weights), "--dataset_path", str(synthetic_root),
        "--output", str(output), "--device", "cpu",
    ])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    rows = read_results_csv(output)
    assert list(rows) == ["object", "texture", "Mean"]
    assert list(rows["texture"]) == COLUMNS
    assert all(0.0 <= value <= 1.0 for row in rows.values() for value in row.values())
    assert rows["texture"]["instance_auroc"] >= 0.7  # random-weight backbone, visible defects
    assert "image AUROC" in outcome.output and "pixel F1max" in outcome.output
    assert [p.name for p in tmp_path.iterdir()] == ["challenge.csv"]  # written atomically


def test_same_seed_gives_the_same_numbers_and_drift_changes_them(weights, synthetic_root, tmp_path):
    def evaluate(**changes) -> dict:
        return run_challenge(options(weights, synthetic_root, tmp_path / "r.csv", **changes))

    first = evaluate()
    assert evaluate() == first
    assert evaluate(drift=False) != first  # other seeds: test_drift_parameters_depend_only_...


def test_drift_moves_the_mask_with_the_image():
    image = torch.zeros(3, 256, 256)
    image[:, 40:80, 150:210] = 1.0
    mask = (image[:1] > 0.5).float()
    for parameters in (
        replace(NO_CHANGE, horizontal_flip=True),
        replace(NO_CHANGE, vertical_flip=True),
    ):
        moved_image, moved_mask = apply_drift(image, mask, parameters)
        assert torch.equal(moved_mask[0] > 0.5, moved_image.mean(dim=0) > 0.5)
        assert not torch.equal(moved_mask, mask)
    rotated = replace(NO_CHANGE, angle=17.0, horizontal_flip=True)
    moved_image, moved_mask = apply_drift(image, mask, rotated)
    in_image, in_mask = moved_image.mean(dim=0) > 0.5, moved_mask[0] > 0.5
    overlap = (in_image & in_mask).sum() / (in_image | in_mask).sum()
    assert overlap > 0.95
    assert set(moved_mask.unique().tolist()) <= {0.0, 1.0}  # nearest: still binary


def test_colour_and_blur_change_the_image_only():
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(1, 64, 64) > 0.5).float()
    jittered = replace(NO_CHANGE, brightness=1.1, hue=0.05, blur_sigma=1.5)
    new_image, new_mask = apply_drift(image, mask, jittered)
    assert torch.equal(new_mask, mask)
    assert not torch.allclose(new_image, image, atol=1e-3)
    assert new_image.min() >= 0.0 and new_image.max() <= 1.0


def test_drift_parameters_depend_only_on_seed_and_index():
    draws = [sample_drift(drift_generator(42, index)) for index in range(40)]
    assert draws[3] == sample_drift(drift_generator(42, 3))
    assert draws[3] != sample_drift(drift_generator(43, 3))
    assert len(set(draws)) == len(draws)
    assert all(-20.0 <= d.angle <= 20.0 and 0.1 <= d.blur_sigma <= 2.0 for d in draws)
    assert all(0.9 <= d.brightness <= 1.1 and -0.1 <= d.hue <= 0.1 for d in draws)
    assert {d.horizontal_flip for d in draws} == {True, False}
    assert all(sorted(d.colour_order) == [0, 1, 2, 3] for d in draws)


def test_test_images_are_256_pixels_with_binary_masks(synthetic_root):
    sample = next(s for s in list_samples(synthetic_root, "object", "test") if s.is_anomaly)
    image, mask = load_test_pair(sample)
    assert image.shape == (3, 256, 256) and image.dtype == torch.float32
    assert mask.shape == (1, 256, 256) and set(mask.unique().tolist()) == {0.0, 1.0}


def test_class_loads_from_a_file_or_a_module_name():
    assert load_module_class("patchcore.model.module", "PatchCoreModule") is PatchCoreModule
    from_file = load_module_class(str(MODULE_FILE), "PatchCoreModule")
    assert from_file.__name__ == "PatchCoreModule" and callable(from_file)
    with pytest.raises(ConfigurationError, match="--class_name Nope: no such class"):
        load_module_class("patchcore.model.module", "Nope")
    with pytest.raises(ConfigurationError, match="--module_path missing.py: file does not exist"):
        load_module_class("missing.py", "PatchCoreModule")


def test_bad_arguments_give_one_line_errors(weights, synthetic_root, tmp_path):
    base = ["--weights_path", str(weights), "--dataset_path", str(synthetic_root),
            "--output", str(tmp_path / "r.csv"), "--device", "cpu"]  # fmt: skip
    outcome = CliRunner().invoke(challenge_cli, [*base, "--category", "carpet"])
    assert outcome.exit_code == 1
    assert f"Error: --category carpet: no carpet.pth in {weights}" in outcome.output
    outcome = CliRunner().invoke(challenge_cli, [*base, "--module_path", "no_such_module_xyz"])
    assert outcome.exit_code == 1 and "neither a Python file nor an importable" in outcome.output


def test_unloadable_weights_name_the_file(weights, synthetic_root, tmp_path):
    (tmp_path / "texture.pth").write_bytes(b"not a weights file")
    outcome = CliRunner().invoke(challenge_cli, [
        "--weights_path", str(tmp_path), "--dataset_path", str(synthetic_root),
        "--output", str(tmp_path / "r.csv"), "--device", "cpu",
    ])  # fmt: skip
    assert outcome.exit_code == 1
    assert f"Error: {tmp_path / 'texture.pth'}: cannot read weights" in outcome.output


def test_challenge_script_is_a_thin_entry_point(monkeypatch, capsys):
    assert "--weights_path" in run_script_help("evaluate_challenge.py", monkeypatch, capsys)


def test_each_image_is_prepared_once_single_threaded_and_the_weights_load_once(
    weights, synthetic_root, tmp_path, monkeypatch
):
    """The evaluator's per-image cost stays near evaluate's (docs/how-to/challenge-format.md, bench/bench_challenge.py):
    one weights load per category, one decode per image, the image preparation on one torch
    thread (the model keeps the caller's), and one sort of the pixels for the metrics."""
    from patchcore.apps import challenge
    from patchcore.evaluation import metrics

    calls = {"load": 0, "decode": [], "threads": [], "sorts": 0}
    original_load, original_pair = torch.load, challenge.fixed_size_pair
    original_sort = metrics._sort_packed

    def counting_load(*arguments, **keywords):
        calls["load"] += 1
        return original_load(*arguments, **keywords)

    def counting_pair(image_path, *arguments):
        calls["decode"].append(image_path)
        calls["threads"].append(torch.get_num_threads())
        return original_pair(image_path, *arguments)

    def counting_sort(*arguments, **keywords):
        calls["sorts"] += 1
        return original_sort(*arguments, **keywords)

    monkeypatch.setattr(challenge.torch, "load", counting_load)
    monkeypatch.setattr(challenge, "fixed_size_pair", counting_pair)
    monkeypatch.setattr(metrics, "_sort_packed", counting_sort)
    threads = torch.get_num_threads()
    first = run_challenge(options(weights, synthetic_root, tmp_path / "r.csv"))
    samples = list_samples(synthetic_root, "texture", "test", masks_required=True)
    assert calls["load"] == 1
    assert sorted(calls["decode"]) == sorted(s.image_path for s in samples)  # once each
    assert set(calls["threads"]) == {1} and torch.get_num_threads() == threads
    assert calls["sorts"] == 2  # the image scores once, the pixels once (was 4: one per metric)
    # The same numbers as each metric computed on its own.
    monkeypatch.undo()
    model = challenge.load_submission(
        PatchCoreModule, weights / "texture.pth", torch.device("cpu")
    )
    scores, labels, maps, masks = challenge.predict_category(
        model, samples, options(weights, synthetic_root, tmp_path / "r.csv"), "texture"
    )
    assert first["texture"] == {
        "instance_auroc": metrics.instance_auroc(scores, labels),
        "full_pixel_auroc": metrics.full_pixel_auroc(maps, masks),
        "instance_f1max": metrics.instance_f1max(scores, labels),
        "pixel_f1max": metrics.pixel_f1max(maps, masks),
    }


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.37, 2.0])
def test_the_separable_blur_equals_torchvisions_two_dimensional_one(sigma):
    """The drift's blur in two 1-d passes gives torchvision's 2-d kernel's image to float
    rounding (bench/bench_challenge.py: it halves the blur's cost)."""
    from torchvision.transforms.v2 import functional as TF

    from patchcore.apps.challenge import separable_blur

    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(3))
    size = replace(NO_CHANGE, blur_sigma=sigma).blur_kernel_size
    expected = TF.gaussian_blur(image, [size, size], [sigma, sigma])
    torch.testing.assert_close(separable_blur(image, size, sigma), expected, rtol=0, atol=2e-6)


def test_a_grey_image_skips_the_hue_shift_with_the_same_result():
    """The drift's colour jitter on a grayscale picture equals torchvision's own, hue shift
    included, bit for bit (the shift is skipped there: it returns a grey image unchanged)."""
    from torchvision.transforms.v2 import functional as TF

    from patchcore.apps import challenge

    generator = torch.Generator().manual_seed(5)
    for index in range(6):
        grey = torch.rand(1, 48, 40, generator=generator).expand(3, -1, -1).clone()
        parameters = sample_drift(drift_generator(7, index))
        expected = grey
        for position in parameters.colour_order:
            name = challenge.COLOUR_ADJUSTMENTS[position]
            expected = getattr(TF, f"adjust_{name}")(expected, getattr(parameters, name))
        assert challenge.is_grey(grey) and challenge.is_grey(expected)
        assert torch.equal(challenge._colour(grey, parameters), expected)
    colour = torch.rand(3, 48, 40, generator=generator)
    assert not challenge.is_grey(colour)
