"""The one preprocessing module: reference-exact by default, whole images and tiles beyond it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision import transforms as reference_transforms

from conftest import SHARED_MAGNETIC_TILE, small_config
from patchcore.config import PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.data.datasets import ImageDataset, Sample, SizeGroupedBatchSampler
from patchcore.data.preprocessing import (
    apply_taps,
    cut_tiles,
    defective_pixels,
    frame_of,
    has_defect,
    image_tensor,
    map_to_input_frame,
    mask_tensor,
    open_image,
    open_mask,
    pillow_resamples_rows_first_when_height_shrinks_most,
    resamples_rows_first,
    resize_taps,
    tile_indices,
    tile_origins,
    to_model_input,
    to_tensor,
)
from patchcore.data.synthetic import make_sample, sample_rng
from patchcore.errors import ConfigurationError, DataError
from patchcore.evaluation.metrics import compute_metrics
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import stitch_tiles


def reference_image_transform(resize: int, imagesize: int):
    """The reference's image chain (datasets/mvtec.py) without its Normalize, which our
    backbone applies: PIL resize of the shorter side, centre crop, ToTensor."""
    return reference_transforms.Compose([
        reference_transforms.Resize(resize),
        reference_transforms.CenterCrop(imagesize),
        reference_transforms.ToTensor(),
    ])  # fmt: skip


def write_image(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def noise_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize(
    ("shape", "suffix"),
    [((256, 256, 3), ".png"), ((300, 200, 3), ".png"), ((217, 331), ".jpg"), ((120, 301), ".png")],
)
@pytest.mark.parametrize(("resize", "imagesize"), [(256, 224), (100, 80)])
def test_default_tensors_equal_the_reference_chain_bit_for_bit(
    tmp_path, shape, suffix, resize, imagesize
):
    path = write_image(tmp_path / f"image{suffix}", noise_image(shape, seed=len(shape) + shape[0]))
    config = PreprocessingConfig(resize=resize, imagesize=imagesize)
    expected = reference_image_transform(resize, imagesize)(Image.open(path).convert("RGB"))
    ours = image_tensor(open_image(path, "RGB"), config)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)
    dataset = ImageDataset([Sample(path, None, "good", False)], config)
    assert torch.equal(dataset[0]["image"], expected)


def test_real_grayscale_jpegs_equal_the_reference_chain():
    if not SHARED_MAGNETIC_TILE.is_dir():
        pytest.skip(f"{SHARED_MAGNETIC_TILE} is not available")
    config = PreprocessingConfig()
    for path in sorted((SHARED_MAGNETIC_TILE / "test" / "crack").glob("*.jpg"))[:3]:
        expected = reference_image_transform(256, 224)(Image.open(path).convert("RGB"))
        assert torch.equal(image_tensor(open_image(path, "RGB"), config), expected)


def test_reference_mask_rule_follows_the_reference_chain(tmp_path):
    mask = np.zeros((300, 200), dtype=np.uint8)
    mask[100:160, 20:90] = 255
    path = write_image(tmp_path / "m_mask.png", mask)
    config = PreprocessingConfig(resize=100, imagesize=80)
    expected = reference_image_transform(100, 80)(Image.open(path))  # masks are not converted
    soft = mask_tensor(open_mask(path), config, "reference")
    assert torch.equal(soft, expected)
    assert 0 < ((soft > 0) & (soft < 1)).sum()  # bilinear edges
    binary = mask_tensor(open_mask(path), config, "binary")
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    # The reference counts a pixel as defective only at exactly 1.0 ...
    assert torch.equal(defective_pixels(soft), soft == 1.0)
    # ... but selects every image with any nonzero value for its anomaly-only metric.
    edge_only = torch.zeros(1, 1, 4, 4)
    edge_only[0, 0, 0, 0] = 0.3
    assert has_defect(edge_only).tolist() == [True] and not defective_pixels(edge_only).any()
    with pytest.raises(ConfigurationError, match="--mask_rule must be one of"):
        mask_tensor(open_mask(path), config, "fuzzy")


def test_zero_one_masks_are_read_as_defects_and_named(tmp_path, caplog):
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20, 10:20] = 1
    path = write_image(tmp_path / "ones_mask.png", mask)
    opened = open_mask(path)
    assert np.asarray(opened).max() == 255
    assert str(path) in caplog.text and "0/1" in caplog.text


def test_metrics_follow_the_reference_rule_checked_with_sklearn():
    generator = np.random.default_rng(4)
    maps = generator.random((6, 16, 16)).astype(np.float32)
    soft = np.zeros((6, 16, 16), dtype=np.float32)
    soft[1, 4:9, 4:9] = 1.0
    soft[1, 3, 4:9] = 0.5  # a bilinear edge: not defective, but it counts for selection
    soft[2, 0, 0] = 0.25  # an image with only a faint edge: selected, no defective pixel
    soft[3, 10:14, 2:6] = 1.0
    maps[1, 4:9, 4:9] += 0.5
    scores = maps.reshape(6, -1).max(axis=1)
    labels = (soft.reshape(6, -1) > 0).any(axis=1)
    ours = compute_metrics(
        scores, labels, maps, soft >= 1.0, defect_images=(soft.reshape(6, -1) > 0).any(axis=1)
    )
    pixel_labels = soft.reshape(-1).astype(int)  # the reference: astype(int), only 1.0 -> 1
    assert ours["full_pixel_auroc"] == pytest.approx(roc_auc_score(pixel_labels, maps.reshape(-1)))
    selected = [i for i in range(6) if np.sum(soft[i]) > 0]  # the reference's selection
    assert selected == [1, 2, 3]
    anomaly = roc_auc_score(soft[selected].reshape(-1).astype(int), maps[selected].reshape(-1))
    assert ours["anomaly_pixel_auroc"] == pytest.approx(anomaly)


def test_metrics_take_maps_of_different_sizes():
    generator = np.random.default_rng(5)
    maps = [generator.random((8, 12)), generator.random((10, 6)), generator.random((8, 12))]
    masks = [np.zeros((8, 12), bool), np.zeros((10, 6), bool), np.zeros((8, 12), bool)]
    masks[1][2:5, 1:3] = True
    masks[2][0:2, 0:4] = True
    ours = compute_metrics(np.array([0.1, 0.9, 0.5]), np.array([0, 1, 1]), maps, masks)
    flat_maps = np.concatenate([m.ravel() for m in maps])
    flat_masks = np.concatenate([m.ravel() for m in masks])
    assert ours["full_pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps))
    anomaly = roc_auc_score(
        np.concatenate([m.ravel() for m in masks[1:]]), np.concatenate([m.ravel() for m in maps[1:]])
    )
    assert ours["anomaly_pixel_auroc"] == pytest.approx(anomaly)
    with pytest.raises(DataError, match="image 1: map has shape"):
        compute_metrics(np.zeros(3), np.array([0, 1, 1]), maps, [masks[0], masks[0], masks[2]])


def test_sixteen_bit_images_read_like_their_eight_bit_originals(tmp_path):
    original = noise_image((64, 80), seed=3)
    eight = write_image(tmp_path / "eight.png", original)
    sixteen = write_image(tmp_path / "sixteen.png", original.astype(np.uint16) * 257)
    assert Image.open(sixteen).mode.startswith("I;16")
    assert np.array_equal(np.asarray(open_image(sixteen, "RGB")), np.asarray(open_image(eight)))
    floats = Image.fromarray(original.astype(np.float32) / 255.0)
    floats.save(tmp_path / "float.tif")
    assert np.array_equal(np.asarray(open_image(tmp_path / "float.tif")), np.asarray(open_image(eight)))
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(tmp_path / "hot.tif")
    with pytest.raises(DataError, match="hot.tif: 32-bit float image with values outside"):
        open_image(tmp_path / "hot.tif")
    config = small_config(sampler=SamplerConfig("identity"))
    model = PatchCore(config, search=SearchConfig("torch"))
    images = [image_tensor(open_image(p), config.preprocessing) for p in (eight, sixteen)]
    model.fit([torch.stack([images[0]])])
    scores = model.predict(torch.stack(images)).scores
    assert scores[0] == scores[1]


def test_whole_image_mode_keeps_the_aspect_ratio_and_every_pixel(tmp_path):
    path = write_image(tmp_path / "wide.png", noise_image((460, 1130, 3), seed=1))
    config = PreprocessingConfig(resize=256, crop="none")
    tensor = image_tensor(open_image(path), config)
    assert tuple(tensor.shape) == (3, 256, 628)  # int(256 * 1130 / 460)
    capped = PreprocessingConfig(resize=256, crop="none", max_size=400)
    assert tuple(image_tensor(open_image(path), capped).shape) == (3, 163, 400)
    frame = frame_of((460, 1130), PreprocessingConfig())
    assert frame.size == (224, 224) and frame.resized == (256, 628)  # the crop keeps 36 %
    maps = torch.rand(1, 256, 628)
    back = map_to_input_frame(maps, (460, 1130), config)
    assert back.shape == (1, 460, 1130)
    torch.testing.assert_close(
        to_model_input(torch.rand(1, 3, 460, 1130), config).shape[-2:], torch.Size([256, 628])
    )


def test_a_fixed_scale_resizes_every_image_by_one_factor(tmp_path):
    config = PreprocessingConfig(crop="none", scale=0.5)
    sizes = {(460, 1130): (230, 565), (301, 107): (150, 54), (64, 64): (32, 32)}
    for (height, width), expected in sizes.items():  # round(side * 0.5), half to even
        path = write_image(tmp_path / f"{width}.png", noise_image((height, width, 3), seed=3))
        tensor = image_tensor(open_image(path), config)
        assert tuple(tensor.shape[1:]) == expected, (height, width)
        frame = frame_of((height, width), config)
        assert frame.size == frame.resized == expected and (frame.top, frame.left) == (0, 0)
        pil = Image.open(path).convert("RGB").resize(expected[::-1], Image.BILINEAR)
        assert torch.equal(tensor, reference_transforms.ToTensor()(pil))  # PIL's resize
    assert tuple(frame_of((460, 1130), PreprocessingConfig(crop="none", scale=1.0)).size) == (
        460, 1130)  # fmt: skip
    capped = PreprocessingConfig(crop="none", scale=2.0, max_size=1000)
    assert frame_of((460, 1130), capped).size == (407, 1000)  # int(1000 * 920 / 2260)
    maps = torch.rand(1, 230, 565)
    assert map_to_input_frame(maps, (460, 1130), config).shape == (1, 460, 1130)
    assert to_model_input(torch.rand(1, 3, 460, 1130), config).shape[-2:] == (230, 565)


def test_images_of_different_sizes_are_batched_by_size():
    sampler = SizeGroupedBatchSampler([(4, 6), (4, 8), (4, 6), (4, 6), (4, 8)], batch_size=2)
    assert list(sampler) == [[0, 2], [3], [1, 4]]
    same = SizeGroupedBatchSampler([(4, 4)] * 5, batch_size=2)
    assert list(same) == [[0, 1], [2, 3], [4]]


def test_bad_preprocessing_options_are_one_line_errors(tmp_path):
    cases = [
        ({"tile_overlap": 1.0}, "--tile_overlap must be in [0, 1), got 1.0"),
        ({"crop": "none", "max_size": 200}, "--max_size must be >= --resize (256), got 200"),
        ({"tile": 300}, "--tile 300 is larger than the 224 px centre crop"),
        ({"crop": "sides"}, "--crop must be one of center, none"),
        ({"resize": 16, "imagesize": 16}, "--resize must be an integer >= 32"),
        ({"crop": "none", "scale": 0.0}, "--scale must be a number > 0, got 0.0"),
        ({"crop": "none", "scale": float("nan")}, "--scale must be a number > 0, got nan"),
        ({"scale": 0.5}, "--scale needs --crop none"),
        ({"crop": "none", "scale": 0.5, "max_size": 16}, "--max_size must be >= 32, got 16"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigurationError) as raised:
            PreprocessingConfig(**changes)
        assert message in str(raised.value) and "\n" not in str(raised.value)
    small = write_image(tmp_path / "tiny.png", noise_image((10, 400, 3), seed=2))
    dataset = ImageDataset([Sample(small, None, "good", False)], PreprocessingConfig(crop="none", resize=32, max_size=200))
    with pytest.raises(DataError, match="tiny.png: the working image is 200x5 pixels"):
        dataset.working_sizes()
    wide = write_image(tmp_path / "wide.png", noise_image((100, 300, 3), seed=2))
    tiled = ImageDataset(
        [Sample(wide, None, "good", False)], PreprocessingConfig(resize=64, crop="none", tile=96)
    )
    with pytest.raises(DataError, match=r"wide.png: --tile 96 is larger than the working image"):
        tiled.working_sizes()


def test_tiles_cover_the_image_and_overlaps_are_averaged():
    assert tile_origins(100, 40, 0.0) == [0, 40, 60]
    assert tile_origins(100, 40, 0.5) == [0, 20, 40, 60]
    assert tile_origins(40, 40, 0.25) == [0]
    images = torch.arange(2 * 3 * 6 * 10, dtype=torch.float32).reshape(2, 3, 6, 10)
    tile_rows, tile_columns = tile_indices((6, 10), 6, 0.0)
    assert tile_rows.tolist() == [list(range(6))]
    assert tile_columns.tolist() == [list(range(6)), list(range(4, 10))]
    tiles = cut_tiles(images, tile_rows, tile_columns)
    assert tiles.shape == (4, 3, 6, 6)
    assert torch.equal(tiles[1], images[0, :, :, 4:10]) and torch.equal(tiles[2], images[1, :, :, :6])
    constant = torch.tensor([1.0, 3.0]).view(2, 1, 1).expand(2, 2, 2)  # one image, two tiles
    stitched = stitch_tiles(constant, tile_rows, tile_columns, (6, 10))
    assert stitched.shape == (1, 6, 10)
    assert torch.all(stitched[0, :, :4] == 1.0) and torch.all(stitched[0, :, 6:] == 3.0)
    assert torch.all(stitched[0, :, 4:6] == 2.0)  # the overlap: the mean of both tiles


@pytest.mark.parametrize(("size", "tile", "overlap"), [((70, 93), 32, 0.5), ((64, 100), 24, 0.0)])
def test_tiles_by_index_are_slices_and_stitch_like_a_loop_over_the_tiles(size, tile, overlap):
    """`cut_tiles` and `stitch_tiles` (written by index, for graphs of any size) against the
    plain loop over the tiles' slices: the same tiles, and on the CPU the same map bit for
    bit (each pixel's sum in the tiles' order)."""
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, *size, generator=generator)
    origins = [(top, left) for top in tile_origins(size[0], tile, overlap)
               for left in tile_origins(size[1], tile, overlap)]  # fmt: skip
    tile_rows, tile_columns = tile_indices(size, tile, overlap)
    sliced = torch.stack([images[:, :, top : top + tile, left : left + tile]
                          for top, left in origins], dim=1).reshape(-1, 3, tile, tile)  # fmt: skip
    assert torch.equal(cut_tiles(images, tile_rows, tile_columns), sliced)
    patch_scores = torch.rand(2 * len(origins), 4, 4, generator=generator) * 7.0
    upsampled = torch.nn.functional.interpolate(
        patch_scores.unsqueeze(1), size=(tile, tile), mode="bilinear", align_corners=False
    ).reshape(2, len(origins), tile, tile)
    total, coverage = torch.zeros(2, *size), torch.zeros(1, *size)
    for position, (top, left) in enumerate(origins):
        total[:, top : top + tile, left : left + tile] += upsampled[:, position]
        coverage[:, top : top + tile, left : left + tile] += 1.0
    assert coverage.max() > 1.0 or overlap == 0.0  # overlaps are averaged where there are any
    assert torch.equal(stitch_tiles(patch_scores, tile_rows, tile_columns, size), total / coverage)


def test_one_tile_over_the_whole_image_gives_the_whole_image_map(synthetic_root):
    whole = small_config(preprocessing=PreprocessingConfig(resize=64, imagesize=64))
    tiled = small_config(preprocessing=PreprocessingConfig(resize=64, imagesize=64, tile=64))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    predictions = []
    for config in (whole, tiled):
        model = PatchCore(config, search=SearchConfig("torch"))
        model.fit([images[:2]])
        predictions.append(model.predict(images))
    torch.testing.assert_close(predictions[1].maps, predictions[0].maps)
    assert torch.all(predictions[1].scores <= predictions[0].scores + 1e-6)
    with pytest.raises(ConfigurationError, match="--score_reweighting is not defined for tiled"):
        small_config(score_reweighting=True, preprocessing=tiled.preprocessing)


# ---------------------------------------------------------------- edge defects
def wide_texture(seed: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two 96 px synthetic texture tiles side by side (96 x 192); with `defect`, a dark blob
    in the left 40 pixels, which a centre crop of the resized image never sees."""
    halves = [make_sample("texture", None, 96, sample_rng(seed, "texture", 0, i)).image
              for i in range(2)]  # fmt: skip
    image = np.concatenate(halves, axis=1)
    mask = np.zeros(image.shape[:2], dtype=bool)
    if defect:
        rows, columns = np.ogrid[:96, :192]
        mask = (rows - 48) ** 2 + (columns - 18) ** 2 <= 10**2
        image = image.copy()
        image[mask] = (image[mask] * 0.25).astype(np.uint8)
    return image, mask


def test_a_defect_at_the_image_edge_is_found_whole_image_and_missed_by_the_crop(tmp_path):
    samples, masks = [], {}
    for index in range(14):
        defect = index >= 10
        image, mask = wide_texture(100 + index, defect)
        path = write_image(tmp_path / f"{index:02d}.png", image)
        samples.append(Sample(path, None, "hole" if defect else "good", defect))
        masks[path] = mask
    train, test = samples[:6], samples[6:]
    found = {}
    for crop in ("none", "center"):
        preprocessing = PreprocessingConfig(resize=96, imagesize=96, crop=crop)
        config = small_config(
            backbone_name="efficientnet_lite0", layers=("_blocks.4", "_blocks.10"),
            pretrained=True, preprocessing=preprocessing,
            sampler=SamplerConfig("identity"),
        )  # fmt: skip
        model = PatchCore(config, search=SearchConfig("torch"))
        model.fit([torch.stack([ImageDataset(train, preprocessing)[i]["image"] for i in range(6)])])
        dataset = ImageDataset(test, preprocessing)
        prediction = model.predict(torch.stack([dataset[i]["image"] for i in range(len(test))]))
        normal, defective = prediction.scores[:4], prediction.scores[4:]
        found[crop] = int((defective > normal.max()).sum())
        if crop == "none":
            for index, sample in enumerate(test[4:], start=4):
                peak = np.unravel_index(int(prediction.maps[index].argmax()), (96, 192))
                assert masks[sample.image_path][max(0, peak[0] - 8) : peak[0] + 8,
                                                max(0, peak[1] - 8) : peak[1] + 8].any()  # fmt: skip
        else:
            frame = frame_of((96, 192), preprocessing)
            assert frame.left == 48  # the crop keeps columns 48..143: the blob (8..28) is out
    assert found["none"] == 4
    assert found["center"] < found["none"]


def test_the_tensor_path_equals_the_file_path_bit_for_bit_on_every_geometry():
    """40 random 8-bit images of random sizes through every geometry (centre crop, whole
    image, a fixed scale that shrinks or enlarges, small crops): `to_model_input` on the
    decoded image equals `image_tensor` (Pillow) exactly, in whichever order Pillow takes the
    two axes."""
    generator = np.random.default_rng(0)
    orders = set()
    for _ in range(40):
        height, width = (int(side) for side in generator.integers(40, 500, size=2))
        picture = Image.fromarray(noise_image((height, width, 3), int(generator.integers(1 << 30))))
        configs = [
            PreprocessingConfig(),
            PreprocessingConfig(crop="none"),
            PreprocessingConfig(crop="none", scale=float(generator.uniform(0.2, 2.5))),
            PreprocessingConfig(resize=int(generator.integers(64, 400)), imagesize=64),
        ]
        for config in configs:
            expected = image_tensor(picture, config)
            frame = frame_of((height, width), config)
            orders.add(resamples_rows_first((height, width), frame.resized))
            assert torch.equal(to_model_input(to_tensor(picture)[None], config)[0], expected)
    assert orders == {False, pillow_resamples_rows_first_when_height_shrinks_most()}


def test_pillow_order_of_passes_is_read_off_pillow():
    """Pillow 13 resamples rows first when the height shrinks by more than twice as many
    pixels as the width; the probe says whether this Pillow does, and the rule then predicts
    Pillow's order on sizes it was not probed with."""
    generator = np.random.default_rng(3)
    for size, resized in [((205, 54), (163, 37)), ((187, 230), (12, 42)), ((100, 100), (80, 90)),
                          ((148, 227), (139, 183)), ((261, 69), (169, 41)), ((90, 60), (30, 200))]:
        pixels = generator.integers(0, 256, size, dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize(resized[::-1], Image.Resampling.BILINEAR))
        tensor = torch.from_numpy(pixels).float()
        rows, columns = resize_taps(size[0], resized[0]), resize_taps(size[1], resized[1])
        rows_first = apply_taps(apply_taps(tensor, 0, rows), 1, columns).numpy()
        columns_first = apply_taps(apply_taps(tensor, 1, columns), 0, rows).numpy()
        ours = rows_first if resamples_rows_first(size, resized) else columns_first
        assert np.array_equal(ours, expected), (size, resized)
        assert not np.array_equal(rows_first, columns_first)  # the order matters here
