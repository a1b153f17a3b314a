"""PatchCore fit/predict mechanics, save/load, and the model folder format."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from conftest import small_config
from patchcore.config import PreprocessingConfig, SearchConfig
from patchcore.errors import ModelFormatError, OutputError
from patchcore.evaluation.ensemble import calibrate_ensemble, predict_new_images
from patchcore.model.feature_store import InMemoryFeatureStore, SpilledFeatureStore, gather_rows
from patchcore.model.patchcore import PatchCore
from patchcore.model.samplers import build_sampler
from patchcore.model.scoring import score_patches
from patchcore.model.search import build_index
from patchcore.model.serialization import (
    BACKBONE_STATISTICS_FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    PARAMS_FILE,
    config_from_meta,
    load_ensemble_statistics,
    load_model,
    load_models,
    member_prefixes,
    save_models,
)


@pytest.fixture
def fitted(random_images):
    model = PatchCore(small_config())
    model.fit([random_images[:3], {"image": random_images[3:]}])
    return model


def test_fit_builds_a_coreset_bank_and_predict_returns_scores_and_maps(fitted):
    # resnet18 layer2 of a 64 px image is an 8 x 8 grid: 6 images x 64 patches, 25 % kept.
    assert fitted.memory_bank.shape == (int(6 * 64 * 0.25), 48)
    prediction = fitted.predict(torch.rand(2, 3, 64, 64))
    assert prediction.scores.shape == (2,)
    assert prediction.maps.shape == (2, 64, 64)
    assert prediction.patch_scores.shape == (2, 8, 8)
    flat = prediction.patch_scores.reshape(2, -1)
    assert torch.equal(prediction.scores, flat.max(dim=1).values)


def test_patch_score_is_mean_squared_distance_to_k_nearest(random_images):
    for num_nn in (1, 4):
        model = PatchCore(small_config(num_nn=num_nn))
        model.fit([random_images])
        query = torch.rand(1, 3, 64, 64)
        features, _ = model.embed(query)
        squared = torch.cdist(features.double(), model.memory_bank.double()).square()
        expected = squared.topk(num_nn, dim=1, largest=False).values.mean(dim=1)
        got = model.predict(query).patch_scores.reshape(-1).double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_l2_distance_option_takes_square_roots(random_images):
    squared_model = PatchCore(small_config())
    squared_model.fit([random_images])
    l2_model = PatchCore(small_config(distance="l2"))
    l2_model.set_memory_bank(squared_model.memory_bank)
    query = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(
        l2_model.predict(query).patch_scores, squared_model.predict(query).patch_scores.sqrt()
    )


def test_score_reweighting_scales_the_image_score_by_a_weight_in_0_1(random_images):
    plain = PatchCore(small_config())
    plain.fit([random_images])
    reweighted = PatchCore(small_config(score_reweighting=True, reweighting_neighbours=3))
    reweighted.set_memory_bank(plain.memory_bank)
    query = torch.rand(3, 3, 64, 64)
    base, weighted = plain.predict(query), reweighted.predict(query)
    assert torch.equal(base.maps, weighted.maps)
    ratio = weighted.scores / base.scores
    assert torch.all(ratio > 0) and torch.all(ratio <= 1)
    # Independent computation of Eq. 7 for the first image.
    features, _ = plain.embed(query[:1])
    bank = plain.memory_bank
    test_feature = features[base.patch_scores[0].reshape(-1).argmax()]
    nearest = torch.cdist(test_feature[None], bank)[0].argmin()
    neighbourhood = torch.cdist(bank[nearest][None], bank)[0].topk(3, largest=False).indices
    distances = torch.linalg.vector_norm(bank[neighbourhood] - test_feature, dim=1).double()
    star = torch.linalg.vector_norm(bank[nearest] - test_feature).double()
    expected = 1 - torch.exp(star) / torch.exp(distances).sum()
    torch.testing.assert_close(ratio[0].double(), expected, rtol=1e-4, atol=1e-6)


# A bank in 4 dimensions with a dense corner (a, b, c) and an isolated feature d.
EQ7_BANK = torch.tensor([
    [1.0, 0.0, 0.0, 0.0],  # a: 1 from the origin
    [0.0, 1.5, 0.0, 0.0],  # b: 1.5 from the origin, 1.80 from a
    [0.0, 0.0, 1.5, 0.0],  # c: 1.5 from the origin, 1.80 from a
    [21.0, 0.0, 0.0, 0.0],  # d: 20 from a, 21.05 from b and c
])  # fmt: skip
EQ7_QUERIES = torch.tensor([[0.0, 0.0, 0.0, 0.0], [20.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("backend", ["rerank", "torch", "faiss"])
def test_eq7_weight_in_a_constructed_bank_is_the_hand_computed_one(backend):
    """Eq. 7 of the paper: s = (1 - exp|t - m*| / sum over N_b(m*) of exp|t - m|) * s*, with
    m* the bank feature nearest to the worst test patch t and N_b(m*) its b nearest bank
    features (m* included). A candidate whose nearest normal feature lies in a dense region
    (its neighbours about as close to t) is down-weighted; one whose nearest normal feature
    is isolated, a rare normal occurrence, keeps its score: the effect the paper describes."""
    config = small_config(
        target_embed_dimension=4, score_reweighting=True, reweighting_neighbours=3
    )
    index = build_index(SearchConfig(backend=backend), torch.device("cpu"))
    index.fit(EQ7_BANK)
    # Two images of one patch each: t = origin (m* = a, N_3 = {a, b, c}) and t = 20 e1
    # (m* = d, 1 away; N_3 = {d, a, b or c}, 19 and 20.06 away).
    patch_scores, image_scores = score_patches(EQ7_QUERIES, (1, 1), index, config)
    assert patch_scores.flatten().tolist() == [1.0, 1.0]  # s* = squared distance 1, both
    dense = 1 - math.exp(1) / (math.exp(1) + 2 * math.exp(1.5))  # = 1 - 1 / (1 + 2 e^0.5)
    isolated = 1 - math.exp(1) / (math.exp(1) + math.exp(19) + math.exp(math.sqrt(402.25)))
    assert dense == pytest.approx(0.767303, abs=1e-6) and isolated > 1 - 1e-7
    torch.testing.assert_close(image_scores, torch.tensor([dense, isolated]), rtol=0, atol=1e-6)
    # The weight reads raw distances: scaled to the tens and hundreds of units that real
    # backbone features have, the same geometry's gaps are many units wide, the softmax
    # saturates and the weight is 1 to within a millionth (see docs/explanations/fidelity.md, Eq. 7).
    _, scaled = score_patches(30 * EQ7_QUERIES, (1, 1), _fitted(index, 30 * EQ7_BANK), config)
    dense_scaled = 1 - 1 / (1 + 2 * math.exp(15))
    assert 1 - dense_scaled < 1e-6
    torch.testing.assert_close(scaled, torch.tensor([900 * dense_scaled, 900.0]))


def _fitted(index, bank):
    index.fit(bank)
    return index


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_every_search_backend_gives_the_same_predictions(fitted, backend):
    other = PatchCore(fitted.config, search=SearchConfig(backend=backend))
    other.set_memory_bank(fitted.memory_bank)
    query = torch.rand(2, 3, 64, 64)
    expected, predicted = other.predict(query), fitted.predict(query)
    torch.testing.assert_close(predicted.scores, expected.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(predicted.maps, expected.maps, rtol=1e-4, atol=1e-5)


def test_fast_coreset_path_builds_the_plain_sweeps_bank(monkeypatch):
    """Enough patches for the lazy selection (more than the plain sweep's small-input
    limit): the fitted bank is bit-identical to the one the plain sweep selects."""
    from patchcore.model import samplers

    images = torch.rand(140, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert len(images) * 64 > samplers._PLAIN_SWEEP_ROWS  # 8x8 patches per image
    batches = list(images.split(20))
    fast = PatchCore(small_config())
    fast.fit(batches)
    monkeypatch.setattr(samplers, "_PLAIN_SWEEP_ROWS", 10**9)
    plain = PatchCore(small_config())
    plain.fit(batches)
    assert torch.equal(fast.memory_bank, plain.memory_bank)


def test_save_and_load_give_identical_predictions(tmp_path, fitted, random_images):
    fitted.calibrate([random_images[:2]])
    save_models(tmp_path / "model", [fitted])
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(
        [PARAMS_FILE, INDEX_FILE, META_FILE]
    )
    loaded = load_model(tmp_path / "model")
    query = torch.rand(2, 3, 64, 64)
    first, second = fitted.predict(query), loaded.predict(query)
    assert torch.equal(first.scores, second.scores) and torch.equal(first.maps, second.maps)
    assert loaded.config == fitted.config
    assert loaded.normal_statistics == fitted.normal_statistics
    meta = json.loads((tmp_path / "model" / META_FILE).read_text())
    for key in ("format_version", "library_version", "config", "normalisation"):
        assert key in meta
    assert meta["config"]["num_nn"] == 1 and meta["config"]["preprocessing"]["imagesize"] == 64


def test_ensemble_members_are_saved_with_reference_prefixes(tmp_path, fitted, random_images):
    second = PatchCore(small_config(backbone_name="resnet34"))
    second.fit([random_images])
    save_models(tmp_path / "ensemble", [fitted, second])
    assert member_prefixes(tmp_path / "ensemble") == ["Ensemble-1-2_", "Ensemble-2-2_"]
    loaded = load_models(tmp_path / "ensemble")
    assert [m.config.backbone_name for m in loaded] == ["resnet18", "resnet34"]


def test_an_ensemble_threshold_is_measured_on_its_combined_scale_and_saved_with_every_member(
    tmp_path, fitted, random_images
):
    second = PatchCore(small_config(backbone_name="resnet34"))
    second.fit([random_images])
    members = [fitted, second]
    held_out = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calibration = [model.calibrate([held_out]) for model in members]
    statistics = calibrate_ensemble(members, calibration, 0.9)
    # The scale new images are scored on (predict, dashboard) is the one calibrated here.
    scores, maps = predict_new_images(members, held_out)
    assert statistics.threshold == pytest.approx(float(np.quantile(scores.double(), 0.9)))
    assert statistics.image_score_max == pytest.approx(float(scores.max()))
    assert statistics.pixel_score_min == pytest.approx(float(maps.min()))
    assert statistics.num_images == 5 and statistics.threshold_quantile == 0.9

    folder = tmp_path / "ensemble"
    save_models(folder, members, statistics)
    assert load_ensemble_statistics(folder) == statistics
    metas = [json.loads((folder / f"{prefix}{META_FILE}").read_text())
             for prefix in member_prefixes(folder)]  # fmt: skip
    # The reference's backbone statistics: written as version 6, the oldest that records them.
    assert [meta["format_version"] for meta in metas] == [BACKBONE_STATISTICS_FORMAT_VERSION] * 2 == [6, 6]
    assert metas[0]["ensemble"] == metas[1]["ensemble"]
    assert metas[0]["ensemble"]["members"] == 2
    # A library that knows only format 2 refuses these folders with a clear message.
    with pytest.raises(ModelFormatError, match="format version 6 is newer than this library"):
        config_from_meta(metas[0], "member meta", format_version=2)
    # Members that disagree (a folder mixing two saves) are refused.
    metas[1]["ensemble"]["normal_statistics"]["threshold"] += 1.0
    (folder / f"Ensemble-2-2_{META_FILE}").write_text(json.dumps(metas[1]))
    with pytest.raises(ModelFormatError, match="record different ensemble statistics"):
        load_ensemble_statistics(folder)
    # Folders of format 2 (no ensemble entry) still load, without a combined threshold.
    for meta, prefix in zip(metas, member_prefixes(folder), strict=True):
        meta.pop("ensemble")
        meta["format_version"] = 2
        (folder / f"{prefix}{META_FILE}").write_text(json.dumps(meta))
    assert len(load_models(folder)) == 2 and load_ensemble_statistics(folder) is None
    with pytest.raises(ModelFormatError, match="belong to an ensemble"):
        save_models(tmp_path / "single", [fitted], statistics)
    assert load_ensemble_statistics(tmp_path / "ensemble") is None
    save_models(tmp_path / "single", [fitted])
    assert load_ensemble_statistics(tmp_path / "single") is None


def test_saving_over_a_folder_replaces_it_and_a_failed_save_leaves_the_old_one(
    tmp_path, fitted, monkeypatch
):
    target = tmp_path / "model"
    save_models(target, [fitted])
    before = (target / INDEX_FILE).read_bytes()

    def broken_write(bank, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("patchcore.model.serialization.write_memory_bank", broken_write)
    with pytest.raises(OutputError, match=f"{target}: cannot write \\(disk full\\)"):
        save_models(target, [fitted])
    assert (target / INDEX_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging leftovers


def test_reference_format_folder_loads(tmp_path, random_images):
    """A folder as the reference writes it: params pickle + faiss index, no meta file.

    The reference records no weights flag (its backbones are always pretrained), so this
    uses efficientnet_lite0, whose real weights are available offline."""
    config = small_config(
        backbone_name="efficientnet_lite0", pretrained=True, layers=("_blocks.4", "_blocks.10")
    )
    original = PatchCore(config)
    original.fit([random_images])
    folder = tmp_path / "reference"
    save_models(folder, [original])
    (folder / META_FILE).unlink()
    params = pickle.loads((folder / PARAMS_FILE).read_bytes())
    assert set(params) == {
        "backbone.name", "layers_to_extract_from", "input_shape", "pretrain_embed_dimension",
        "target_embed_dimension", "patchsize", "patchstride", "anomaly_scorer_num_nn",
    }  # fmt: skip
    model = load_model(folder, reference_resize=72)
    assert model.config.preprocessing.imagesize == 64
    assert model.config.preprocessing.resize == 72
    assert torch.equal(model.memory_bank, original.memory_bank)
    query = torch.rand(1, 3, 64, 64)
    assert torch.equal(model.predict(query).maps, original.predict(query).maps)


def test_pickles_that_would_run_code_are_refused(tmp_path, fitted):
    folder = tmp_path / "evil"
    save_models(folder, [fitted])

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / PARAMS_FILE).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelFormatError, match="refusing to load 'builtins.print'"):
        load_model(folder)


def test_a_fixed_scale_is_saved_as_format_5_and_restored(tmp_path, random_images):
    # pretrained backbone statistics: version 6's field is not recorded (see
    # tests/test_reference_statistics.py for the reference's statistics)
    scaled = small_config(
        preprocessing=PreprocessingConfig(crop="none", scale=0.75), backbone_statistics="pretrained"
    )
    model = PatchCore(scaled)
    model.fit([random_images[:3]])
    save_models(tmp_path / "scaled", [model])
    meta = json.loads((tmp_path / "scaled" / META_FILE).read_text())
    assert meta["format_version"] == 5 and meta["config"]["preprocessing"]["scale"] == 0.75
    assert load_model(tmp_path / "scaled").config.preprocessing == scaled.preprocessing
    # A reader of format 4 refuses it with the version, not with a wrong preprocessing.
    with pytest.raises(ModelFormatError, match="format version 5 is newer than this library"):
        config_from_meta(meta, "meta", format_version=4)
    # Without a scale nothing changes: no `scale` entry, written as version 3 as before.
    plain_config = small_config(backbone_statistics="pretrained")
    plain_model = PatchCore(plain_config)
    plain_model.fit([random_images[:3]])
    save_models(tmp_path / "plain", [plain_model])
    plain = json.loads((tmp_path / "plain" / META_FILE).read_text())
    assert plain["format_version"] == 3 and "scale" not in plain["config"]["preprocessing"]
    # The exported module's and exported graphs' own descriptions follow the same rule.
    from patchcore.apps.runtimes import ExportRecord
    from patchcore.model.module import config_blob

    assert [config_blob(c)["format_version"] for c in (scaled, plain_config)] == [3, 2]
    records = [json.loads(ExportRecord(c, (64, 64), None, None, 10, 10, 18, "fp32", "x").to_json())
               for c in (scaled, plain_config)]  # fmt: skip
    assert [record["format_version"] for record in records] == [2, 1]
    assert ExportRecord.from_json(json.dumps(records[0]), "graph").config == scaled


def test_newer_format_version_fails_clearly(tmp_path, fitted):
    folder = tmp_path / "future"
    save_models(folder, [fitted])
    meta = json.loads((folder / META_FILE).read_text())
    meta["format_version"] = 99
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="format version 99 is newer"):
        load_model(folder)


def test_missing_folder_and_empty_folder_fail_clearly(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_models(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="no patchcore_params.pkl"):
        load_models(tmp_path / "empty")


def test_feature_stores_return_the_rows_of_the_concatenation():
    chunks = [torch.randn(5, 3), torch.randn(1, 3), torch.randn(7, 3)]
    indices = torch.tensor([12, 0, 5, 6, 4, 11])
    expected = torch.cat(chunks)[indices]
    assert torch.equal(gather_rows(chunks, indices), expected)
    for store in (InMemoryFeatureStore(), SpilledFeatureStore()):
        for chunk in chunks:
            store.append(chunk)
        assert len(store) == 13 and torch.equal(store.gather(indices), expected)
        store.close()


def test_streaming_fit_selects_the_same_bank_as_sampling_all_features(random_images):
    model = PatchCore(small_config())
    model.fit([random_images[:2], random_images[2:5], random_images[5:]])
    features = model.embed(random_images)[0]
    sampler = build_sampler(model.config.sampler, model.reference_projection_state())
    expected = features[sampler.select(features)]
    torch.testing.assert_close(model.memory_bank, expected)


def test_corrupt_meta_file_fails_clearly(tmp_path, fitted):
    folder = tmp_path / "corrupt"
    save_models(folder, [fitted])
    (folder / META_FILE).write_text("{ not json")
    with pytest.raises(ModelFormatError, match="patchcore_meta.json: not valid JSON"):
        load_model(folder)


def test_fit_embeds_a_few_images_at_a_time_with_the_whole_batch_features(random_images):
    """Fitting embeds at most FIT_IMAGES_AT_ONCE images per backbone call (activation memory
    independent of the loader's batch size); the parts are the features of the whole batch
    embedded at once, up to float rounding (the backbone's kernels may sum in another order
    for another batch size)."""
    from patchcore.model.patchcore import FIT_IMAGES_AT_ONCE

    model = PatchCore(small_config())
    parts = [features for features, _ in model.training_features(random_images[:5])]
    per_image = len(model.embed(random_images[:1])[0])
    assert FIT_IMAGES_AT_ONCE == 2
    assert [len(part) for part in parts] == [2 * per_image, 2 * per_image, per_image]
    torch.testing.assert_close(torch.cat(parts), model.embed(random_images[:5])[0],
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_spilling_on_a_writer_thread_gives_the_bytes_of_spilling_in_place():
    chunks = [torch.randn(257, 9) for _ in range(11)]  # more batches than the writer's queue
    indices = torch.randperm(257 * 11)[:300]
    gathered = []
    for background in (True, False):
        store = SpilledFeatureStore(background=background)
        for chunk in chunks:
            store.append(chunk)
        gathered.append(store.gather(indices))
        store._file.handle.seek(0)
        gathered.append(torch.frombuffer(bytearray(store._file.handle.read()), dtype=torch.float32))
        store.close()
    assert torch.equal(gathered[0], torch.cat(chunks)[indices])
    assert torch.equal(gathered[0], gathered[2]) and torch.equal(gathered[1], gathered[3])
    assert torch.equal(gathered[1], torch.cat(chunks).flatten())


def test_a_failed_background_spill_write_is_raised_on_the_callers_thread(monkeypatch):
    from patchcore.errors import OutputError
    from patchcore.model import feature_store

    monkeypatch.setattr(feature_store.tempfile, "TemporaryFile",
                        lambda **_: open("/dev/full", "r+b"))  # noqa: SIM115  # fmt: skip
    store = SpilledFeatureStore(background=True)
    with pytest.raises(OutputError, match="cannot write the temporary file"):
        for _ in range(2 * feature_store.SPILL_QUEUE_BATCHES + 2):
            store.append(torch.randn(4096, 16))
        store.gather(torch.tensor([0]))
    store.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_values_are_counted_like_isfinite(dtype):
    from patchcore.tensors import count_non_finite

    generator = torch.Generator().manual_seed(5)
    values = torch.randn(300, 17, generator=generator).to(dtype)
    assert count_non_finite(values) == 0
    assert count_non_finite(values[:0]) == 0
    for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("nan"), float("inf"), -float("inf")]):
        spoiled = values.clone()
        spoiled.view(-1)[torch.randperm(spoiled.numel(), generator=generator)[: len(bad)]] = torch.tensor(bad, dtype=dtype)
        assert count_non_finite(spoiled) == int((~torch.isfinite(spoiled)).sum()) == len(bad)
