"""Patch features: a frozen backbone's intermediate maps, turned into one vector per patch.

`FeatureExtractor` traces the backbone into a graph that ends at the deepest requested
layer, so the forward pass computes nothing past it (no hooks, no exceptions to stop early).

`PatchFeatureAggregator` builds the locally aware patch features of the PatchCore paper and
the reference implementation. For each layer: every position's p x p neighbourhood (zero
padded, stride s) is flattened in (channel, row, column) order and average-pooled to
`pretrain_embed_dimension` values. The deeper layers' grids are bilinearly resized to the
first layer's grid. The per-layer vectors are concatenated and average-pooled once more to
`target_embed_dimension`. The reference resizes the flattened neighbourhoods and pools
afterwards; both steps are linear and act on different axes, so we pool first (9x less
data to resize) and get the same features up to float rounding. Pooling is done along the
unfolded tensor's feature axis by gathers (`average_pool_axis`), with the exact arithmetic
of `adaptive_avg_pool1d`, instead of transposing the wide unfolded tensor first.

`PatchEmbedder` chains the two, and `build_embedder` is the one place where a model
configuration becomes an embedder: the estimator and the exported module both use it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from patchcore.config import PatchCoreConfig
from patchcore.errors import BackboneError, DataError
from patchcore.model.backbones import Backbone, load_backbone


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
        # Channels-last (NHWC) weights and inputs: oneDNN's and cuDNN's fastest convolution
        # layouts (EfficientNet-Lite0 extraction about 1.25x faster on CPU, README Performance);
        # the same arithmetic up to float rounding.
        self.use_memory_format(torch.channels_last)

    def use_memory_format(self, memory_format: torch.memory_format) -> None:
        """Runs the backbone's weights and inputs in `memory_format` (`torch.contiguous_format`
        is torch's default NCHW, the reference's)."""
        self.memory_format = memory_format
        self.graph.to(memory_format=memory_format)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """The backbone stays frozen in eval mode whatever the caller asks."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: [B, 3, H, W] in [0, 1] -> one [B, C_i, H_i, W_i] map per layer, in order."""
        normalised = ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        outputs = self.graph(normalised)
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


def patch_grid_size(size: int, patchsize: int, stride: int) -> int:
    """Number of patch positions along one axis of a feature map of `size`."""
    padding = (patchsize - 1) // 2
    return (size + 2 * padding - patchsize) // stride + 1


class PatchFeatureAggregator(torch.nn.Module):
    """Turns a list of layer feature maps into one feature vector per patch position."""

    def __init__(
        self,
        patchsize: int,
        stride: int,
        pretrain_embed_dimension: int,
        target_embed_dimension: int,
    ) -> None:
        super().__init__()
        self.patchsize = patchsize
        self.stride = stride
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension

    def _pooled_neighbourhoods(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, pretrain_dim, h, w]: each neighbourhood pooled to pretrain_dim."""
        batch, _, height, width = feature_map.shape
        grid_h = patch_grid_size(height, self.patchsize, self.stride)
        grid_w = patch_grid_size(width, self.patchsize, self.stride)
        unfolded = F.unfold(
            feature_map,
            kernel_size=self.patchsize,
            padding=(self.patchsize - 1) // 2,
            stride=self.stride,
        )  # [B, C*p*p, h*w], channel-major within each neighbourhood
        pooled = average_pool_axis(unfolded, self.pretrain_embed_dimension)  # [B, D, h*w]
        # [B, h, w, D] memory, seen as [B, D, h, w]: the layout the resizing kernel gets
        return (
            pooled.transpose(1, 2)
            .contiguous()
            .reshape(batch, grid_h, grid_w, -1)
            .permute(0, 3, 1, 2)
        )

    def forward(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Returns features [B*h*w, target_dim] in (image, row, column) order and the grid (h, w)."""
        per_layer = [self._pooled_neighbourhoods(feature_map) for feature_map in feature_maps]
        grid = per_layer[0].shape[-2:]
        per_layer = [per_layer[0]] + [
            F.interpolate(layer, size=grid, mode="bilinear", align_corners=False)
            for layer in per_layer[1:]
        ]
        batch = per_layer[0].shape[0]
        # [B, L, D, h, w] -> [B*h*w, L*D] with each layer's D values contiguous.
        stacked = torch.stack(per_layer, dim=1).permute(0, 3, 4, 1, 2)
        stacked = stacked.reshape(batch * grid[0] * grid[1], -1, 1)
        features = average_pool_axis(stacked, self.target_embed_dimension).squeeze(2)
        return features, (int(grid[0]), int(grid[1]))


def average_pool_axis(values: torch.Tensor, size: int) -> torch.Tensor:
    """`F.adaptive_avg_pool1d` along axis 1 of values [B, L, M] (to [B, size, M]), with its
    arithmetic: output j is the float sum, in order, of inputs floor(j L / size) up to
    ceil((j + 1) L / size), divided by their count. Each input row is a contiguous M-vector,
    so no transposed copy of a wide unfolded tensor is needed."""
    length = values.shape[1]
    if size == 1:  # torch averages to one value with its own reduction order
        pooled = F.adaptive_avg_pool1d(values.transpose(1, 2).reshape(-1, 1, length), 1)
        return pooled.reshape(values.shape[0], values.shape[2], 1).transpose(1, 2)
    starts, counts = _pooling_windows(length, size)
    device = values.device

    def rows(indices: list[int]) -> torch.Tensor:
        return torch.tensor(indices, dtype=torch.long, device=device)

    total = values.index_select(1, rows(starts))
    for offset in range(1, max(counts)):
        if offset < min(counts):
            total += values.index_select(1, rows([start + offset for start in starts]))
        else:
            longer = [j for j, count in enumerate(counts) if count > offset]
            total[:, rows(longer)] += values.index_select(
                1, rows([starts[j] + offset for j in longer])
            )
    return total / torch.tensor(counts, dtype=values.dtype, device=device)[None, :, None]


def _pooling_windows(length: int, size: int) -> tuple[list[int], list[int]]:
    """First input and input count of each of `size` adaptive-pooling windows over `length`
    (plain integers: the windows depend on shapes only, so exported graphs hold constants)."""
    starts = [j * length // size for j in range(size)]
    ends = [-(-(j + 1) * length // size) for j in range(size)]
    return starts, [end - start for start, end in zip(starts, ends)]


class PatchEmbedder(torch.nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> patch features [B*h*w, D] and the patch grid (h, w)."""

    def __init__(self, extractor: FeatureExtractor, aggregator: PatchFeatureAggregator) -> None:
        super().__init__()
        self.extractor = extractor
        self.aggregator = aggregator

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
        return self.aggregator(self.extractor(images))


def build_embedder(config: PatchCoreConfig, pretrained: bool | None = None) -> PatchEmbedder:
    """The embedder `config` describes; `pretrained=False` builds placeholder weights (never
    downloads) for a caller that loads the weights itself, None follows the configuration."""
    pretrained = config.pretrained if pretrained is None else pretrained
    backbone = load_backbone(config.backbone_name, pretrained, init_seed=config.seed)
    aggregator = PatchFeatureAggregator(
        config.patchsize,
        config.patchstride,
        config.pretrain_embed_dimension,
        config.target_embed_dimension,
    )
    return PatchEmbedder(FeatureExtractor(backbone, config.layers), aggregator)
