import numpy as np
import scipy.ndimage
import torch

from patchcore.model.scoring import gaussian_blur, patch_scores_to_maps


def test_gaussian_blur_equals_scipy_including_maps_smaller_than_the_kernel():
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 56, 40), (1, 9, 13)]:
        maps = torch.rand(*shape, generator=generator)
        expected = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in maps.numpy()])
        np.testing.assert_allclose(gaussian_blur(maps, 4.0).numpy(), expected, atol=1e-6)


def test_maps_are_upsampled_to_the_image_size_bilinearly_then_smoothed():
    patch_scores = torch.rand(3, 28, 28)
    maps = patch_scores_to_maps(patch_scores, (224, 224))
    assert maps.shape == (3, 224, 224)
    upsampled = torch.nn.functional.interpolate(patch_scores[:, None], size=224, mode="bilinear")
    expected = np.stack([scipy.ndimage.gaussian_filter(m, 4) for m in upsampled[:, 0].numpy()])
    np.testing.assert_allclose(maps.numpy(), expected, atol=1e-5)
