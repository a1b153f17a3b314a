"""Tests of the segmentation overlay PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.evaluation import visualization
from patchcore.evaluation.visualization import (
    save_segmentation_images,
)
from patchcore.files import safe_file_stem, unique_file_stems
from patchcore.model.calibration import colour_range


def shared_colour_range(maps):
    return colour_range(None, None, maps)

COUNT, HEIGHT, WIDTH = 3, 32, 40


def _inputs(seed: int = 0) -> dict[str, object]:
    """Small random images, maps, scores, names and masks (the first image is 'good')."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(COUNT, 3, HEIGHT, WIDTH, generator=generator)
    maps = torch.rand(COUNT, HEIGHT, WIDTH, generator=generator) * 3.0
    masks = torch.zeros(COUNT, 1, HEIGHT, WIDTH)
    masks[1:, :, 8:20, 10:25] = 1.0
    return {
        "images": images,
        "anomaly_maps": maps,
        "scores": maps.amax(dim=(1, 2)),
        "names": ["good_000", "crack_001", "crack_002"],
        "masks": masks,
    }


def _assert_pngs(paths: list[Path], folder: Path, stems: list[str]) -> None:
    """`paths` are the expected files in `folder`, each a readable, reasonably sized PNG."""
    assert paths == [folder / f"{stem}.png" for stem in stems]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.load()
            width, height = image.size
        assert 600 <= width <= 1400 and 250 <= height <= 600, image.size


def _pixels(path: Path) -> np.ndarray:
    """The RGB pixels of a PNG as int16."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_writes_one_png_per_image(tmp_path: Path) -> None:
    inputs = _inputs()
    paths = save_segmentation_images(tmp_path / "segmentation", **inputs, threshold=2.0)
    _assert_pngs(paths, tmp_path / "segmentation", list(inputs["names"]))
    assert sorted(p.name for p in (tmp_path / "segmentation").iterdir()) == sorted(
        p.name for p in paths
    )


def test_accepts_numpy_and_unbatched_channel_masks(tmp_path: Path) -> None:
    inputs = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in _inputs().items()}
    inputs["masks"] = inputs["masks"][:, 0]
    inputs["scores"] = list(inputs["scores"])
    paths = save_segmentation_images(tmp_path, **inputs)
    _assert_pngs(paths, tmp_path, list(inputs["names"]))


def test_works_without_masks(tmp_path: Path) -> None:
    inputs = _inputs()
    inputs["masks"] = None
    paths = save_segmentation_images(tmp_path, **inputs)
    _assert_pngs(paths, tmp_path, list(inputs["names"]))


def test_works_when_no_image_has_a_mask(tmp_path: Path) -> None:
    paths = save_segmentation_images(tmp_path, **_inputs(), has_mask=[False] * COUNT)
    _assert_pngs(paths, tmp_path, list(_inputs()["names"]))


def test_mask_panel_differs_with_and_without_ground_truth(tmp_path: Path) -> None:
    inputs = _inputs()
    with_mask = save_segmentation_images(tmp_path / "a", **inputs)[1]
    without = save_segmentation_images(tmp_path / "b", **inputs, has_mask=[True, False, True])[1]
    assert not np.array_equal(_pixels(with_mask), _pixels(without))


def test_shared_colour_range_is_global_min_max() -> None:
    maps = _inputs()["anomaly_maps"]
    vmin, vmax = shared_colour_range(maps)
    assert vmin == pytest.approx(float(np.min(maps.numpy())))
    assert vmax == pytest.approx(float(np.max(maps.numpy())))
    per_image_max = maps.amax(dim=(1, 2))
    assert vmax == pytest.approx(float(per_image_max.max()))
    assert vmax > float(per_image_max.min())  # not per-image rescaling


def test_shared_colour_range_ignores_non_finite_values() -> None:
    maps = np.array([[[1.0, np.nan], [np.inf, 4.0]], [[-2.0, 0.0], [0.5, -np.inf]]])
    assert shared_colour_range(maps) == (-2.0, 4.0)
    with pytest.raises(ValueError, match="anomaly maps"):
        shared_colour_range(np.full((1, 2, 2), np.nan))


def test_default_colour_range_comes_from_shared_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _inputs()
    calls = []

    def recording_range(threshold, statistics, maps) -> tuple[float, float]:
        calls.append([m.shape for m in maps])
        return colour_range(threshold, statistics, maps)

    monkeypatch.setattr(visualization, "default_colour_range", recording_range)
    save_segmentation_images(tmp_path, **inputs)
    assert calls == [[(HEIGHT, WIDTH)] * COUNT]  # once, over all maps together


def test_explicit_colour_range_is_used_and_not_recomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unexpected(*arguments) -> tuple[float, float]:
        raise AssertionError("colour range should not be recomputed")

    monkeypatch.setattr(visualization, "default_colour_range", unexpected)
    paths = save_segmentation_images(tmp_path, **_inputs(), colour_range=(0.0, 10.0))
    assert len(paths) == COUNT


def test_scaled_map_looks_different_under_shared_scale(tmp_path: Path) -> None:
    inputs = _inputs()
    maps = inputs["anomaly_maps"].clone()
    maps[1] = maps[0] * 0.5  # half as anomalous: must look cooler than image 0
    inputs.update(anomaly_maps=maps, names=["a", "b", "c"], masks=None, scores=[1.0, 1.0, 1.0])
    inputs["images"] = inputs["images"][[0, 0, 0]]
    first, second, _ = save_segmentation_images(tmp_path, **inputs)
    assert np.abs(_pixels(first) - _pixels(second)).max() > 50  # per-image rescaling: equal


def test_constant_maps_do_not_crash(tmp_path: Path) -> None:
    inputs = _inputs()
    inputs["anomaly_maps"] = torch.zeros(COUNT, HEIGHT, WIDTH)
    assert len(save_segmentation_images(tmp_path, **inputs)) == COUNT


def test_names_are_sanitised_keeping_letters_of_any_script(tmp_path: Path) -> None:
    inputs = _inputs()
    inputs["names"] = ["good/000", "crack 001", "cräck:002.x"]
    paths = save_segmentation_images(tmp_path, **inputs)
    assert [p.name for p in paths] == ["good_000.png", "crack_001.png", "cräck_002.x.png"]
    assert safe_file_stem("a-b_c.d9") == "a-b_c.d9"
    assert safe_file_stem("傷") == "傷" and safe_file_stem("") == "_"


def test_names_colliding_after_sanitising_get_distinct_files(tmp_path: Path) -> None:
    inputs = _inputs()
    inputs["names"] = ["crack/000", "ok", "crack_000"]
    paths = save_segmentation_images(tmp_path, **inputs)
    assert [p.name for p in paths] == ["crack_000.png", "ok.png", "crack_000-2.png"]
    assert unique_file_stems(["crack", "Crack", "bild äöü", "bild öäü", "傷痕", "傷痕"]) == [
        "crack", "Crack-2", "bild_äöü", "bild_öäü", "傷痕", "傷痕-2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argument", "bad_value"),
    [
        ("images", torch.rand(COUNT, 4, HEIGHT, WIDTH)),
        ("images", torch.rand(COUNT, HEIGHT, WIDTH)),
        ("anomaly_maps", torch.rand(COUNT, HEIGHT, WIDTH + 1)),
        ("anomaly_maps", torch.rand(COUNT - 1, HEIGHT, WIDTH)),
        ("masks", torch.zeros(COUNT, 2, HEIGHT, WIDTH)),
        ("scores", [1.0, 2.0]),
        ("names", ["a", "b"]),
        ("has_mask", [True]),
    ],
)
def test_shape_mismatch_names_the_argument(
    tmp_path: Path, argument: str, bad_value: object
) -> None:
    inputs = _inputs()
    inputs[argument] = bad_value
    with pytest.raises(ValueError, match=argument):
        save_segmentation_images(tmp_path, **inputs)


def test_rejects_normalised_images_and_bad_colour_range(tmp_path: Path) -> None:
    inputs = _inputs()
    with pytest.raises(ValueError, match=r"images: .*\[0, 1\]"):
        save_segmentation_images(tmp_path, **{**inputs, "images": inputs["images"] * 4 - 2})
    with pytest.raises(ValueError, match="colour_range"):
        save_segmentation_images(tmp_path, **inputs, colour_range=(1.0, 1.0))


def test_title_reports_score_and_decision() -> None:
    assert "score 3.142" in visualization._title("x", 3.14159, None)
    assert visualization._title("x", 3.14159, 2.0).endswith("> threshold 2: reject")
    assert visualization._title("x", 1.5, 2.0).endswith("<= threshold 2: accept")


def test_empty_input_writes_nothing(tmp_path: Path) -> None:
    paths = save_segmentation_images(
        tmp_path / "out",
        torch.zeros(0, 3, 8, 8),
        torch.zeros(0, 8, 8),
        [],
        [],
    )
    assert paths == []


def test_every_colour_bar_marks_the_threshold() -> None:
    # The overlays' vertical bar: a dark line across it at the threshold (the middle of a
    # threshold-centred scale), none without a threshold.
    marked = visualization.vertical_colour_bar_rgb((0.0, 2.0), 1.0, 300)
    unmarked = visualization.vertical_colour_bar_rgb((0.0, 2.0), None, 300)
    assert marked.shape == unmarked.shape and marked.shape[0] == 300
    line = (marked.max(axis=-1) < 60) & (unmarked.max(axis=-1) >= 60)
    rows = np.flatnonzero(line.sum(axis=1) >= 10)
    assert len(rows) and abs(rows.mean() - 150) < 4
    # The colour bar image of predict's heat maps and the dashboard: the same colours, a
    # dark line at the threshold (the middle of a threshold-centred scale).
    bar = visualization.colour_bar_rgb((0.0, 2.0), 1.0, 400)
    plain = visualization.colour_bar_rgb((0.0, 2.0), None, 400)
    assert bar.shape == plain.shape and bar.shape[1] == 400 and bar.dtype == np.uint8
    added_dark = (bar.max(axis=-1) < 60) & (plain.max(axis=-1) >= 60)
    columns = np.flatnonzero(added_dark.sum(axis=0) >= 10)  # a line across the bar
    assert len(columns) and abs(columns.mean() - 200) < 4
    assert visualization._threshold_label(21293.2) == "threshold 21293"
    assert visualization._threshold_label(0.68403) == "threshold 0.6840"


def _overlay(tmp_path: Path, **changes) -> np.ndarray:
    """The pixels of one overlay of a mid-grey image whose map is 0 on the left, 3 on the right."""
    image = torch.full((1, 3, 64, 64), 0.5)
    anomaly_map = torch.zeros(1, 64, 64)
    anomaly_map[:, :, 32:] = 3.0
    arguments = {"images": image, "anomaly_maps": anomaly_map, "scores": [3.0], "names": ["x"],
                 "colour_range": (0.0, 3.0), "threshold": 1.5, **changes}  # fmt: skip
    return _pixels(save_segmentation_images(tmp_path, **arguments)[0])


def test_overlay_map_panel_uses_the_shared_colour_scale_and_blend(tmp_path: Path) -> None:
    pixels = _overlay(tmp_path)
    grey = np.full((1, 1, 3), 128, dtype=np.uint8)
    low = visualization.blend_heatmap(grey, np.zeros((1, 1)), (0.0, 3.0))[0, 0]
    high = visualization.blend_heatmap(grey, np.full((1, 1), 3.0), (0.0, 3.0))[0, 0]
    panel = visualization.MARGIN + 2 * (visualization.PANEL_SIZE + visualization.PANEL_GAP)
    middle = visualization.TITLE_HEIGHT + visualization.PANEL_TITLE_HEIGHT + 150
    assert np.array_equal(pixels[middle, panel + 40], low)  # the map's low half: dark blue
    assert np.array_equal(pixels[middle, panel + 260], high)  # its high half: dark red
    image_panel = pixels[middle, visualization.MARGIN + 150]
    assert np.array_equal(image_panel, [128, 128, 128])
    # A different colour range changes the colours: the scale is the one given.
    rescaled = _overlay(tmp_path / "b", colour_range=(0.0, 6.0))
    assert not np.array_equal(rescaled[middle, panel + 260], high)


def test_overlays_render_matplotlib_once_per_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    draws = []
    original = visualization.FigureCanvasAgg.draw

    def counting(canvas, *arguments, **keywords):
        draws.append(canvas)
        return original(canvas, *arguments, **keywords)

    monkeypatch.setattr(visualization.FigureCanvasAgg, "draw", counting)
    paths = save_segmentation_images(tmp_path, **_inputs(), threshold=2.0)
    assert len(paths) == COUNT and len(draws) == 1  # the colour bar, shared by every image
