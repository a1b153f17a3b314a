"""Tests of patchcore.metrics against scikit-learn and against a slow reference PRO."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from patchcore.evaluation.metrics import (
    METRIC_NAMES,
    anomaly_pixel_auroc,
    compute_metrics,
    full_pixel_auroc,
    instance_auroc,
    instance_f1max,
    pixel_f1max,
    pro,
)

EXACT = 1e-10


# ----------------------------------------------------------------------- references


def sklearn_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 along scikit-learn's precision-recall curve, 0/0 counted as 0."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nan_to_num(f1, nan=0.0).max())


def reference_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """PRO by brute force: one explicit pass over the pixels per distinct threshold."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == region) for region in range(1, count + 1)]
    defect_free = masks == 0
    fprs, overlaps = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & defect_free).sum() / defect_free.sum())
        overlaps.append(np.mean([predicted[index][region].mean() for index, region in regions]))
    area = 0.0
    for i in range(1, len(fprs)):
        x0, y0, x1, y1 = fprs[i - 1], overlaps[i - 1], fprs[i], overlaps[i]
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < max_fpr:
            y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_end) / 2
        break
    return area / max_fpr


# ------------------------------------------------------------------------- fixtures


def random_instances(rng: np.random.Generator, size: int, decimals: int | None):
    labels = rng.random(size) < 0.35
    scores = rng.normal(size=size) + 0.8 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # heavy ties
    return scores, labels


def region_masks() -> np.ndarray:
    """4 masks of 24x24: rectangles, an ellipse, corner-touching squares, one empty mask."""
    masks = np.zeros((4, 24, 24), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[0, 15:20, 14:22] = 1
    rows, cols = np.ogrid[:24, :24]
    masks[1][((rows - 12) / 6.0) ** 2 + ((cols - 9) / 4.0) ** 2 <= 1] = 1
    masks[1, 1:3, 20:23] = 1
    masks[2, 4:8, 4:8] = 1  # these two squares touch only at a corner:
    masks[2, 8:11, 8:11] = 1  # one region with 8-connectivity
    masks[2, 18:21, 2:4] = 1
    masks[2, 21:23, 4:7] = 1  # corner contact again
    # masks[3] stays empty: a good image, whose pixels count as defect-free
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray, decimals: int | None):
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 1.5, 1.5))
    maps = noise + 0.6 * masks * rng.random(masks.shape)
    return np.round(maps, decimals) if decimals is not None else maps


# -------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_auroc_matches_sklearn(seed: int, decimals: int | None, dtype: type) -> None:
    scores, labels = random_instances(np.random.default_rng(seed), 157, decimals)
    scores = scores.astype(dtype)
    expected = roc_auc_score(labels, scores)
    assert instance_auroc(scores, labels) == pytest.approx(expected, abs=EXACT)


@pytest.mark.parametrize("decimals", [None, 2])
def test_pixel_aurocs_match_sklearn(decimals: int | None) -> None:
    rng = np.random.default_rng(3)
    masks = region_masks()
    maps = random_maps(rng, masks, decimals)
    expected_full = roc_auc_score(masks.ravel(), maps.ravel())
    assert full_pixel_auroc(maps, masks) == pytest.approx(expected_full, abs=EXACT)
    defective = masks.reshape(len(masks), -1).any(axis=1)
    expected_anomaly = roc_auc_score(masks[defective].ravel(), maps[defective].ravel())
    assert anomaly_pixel_auroc(maps, masks) == pytest.approx(expected_anomaly, abs=EXACT)
    assert expected_anomaly != pytest.approx(expected_full, abs=1e-6)  # the subset matters


def test_float32_ranking_handles_signs_zeros_and_infinities() -> None:
    # float32 maps are ranked through integer codes of their bits: check negative
    # values, -0.0 tied with +0.0, infinities and heavy ties against scikit-learn and
    # against the float64 (argsort) path, which float64 values with 3 decimals take.
    rng = np.random.default_rng(12)
    masks = region_masks()
    maps = random_maps(rng, masks, 1).astype(np.float32)
    maps[0, 0, :4] = [-0.0, 0.0, np.inf, -np.inf]
    maps[1, 5, :3] = [0.0, -0.0, -np.inf]
    assert np.signbit(maps).any() and (maps == 0).sum() > 10
    finite = np.clip(maps, maps[np.isfinite(maps)].min() - 1, maps[np.isfinite(maps)].max() + 1)
    expected = roc_auc_score(masks.ravel(), finite.ravel())  # sklearn refuses infinities
    assert full_pixel_auroc(maps, masks) == pytest.approx(expected, abs=EXACT)
    # The same ranking in float64 that float32 cannot hold (-1e300 rounds to -inf), so
    # it takes the argsort path: both paths must give identical curves.
    nudged = np.where(np.isneginf(maps), -1e300, maps.astype(np.float64))
    for max_fpr in (0.3, 0.05):
        assert pro(maps, masks, max_fpr) == pytest.approx(
            reference_pro(maps.astype(np.float64), masks, max_fpr), abs=EXACT
        )
    assert pixel_f1max(maps, masks) == pytest.approx(pixel_f1max(nudged, masks), abs=EXACT)
    assert compute_metrics(maps.max(axis=(1, 2)), [0, 1, 1, 0], maps, masks) == pytest.approx(
        compute_metrics(maps.max(axis=(1, 2)), [0, 1, 1, 0], nudged, masks), abs=EXACT
    )


def test_float32_and_torch_inputs_give_the_same_values() -> None:
    rng = np.random.default_rng(4)
    masks = region_masks()
    maps = random_maps(rng, masks, 3).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert full_pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        expected, abs=EXACT
    )
    assert pro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        pro(maps.astype(np.float64), masks), abs=EXACT
    )


# ------------------------------------------------------------------------- F1-max


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [5, 6])
def test_instance_f1max_matches_sklearn(seed: int, decimals: int | None) -> None:
    scores, labels = random_instances(np.random.default_rng(seed), 211, decimals)
    assert instance_f1max(scores, labels) == pytest.approx(sklearn_f1max(labels, scores), abs=EXACT)


@pytest.mark.parametrize("decimals", [None, 1])
def test_pixel_f1max_matches_sklearn(decimals: int | None) -> None:
    masks = region_masks()
    maps = random_maps(np.random.default_rng(7), masks, decimals)
    assert pixel_f1max(maps, masks) == pytest.approx(
        sklearn_f1max(masks.ravel(), maps.ravel()), abs=EXACT
    )


def test_full_pixels_only_metrics_match_sklearn() -> None:
    """The challenge's four metrics from two rankings, checked against scikit-learn."""
    masks = region_masks()
    maps = random_maps(np.random.default_rng(9), masks, 2)
    labels = masks.reshape(len(masks), -1).any(axis=1)  # three defective images, one good
    scores = np.random.default_rng(10).normal(size=len(masks)) + labels
    got = compute_metrics(scores, labels, maps, masks, full_pixels_only=True)
    assert math.isnan(got["pro"]) and math.isnan(got["anomaly_pixel_auroc"])
    assert got["instance_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=EXACT)
    assert got["instance_f1max"] == pytest.approx(sklearn_f1max(labels, scores), abs=EXACT)
    assert got["full_pixel_auroc"] == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=EXACT
    )
    assert got["pixel_f1max"] == pytest.approx(
        sklearn_f1max(masks.ravel(), maps.ravel()), abs=EXACT
    )


# ---------------------------------------------------------------------------- PRO


@pytest.mark.parametrize("max_fpr", [0.3, 0.1, 1.0])
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_pro_matches_brute_force_reference(decimals: int | None, max_fpr: float) -> None:
    masks = region_masks()
    maps = random_maps(np.random.default_rng(8), masks, decimals)
    expected = reference_pro(maps, masks, max_fpr)
    assert pro(maps, masks, max_fpr=max_fpr) == pytest.approx(expected, abs=EXACT)


def test_pro_when_a_curve_point_lies_exactly_on_max_fpr() -> None:
    # 1 image, 10 pixels: 2 defective, 8 defect-free whose map values step the FPR
    # through 0.125, 0.25, 0.375, ...; with max_fpr = 0.25 no interpolation is needed.
    masks = np.array([[[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.2, 0.95, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1]]])
    for max_fpr in (0.25, 0.3):
        expected = reference_pro(maps, masks, max_fpr)
        assert pro(maps, masks, max_fpr=max_fpr) == pytest.approx(expected, abs=EXACT)


def test_pro_uses_eight_connectivity() -> None:
    # A 2x2 square touching a 4x4 square at one corner: ONE region of 20 pixels with
    # 8-connectivity (two regions of 4 and 16 with 4-connectivity). The map finds only
    # the small square, so at threshold 1 the curve is at FPR 0 and PRO 4/20 = 0.2
    # (it would be mean(1, 0) = 0.5 with 4-connectivity); then it goes straight to (1, 1).
    # Up to FPR 0.3: trapezoid from 0.2 to 0.2 + 0.8 * 0.3 = 0.44, area 0.3 * 0.64 / 2
    # = 0.096, normalised 0.32 (4-connectivity would give 0.3 * 1.15 / 2 / 0.3 = 0.575).
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 0:2, 0:2] = True
    masks[0, 2:6, 2:6] = True
    maps = np.zeros((1, 8, 8))
    maps[0, 0:2, 0:2] = 1.0
    assert pro(maps, masks) == pytest.approx(0.32, abs=EXACT)


# --------------------------------------------------------------- hand-worked cases


def test_perfect_map_scores_one() -> None:
    masks = region_masks()
    maps = masks.astype(np.float64)
    assert pro(maps, masks) == pytest.approx(1.0, abs=EXACT)
    assert pro(maps, masks, max_fpr=0.1) == pytest.approx(1.0, abs=EXACT)
    assert full_pixel_auroc(maps, masks) == pytest.approx(1.0, abs=EXACT)
    assert anomaly_pixel_auroc(maps, masks) == pytest.approx(1.0, abs=EXACT)
    assert pixel_f1max(maps, masks) == pytest.approx(1.0, abs=EXACT)
    labels = np.array([0, 1, 1, 0, 1])
    assert instance_auroc(labels * 2.5, labels) == pytest.approx(1.0, abs=EXACT)
    assert instance_f1max(labels * 2.5, labels) == pytest.approx(1.0, abs=EXACT)


def test_inverted_perfect_map_scores_zero_auroc() -> None:
    masks = region_masks()
    assert full_pixel_auroc(-masks.astype(float), masks) == pytest.approx(0.0, abs=EXACT)
    labels = np.array([0, 1, 1, 0, 1])
    assert instance_auroc(-labels, labels) == pytest.approx(0.0, abs=EXACT)


def test_constant_map() -> None:
    # A constant map has a single threshold, at which every pixel is predicted
    # defective, so the curve is (0, 0) -> (1, 1). Cutting it at FPR 0.3 by linear
    # interpolation gives the end point (0.3, 0.3); the area is the triangle
    # 0.3 * 0.3 / 2 = 0.045, and normalised by 0.3 that is 0.15 (not 0): the
    # interpolated diagonal is what a random ranking scores, just as AUROC gives 0.5.
    masks = region_masks()
    maps = np.full(masks.shape, 0.7)
    assert pro(maps, masks) == pytest.approx(0.15, abs=EXACT)
    assert pro(maps, masks, max_fpr=0.1) == pytest.approx(0.05, abs=EXACT)
    assert full_pixel_auroc(maps, masks) == pytest.approx(0.5, abs=EXACT)
    # Best F1 = the only point: precision P / n, recall 1, F1 = 2P / (n + P).
    positives, total = int(masks.sum()), masks.size
    assert pixel_f1max(maps, masks) == pytest.approx(2 * positives / (total + positives))


# ---------------------------------------------------------------- compute_metrics


def test_compute_metrics_keys_and_values() -> None:
    rng = np.random.default_rng(9)
    masks = region_masks()
    maps = random_maps(rng, masks, 3)
    labels = masks.reshape(4, -1).any(axis=1)
    scores = maps.reshape(4, -1).max(axis=1)
    results = compute_metrics(scores, labels, maps, masks)
    assert (
        tuple(results)
        == METRIC_NAMES
        == (
            "instance_auroc",
            "full_pixel_auroc",
            "anomaly_pixel_auroc",
            "pro",
            "instance_f1max",
            "pixel_f1max",
        )
    )
    assert results["instance_auroc"] == pytest.approx(instance_auroc(scores, labels), abs=EXACT)
    assert results["full_pixel_auroc"] == pytest.approx(full_pixel_auroc(maps, masks), abs=EXACT)
    assert results["anomaly_pixel_auroc"] == pytest.approx(
        anomaly_pixel_auroc(maps, masks), abs=EXACT
    )
    assert results["pro"] == pytest.approx(pro(maps, masks), abs=EXACT)
    assert results["instance_f1max"] == pytest.approx(instance_f1max(scores, labels), abs=EXACT)
    assert results["pixel_f1max"] == pytest.approx(pixel_f1max(maps, masks), abs=EXACT)


def test_compute_metrics_without_maps_has_nan_pixel_metrics() -> None:
    results = compute_metrics(np.array([0.1, 0.9]), np.array([0, 1]))
    assert tuple(results) == METRIC_NAMES
    assert results["instance_auroc"] == 1.0
    assert all(math.isnan(results[name]) for name in METRIC_NAMES[1:4] + ("pixel_f1max",))


def test_empty_masks_give_nan_pixel_metrics(caplog: pytest.LogCaptureFixture) -> None:
    maps = np.random.default_rng(10).random((3, 6, 6))
    masks = np.zeros((3, 6, 6))
    with caplog.at_level(logging.WARNING, logger="patchcore.metrics"):
        results = compute_metrics(np.array([0.2, 0.5, 0.9]), np.array([0, 1, 1]), maps, masks)
        assert math.isnan(pro(maps, masks))
        assert math.isnan(anomaly_pixel_auroc(maps, masks))
        assert math.isnan(full_pixel_auroc(maps, masks))
    for name in ("full_pixel_auroc", "anomaly_pixel_auroc", "pro", "pixel_f1max"):
        assert math.isnan(results[name])
    assert results["instance_auroc"] == 1.0
    assert caplog.records, "a NaN metric is announced by a warning"


def test_single_class_gives_nan_instance_auroc(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="patchcore.metrics"):
        results = compute_metrics(np.array([0.3, 0.4, 0.8]), np.zeros(3))
    assert math.isnan(results["instance_auroc"])
    assert math.isnan(results["instance_f1max"])
    assert "only one class" in caplog.text
    assert math.isnan(instance_auroc(np.array([0.3, 0.4]), np.ones(2)))
    assert instance_f1max(np.array([0.3, 0.4]), np.ones(2)) == 1.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            (np.zeros(3), np.zeros(3), np.zeros((3, 12, 12)), np.zeros((3, 10, 10))),
            r"^masks has shape \(3, 10, 10\) but maps has \(3, 12, 12\); they must match$",
        ),
        ((np.zeros(3), np.zeros(4)), r"^labels has shape \(4,\) but scores has \(3,\)"),
        ((np.zeros((3, 1)), np.zeros((3, 1))), r"^scores has shape \(3, 1\) but must be"),
        (
            (np.zeros(3), np.zeros(3), np.zeros((3, 8)), np.zeros((3, 8))),
            r"^maps has shape \(3, 8\) but must be \[N, H, W\]$",
        ),
        (
            (np.zeros(3), np.zeros(3), np.zeros((2, 8, 8)), np.zeros((2, 8, 8))),
            r"^maps has 2 images but scores has 3; they must match$",
        ),
        ((np.array([0.1, np.nan]), np.array([0, 1])), r"^scores contains NaN"),
    ],
)
def test_shape_errors_name_the_argument(arguments: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(*arguments)


def test_bad_max_fpr_is_rejected() -> None:
    masks = region_masks()
    with pytest.raises(ValueError, match="max_fpr"):
        pro(masks.astype(float), masks, max_fpr=0.0)


# -------------------------------------------------------------------------- scale


def test_full_size_run_completes() -> None:
    """300 maps of 224x224 (15M pixels): the scale of an MVTec category's test set."""
    rng = np.random.default_rng(11)
    maps = rng.random((300, 224, 224), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[:150, 40:90, 60:100] = True
    masks[:150, 150:160, 20:30] = True
    maps[masks] += 0.25
    assert 0.15 < pro(maps, masks) < 1.0  # 0.15 is what a random ranking scores
    assert 0.5 < full_pixel_auroc(maps, masks) < 1.0
