"""Intermediate feature maps of a frozen backbone.

The backbone is traced into a graph that ends at the deepest requested layer, so the
forward pass computes nothing past it (no hooks, no exceptions to stop early).
"""

from __future__ import annotations

import warnings

import torch
from torchvision.models.feature_extraction import create_feature_extractor

from patchcore.backbones import Backbone
from patchcore.errors import BackboneError


class FeatureExtractor(torch.nn.Module):
    """Normalises images in [0, 1] with the backbone's statistics and returns layer outputs."""

    def __init__(self, backbone: Backbone, layers: tuple[str, ...]) -> None:
        super().__init__()
        _check_layers_exist(backbone, layers)
        self.layers = tuple(layers)
        with warnings.catch_warnings():
            # torchvision warns that train- and eval-mode graphs may differ; we only use eval.
            warnings.filterwarnings("ignore", message=".*subsequence of those obtained in train")
            self.graph = create_feature_extractor(
                backbone.network, return_nodes={layer: layer for layer in layers}
            )
        self.graph.eval()
        self.graph.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> FeatureExtractor:
        """The backbone stays frozen in eval mode whatever the caller asks."""
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: [B, 3, H, W] in [0, 1] -> one [B, C_i, H_i, W_i] map per layer, in order."""
        outputs = self.graph((images - self.mean) / self.std)
        return [outputs[layer] for layer in self.layers]


def _check_layers_exist(backbone: Backbone, layers: tuple[str, ...]) -> None:
    module_names = {name for name, _ in backbone.network.named_modules() if name}
    for layer in layers:
        if layer not in module_names:
            top_level = [name for name, _ in backbone.network.named_children()]
            raise BackboneError(
                f"layer '{layer}' does not exist in backbone '{backbone.name}'; its top-level "
                f"layers are: {', '.join(top_level)}"
            )
