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


@pytest.mark.parametrize("kept", [False, True], ids=["embedded-again", "kept-features"])
@pytest.mark.parametrize("reweighting", [False, True])
def test_leave_one_out_scores_equal_a_model_without_that_images_features(reweighting, kept):
    images = _images(6)
    config = small_config(score_reweighting=reweighting, num_nn=2)
    model = PatchCore(config)
    model.fit(_batches(images), keep_training_features=kept)
    prediction = model.calibrate_leave_one_out(None if kept else _batches(images), quantile=0.9)
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


def _searches():
    """Each kind of search ExcludingSearch may wrap, by name: those that leave rows out
    themselves (torch, re-ranking on every product path this machine runs) and one that
    does not (FAISS, or a plain wrapper of the torch search where FAISS is missing)."""
    from patchcore.model.native import coreset_kernels
    from patchcore.model.samplers import native_product_paths
    from patchcore.model.search import RerankedNearestNeighbours, faiss_available

    kernels = coreset_kernels()
    searches = {"torch": lambda: build_index(SearchConfig(backend="torch"), torch.device("cpu"))}
    for path in native_product_paths(kernels) if kernels is not None else []:
        searches[f"rerank-{path}"] = lambda path=path: RerankedNearestNeighbours(products=path)
    if faiss_available():
        searches["faiss"] = lambda: build_index(SearchConfig(backend="faiss"), torch.device("cpu"))
    return searches


class _PlainSearch:  # a search without search_excluding
    def __init__(self, inner):
        self.inner, self.bank = inner, inner.bank

    def search(self, queries, k):
        return self.inner.search(queries, k)


@pytest.mark.parametrize("plain", [False, True], ids=["own-exclusion", "wrapped"])
@pytest.mark.parametrize("name", list(_searches()))
def test_excluding_search_matches_a_search_of_the_remaining_rows(name, plain):
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(300, 40, generator=generator)
    bank[1::3] = bank[0::3][: len(bank[1::3])] + 1e-3  # excluded rows nearest to kept ones
    queries = torch.cat([torch.randn(70, 40, generator=generator), bank[:20:3]])
    excluded = torch.zeros(len(bank), dtype=torch.bool)
    excluded[::3] = True
    full = _searches()[name]()
    full.fit(bank)
    searched = _PlainSearch(full) if plain else full
    distances, indices = ExcludingSearch(searched, excluded).search(queries, 4)
    kept = torch.nonzero(~excluded).squeeze(1)
    reduced = build_index(SearchConfig(backend="torch"), torch.device("cpu"))
    reduced.fit(bank[kept])
    expected_distances, expected_indices = reduced.search(queries, 4)
    assert torch.equal(indices.cpu(), kept[expected_indices])
    torch.testing.assert_close(distances.cpu(), expected_distances, rtol=1e-5, atol=1e-4)


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


def _reduced_model_predictions(model: PatchCore, config, images: list[torch.Tensor]):
    """Each image scored by a model whose bank lacks that image's features."""
    predictions = []
    for image, single in enumerate(images):
        reduced = PatchCore(config)
        reduced.set_memory_bank(model.memory_bank[model.bank_sources.long() != image].clone())
        predictions.append(reduced.predict(single))
    return predictions


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
def test_kept_features_score_without_a_second_backbone_pass(tiled, monkeypatch):
    """fit(keep_training_features=True) keeps the features the bank was selected from; the
    calibration scores them without calling the backbone, equal (within the rounding of
    another batch size) to models built without each image's features, on images of two
    working sizes; the features are released afterwards."""
    preprocessing = PreprocessingConfig(resize=72, imagesize=64, tile=32 if tiled else None)
    config = small_config(num_nn=2, preprocessing=preprocessing)
    wide = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    batches = [_images(2), wide, _images(1, seed=4)]
    singles = [single for batch in batches for single in batch.split(1)]
    model = PatchCore(config)
    model.fit(batches, keep_training_features=True)
    assert model.training_features_kept
    calls = []
    monkeypatch.setattr(model, "embed", lambda images: calls.append(images) or None)
    prediction = model.calibrate_leave_one_out(quantile=0.5)
    assert calls == []
    assert not model.training_features_kept
    monkeypatch.undo()
    for image, expected in enumerate(_reduced_model_predictions(model, config, singles)):
        torch.testing.assert_close(prediction.scores[image], expected.scores[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(prediction.maps[image], expected.maps[0], rtol=1e-5, atol=1e-6)
    assert model.calibration_method == "training images, leave-one-image-out"


def test_kept_features_are_released_by_a_refit_and_needed_without_a_loader():
    model = PatchCore(small_config())
    model.fit(_batches(_images(3)), keep_training_features=True)
    store = model._training_features.store
    model.fit(_batches(_images(3)))
    assert not model.training_features_kept
    assert store._file.closed
    with pytest.raises(DataError, match=r"needs the training loader fit\(\) read, or features"):
        model.calibrate_leave_one_out()
