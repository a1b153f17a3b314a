"""Patch features equal a direct transcription of the reference algorithm."""

import torch
import torch.nn.functional as F

from patchcore.model.features import PatchFeatureAggregator, patch_grid_size


def straightforward_patch_features(maps, patchsize, pretrain_dim, target_dim):
    """Reference order: patchify every layer, resize the flattened neighbourhoods of deeper
    layers to the first grid, pool each layer's neighbourhoods, then pool across layers."""
    padding = (patchsize - 1) // 2
    per_layer = []
    grid = None
    for layer_map in maps:
        batch, channels, height, width = layer_map.shape
        unfolded = F.unfold(layer_map, patchsize, padding=padding)  # B, C*p*p, L
        neighbourhoods = unfolded.reshape(batch, channels * patchsize * patchsize, height, width)
        if grid is None:
            grid = (height, width)
        else:
            neighbourhoods = F.interpolate(
                neighbourhoods, size=grid, mode="bilinear", align_corners=False
            )
        flat = neighbourhoods.permute(0, 2, 3, 1).reshape(-1, channels * patchsize * patchsize)
        per_layer.append(F.adaptive_avg_pool1d(flat[:, None, :], pretrain_dim)[:, 0])
    stacked = torch.stack(per_layer, dim=1).reshape(len(per_layer[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim)[:, 0], grid


def test_matches_reference_order_of_operations():
    generator = torch.Generator().manual_seed(1)
    maps = [
        torch.randn(2, 12, 8, 8, generator=generator),
        torch.randn(2, 20, 4, 4, generator=generator),
    ]
    aggregator = PatchFeatureAggregator(
        3, 1, pretrain_embed_dimension=16, target_embed_dimension=10
    )
    features, grid = aggregator(maps)
    expected, expected_grid = straightforward_patch_features(maps, 3, 16, 10)
    assert grid == expected_grid == (8, 8)
    assert features.shape == (2 * 8 * 8, 10)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_patchsize_five_and_one():
    maps = [torch.randn(1, 6, 7, 7), torch.randn(1, 6, 4, 4)]
    for patchsize in (1, 5):
        features, grid = PatchFeatureAggregator(patchsize, 1, 8, 8)(maps)
        expected, _ = straightforward_patch_features(maps, patchsize, 8, 8)
        assert grid == (7, 7)
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_patch_grid_size_same_padding():
    assert patch_grid_size(28, 3, 1) == 28
    assert patch_grid_size(28, 5, 1) == 28
    assert patch_grid_size(28, 3, 2) == 14
