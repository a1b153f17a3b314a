"""Patch features equal a direct transcription of the reference algorithm."""

import torch
import torch.nn.functional as F

from patchcore.model.features import PatchFeatureAggregator, patch_grid_size


def straightforward_patch_features(maps, patchsize, pretrain_dim, target_dim, stride=1):
    """Reference order: patchify every layer, resize the flattened neighbourhoods of deeper
    layers to the first grid, pool each layer's neighbourhoods, then pool across layers."""
    padding = (patchsize - 1) // 2
    per_layer = []
    grid = None
    for layer_map in maps:
        batch, channels = layer_map.shape[:2]
        height, width = (patch_grid_size(size, patchsize, stride) for size in layer_map.shape[2:])
        unfolded = F.unfold(layer_map, patchsize, padding=padding, stride=stride)  # B, C*p*p, L
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


def test_matches_the_reference_across_shapes_strides_and_straddling_windows():
    """Every configuration kind: windows wider and narrower than a channel's neighbourhood,
    final averages straddling two layers, three layers, stride 2, patch sizes 1 to 5, a
    single target value, channels-last maps."""
    generator = torch.Generator().manual_seed(3)
    cases = [  # channels per layer, grids, patchsize, stride, pretrain, target
        ((24, 40), (10, 5), 3, 1, 64, 48),
        ((24, 40), (10, 5), 3, 1, 300, 700),
        ((24, 40), (10, 5), 3, 1, 1024, 1024),
        ((24, 40), (10, 5), 3, 1, 100, 67),  # 200 values to 67: averages cross layers
        ((8, 12, 6), (9, 6, 3), 3, 1, 20, 13),
        ((16, 32), (11, 6), 3, 2, 40, 24),
        ((16, 32), (8, 4), 2, 1, 40, 24),
        ((16, 32), (8, 4), 5, 1, 40, 24),
        ((16, 32), (8, 4), 1, 1, 40, 24),
        ((16, 32), (8, 4), 3, 1, 40, 1),
    ]
    for channels, grids, patchsize, stride, pretrain, target in cases:
        maps = [torch.randn(2, count, size, size + 1, generator=generator).relu()
                for count, size in zip(channels, grids)]  # fmt: skip
        aggregator = PatchFeatureAggregator(patchsize, stride, pretrain, target)
        expected, expected_grid = straightforward_patch_features(
            maps, patchsize, pretrain, target, stride
        )
        features, grid = aggregator(maps)
        assert grid == expected_grid
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
        last = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        torch.testing.assert_close(aggregator(last)[0], expected, rtol=1e-5, atol=1e-6)


def test_composed_convolutions_are_grouped_as_finely_as_the_windows_allow():
    """WideResNet50 layer2/layer3 at 1024/1024: each final value of layer2 averages one
    channel's neighbourhood (depthwise), each of layer3 two channels'; EfficientNet-Lite0's
    40 and 112 channels fall into blocks of 5 and 7 channels."""
    from patchcore.model.features import composed_poolings

    def layout(channels):
        return [(p.first, tuple(p.weight.shape), p.groups)
                for p in composed_poolings(channels, 3, 1024, 1024)]  # fmt: skip

    assert layout((512, 1024)) == [(0, (512, 1, 3, 3), 512), (512, (512, 2, 3, 3), 512)]
    assert layout((40, 112)) == [(0, (512, 5, 3, 3), 8), (512, (512, 7, 3, 3), 16)]
    # WideResNet50 layer2: each value is (the neighbourhood's sum + its centre) / 10
    centre_weighted = torch.full((3, 3), 0.1, dtype=torch.float64)
    centre_weighted[1, 1] = 0.2
    weight = composed_poolings((512, 1024), 3, 1024, 1024)[0].weight
    assert torch.allclose(weight[:, 0], centre_weighted.expand(512, 3, 3))
