"""Updating a saved model with new good images: coreset continuation, limits, recalibration,
atomic replacement, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import small_config
from patchcore.cli.update import update_cli
from patchcore.config import SamplerConfig, SearchConfig
from patchcore.data.datasets import ImageDataset, Sample, list_samples
from patchcore.model.patchcore import PatchCore
from patchcore.model.samplers import select_farthest_points
from patchcore.model.serialization import INDEX_FILE, load_models, save_models
from patchcore.model.update import UpdateLimits, nearest_squared_distances


def fitted_model(root: Path) -> PatchCore:
    model = PatchCore(small_config())
    dataset = ImageDataset(list_samples(root, "texture", "train"), model.config.preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6)
    model.fit(loader)
    model.calibrate(loader)
    return model


def scores_of(model: PatchCore, paths: list[Path]) -> torch.Tensor:
    samples = [Sample(path, None, "good", False) for path in paths]
    dataset = ImageDataset(samples, model.config.preprocessing)
    return model.predict(torch.stack([item["image"] for item in dataset])).scores


@pytest.fixture(scope="module")
def saved(synthetic_root, tmp_path_factory):
    """A calibrated model folder and its most anomalous defective test image."""
    model = fitted_model(synthetic_root)
    folder = tmp_path_factory.mktemp("update") / "model"
    save_models(folder, [model])
    defective = sorted(p for p in (synthetic_root / "texture" / "test").glob("*/*.png")
                       if p.parent.name != "good")  # fmt: skip
    scores = scores_of(model, defective)
    worst = defective[int(scores.argmax())]
    return folder, worst, model


def update(*arguments) -> tuple[int, str]:
    outcome = CliRunner().invoke(
        update_cli, [str(a) for a in (*arguments, "--gpu", "-1", "--num_workers", "0")]
    )
    return outcome.exit_code, outcome.output


def copy_of(folder: Path, destination: Path) -> Path:
    import shutil

    shutil.copytree(folder, destination)
    return destination


def test_an_anomaly_added_as_good_scores_normal_after_the_update(saved, tmp_path):
    folder, worst, original = saved
    model_dir = copy_of(folder, tmp_path / "model")
    threshold = original.normal_statistics.threshold
    before = float(scores_of(load_models(model_dir)[0], [worst])[0])
    assert before > threshold

    code, output = update(model_dir, worst)

    assert code == 0, output
    updated = load_models(model_dir)[0]
    after = float(scores_of(updated, [worst])[0])
    assert after <= threshold < before
    added = len(updated.memory_bank) - len(original.memory_bank)
    assert 0 < added < 64  # some of the image's 8 x 8 patch features, not all of them
    assert torch.equal(updated.memory_bank[: len(original.memory_bank)], original.memory_bank)
    assert updated.normal_statistics == original.normal_statistics  # nothing to recalibrate on
    history = json.loads((model_dir / "update_history.json").read_text())
    assert [entry["members"][0]["added"] for entry in history] == [added]
    assert f"threshold kept at {threshold:.6g}" in output


def naive_continuation(bank: np.ndarray, candidates: np.ndarray, count: int):
    """The farthest-point definition, naively in float64: picks and their distances."""
    chosen, picks, distances = bank, [], []
    for _ in range(count):
        nearest = ((candidates[:, None, :] - chosen[None, :, :]) ** 2).sum(-1).min(axis=1)
        best = int(nearest.argmax())
        picks.append(best)
        distances.append(float(nearest[best]))
        chosen = np.vstack([chosen, candidates[best]])
    return picks, distances


@pytest.fixture
def bank_and_new():
    generator = torch.Generator().manual_seed(5)
    bank, new = torch.randn(40, 6, generator=generator), torch.randn(300, 6, generator=generator)
    new[:30] = bank[:30]  # already in the bank: never picked
    start = nearest_squared_distances(bank, new, torch.device("cpu"), threads=1)
    return bank, new, start


def test_the_continuation_is_the_farthest_point_sequence_against_bank_and_picks(bank_and_new):
    bank, new, start = bank_and_new
    torch.testing.assert_close(start.double(), torch.cdist(new.double(), bank.double()).square().amin(1),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    picks = select_farthest_points(new, start, 150, stop_at=0.0)

    expected, _ = naive_continuation(bank.double().numpy(), new.double().numpy(), 150)
    assert picks.tolist() == expected
    assert min(expected) >= 30
    # Features already in the bank (distance 0) are never picked: 270 of 300 at most.
    assert sorted(select_farthest_points(new, start, 300, stop_at=0.0).tolist()) == list(range(30, 300))


def test_the_continuation_stops_at_the_target_distance(bank_and_new):
    bank, new, start = bank_and_new
    expected, distances = naive_continuation(bank.double().numpy(), new.double().numpy(), 150)
    target = (distances[99] + distances[100]) / 2  # between the 100th and 101st picks
    assert select_farthest_points(new, start, 300, stop_at=target).tolist() == expected[:100]
    assert select_farthest_points(new, start, 70, stop_at=target).tolist() == expected[:70]  # cap
    assert len(select_farthest_points(new, start, 300, stop_at=float(start.max()) + 1)) == 0
    assert len(select_farthest_points(new, start, 0)) == 0


def test_the_lazy_selection_stops_where_the_plain_sweep_stops():
    """Above 8192 rows the CPU selection is the lazy tiled one; continued from a bank and
    stopped at a distance, it picks what the plain sweep picks."""
    from patchcore.model.samplers import farthest_point_selection

    generator = torch.Generator().manual_seed(9)
    bank = torch.randn(50, 16, generator=generator)
    new = torch.randn(9000, 16, generator=generator)
    start = nearest_squared_distances(bank, new, torch.device("cpu"), threads=1)
    plain = farthest_point_selection(new, new.square().sum(dim=1), start.clone(), 2000)
    minimum, distances = start.clone(), []  # each pick's distance when it was picked
    for pick in plain.tolist():
        distances.append(float(minimum[pick]))
        minimum = torch.minimum(minimum, (new - new[pick]).square().sum(dim=1))
    stop_at = (distances[1499] + distances[1500]) / 2
    lazy = select_farthest_points(new, start, 2000, stop_at=stop_at)
    expected = farthest_point_selection(new, new.square().sum(dim=1), start.clone(), 2000,
                                        stop_at=stop_at)  # fmt: skip
    assert lazy.tolist() == expected.tolist() == plain[:1500].tolist()


def test_limits_cap_the_number_of_added_features():
    config = small_config(sampler=SamplerConfig(percentage=0.1))
    assert UpdateLimits().count(config, 1000, 50, has_target=False) == 100
    assert UpdateLimits().count(config, 1000, 50, has_target=True) == 1000
    assert UpdateLimits(percentage=0.5).count(config, 1000, 50, has_target=True) == 500
    assert UpdateLimits(max_bank_size=80).count(config, 1000, 50, has_target=True) == 30
    assert UpdateLimits(max_bank_size=40).count(config, 1000, 50, has_target=False) == 0


def test_output_keeps_the_old_model_and_max_bank_size_caps_the_new_one(saved, tmp_path):
    folder, worst, original = saved
    old_bytes = (folder / INDEX_FILE).read_bytes()
    cap = len(original.memory_bank) + 5
    code, output = update(folder, worst, "--output", tmp_path / "new", "--max_bank_size", cap,
                          "-p", "1.0")  # fmt: skip
    assert code == 0, output
    assert "(bank 192 -> 197)" in output
    assert (folder / INDEX_FILE).read_bytes() == old_bytes
    assert not (folder / "update_history.json").exists()
    assert len(load_models(tmp_path / "new")[0].memory_bank) == cap


def test_a_target_score_of_zero_adds_every_new_feature(saved, tmp_path):
    folder, worst, original = saved
    code, output = update(folder, worst, "--output", tmp_path / "new", "--target_score", "0")
    assert code == 0, output
    updated = load_models(tmp_path / "new")[0]
    assert len(updated.memory_bank) == len(original.memory_bank) + 64
    assert float(scores_of(updated, [worst])[0]) == 0.0


def test_normal_images_recalibrate_the_threshold(saved, synthetic_root, tmp_path):
    folder, worst, original = saved
    good = synthetic_root / "texture" / "test" / "good"
    code, output = update(folder, worst, "--output", tmp_path / "new", "--normal_images", good,
                          "--threshold_quantile", "0.5")  # fmt: skip
    assert code == 0, output
    updated = load_models(tmp_path / "new")[0]
    scores = scores_of(updated, sorted(good.glob("*.png")))
    statistics = updated.normal_statistics
    assert statistics.num_images == len(scores)
    assert statistics.threshold == pytest.approx(float(torch.quantile(scores.double(), 0.5)))
    assert statistics.threshold != original.normal_statistics.threshold
    assert "recalibrated on" in output


def test_a_memory_mapped_bank_updates_to_the_same_model(saved, tmp_path):
    folder, worst, _ = saved
    assert update(folder, worst, "--output", tmp_path / "memory")[0] == 0
    code, output = update(folder, worst, "--output", tmp_path / "mmap", "--bank_storage", "mmap")
    assert code == 0, output
    assert (tmp_path / "memory" / INDEX_FILE).read_bytes() == (tmp_path / "mmap" / INDEX_FILE).read_bytes()
    mapped = load_models(tmp_path / "mmap", search=SearchConfig(bank_storage="mmap"))[0]
    in_memory = load_models(tmp_path / "memory")[0]
    assert torch.equal(scores_of(mapped, [worst]), scores_of(in_memory, [worst]))


def test_a_failed_update_leaves_the_model_as_it_was(saved, tmp_path, monkeypatch):
    folder, worst, _ = saved
    model_dir = copy_of(folder, tmp_path / "model")
    files = {path.name: path.read_bytes() for path in model_dir.iterdir()}

    def broken(*_arguments):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("patchcore.model.serialization.write_memory_bank", broken)
    code, output = update(model_dir, worst)
    assert code == 1 and "No space left on device" in output
    assert len(output.strip().splitlines()) == 1 and output.startswith("Error: ")
    assert {path.name: path.read_bytes() for path in model_dir.iterdir()} == files
    assert sorted(path.name for path in tmp_path.iterdir()) == [".model.lock", "model"]  # no staging


def test_bad_input_gets_one_line_errors(saved, tmp_path):
    folder, worst, _ = saved
    (tmp_path / "not_a_model").mkdir()
    code, output = update(tmp_path / "not_a_model", worst)
    assert code == 1
    assert output.strip().splitlines() == [
        f"Error: {tmp_path / 'not_a_model'}: no patchcore_params.pkl found; is this a model folder?"
    ]
    code, output = update(folder, tmp_path / "missing.png")
    assert code == 1 and "no such file or folder" in output and len(output.strip().splitlines()) == 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    code, output = update(folder, broken)
    assert code == 1 and str(broken) in output and len(output.strip().splitlines()) == 1
    code, output = update(folder, worst, "--percentage", "2")
    assert code == 2 and "--percentage must be in (0, 1]" in output
    code, output = update(folder, worst, "--target_score", "-1")
    assert code == 2 and "--target_score must be a finite number >= 0, got -1.0" in output


def test_an_ensemble_updates_every_member_and_keeps_or_recalibrates_its_combined_scale(
    synthetic_root, tmp_path
):
    from patchcore.evaluation.ensemble import calibrate_ensemble
    from patchcore.model.serialization import load_ensemble_statistics

    dataset = ImageDataset(list_samples(synthetic_root, "texture", "train"),
                           small_config().preprocessing)  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=6)
    members = [PatchCore(small_config(seed=seed)) for seed in (0, 1)]
    predictions = []
    for member in members:
        member.fit(loader)
        predictions.append(member.calibrate(loader))
    saved = calibrate_ensemble(members, predictions)
    save_models(tmp_path / "ensemble", members, saved)
    new_image = max((synthetic_root / "texture" / "test").glob("*/*.png"))

    code, output = update(tmp_path / "ensemble", new_image, "--output", tmp_path / "kept",
                          "--target_score", "0")  # every new feature joins every member
    assert code == 0, output
    updated = load_models(tmp_path / "kept")
    assert [len(u.memory_bank) for u in updated] == [len(m.memory_bank) + 64 for m in members]
    assert load_ensemble_statistics(tmp_path / "kept") == saved
    assert f"threshold kept at {saved.threshold:.6g}" in output

    good = synthetic_root / "texture" / "test" / "good"
    code, output = update(tmp_path / "ensemble", new_image, "--output", tmp_path / "recalibrated",
                          "--normal_images", good)  # fmt: skip
    assert code == 0, output
    updated = load_models(tmp_path / "recalibrated")
    normal = ImageDataset([Sample(p, None, "good", False) for p in sorted(good.glob("*.png"))],
                          small_config().preprocessing)  # fmt: skip
    normal_loader = torch.utils.data.DataLoader(normal, batch_size=6)
    expected = calibrate_ensemble(updated, [m.predict_batches(normal_loader) for m in updated])
    recalibrated = load_ensemble_statistics(tmp_path / "recalibrated")
    assert recalibrated.threshold == pytest.approx(expected.threshold, rel=1e-6)
    assert recalibrated.num_images == len(normal) and recalibrated != saved


def test_the_model_card_goes_with_the_update(saved, tmp_path):
    folder, worst, original = saved
    source = copy_of(folder, tmp_path / "carded")
    (source / "MODEL_CARD.md").write_text("# PatchCore model: texture\n")
    code, output = update(source, worst, "--output", tmp_path / "new", "--max_bank_size",
                          len(original.memory_bank) + 5, "-p", "1.0")  # fmt: skip
    assert code == 0, output
    card = (tmp_path / "new" / "MODEL_CARD.md").read_text()
    assert card.startswith("# PatchCore model: texture\n\n## Update ")
    assert f"- 1 more normal images; memory bank now {len(original.memory_bank) + 5} features" in card
