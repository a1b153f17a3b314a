"""The operator dashboard: its data functions, and the Streamlit app driven headlessly."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchcore.cli.runs import train_cli
from patchcore.config import PreprocessingConfig
from patchcore.apps.dashboard import data
from patchcore.evaluation.visualization import heatmap_rgb
from patchcore.data.datasets import ImageDataset, Sample
from patchcore.errors import ConfigurationError, DataError
from patchcore.model.serialization import load_models
from patchcore.evaluation.records import read_predictions
from patchcore.evaluation.reporting import write_results_csv

APP = Path(data.__file__).with_name("app.py")
CATEGORY = "mvtec_object"
SMALL_MODEL = [
    "-b", "resnet18", "--random_backbone_weights", "--pretrain_embed_dimension", "64",
    "--target_embed_dimension", "64",
]  # fmt: skip


def make_dashboard_run(data_root: Path, results: Path) -> Path:
    """A quick real run on the synthetic 'object' category (model, predictions saved), plus an
    older run folder that has only a results.csv. Returns the trained run's folder."""
    old_run = results / "older" / "no_predictions" / "results.csv"
    write_results_csv(old_run, {"mvtec_object": {"instance_auroc": 0.5, "pro": math.nan}})
    os.utime(old_run, (1_000_000_000, 1_000_000_000))
    arguments = [
        "--gpu", "-1", "--save_patchcore_model", "--save_predictions", results,
        "patch_core", *SMALL_MODEL, "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", "--resize", "144", "--imagesize", "128", "--num_workers", "0",
        "--batch_size", "4", "--train_val_split", "0.75", "-d", "object", "mvtec", data_root,
    ]  # fmt: skip
    outcome = CliRunner().invoke(train_cli, [str(a) for a in arguments], catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    return results / "project" / "group"


@pytest.fixture(scope="module")
def dashboard_run(synthetic_root, tmp_path_factory):
    results = tmp_path_factory.mktemp("dashboard_results")
    return results, make_dashboard_run(synthetic_root, results)


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
    assert data.select_images(SCORES, 0.5, "rejected").tolist() == [2, 4]
    assert data.select_images(SCORES, 0.5, "accepted").tolist() == [0, 1, 3, 5]
    everything = data.select_images(SCORES, 0.5, "all")
    assert everything.tolist() == list(range(6))
    # Equal scores (indices 1 and 5, names b and c) are ordered by name.
    assert data.sort_images(everything, SCORES, NAMES, "score, highest first").tolist() == [
        2, 4, 1, 5, 3, 0]  # fmt: skip
    assert data.sort_images(everything, SCORES, NAMES, "score, lowest first").tolist() == [
        0, 3, 1, 5, 4, 2]  # fmt: skip
    assert data.sort_images(np.array([0, 2, 5]), SCORES, NAMES, "name").tolist() == [2, 5, 0]
    with pytest.raises(ConfigurationError):
        data.select_images(SCORES, 0.5, "maybe")


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
def test_most_suspicious_patch_is_the_cell_of_the_map_maximum():
    anomaly_map = np.zeros((64, 48))
    anomaly_map[37, 21] = 5.0
    patch = data.most_suspicious_patch(anomaly_map, (8, 6))  # cells of 8 x 8 pixels
    assert patch.peak == (37, 21) and patch.cell == (4, 2)
    assert patch.box == (32, 16, 40, 24) and patch.score == 5.0
    corner = np.zeros((30, 30))
    corner[29, 0] = 1.0
    patch = data.most_suspicious_patch(corner, (4, 4))  # 7.5-pixel cells
    assert patch.cell == (3, 0) and patch.box == (22, 0, 30, 8)


def test_one_colour_scale_for_all_maps_of_a_category():
    maps = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)])
    maps[1, 0, 0] = 2.0
    scale = data.colour_range(maps)
    assert scale == (1.0, 3.0)
    first, second = (heatmap_rgb(anomaly_map, scale) for anomaly_map in maps)
    assert (first == first[0, 0]).all() and tuple(first[0, 0]) != tuple(second[1, 1])
    # The same value has the same colour wherever it appears.
    same = heatmap_rgb(np.array([[2.0]]), scale)
    assert tuple(same[0, 0]) == tuple(second[0, 0])
    assert data.colour_range(np.ones((2, 3, 3))) == pytest.approx((0.5, 1.5))


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
    assert [run.label for run in runs] == ["project/group", "older/no_predictions"]
    assert runs[0].folder == run_folder and runs[0].has_predictions
    assert not runs[1].has_predictions and data.list_categories(runs[1].folder) == []
    assert data.list_categories(run_folder) == [CATEGORY]
    assert data.model_folder(run_folder, CATEGORY) == run_folder / "models" / CATEGORY
    assert data.model_folder(runs[1].folder, CATEGORY) is None
    assert data.saved_preprocessing(run_folder / "models" / CATEGORY) == PreprocessingConfig(
        144, 128
    )
    assert data.find_runs(results / "nowhere") == []


def test_a_damaged_model_meta_file_falls_back_to_the_map_size(tmp_path):
    (tmp_path / "patchcore_params.pkl").write_bytes(b"")
    (tmp_path / "patchcore_meta.json").write_text("{not json")
    assert data.saved_preprocessing(tmp_path) is None
    (tmp_path / "patchcore_meta.json").write_text('{"config": {"preprocessing": {"resize": 0}}}')
    assert data.saved_preprocessing(tmp_path) is None
    assert data.saved_preprocessing(None) is None


def test_scoring_new_images_lists_unreadable_files(dashboard_run, synthetic_root, tmp_path):
    _, run_folder = dashboard_run
    models = load_models(run_folder / "models" / CATEGORY, "cpu")
    good = sorted((synthetic_root / "object" / "test" / "good").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    scored = data.score_images(models, [good[0], broken, good[1]], batch_size=2)
    assert scored.paths == [str(good[0]), str(good[1])]
    assert [path for path, _ in scored.unreadable] == [str(broken)]
    assert [m.shape for m in scored.maps] == [(128, 128)] * 2
    assert [i.shape for i in scored.images] == [(128, 128, 3)] * 2
    saved = read_predictions(run_folder / "predictions" / CATEGORY)
    for path, score in zip(scored.paths, scored.scores, strict=True):
        assert score == pytest.approx(saved.scores[saved.image_paths.index(path)], rel=1e-4)


# ------------------------------------------------------------------ the app
@pytest.fixture
def app(dashboard_run, monkeypatch):
    app_test = pytest.importorskip(
        "streamlit.testing.v1", reason='Streamlit is not installed (pip install -e ".[dashboard]")'
    )
    results, _ = dashboard_run
    monkeypatch.setenv("PATCHCORE_RESULTS", str(results))
    test = app_test.AppTest.from_file(str(APP), default_timeout=60).run()
    assert not test.exception, test.exception
    return test


def grid_captions(test) -> list[str]:
    return [caption for image in test.image for caption in image.captions if " · score " in caption]


def counts_text(test) -> str:
    return next(m.value for m in test.markdown if m.value.startswith("At threshold"))


def metric(test, label: str) -> str:
    return next(m.value for m in test.metric if m.label == label)


def test_app_shows_metrics_counts_and_grid_at_the_saved_threshold(app, dashboard_run):
    _, run_folder = dashboard_run
    saved = read_predictions(run_folder / "predictions" / CATEGORY)
    assert app.title[0].value == "PatchCore inspection dashboard"
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
    patch = data.most_suspicious_patch(saved.maps[best], saved.patch_grids[best])
    assert metric(app, "Patch score (anomaly-map peak)") == data.score_text(patch.score, 5)


def test_threshold_filter_and_detail_view_respond(app, dashboard_run):
    _, run_folder = dashboard_run
    saved = read_predictions(run_folder / "predictions" / CATEGORY)
    threshold = float(np.median(saved.scores))
    app.slider[0].set_value(threshold).run()
    counts = data.confusion_counts(saved.scores, saved.is_anomaly, threshold)
    assert f"{counts.rejected} rejected, {counts.accepted} accepted" in counts_text(app)
    assert metric(app, "False reject") == str(counts.false_reject)

    app.radio[0].set_value("accepted").run()
    captions = grid_captions(app)
    assert len(captions) == counts.accepted and all(" · accept · " in c for c in captions)
    app.radio[0].set_value("rejected").run()
    assert len(grid_captions(app)) == counts.rejected

    lowest_rejected = min(np.flatnonzero(saved.scores > threshold), key=lambda i: saved.scores[i])
    app.button(key=f"inspect:project/group/{CATEGORY}:{lowest_rejected}").click().run()
    assert not app.exception, app.exception
    detail = next(m.value for m in app.markdown if "true label:" in m.value)
    assert saved.image_names[lowest_rejected] in detail and "**rejected**" in detail
    assert any(m.value.startswith("**Most suspicious patch") for m in app.markdown)
    patch = data.most_suspicious_patch(saved.maps[lowest_rejected], saved.patch_grids[lowest_rejected])
    assert metric(app, "Patch score (anomaly-map peak)") == data.score_text(patch.score, 5)

    app.slider[0].set_value(float(saved.scores.max()) + 1e-3).run()
    assert any("No image is rejected" in info.value for info in app.info)
    app.button(key=f"reset:project/group/{CATEGORY}").click().run()
    assert app.slider[0].value == pytest.approx(saved.threshold)


def test_run_without_predictions_shows_only_its_results(app):
    app.selectbox(key="run").set_value("older/no_predictions").run()
    assert any("without --save_predictions" in warning.value for warning in app.warning)
    assert len(app.dataframe) == 1 and "image AUROC" in app.dataframe[0].value.columns
    assert not app.slider and not app.metric


def test_scoring_a_folder_of_new_images(app, synthetic_root, tmp_path):
    for image in sorted((synthetic_root / "object" / "test" / "crack").glob("*.png")):
        (tmp_path / image.name).write_bytes(image.read_bytes())
    (tmp_path / "unreadable.png").write_bytes(b"no image here")
    app.text_input(key=f"new-folder:project/group/{CATEGORY}").input(str(tmp_path)).run()
    app.button(key=f"score:project/group/{CATEGORY}").click().run()
    assert not app.exception, app.exception
    table = app.dataframe[0].value
    assert sorted(Path(p).name for p in table["path"]) == ["000.png", "001.png", "002.png"]
    assert set(table["decision"]) <= {"reject", "accept"}
    assert any("unreadable.png" in warning.value for warning in app.warning)
    rejected = int((table["decision"] == "reject").sum())
    assert any(m.value.startswith(f"**3 scored, {rejected} rejected") for m in app.markdown)


def test_dashboard_command_runs_streamlit_on_the_app(tmp_path, monkeypatch):
    from patchcore.apps.dashboard import launch
    from patchcore.cli.dashboard import dashboard_cli

    commands = []
    monkeypatch.setattr(launch.subprocess, "call", lambda command: commands.append(command) or 0)
    outcome = CliRunner().invoke(
        dashboard_cli, ["--results", str(tmp_path), "--port", "8600", "--headless", "--gpu", "-1"]
    )
    assert outcome.exit_code == 0, outcome.output
    (command,) = commands
    assert command[1:4] == ["-m", "streamlit", "run"] and Path(command[4]) == APP
    assert command[command.index("--server.port") + 1] == "8600"
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[-5:] == ["--", "--results", str(tmp_path.resolve()), "--device", "cpu"]
    missing = CliRunner().invoke(dashboard_cli, ["--results", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
