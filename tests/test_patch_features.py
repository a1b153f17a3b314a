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


def test_axis_pooling_has_the_arithmetic_of_adaptive_average_pooling():
    from patchcore.model.features import average_pool_axis

    generator = torch.Generator().manual_seed(2)
    for length, size in [(4608, 1024), (9216, 1024), (360, 1024), (1008, 1024), (2048, 1024),
                         (17, 5), (5, 17), (7, 7), (100, 1)]:  # fmt: skip
        values = torch.randn(3, length, 6, generator=generator)
        expected = F.adaptive_avg_pool1d(values.transpose(1, 2).reshape(-1, 1, length), size)
        expected = expected.reshape(3, 6, size).transpose(1, 2)
        assert torch.equal(average_pool_axis(values, size), expected), (length, size)


def test_features_are_bit_identical_to_pooling_transposed_neighbourhoods():
    """The aggregator's speed-up (pooling along the unfolded tensor's feature axis) changes
    no bit of the features of the straightforward form: transpose, then adaptive pooling."""

    def transposed_form(aggregator, maps):
        per_layer = []
        for layer_map in maps:
            batch, _, height, width = layer_map.shape
            unfolded = F.unfold(layer_map, aggregator.patchsize, padding=1)
            rows = unfolded.transpose(1, 2).reshape(batch * height * width, 1, -1)
            pooled = F.adaptive_avg_pool1d(rows, aggregator.pretrain_embed_dimension)
            per_layer.append(pooled.reshape(batch, height, width, -1).permute(0, 3, 1, 2))
        grid = per_layer[0].shape[-2:]
        per_layer = [per_layer[0]] + [
            F.interpolate(layer, size=grid, mode="bilinear", align_corners=False)
            for layer in per_layer[1:]
        ]
        stacked = torch.stack(per_layer, dim=1).permute(0, 3, 4, 1, 2)
        stacked = stacked.reshape(-1, 1, stacked.shape[-2] * stacked.shape[-1])
        return F.adaptive_avg_pool1d(stacked, aggregator.target_embed_dimension).squeeze(1)

    generator = torch.Generator().manual_seed(3)
    maps = [torch.randn(2, 24, 10, 10, generator=generator).relu(),
            torch.randn(2, 40, 5, 5, generator=generator).relu()]  # fmt: skip
    for pretrain, target in [(64, 48), (300, 700), (1024, 1024)]:
        aggregator = PatchFeatureAggregator(3, 1, pretrain, target)
        features, _ = aggregator(maps)
        assert torch.equal(features, transposed_form(aggregator, maps))
