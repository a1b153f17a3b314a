import urllib.error

import pytest
import torch

from conftest import small_config
from patchcore.config import PreprocessingConfig, SearchConfig, split_seeded_name
from patchcore.errors import BackboneError, ConfigurationError
from patchcore.model.backbones import (
    EFFICIENTNET_LITE_MEAN,
    IMAGENET_MEAN,
    load_backbone,
)
from patchcore.model.features import FeatureExtractor
from patchcore.model.patchcore import PatchCore


def test_reference_names_map_to_torchvision_architectures():
    backbone = load_backbone("wideresnet50", pretrained=False)
    assert backbone.network.layer2[0].conv2.out_channels == 256  # wide: 2 x 128
    assert backbone.mean == IMAGENET_MEAN
    assert type(load_backbone("resnext101", pretrained=False).network).__name__ == "ResNet"


def test_random_initialisation_is_reproducible_from_its_seed():
    first = load_backbone("resnet18", pretrained=False, init_seed=4).network.conv1.weight
    second = load_backbone("resnet18", pretrained=False, init_seed=4).network.conv1.weight
    third = load_backbone("resnet18", pretrained=False, init_seed=5).network.conv1.weight
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_efficientnet_lite0_has_real_imagenet_weights_offline():
    backbone = load_backbone("efficientnet_lite0")
    assert backbone.pretrained and backbone.mean == EFFICIENTNET_LITE_MEAN
    # Trained batch-norm statistics are not the initial zeros/ones.
    assert backbone.network._bn0.running_var.std() > 0.01
    extractor = FeatureExtractor(backbone, ("_blocks.4", "_blocks.10"))
    maps = extractor(torch.rand(2, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 28, 28), (2, 112, 14, 14)]


def test_extractor_stops_at_the_last_requested_layer():
    extractor = FeatureExtractor(load_backbone("resnet18", pretrained=False), ("layer2",))
    module_names = {name.split(".")[0] for name, _ in extractor.graph.named_modules() if name}
    assert "layer2" in module_names and "layer3" not in module_names and "fc" not in module_names
    (layer2,) = extractor(torch.rand(1, 3, 64, 64))
    assert layer2.shape == (1, 128, 8, 8)


@pytest.mark.parametrize("name, layers", [("efficientnet_lite0", ("_blocks.4", "_blocks.10")),
                                           ("resnet18", ("layer2", "layer3"))])  # fmt: skip
def test_channels_last_features_equal_the_default_layout_within_rounding(name, layers):
    """The extractor runs convolutions channels-last (faster); torch's default NCHW layout,
    the reference's, gives the same features up to float rounding, on a non-square input."""
    extractor = FeatureExtractor(load_backbone(name, pretrained=name == "efficientnet_lite0"),
                                 layers)  # fmt: skip
    images = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        fast = extractor(images)
        extractor.use_memory_format(torch.contiguous_format)
        default = extractor(images)
    for fast_map, default_map in zip(fast, default, strict=True):
        assert fast_map.shape == default_map.shape
        scale = float(default_map.abs().max())
        torch.testing.assert_close(fast_map, default_map, rtol=0.0, atol=1e-5 * scale)


def test_unknown_backbone_and_layer_are_named_in_the_error():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet9000'"):
        load_backbone("resnet9000", pretrained=False)
    with pytest.raises(BackboneError, match="layer 'layer7' does not exist in backbone 'resnet18'"):
        FeatureExtractor(load_backbone("resnet18", pretrained=False), ("layer2", "layer7"))


def test_missing_weights_offline_say_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(BackboneError) as error:
        load_backbone("wideresnet50")
    message = str(error.value)
    assert "wide_resnet50_2-" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "\n" not in message


def test_weights_in_the_torch_cache_load_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = load_backbone("resnet18", pretrained=False, init_seed=9).network
    import torchvision

    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / url.rsplit("/", 1)[-1])
    loaded = load_backbone("resnet18", pretrained=True).network
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)


def test_seeded_backbone_names():
    assert split_seeded_name("wideresnet50.seed-3") == ("wideresnet50", 3)
    assert split_seeded_name("resnet18") == ("resnet18", None)
    with pytest.raises(ConfigurationError, match="must be an integer"):
        split_seeded_name("resnet18.seed-x")


@pytest.mark.parametrize("runtime", ["torch", "torchscript"])
def test_other_backbone_runtimes_score_like_eager_torch_within_rounding(runtime, random_images):
    """A model whose backbone runs with BatchNorm folded (the default) or in TorchScript
    (oneDNN fusion) gives the scores of eager torch over the network's own layers within
    1e-5 relative, for a batch of 1 and of several, images of two sizes, and its maps
    within 1e-5 of their largest value."""
    config = small_config(preprocessing=PreprocessingConfig(resize=72, crop="none"))
    eager = PatchCore(config, search=SearchConfig("torch", backbone_runtime="torch-unfolded"))
    eager.fit([random_images])
    other = PatchCore(config, search=SearchConfig("torch", backbone_runtime=runtime))
    other.set_memory_bank(eager.memory_bank)
    wide = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    for images in (random_images[:1], random_images, wide):
        expected, got = eager.predict(images), other.predict(images)
        torch.testing.assert_close(got.scores, expected.scores, rtol=1e-5, atol=0.0)
        scale = float(expected.maps.abs().max())
        torch.testing.assert_close(got.maps, expected.maps, rtol=0.0, atol=1e-5 * scale)
    assert other.embedder.extractor.runtime == runtime


def test_backbone_runtime_is_validated_and_cpu_only():
    with pytest.raises(ConfigurationError, match="--backbone_runtime must be one of torch, "
                                                 "torch-unfolded, torchscript, got 'tvm'"):  # fmt: skip
        SearchConfig(backbone_runtime="tvm")
    extractor = FeatureExtractor(load_backbone("resnet18", pretrained=False), ("layer2",))
    extractor.mean = extractor.mean.to("meta")  # stands in for an accelerator's tensors
    with pytest.raises(ConfigurationError, match="--backbone_runtime torchscript runs on the "
                                                 "CPU only"):  # fmt: skip
        extractor.use_runtime("torchscript")
