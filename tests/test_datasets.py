"""MVTec-layout loading: masks by stem, conversions, splits, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.config import PreprocessingConfig
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.errors import DataError

PRE = PreprocessingConfig(resize=40, imagesize=32)


def write_image(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def layout(tmp_path):
    """A category whose mask names sort in a different order than their images."""
    root = tmp_path / "data"
    category = root / "widget"
    for index in range(5):
        write_image(
            category / "train" / "good" / f"img_{index}.png",
            np.full((48, 60, 3), 40 * index, np.uint8),
        )
    write_image(category / "test" / "good" / "ok_1.jpg", np.full((48, 60), 90, np.uint8))
    # Stems whose sort order differs from the mask-file sort order.
    for stem, left in (("b_10", True), ("b_9", False)):
        write_image(category / "test" / "dent" / f"{stem}.png", np.zeros((48, 60, 3), np.uint8))
        mask = np.zeros((48, 60), np.uint8)
        if left:
            mask[:, :30] = 255
        else:
            mask[:, 30:] = 255
        write_image(category / "ground_truth" / "dent" / f"{stem}_mask.png", mask)
    return root


def test_masks_are_matched_by_stem(layout):
    samples = list_samples(layout, "widget", "test")
    dataset = ImageDataset(samples, PreprocessingConfig(resize=48, imagesize=48))
    by_name = {dataset[i]["image_name"]: dataset[i] for i in range(len(dataset))}
    assert set(by_name) == {"good_ok_1", "dent_b_10", "dent_b_9"}
    left = by_name["dent_b_10"]["mask"][0]
    right = by_name["dent_b_9"]["mask"][0]
    assert left[:, :20].all() and not left[:, -20:].any()
    assert right[:, -20:].all() and not right[:, :20].any()
    assert not by_name["good_ok_1"]["mask"].any()
    assert by_name["dent_b_9"]["is_anomaly"] == 1 and by_name["good_ok_1"]["is_anomaly"] == 0


def test_grayscale_becomes_rgb_and_images_are_resized_and_cropped(layout):
    dataset = ImageDataset(list_samples(layout, "widget", "test"), PRE)
    item = dataset[[s.defect_type for s in dataset.samples].index("good")]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"], torch.full_like(item["image"], 90 / 255), atol=1e-3)
    reference_mask = dataset[0]["mask"]
    assert 0.0 <= reference_mask.min() and reference_mask.max() <= 1.0
    binary = ImageDataset(dataset.samples, PRE, mask_rule="binary")
    assert set(torch.unique(binary[0]["mask"]).tolist()) <= {0.0, 1.0}


def test_train_val_split_holds_out_the_last_normal_images(layout):
    train = list_samples(layout, "widget", "train", train_val_split=0.6)
    val = list_samples(layout, "widget", "val", train_val_split=0.6)
    assert [s.image_path.name for s in train] == ["img_0.png", "img_1.png", "img_2.png"]
    assert [s.image_path.name for s in val] == ["img_3.png", "img_4.png"]
    assert list_samples(layout, "widget", "val") == []


def test_missing_category_and_empty_train_folder(layout):
    with pytest.raises(DataError, match="category folder .*nope does not exist"):
        list_samples(layout, "nope", "train")
    for path in (layout / "widget" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="train/good holds no images"):
        list_samples(layout, "widget", "train")


def test_missing_mask_is_an_error_for_mvtec_but_not_for_folder_datasets(layout):
    (layout / "widget" / "ground_truth" / "dent" / "b_9_mask.png").unlink()
    with pytest.raises(DataError, match="b_9.png: no mask; expected .*b_9_mask.png"):
        list_samples(layout, "widget", "test")
    samples = list_samples(layout, "widget", "test", masks_required=False)
    item = ImageDataset(samples, PRE)[[s.image_path.stem for s in samples].index("b_9")]
    assert item["has_mask"] is False


def test_corrupt_image_and_wrong_size_mask_name_the_file(layout):
    broken = layout / "widget" / "test" / "dent" / "b_10.png"
    broken.write_bytes(b"not an image at all")
    dataset = ImageDataset(list_samples(layout, "widget", "test"), PRE)
    names = [s.image_path.name for s in dataset.samples]
    with pytest.raises(DataError, match="b_10.png: cannot read image"):
        dataset[names.index("b_10.png")]
    write_image(
        layout / "widget" / "ground_truth" / "dent" / "b_9_mask.png", np.zeros((10, 10), np.uint8)
    )
    with pytest.raises(DataError, match="b_9_mask.png: mask is 10x10 but its image"):
        dataset[names.index("b_9.png")]
