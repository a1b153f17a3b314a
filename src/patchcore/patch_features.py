"""Locally aware patch features, as the PatchCore paper and reference implementation build them.

For each layer: every position's p x p neighbourhood (zero padded, stride s) is flattened in
(channel, row, column) order and average-pooled to `pretrain_embed_dimension` values. The
deeper layers' grids are bilinearly resized to the first layer's grid. The per-layer vectors
are concatenated and average-pooled once more to `target_embed_dimension`.

The reference resizes the flattened neighbourhoods and pools afterwards; both steps are
linear and act on different axes, so we pool first (9x less data to resize) and get the same
features up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
        neighbourhoods = unfolded.transpose(1, 2).reshape(batch * grid_h * grid_w, 1, -1)
        pooled = F.adaptive_avg_pool1d(neighbourhoods, self.pretrain_embed_dimension)
        return pooled.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2)

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
        stacked = stacked.reshape(batch * grid[0] * grid[1], 1, -1)
        features = F.adaptive_avg_pool1d(stacked, self.target_embed_dimension).squeeze(1)
        return features, (int(grid[0]), int(grid[1]))
