"""Pixel anomaly maps from patch scores: bilinear upsampling, then Gaussian smoothing.

The smoothing equals `scipy.ndimage.gaussian_filter(map, sigma)` (truncate 4.0, mode
'reflect', i.e. edge-including mirror padding), done in torch on the maps' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_SIGMA = 4.0
TRUNCATE = 4.0


def gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _mirror_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices padding an axis by `radius` on both sides as 'd c b a | a b c d | d c b a'."""
    positions = torch.arange(-radius, size + radius, device=device)
    period = 2 * size
    positions = positions % period
    return torch.where(positions >= size, period - 1 - positions, positions)


def gaussian_blur(maps: torch.Tensor, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """maps [B, H, W] -> smoothed maps of the same shape."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, maps.device)
    radius = (len(kernel) - 1) // 2
    height, width = maps.shape[-2:]
    padded = maps.index_select(-1, _mirror_indices(width, radius, maps.device))
    rows = F.conv1d(padded.reshape(-1, 1, padded.shape[-1]), kernel.view(1, 1, -1))
    rows = rows.reshape(maps.shape[0], height, width)
    padded = rows.index_select(-2, _mirror_indices(height, radius, maps.device))
    columns = padded.transpose(1, 2).reshape(-1, 1, height + 2 * radius)
    smoothed = F.conv1d(columns, kernel.view(1, 1, -1))
    return smoothed.reshape(maps.shape[0], width, height).transpose(1, 2).contiguous()


def patch_scores_to_maps(
    patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = DEFAULT_SIGMA
) -> torch.Tensor:
    """patch_scores [B, h, w] -> anomaly maps [B, H, W] at the input image size."""
    upsampled = F.interpolate(
        patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False
    ).squeeze(1)
    return gaussian_blur(upsampled, sigma)
