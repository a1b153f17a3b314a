"""Leave-one-image-out calibration: each training image scored against the bank without the
features that came from it, checked against a model built on that reduced bank."""

import numpy as np
import pytest
import torch

from conftest import small_config
from patchcore.config import PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.errors import DataError
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import ExcludingSearch
from patchcore.model.search import build_index


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _batches(images: torch.Tensor, size: int = 2) -> list[torch.Tensor]:
    return list(images.split(size))


def test_identity_bank_records_each_features_source_image():
    images = _images(5)
    model = PatchCore(small_config(sampler=SamplerConfig(name="identity", percentage=1.0)))
    model.fit(_batches(images))
    per_image = len(model.memory_bank) // 5
    expected = torch.arange(len(model.memory_bank)) // per_image
    assert torch.equal(model.bank_sources.long(), expected)
    assert model.num_training_images == 5


def test_tiled_bank_sources_group_each_images_tiles():
    preprocessing = PreprocessingConfig(resize=72, imagesize=64, tile=32)
    config = small_config(sampler=SamplerConfig(name="identity", percentage=1.0),
                          preprocessing=preprocessing)  # fmt: skip
    model = PatchCore(config)
    model.fit(_batches(_images(3), 3))
    counts = torch.bincount(model.bank_sources.long())
    assert counts.tolist() == [len(model.memory_bank) // 3] * 3


@pytest.mark.parametrize("reweighting", [False, True])
def test_leave_one_out_scores_equal_a_model_without_that_images_features(reweighting):
    images = _images(6)
    config = small_config(score_reweighting=reweighting, num_nn=2)
    model = PatchCore(config)
    model.fit(_batches(images))
    prediction = model.calibrate_leave_one_out(_batches(images), quantile=0.9)
    in_sample = model.predict(images).scores
    for image in range(6):
        keep = model.bank_sources.long() != image
        reduced = PatchCore(config)
        reduced.set_memory_bank(model.memory_bank[keep].clone())
        expected = reduced.predict(images[image : image + 1])
        torch.testing.assert_close(prediction.scores[image], expected.scores[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(prediction.maps[image], expected.maps[0], rtol=1e-5, atol=1e-6)
    # Leaving an image's own features out can only raise its score, and does here.
    assert bool((prediction.scores >= in_sample - 1e-6).all())
    assert bool((prediction.scores > in_sample + 1e-6).any())
    expected_threshold = float(np.quantile(prediction.scores.double().numpy(), 0.9))
    assert model.normal_statistics.threshold == pytest.approx(expected_threshold)
    assert model.calibration_method == "training images, leave-one-image-out"


def test_excluding_search_matches_a_search_of_the_remaining_rows():
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(50, 8, generator=generator)
    queries = torch.randn(7, 8, generator=generator)
    excluded = torch.zeros(50, dtype=torch.bool)
    excluded[::3] = True
    full = build_index(SearchConfig(backend="torch"), torch.device("cpu"))
    full.fit(bank)
    distances, indices = ExcludingSearch(full, excluded).search(queries, 4)
    kept = torch.nonzero(~excluded).squeeze(1)
    reduced = build_index(SearchConfig(backend="torch"), torch.device("cpu"))
    reduced.fit(bank[kept])
    expected_distances, expected_indices = reduced.search(queries, 4)
    assert torch.equal(indices, kept[expected_indices])
    torch.testing.assert_close(distances, expected_distances)


def test_leave_one_out_refuses_another_number_of_images():
    model = PatchCore(small_config())
    model.fit(_batches(_images(4)))
    with pytest.raises(DataError, match="got 3 images but the bank was built from 4"):
        model.calibrate_leave_one_out(_batches(_images(3)))


def test_leave_one_out_falls_back_to_in_sample_with_one_training_image(caplog):
    model = PatchCore(small_config())
    image = _images(1)
    model.fit([image])
    model.calibrate_leave_one_out([image])
    assert "in-sample" in caplog.text
    assert model.calibration_method.startswith("training images, in-sample")
    assert model.normal_statistics.threshold == pytest.approx(float(model.predict(image).scores[0]))


def test_a_loaded_model_cannot_calibrate_leave_one_out(tmp_path):
    from patchcore.model.serialization import load_model, save_models

    model = PatchCore(small_config())
    model.fit(_batches(_images(3)))
    save_models(tmp_path / "model", [model])
    loaded = load_model(tmp_path / "model")
    with pytest.raises(DataError, match="only fit\\(\\) records"):
        loaded.calibrate_leave_one_out(_batches(_images(3)))


def test_degenerate_members_are_named_in_a_warning():
    from patchcore.apps.runs import degenerate_problem, member_name
    from patchcore.model.calibration import NormalStatistics

    model = PatchCore(small_config())
    model.fit(_batches(_images(3)))
    model.calibrate_leave_one_out(_batches(_images(3)))
    assert degenerate_problem(model) == ""
    constant = PatchCore(small_config())
    constant.set_memory_bank(torch.full((20, 48), 0.3) + 1e-6 * torch.rand(20, 48))
    assert "near-constant memory-bank features" in degenerate_problem(constant)
    tiny = PatchCore(small_config())
    tiny.set_memory_bank(model.memory_bank)
    tiny.normal_statistics = NormalStatistics(0.0, 2e-5, 0.0, 2e-5, 1.7e-05, 0.99, 3)
    assert degenerate_problem(tiny) == "has a near-zero threshold (1.7e-05): its features barely vary"
    assert member_name(model.config, 2, 3) == "member 2 of 3 (resnet18, random weights, seed 0)"
    assert member_name(model.config, 1, 1) == "the model (resnet18, random weights, seed 0)"
