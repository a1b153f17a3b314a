"""Fit's spill of the backbone's layer maps instead of the patch features
(`feature_store.SpilledLayerMaps`): the rows given back are the features fit projected, bit
for bit, and the choice between the two spills."""

import pytest
import torch

from conftest import small_config
from patchcore.config import PatchCoreConfig, SearchConfig, default_layers
from patchcore.model.feature_store import SpilledLayerMaps, feature_store_for
from patchcore.model.patchcore import PatchCore

# layer2 + layer3 of ResNet18 give 192 values per patch: spilled as maps below 768 features
MAPS_CONFIG = {"pretrain_embed_dimension": 1024, "target_embed_dimension": 1024}


class CountingAggregation:
    """A stand-in aggregation (any deterministic function of the maps) that counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, maps):
        self.calls += 1
        first = maps[0].flatten(2).transpose(1, 2)  # [B, HW, C] in the map's own layout
        second = maps[1].mean(dim=(2, 3))[:, None, :].expand(-1, first.shape[1], -1)
        return torch.cat([first * 1.5, second], dim=2).reshape(-1, 7), maps[0].shape[-2:]


@pytest.mark.parametrize("background, dtype", [(False, torch.float32), (True, torch.float32),
                                               (False, torch.float64)])  # fmt: skip
def test_spilled_layer_maps_give_back_each_parts_features(background, dtype):
    generator = torch.Generator().manual_seed(0)
    aggregate = CountingAggregation()
    store = SpilledLayerMaps(aggregate, background=background)
    expected = []
    for number in range(5):
        batch = 1 + number % 2
        first = torch.randn(batch, 4, 3, 5, generator=generator, dtype=dtype)
        if number % 2:  # both layouts are kept as they were
            first = first.contiguous(memory_format=torch.channels_last)
        second = torch.randn(batch, 3, 2, 2, generator=generator, dtype=dtype)
        features = aggregate([first, second])[0]
        store.append(features, [first, second])
        expected.append(features)
    expected = torch.cat(expected)
    assert len(store) == len(expected)
    aggregate.calls = 0
    indices = torch.randperm(len(expected), generator=generator)[:40]
    gathered = store.gather(indices)
    assert gathered.dtype == dtype and torch.equal(gathered, expected[indices])
    assert aggregate.calls == len(torch.unique(torch.searchsorted(
        torch.tensor([15, 45, 60, 90, 105]), indices, right=True)))  # fmt: skip
    # a span across parts; the last part aggregated is kept
    assert torch.equal(store.span(10, 40), expected[10:50])
    calls = aggregate.calls
    assert torch.equal(store.span(46, 3), expected[46:49]) and aggregate.calls == calls
    store.close()


def _fitted(config, spill_maps: bool, monkeypatch, images, memory_format=None):
    monkeypatch.setattr(PatchCore, "spills_layer_maps", lambda self: spill_maps)
    model = PatchCore(config, search=SearchConfig("torch"))
    if memory_format is not None:
        model.embedder.extractor.use_memory_format(memory_format)
    model.fit([images[:2], images[2:5], images[5:]], keep_training_features=True)
    kind = type(model._training_features.store).__name__
    model.calibrate_leave_one_out()
    return model, kind


@pytest.mark.parametrize("memory_format", [None, torch.contiguous_format])
def test_a_fit_spilling_maps_equals_one_spilling_features_bit_for_bit(memory_format, monkeypatch):
    """The bank, its sources and the leave-one-image-out threshold are the same whether
    fit spilled the layer maps or the features: EfficientNet-Lite0 at 224 px, whose
    aggregation rounds differently for maps of another layout, with channels-last maps
    (the default) and NCHW ones."""
    config = PatchCoreConfig(backbone_name="efficientnet_lite0",
                             layers=default_layers("efficientnet_lite0"))  # fmt: skip
    images = torch.rand(6, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    maps, maps_kind = _fitted(config, True, monkeypatch, images, memory_format)
    features, features_kind = _fitted(config, False, monkeypatch, images, memory_format)
    assert (maps_kind, features_kind) == ("SpilledLayerMaps", "SpilledFeatureStore")
    assert torch.equal(maps.memory_bank, features.memory_bank)
    assert torch.equal(maps.bank_sources, features.bank_sources)
    assert maps.normal_statistics == features.normal_statistics


def test_which_spill_fit_uses():
    """Maps where they take at most a quarter of the features' bytes, on the CPU, with the
    bank in memory; features otherwise; nothing spilled on an accelerator."""
    assert PatchCore(small_config(**MAPS_CONFIG)).spills_layer_maps()
    assert not PatchCore(small_config()).spills_layer_maps()  # 192 values against 48
    mapped = PatchCore(small_config(**MAPS_CONFIG), search=SearchConfig(bank_storage="mmap"))
    assert not mapped.spills_layer_maps()
    lite = PatchCoreConfig(backbone_name="efficientnet_lite0",
                           layers=default_layers("efficientnet_lite0"))  # fmt: skip
    assert PatchCore(lite).spills_layer_maps()  # 68 values per patch against 1,024
    wide = PatchCoreConfig(pretrained=False)  # WideResNet50: 768 against 1,024
    assert not PatchCore(wide).spills_layer_maps()
    assert type(feature_store_for(torch.device("meta"), CountingAggregation())).__name__ == (
        "InMemoryFeatureStore")  # fmt: skip
