"""The operator dashboard: its data functions, and the Streamlit app driven headlessly."""

from __future__ import annotations

import csv
import dataclasses
import math
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import DASHBOARD_CATEGORY as CATEGORY
from conftest import DASHBOARD_ENSEMBLE_RUN, DASHBOARD_GOOD_ONLY
from patchcore.apps.dashboard import data
from patchcore.cli.predict import predict_cli
from patchcore.config import PatchCoreConfig, PreprocessingConfig
from patchcore.data.datasets import ImageDataset, Sample
from patchcore.errors import ConfigurationError, DataError
from patchcore.evaluation.records import DatasetPredictions, DecisionTable, read_predictions
from patchcore.evaluation.visualization import heatmap_rgb
from patchcore.model.calibration import NormalStatistics, colour_range
from patchcore.model.serialization import load_ensemble_statistics, load_models

APP = Path(data.__file__).with_name("app.py")
ENSEMBLE_TOLERANCE = 1e-3  # on the ensemble's scale, where normal images span 0 to 1


@pytest.fixture(scope="module")
def dashboard_run(dashboard_results):
    """The results folder and its newest run (a single model with two categories)."""
    return dashboard_results, dashboard_results / "project" / "group"


# ------------------------------------------------------------------- decisions
SCORES = np.array([0.1, 0.5, 0.9, 0.3, 0.7, 0.5])
DEFECTIVE = np.array([False, True, True, False, False, True])
NAMES = ["e", "b", "a", "f", "d", "c"]


def test_confusion_counts_match_a_hand_count():
    counts = data.confusion_counts(SCORES, DEFECTIVE, 0.5)
    # Rejected (score > 0.5): 0.9 (defective), 0.7 (good). Scores equal to 0.5 are accepted.
    assert counts == data.Confusion(true_reject=1, false_reject=1, true_accept=2, false_accept=2)
    assert (counts.good, counts.defective, counts.rejected, counts.accepted) == (3, 3, 2, 4)
    assert counts.false_reject_rate == pytest.approx(1 / 3)
    assert counts.false_accept_rate == pytest.approx(2 / 3)
    assert counts.accuracy == pytest.approx(3 / 6)
    everything = data.confusion_counts(SCORES, DEFECTIVE, -1.0)
    assert everything == data.Confusion(3, 3, 0, 0)
    assert math.isnan(data.confusion_counts(SCORES[:1], DEFECTIVE[:1], 0).false_accept_rate)


def test_filters_and_sort_orders():
    assert data.select_images(SCORES, DEFECTIVE, 0.5, "rejected").tolist() == [2, 4]
    assert data.select_images(SCORES, DEFECTIVE, 0.5, "accepted").tolist() == [0, 1, 3, 5]
    # Good images rejected: 0.7 (index 4); defective images accepted: 0.5 twice (1 and 5).
    assert data.select_images(SCORES, DEFECTIVE, 0.5, "false rejects").tolist() == [4]
    assert data.select_images(SCORES, DEFECTIVE, 0.5, "escapes").tolist() == [1, 5]
    everything = data.select_images(SCORES, DEFECTIVE, 0.5, "all")
    assert everything.tolist() == list(range(6))
    # Equal scores (indices 1 and 5, names b and c) are ordered by name.
    assert data.sort_images(everything, SCORES, NAMES, "score, highest first").tolist() == [
        2, 4, 1, 5, 3, 0]  # fmt: skip
    assert data.sort_images(everything, SCORES, NAMES, "score, lowest first").tolist() == [
        0, 3, 1, 5, 4, 2]  # fmt: skip
    assert data.sort_images(np.array([0, 2, 5]), SCORES, NAMES, "name").tolist() == [2, 5, 0]
    with pytest.raises(ConfigurationError):
        data.select_images(SCORES, DEFECTIVE, 0.5, "maybe")


def test_the_opening_category_has_the_most_rejects_among_those_with_defects():
    good_only = data.CategoryOutlook("a_clean", rejected=9, defective=0)
    few = data.CategoryOutlook("b_few", rejected=1, defective=30)
    many = data.CategoryOutlook("c_many", rejected=4, defective=5)
    tie = data.CategoryOutlook("d_tie", rejected=4, defective=8)
    assert data.opening_category([good_only, few, many]) == "c_many"
    assert data.opening_category([good_only, few, many, tie]) == "d_tie"  # more defects
    assert data.opening_category([good_only, few]) == "b_few"  # never the good-only one
    assert data.opening_category([good_only]) == "a_clean"  # nothing else to show
    outlook = data.category_outlook("x", DecisionTable(DEFECTIVE, SCORES, 0.5))
    assert outlook == data.CategoryOutlook("x", rejected=2, defective=3)


def test_run_names_are_shortened_in_the_middle():
    name = "MVTecAD_Results/IM224_Ensemble_L2-3_P001_D1024-384_PS-3_AN-1_3"
    short = data.middle_truncated(name, 30)
    assert short == "MVTecAD_Result…384_PS-3_AN-1_3" and len(short) == 30
    assert "…" in short and data.middle_truncated("project/group", 30) == "project/group"


def test_scores_are_written_without_exponents():
    assert [data.score_text(v) for v in (0.29590277, 13413.2, 2.5, 0.0)] == [
        "0.2959", "13413", "2.500", "0"]  # fmt: skip
    assert data.score_text(0.000123456, 5) == "0.00012346"


def test_initial_threshold_and_slider_range():
    assert data.initial_threshold(0.42, SCORES, DEFECTIVE)[0] == 0.42
    value, note = data.initial_threshold(None, SCORES, DEFECTIVE)
    assert value == pytest.approx(np.quantile([0.1, 0.3, 0.7], 0.99)) and "percentile" in note
    value, note = data.initial_threshold(None, SCORES[DEFECTIVE], DEFECTIVE[DEFECTIVE])
    assert value == pytest.approx(0.7) and "midpoint" in note
    bounds = data.slider_range(SCORES, 1.5)
    assert bounds.low < 0.1 and bounds.high > 1.5 and bounds.step > 0
    assert bounds.format.startswith("%.") and bounds.format.endswith("f")


# -------------------------------------------------------------------- overlays
def test_the_suspicious_patch_is_the_cell_whose_score_is_the_image_score():
    anomaly_map = np.zeros((64, 48))
    anomaly_map[37, 21] = 5.0  # the smoothed map peaks in cell (4, 2) ...
    patch_scores = np.zeros((8, 6))
    patch_scores[1, 5] = 7.5  # ... but the highest patch score, the image score, is in (1, 5)
    patch = data.most_suspicious_patch(anomaly_map, (8, 6), 7.5, patch_scores)
    assert patch.cell == (1, 5) and patch.box == (8, 40, 16, 48)  # cells of 8 x 8 pixels
    assert patch.score == patch.image_score == 7.5 and patch.map_peak == 5.0
    assert patch.relation == "This patch's score is the image score."
    weighted = data.most_suspicious_patch(anomaly_map, (8, 6), 6.0, patch_scores)
    assert "Eq. 7 weight 0.8000" in weighted.relation
    ensemble = data.most_suspicious_patch(anomaly_map, (8, 6), 0.7, patch_scores, members=2)
    assert "mean of each ensemble member's highest patch score" in ensemble.relation
    tiled = PatchCoreConfig(preprocessing=PreprocessingConfig(resize=64, crop="none", tile=32))
    assert "stitched" in data.most_suspicious_patch(
        anomaly_map, (8, 6), 7.6, patch_scores, config=tiled
    ).relation
    # Records of older versions have no patch scores: the cell of the map's peak is shown.
    old = data.most_suspicious_patch(anomaly_map, (8, 6), 7.5)
    assert old.cell == (4, 2) and old.box == (32, 16, 40, 24) and old.score is None
    assert "older version" in old.relation
    corner = np.zeros((30, 30))
    corner[29, 0] = 1.0
    assert data.most_suspicious_patch(corner, (4, 4), 1.0).box == (22, 0, 30, 8)


def records(maps, threshold=None, statistics=None) -> DatasetPredictions:
    count = len(maps)
    return DatasetPredictions(
        name="x", image_names=[str(i) for i in range(count)], image_paths=[""] * count,
        defect_types=["good"] * count, is_anomaly=np.zeros(count, bool),
        has_mask=np.zeros(count, bool), scores=np.zeros(count), maps=list(maps),
        masks=[np.zeros(m.shape, bool) for m in maps], metrics={}, threshold=threshold,
        patch_grids=[(2, 2)] * count, statistics=statistics,
    )  # fmt: skip


def test_one_colour_scale_per_model_with_the_threshold_in_the_middle():
    maps = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)])
    maps[1, 0, 0] = 2.0
    # No saved threshold (e.g. an ensemble on a test-set min-max scale): the maps' range.
    scale = data.colour_range(records(maps))
    assert scale == (1.0, 3.0)
    first, second = (heatmap_rgb(anomaly_map, scale) for anomaly_map in maps)
    assert (first == first[0, 0]).all() and tuple(first[0, 0]) != tuple(second[1, 1])
    same = heatmap_rgb(np.array([[2.0]]), scale)
    assert tuple(same[0, 0]) == tuple(second[0, 0])
    assert data.colour_range(records(np.ones((2, 3, 3)))) == pytest.approx((0.5, 1.5))
    # With the model's threshold: the scale the overlays and patchcore-predict use.
    statistics = NormalStatistics(1.0, 2.0, 0.5, 2.5, 2.0, 0.99, 10)
    scale = data.colour_range(records(maps, 2.0, statistics))
    assert scale == colour_range(2.0, statistics) == (0.5, 3.5)
    bar = data.colour_bar(scale, 2.0, width=320)
    assert bar.shape[1] == 320 and bar.dtype == np.uint8
    column = bar[:, 320 // 2 + 1]  # the threshold's line, in the middle of the bar
    assert (column == 0).all(axis=-1).any()


def test_new_images_are_decided_on_the_scale_they_are_scored_on():
    maps = np.ones((2, 4, 4))
    statistics = NormalStatistics(0.0, 1.0, 0.1, 1.2, 0.9, 0.99, 10)
    single = records(maps, 5.0)
    assert data.new_image_decision(single, 4.0, None).threshold == 4.0  # the slider
    on_normal_scale = dataclasses.replace(single, members=2, normalisation="normal_stats")
    decision = data.new_image_decision(on_normal_scale, 0.8, statistics)
    assert decision.threshold == 0.8 and decision.scale is None and not decision.refusal
    # An ensemble evaluated on a test-set min-max scale: new images cannot be put on it;
    # they are decided at the threshold saved with the members, coloured on their scale ...
    on_test_scale = dataclasses.replace(single, members=2, normalisation="test_minmax")
    decision = data.new_image_decision(on_test_scale, 0.5, statistics)
    assert decision.threshold == 0.9 and decision.scale == colour_range(0.9, statistics)
    assert "not at the slider's" in decision.note
    # ... or, without one (saved by an older version), not scored, with the reason.
    refused = data.new_image_decision(on_test_scale, 0.5, None)
    assert refused.threshold is None and "cannot be put on" in refused.refusal


def test_sidebar_and_new_images_panel_tell_one_threshold_story():
    """A test_minmax ensemble whose members carry a threshold: the sidebar no longer says
    that no threshold was saved while the new-images panel decides at it."""
    statistics = NormalStatistics(0.0, 1.0, 0.1, 1.2, 0.9, 0.99, 10)
    on_test_scale = dataclasses.replace(
        records(np.ones((2, 4, 4))), members=2, normalisation="test_minmax", threshold=None
    )
    assert not data.on_run_scale(on_test_scale)
    decision = data.new_image_decision(on_test_scale, 0.5, statistics)
    value, note = data.initial_threshold(None, SCORES, DEFECTIVE, decision.threshold)
    assert value == pytest.approx(np.quantile([0.1, 0.3, 0.7], 0.99))  # the run's own scale
    assert "no threshold was saved" not in note
    assert data.score_text(decision.threshold, 5) in note and "Score new images" in note
    assert data.score_text(statistics.threshold, 5) in decision.note  # the same number
    # Without a member threshold the sidebar says so, and the panel refuses.
    _, note = data.initial_threshold(None, SCORES, DEFECTIVE, None)
    assert "no threshold was saved" in note
    assert data.new_image_decision(on_test_scale, 0.5, None).refusal
    # Single models and normal_stats ensembles are on the run's scale: the slider decides.
    assert data.on_run_scale(dataclasses.replace(on_test_scale, normalisation="normal_stats"))
    assert data.on_run_scale(dataclasses.replace(on_test_scale, members=1))


def test_overlay_outlines_the_ground_truth_and_crops_stay_inside():
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 10:30] = True
    outline = data.mask_outline(mask)
    assert outline.sum() == 2 * 10 + 2 * 20 - 4 and not outline[12:18, 12:28].any()
    drawn = data.overlay(image, np.zeros((40, 40)), (0.0, 1.0), mask)
    outline = data.mask_outline(mask, thickness=2)  # small images get a 2-pixel outline
    assert (drawn[outline] == data.GROUND_TRUTH_COLOUR).all()
    assert not (drawn[~outline] == data.GROUND_TRUTH_COLOUR).all(axis=-1).any()
    boxed = data.draw_box(image, (0, 0, 8, 8))
    assert tuple(boxed[0, 3]) == data.BOX_COLOUR and tuple(boxed[4, 4]) == (0, 0, 0)
    assert data.zoom_window((16, 16, 24, 24), (40, 40), context=3) == (8, 8, 32, 32)
    assert data.zoom_window((0, 32, 8, 40), (40, 40), context=3) == (0, 16, 24, 40)
    crop = data.zoomed_patch(image, (0, 0, 8, 8), context=3, size=240)
    assert crop.shape == (240, 240, 3)  # a 24 x 24 window at the corner, enlarged 10 times
    assert (crop[:2, :80] == data.BOX_COLOUR).all() and (crop[2:78, 2:78] == 0).all()
    assert (crop[82:, 82:] == 0).all()  # outside the box and its shadow line
    assert data.side_by_side(image, image, gap=4).shape == (40, 84, 3)


def test_view_image_matches_the_model_preprocessing(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    preprocessing = PreprocessingConfig(resize=36, imagesize=32)
    expected = ImageDataset([Sample(path, None, "good", False)], preprocessing)[0]["image"]
    shown = data.load_view_image(path, preprocessing, (32, 32))
    assert np.array_equal(shown, data.to_uint8_image(expected))
    assert data.load_view_image(path, None, (20, 24)).shape == (20, 24, 3)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        data.load_view_image(tmp_path / "broken.png", None, (8, 8))


# ------------------------------------------------------------------ run folders
def test_runs_are_found_newest_first_with_their_categories(dashboard_run):
    results, run_folder = dashboard_run
    runs = data.find_runs(results)
    labels = [run.label for run in runs]
    assert labels == ["project/group", DASHBOARD_ENSEMBLE_RUN, "stolen", "older/no_predictions"]
    assert runs[0].folder == run_folder and runs[0].has_predictions
    assert not runs[-1].has_predictions and data.list_categories(runs[-1].folder) == []
    assert data.list_categories(run_folder) == [DASHBOARD_GOOD_ONLY, CATEGORY]
    assert data.model_folder(run_folder, CATEGORY) == run_folder / "models" / CATEGORY
    assert data.model_folder(runs[-1].folder, CATEGORY) is None
    assert data.saved_preprocessing(run_folder / "models" / CATEGORY) == PreprocessingConfig(
        144, 128
    )
    assert data.find_runs(results / "nowhere") == []


def test_browsing_stays_inside_the_results_folder(dashboard_run, tmp_path):
    results, _ = dashboard_run
    root = data.ResultsRoot.of(results)
    # Run folders and their contents that lead outside through symbolic links are refused:
    # `leak` (its results.csv is a link) is not listed, `stolen` (its predictions folder is
    # a link) is listed without predictions, and the linked folder of images is refused.
    assert "leak" not in [run.label for run in data.find_runs(root)]
    assert data.list_categories(results / "stolen") == []
    with pytest.raises(DataError, match="leads outside its run folder"):
        data.predictions_folder(results / "stolen", CATEGORY)
    for escape, message in (
        ("..", "'..' is not allowed"),
        ("incoming/../../outside", "'..' is not allowed"),
        ("/etc", "outside the results folder"),
        ("outside_images", "outside the results folder"),
        (str(tmp_path), "outside the results folder"),
    ):
        with pytest.raises(DataError, match=message):
            data.folder_images(root, escape)
    assert root.inside("incoming/mixed") == (results / "incoming" / "mixed").resolve()
    assert root.inside(results / "incoming") == (results / "incoming").resolve()
    assert len(data.folder_images(root, "incoming/mixed")) == 4
    # A file inside a scored folder that links outside is skipped.
    (tmp_path / "root" / "new").mkdir(parents=True)
    inside = tmp_path / "root" / "new" / "inside.png"
    inside.write_bytes((results / "incoming" / "mixed" / "000.png").read_bytes())
    (tmp_path / "secret.png").write_bytes(inside.read_bytes())
    (tmp_path / "root" / "new" / "link.png").symlink_to(tmp_path / "secret.png")
    assert data.folder_images(data.ResultsRoot.of(tmp_path / "root"), "new") == [inside]
    with pytest.raises(DataError, match="does not exist"):
        data.ResultsRoot.of(tmp_path / "absent")
    with pytest.raises(DataError, match="--results"):
        data.ResultsRoot.of("")


def test_the_run_predict_and_the_dashboard_share_one_colour_scale(dashboard_run):
    """The overlays (`apps.runs`) and the records decide and colour with the model's own
    statistics; predict takes the same from the model folder; the dashboard from the records."""
    from patchcore.apps.predict import saved_decision_statistics

    _, run_folder = dashboard_run
    saved = read_predictions(run_folder / "predictions" / CATEGORY)
    folder = run_folder / "models" / CATEGORY
    models = load_models(folder)
    statistics = saved_decision_statistics(models, folder)
    assert saved.statistics == statistics == models[0].normal_statistics
    assert saved.threshold == statistics.threshold
    assert data.colour_range(saved) == colour_range(statistics.threshold, statistics)


def test_a_damaged_model_meta_file_falls_back_to_the_map_size(tmp_path):
    (tmp_path / "patchcore_params.pkl").write_bytes(b"")
    (tmp_path / "patchcore_meta.json").write_text("{not json")
    assert data.saved_preprocessing(tmp_path) is None
    (tmp_path / "patchcore_meta.json").write_text('{"config": {"preprocessing": {"resize": 0}}}')
    assert data.saved_preprocessing(tmp_path) is None
    assert data.saved_preprocessing(None) is None


def test_scoring_new_images_lists_unreadable_files(dashboard_run, tmp_path, monkeypatch):
    _, run_folder = dashboard_run
    models = load_models(run_folder / "models" / CATEGORY, "cpu")
    saved = read_predictions(run_folder / "predictions" / CATEGORY)
    good = [Path(path) for path in saved.image_paths if Path(path).parent.name == "good"][:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    # A strip whose resized working image would exceed the working-pixel limit (lowered
    # here): refused by predict's rule, listed with the file's name, the others still scored.
    monkeypatch.setenv("PATCHCORE_MAX_WORKING_PIXELS", "200000")
    sliver = tmp_path / "strip.png"
    Image.new("RGB", (2400, 30), (90, 90, 90)).save(sliver)
    scored = data.score_images(models, [good[0], broken, sliver, good[1]], batch_size=2)
    assert scored.paths == [str(good[0]), str(good[1])]
    assert [path for path, _ in scored.unreadable] == [str(broken), str(sliver)]
    assert str(sliver) in scored.unreadable[1][1]
    assert "more than the working limit" in scored.unreadable[1][1]
    assert [m.shape for m in scored.maps] == [(128, 128)] * 2
    assert [i.shape for i in scored.images] == [(128, 128, 3)] * 2
    for path, score in zip(scored.paths, scored.scores, strict=True):
        assert score == pytest.approx(saved.scores[saved.image_paths.index(path)], rel=1e-4)


# ------------------------------------------------------------------ the app
def open_app(results: Path, monkeypatch, allow_scoring: bool = False):
    app_test = pytest.importorskip(
        "streamlit.testing.v1", reason='Streamlit is not installed (pip install -e ".[dashboard]")'
    )
    monkeypatch.setenv("PATCHCORE_RESULTS", str(results))
    if allow_scoring:
        monkeypatch.setenv("PATCHCORE_ALLOW_SCORING", "1")
    else:
        monkeypatch.delenv("PATCHCORE_ALLOW_SCORING", raising=False)
    test = app_test.AppTest.from_file(str(APP), default_timeout=60).run()
    assert not test.exception, test.exception
    return test


@pytest.fixture
def app(dashboard_run, monkeypatch):
    return open_app(dashboard_run[0], monkeypatch)


@pytest.fixture
def scoring_app(dashboard_run, monkeypatch):
    return open_app(dashboard_run[0], monkeypatch, allow_scoring=True)


def grid_captions(test) -> list[str]:
    return [caption for image in test.image for caption in image.captions if " · score " in caption]


def counts_text(test) -> str:
    return next(m.value for m in test.markdown if m.value.startswith("At threshold"))


def metric(test, label: str) -> str:
    return next(m.value for m in test.metric if m.label == label)


def test_app_opens_on_the_category_with_defects_at_the_saved_threshold(app, dashboard_run):
    _, run_folder = dashboard_run
    saved = read_predictions(run_folder / "predictions" / CATEGORY)
    assert app.title[0].value == "PatchCore inspection dashboard"
    # The good-only category sorts first, but the page opens on the one with defects.
    category = app.selectbox(key="category:project/group")
    assert category.options == [DASHBOARD_GOOD_ONLY, CATEGORY] and category.value == CATEGORY
    assert metric(app, "Image AUROC") == f"{100 * saved.metrics['instance_auroc']:.2f} %"
    assert metric(app, "PRO") == f"{100 * saved.metrics['pro']:.2f} %"
    assert app.slider[0].value == pytest.approx(saved.threshold)
    counts = data.confusion_counts(saved.scores, saved.is_anomaly, saved.threshold)
    assert metric(app, "True reject") == str(counts.true_reject)
    assert metric(app, "False accept") == str(counts.false_accept)
    assert f"{counts.rejected} rejected, {counts.accepted} accepted" in counts_text(app)
    captions = grid_captions(app)
    assert len(captions) == len(saved.scores)
    best = int(np.argmax(saved.scores))
    assert captions[0].startswith(saved.image_names[best])
    # The suspicious patch shows the patch score that is the image score, named as such.
    assert saved.patch_scores is not None
    assert float(saved.patch_scores[best].max()) == saved.scores[best]
    image_score = metric(app, "Image score (decides)")
    assert image_score == metric(app, "Patch score (this cell)")
    assert image_score == data.score_text(saved.scores[best], 5)
    assert any("This patch's score is the image score." in c.value for c in app.caption)
    # One colour scale: the model's, as in the overlays and predict, threshold marked.
    assert any("the model's saved threshold" in c for i in app.image for c in i.captions)
    app.selectbox(key="category:project/group").set_value(DASHBOARD_GOOD_ONLY).run()
    assert metric(app, "Image AUROC") == "—"
    assert any("no defective test images" in c.value for c in app.caption)


def test_threshold_filters_and_detail_view_respond(app, dashboard_run):
    _, run_folder = dashboard_run
    saved = read_predictions(run_folder / "predictions" / CATEGORY)
    threshold = float(np.median(saved.scores))
    app.slider[0].set_value(threshold).run()
    counts = data.confusion_counts(saved.scores, saved.is_anomaly, threshold)
    assert f"{counts.rejected} rejected, {counts.accepted} accepted" in counts_text(app)
    assert metric(app, "False reject") == str(counts.false_reject)

    assert app.radio[0].options == list(data.FILTERS)
    app.radio[0].set_value("accepted").run()
    captions = grid_captions(app)
    assert len(captions) == counts.accepted and all(" · accept · " in c for c in captions)
    app.radio[0].set_value("rejected").run()
    assert len(grid_captions(app)) == counts.rejected
    app.radio[0].set_value("false rejects").run()
    captions = grid_captions(app)
    assert len(captions) == counts.false_reject
    assert all(" · reject · good" in c for c in captions)
    app.radio[0].set_value("escapes").run()
    captions = grid_captions(app)
    assert len(captions) == counts.false_accept
    assert all(" · accept · defective" in c for c in captions)
    app.radio[0].set_value("rejected").run()

    lowest_rejected = min(np.flatnonzero(saved.scores > threshold), key=lambda i: saved.scores[i])
    app.button(key=f"inspect:project/group/{CATEGORY}:{lowest_rejected}").click().run()
    assert not app.exception, app.exception
    detail = next(m.value for m in app.markdown if "true label:" in m.value)
    assert saved.image_names[lowest_rejected] in detail and "**rejected**" in detail
    assert any(m.value.startswith("**Most suspicious patch") for m in app.markdown)
    score = data.score_text(saved.scores[lowest_rejected], 5)
    assert metric(app, "Patch score (this cell)") == score

    app.slider[0].set_value(float(saved.scores.max()) + 1e-3).run()
    assert any("No image is among the rejected" in info.value for info in app.info)
    app.button(key=f"reset:project/group/{CATEGORY}").click().run()
    assert app.slider[0].value == pytest.approx(saved.threshold)


def test_run_picker_and_run_without_predictions(app, dashboard_run):
    results, _ = dashboard_run
    picker = app.selectbox(key="run")
    assert picker.options == [data.middle_truncated(run.label) for run in data.find_runs(results)]
    assert "leak" not in picker.options  # its results.csv leads outside the results folder
    app.selectbox(key="run").set_value("older/no_predictions").run()
    assert any("without --save_predictions" in warning.value for warning in app.warning)
    assert len(app.dataframe) == 1 and "image AUROC" in app.dataframe[0].value.columns
    assert not app.slider and not app.metric
    app.selectbox(key="run").set_value("stolen").run()  # predictions lead outside: not shown
    assert any("without --save_predictions" in warning.value for warning in app.warning)


def test_the_page_is_read_only_without_allow_scoring(app):
    # No widget can change the results folder, and scoring is off.
    assert not [box for box in app.sidebar.text_input]
    assert any("read-only" in c.value for c in app.sidebar.caption)
    assert any("scoring new images is off" in info.value for info in app.info)
    assert not [box for box in app.text_input if box.key.startswith("new-folder:")]


def test_scoring_is_restricted_to_folders_inside_the_results_folder(scoring_app):
    folder_box = f"new-folder:project/group/{CATEGORY}"
    score_button = f"score:project/group/{CATEGORY}"
    for escape, message in (("../", "'..' is not allowed"), ("/etc", "outside the results"),
                            ("outside_images", "outside the results")):  # fmt: skip
        scoring_app.text_input(key=folder_box).input(escape).run()
        scoring_app.button(key=score_button).click().run()
        assert any(message in error.value for error in scoring_app.error), escape
        assert not any("decision" in frame.value.columns for frame in scoring_app.dataframe)
    scoring_app.text_input(key=folder_box).input("incoming/mixed").run()
    scoring_app.button(key=score_button).click().run()
    assert not scoring_app.exception, scoring_app.exception
    table = scoring_app.dataframe[0].value
    assert sorted(Path(p).name for p in table["path"]) == ["000.png", "001.png", "002.png"]
    assert set(table["decision"]) <= {"reject", "accept"}
    assert any("unreadable.png" in warning.value for warning in scoring_app.warning)
    rejected = int((table["decision"] == "reject").sum())
    assert any(m.value.startswith(f"**3 scored, {rejected} rejected") for m in scoring_app.markdown)


def test_ensemble_threshold_and_equal_scores_in_run_predict_and_dashboard(
    scoring_app, dashboard_run, tmp_path
):
    """An ensemble trained with held-out normal images decides on its combined scale: the
    threshold saved with its members is the run's, and an image scores the same in the run,
    in patchcore-predict and in the dashboard's "Score new images". Equal up to float32
    rounding: the backbone sees batches of other sizes (its kernels then round differently,
    about 1e-5 of a raw score here), and each member's scores are divided by the span of its
    normal images' scores; the tolerance is a thousandth of that span, the unit of this scale."""
    results, _ = dashboard_run
    run_folder = results / DASHBOARD_ENSEMBLE_RUN
    model_folder = run_folder / "models" / CATEGORY
    saved = read_predictions(run_folder / "predictions" / CATEGORY)
    statistics = load_ensemble_statistics(model_folder)
    assert saved.members == 2 and saved.normalisation == "normal_stats"
    assert statistics is not None and saved.threshold == statistics.threshold
    assert saved.statistics == statistics and statistics.num_images == 3  # 12 * (1 - 0.75)

    app = scoring_app
    app.selectbox(key="run").set_value(DASHBOARD_ENSEMBLE_RUN).run()
    assert not app.exception, app.exception
    assert app.slider[0].value == pytest.approx(statistics.threshold)
    assert any("the threshold saved with the model" in c.value for c in app.sidebar.caption)
    assert any("ensemble of 2, scores combined with normal_stats" in c.value for c in app.caption)
    key = f"{DASHBOARD_ENSEMBLE_RUN}/{CATEGORY}"
    app.text_input(key=f"new-folder:{key}").input("incoming/object_test").run()
    app.button(key=f"score:{key}").click().run()
    assert not app.exception, app.exception
    table = app.dataframe[0].value
    run_scores = {
        f"{Path(path).parent.name}_{Path(path).name}": score
        for path, score in zip(saved.image_paths, saved.scores, strict=True)
    }
    dashboard_scores = {
        Path(path).name: score for path, score in zip(table["path"], table["score"], strict=True)
    }
    assert sorted(dashboard_scores) == sorted(run_scores)
    for name, score in dashboard_scores.items():
        assert score == pytest.approx(run_scores[name], abs=ENSEMBLE_TOLERANCE), name
    expected = data.rejected_mask(np.array(list(run_scores.values())), statistics.threshold)
    assert f"**{len(run_scores)} scored, {int(expected.sum())} rejected at" in "".join(
        m.value for m in app.markdown
    )

    inputs = sorted((results / "incoming" / "object_test").glob("*.png"))
    outcome = CliRunner().invoke(predict_cli, [
        str(model_folder), *map(str, inputs), "--output", str(tmp_path / "out.csv"),
        "--gpu", "-1", "--num_workers", "0",
    ])  # fmt: skip
    with (tmp_path / "out.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rejected = any(row["decision"] == "reject" for row in rows)
    assert outcome.exit_code == (3 if rejected else 0), outcome.output
    assert {float(row["threshold"]) for row in rows} == {statistics.threshold}
    for row in rows:
        name = Path(row["path"]).name
        assert float(row["score"]) == pytest.approx(run_scores[name], abs=ENSEMBLE_TOLERANCE), name
        if abs(run_scores[name] - statistics.threshold) > ENSEMBLE_TOLERANCE:
            rejected = run_scores[name] > statistics.threshold
            assert row["decision"] == ("reject" if rejected else "accept"), name


# ---------------------------------------------------------------- the launcher
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_dashboard_command_runs_streamlit_on_the_app(tmp_path, monkeypatch):
    from patchcore.apps.dashboard import launch
    from patchcore.cli.dashboard import dashboard_cli

    commands = []
    monkeypatch.setattr(
        launch, "run_forwarding_signals", lambda command: commands.append(command) or 0
    )
    outcome = CliRunner().invoke(
        dashboard_cli, ["--results", str(tmp_path), "--port", "8600", "--headless", "--gpu", "-1"]
    )
    assert outcome.exit_code == 0, outcome.output
    (command,) = commands
    assert command[1:4] == ["-m", "streamlit", "run"] and Path(command[4]) == APP
    assert command[command.index("--server.port") + 1] == "8600"
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[-5:] == ["--", "--results", str(tmp_path.resolve()), "--device", "cpu"]
    outcome = CliRunner().invoke(
        dashboard_cli, ["--results", str(tmp_path), "--allow_scoring", "--address", "0.0.0.0"]
    )
    assert outcome.exit_code == 0 and commands[-1][-1] == "--allow_scoring"
    assert launch.is_loopback("127.0.0.1") and launch.is_loopback("::1")
    assert not launch.is_loopback("0.0.0.0") and not launch.is_loopback("10.0.0.2")
    missing = CliRunner().invoke(dashboard_cli, ["--results", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_command_stops_the_streamlit_server(tmp_path, stop):
    pytest.importorskip("streamlit")
    port = free_port()
    launcher = subprocess.Popen(
        [sys.executable, "-c", "from patchcore.cli.dashboard import main; main()",
         "--results", str(tmp_path), "--port", str(port), "--headless", "--gpu", "-1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert launcher.poll() is None, "the dashboard command exited early"
                time.sleep(0.3)
        assert _port_open(port)
        launcher.send_signal(stop)
        assert launcher.wait(timeout=30) == 0
        assert not _port_open(port), "the Streamlit server is still serving after the stop"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_each_defective_image_says_when_its_defect_lies_outside_the_inspected_region(tmp_path):
    """The dashboard's per-image note uses the coverage logic of inspection_coverage.csv."""
    from PIL import Image as PILImage

    from patchcore.config import PreprocessingConfig
    from patchcore.data.datasets import list_samples
    from patchcore.evaluation.quality import inspection_coverage

    category = tmp_path / "part"
    (category / "train" / "good").mkdir(parents=True)
    (category / "test" / "crack").mkdir(parents=True)
    (category / "ground_truth" / "crack").mkdir(parents=True)
    cases = {"corner": (slice(0, 10), slice(0, 10)), "edge": (slice(0, 40), slice(100, 140)),
             "centre": (slice(120, 140), slice(120, 140))}  # fmt: skip
    for name, (rows, columns) in cases.items():
        PILImage.new("RGB", (256, 256), "grey").save(category / "test" / "crack" / f"{name}.png")
        mask = np.zeros((256, 256), dtype=np.uint8)
        mask[rows, columns] = 255
        PILImage.fromarray(mask).save(category / "ground_truth" / "crack" / f"{name}_mask.png")
    preprocessing = PreprocessingConfig()  # centre crop 224 of 256
    note = {name: data.coverage_note(str(category / "test" / "crack" / f"{name}.png"), "crack",
                                     preprocessing) for name in cases}  # fmt: skip
    assert note == {
        "corner": "defect wholly outside the inspected region (centre crop 224 of 256)",
        "edge": "defect partly outside the inspected region (centre crop 224 of 256)",
        "centre": "",
    }
    # The same answers as the run's counts, and none for whole images or unknown masks.
    coverage = inspection_coverage(list_samples(tmp_path, "part", "test"), preprocessing)
    assert [Path(p).stem for p in coverage.wholly_outside] == ["corner"]
    assert [Path(p).stem for p in coverage.partly_outside] == ["edge"]
    whole = PreprocessingConfig(crop="none")
    assert data.coverage_note(str(category / "test" / "crack" / "corner.png"), "crack", whole) == ""
    assert data.coverage_note(str(tmp_path / "elsewhere.png"), "crack", preprocessing) == ""
    assert data.coverage_note(str(category / "test" / "crack" / "corner.png"), "crack", None) == ""
