"""Streamlit script of the operator dashboard.

    patchcore-dashboard --results RESULTS_DIR [--allow_scoring]
    (or: streamlit run app.py -- --results RESULTS_DIR [--allow_scoring])

The results folder comes from `--results`, else from the PATCHCORE_RESULTS environment
variable, and cannot be changed from the page: every run shown lies inside it (see
`data.ResultsRoot`). Everything shown is read from what a run saved (`--save_predictions`,
`--save_patchcore_model`); the page is read-only unless the server was started with
`--allow_scoring` (or PATCHCORE_ALLOW_SCORING=1), which enables "Score new images" on folders
inside the results folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from patchcore.apps.dashboard import data
from patchcore.config import PreprocessingConfig
from patchcore.errors import PatchCoreError
from patchcore.evaluation.records import DatasetPredictions, read_decision_table, read_predictions
from patchcore.evaluation.reporting import COLUMN_TITLES, read_results_csv
from patchcore.layout import RESULTS_FILE, RunLayout
from patchcore.model.serialization import load_ensemble_statistics, load_models

TITLE = "PatchCore inspection dashboard"
RESULTS_ENVIRONMENT_VARIABLE = "PATCHCORE_RESULTS"
ALLOW_SCORING_ENVIRONMENT_VARIABLE = "PATCHCORE_ALLOW_SCORING"
PAGE_SIZE = 24
GRID_COLUMNS = 2
GRID_HEIGHT = 1100
GRID_ROWS_WITHOUT_SCROLL = 4
TOP_NEW_IMAGES = 6
HEADLINE_METRICS = (
    ("instance_auroc", "Image AUROC"),
    ("full_pixel_auroc", "Pixel AUROC"),
    ("pro", "PRO"),
    ("instance_f1max", "Image F1max"),
)
GOOD_COLOUR = "#2e7d32"
DEFECTIVE_COLOUR = "#d62728"


@dataclass(frozen=True)
class Settings:
    """How the server was started: the results folder (or why it is unusable), the device,
    and whether new images may be scored."""

    root: data.ResultsRoot | None
    problem: str
    device: str
    allow_scoring: bool


@dataclass(frozen=True)
class View:
    """The category being inspected and everything derived from it for one script run."""

    run: data.RunInfo
    category: str
    predictions: DatasetPredictions
    folder: str
    stamp: float
    preprocessing: tuple | None  # the saved model's PreprocessingConfig fields, or None
    scale: tuple[float, float]
    settings: Settings

    @property
    def key(self) -> str:
        """Prefix of the session-state keys that belong to this run and category."""
        return f"{self.run.label}/{self.category}"


@dataclass(frozen=True)
class Controls:
    threshold: float
    saved_threshold: float | None
    which: str
    order: str


# ---------------------------------------------------------------------------- inputs
def script_arguments() -> argparse.Namespace:
    """`--results`, `--device` and `--allow_scoring` given after `--` to the script."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--results", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allow_scoring", action="store_true")
    arguments, _ = parser.parse_known_args(sys.argv[1:])
    return arguments


def settings() -> Settings:
    """The server's settings: script arguments first, then the environment variables."""
    arguments = script_arguments()
    folder = arguments.results or os.environ.get(RESULTS_ENVIRONMENT_VARIABLE, "")
    allow = arguments.allow_scoring or os.environ.get(ALLOW_SCORING_ENVIRONMENT_VARIABLE) == "1"
    try:
        root, problem = data.ResultsRoot.of(folder), ""
    except PatchCoreError as error:
        root, problem = None, str(error)
    return Settings(root, problem, arguments.device, allow)


# ----------------------------------------------------------------------- cached loads
@st.cache_resource(max_entries=8, show_spinner="Loading predictions…")
def load_predictions(folder: str, stamp: float) -> DatasetPredictions:
    """Saved predictions of one dataset (shared, read-only), reloaded when files change."""
    return read_predictions(Path(folder))


@st.cache_data(max_entries=32, show_spinner=False)
def category_colour_range(folder: str, stamp: float) -> tuple[float, float]:
    return data.colour_range(load_predictions(folder, stamp))


@st.cache_data(max_entries=32, show_spinner=False)
def view_preprocessing(run_folder: str, category: str, stamp: float) -> tuple | None:
    preprocessing = data.saved_preprocessing(data.model_folder(Path(run_folder), category))
    return None if preprocessing is None else dataclasses.astuple(preprocessing)


@st.cache_data(max_entries=32, show_spinner=False)
def view_config(run_folder: str, category: str, stamp: float):
    return data.saved_config(data.model_folder(Path(run_folder), category))


@st.cache_data(max_entries=32, show_spinner=False)
def category_outlooks(run_folder: str, stamps: tuple[tuple[str, float], ...]):
    outlooks = []
    for category, _ in stamps:
        try:
            folder = data.predictions_folder(Path(run_folder), category)
            outlooks.append(data.category_outlook(category, read_decision_table(folder)))
        except (PatchCoreError, OSError, ValueError, KeyError):
            continue
    return outlooks


@st.cache_data(max_entries=4096, show_spinner=False)
def view_image(
    path: str, mtime: float, preprocessing: tuple | None, size: tuple[int, int]
) -> np.ndarray | None:
    """The input image as the model saw it, or None when it cannot be read."""
    config = None if preprocessing is None else PreprocessingConfig(*preprocessing)
    try:
        return data.load_view_image(Path(path), config, size)
    except PatchCoreError:
        return None


@st.cache_data(max_entries=32, show_spinner=False)
def read_results(path: str, mtime: float) -> pd.DataFrame:
    rows = read_results_csv(Path(path))
    table = pd.DataFrame.from_dict(rows, orient="index") * 100
    return table.rename(columns=COLUMN_TITLES)


@st.cache_resource(max_entries=2, show_spinner="Loading the saved model…")
def load_run_models(folder: str, stamp: float, device: str):
    return load_models(Path(folder), device)


@st.cache_data(max_entries=32, show_spinner=False)
def saved_ensemble_statistics(folder: str, stamp: float):
    return load_ensemble_statistics(Path(folder))


def file_mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def input_image(view: View, index: int) -> np.ndarray | None:
    path = view.predictions.image_paths[index]
    size = tuple(view.predictions.maps[index].shape)
    return view_image(path, file_mtime(path), view.preprocessing, size)


def image_and_overlay(view: View, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The image (grey if unreadable), its overlay, and whether the image was found."""
    predictions = view.predictions
    image = input_image(view, index)
    found = image is not None
    if not found:
        image = data.placeholder_image(tuple(predictions.maps[index].shape))
    mask = predictions.masks[index] if predictions.has_mask[index] else None
    return image, data.overlay(image, predictions.maps[index], view.scale, mask), found


# --------------------------------------------------------------------------- sidebar
def _keep_valid(key: str, options: list) -> None:
    """Drops a stored widget value that is no longer among the options."""
    if key in st.session_state and st.session_state[key] not in options:
        st.session_state[key] = options[0]


def choose_run(root: data.ResultsRoot) -> data.RunInfo | None:
    runs = data.find_runs(root)
    if not runs:
        st.info(
            f"No run found under {root.path}. A run is a folder containing results.csv, e.g. "
            "after `patchcore-demo` or `patchcore-train --save_predictions`."
        )
        return None
    labels = {run.label: run for run in runs}
    _keep_valid("run", list(labels))
    label = st.sidebar.selectbox(
        "Run (newest first)",
        list(labels),
        key="run",
        format_func=lambda name: data.middle_truncated(name or "."),
        help="Run folders under the results folder; long names are shortened in the middle.",
    )
    run = labels[label]
    st.sidebar.caption(f"{run.label or '.'} · written {_when(run)}")
    return run


def _when(run: data.RunInfo) -> str:
    return datetime.datetime.fromtimestamp(run.modified).strftime("%Y-%m-%d %H:%M")


def choose_category(run: data.RunInfo) -> str | None:
    """The category picker; it opens on the category with the most rejects (among those with
    defective images, `data.opening_category`)."""
    categories = data.list_categories(run.folder)
    if not categories:
        return None
    stamps = tuple(
        (category, data.folder_stamp(RunLayout(run.folder).dataset_predictions(category)))
        for category in categories
    )
    outlooks = category_outlooks(str(run.folder), stamps)
    opening = data.opening_category(outlooks) if outlooks else categories[0]
    key = f"category:{run.label}"
    _keep_valid(key, categories)
    return st.sidebar.selectbox(
        "Category", categories, index=categories.index(opening), key=key,
        help="Opens on the category with the most rejected images among those with defects.",
    )  # fmt: skip


def _reset_threshold(key: str, value: float) -> None:
    st.session_state[key] = value


def new_images_threshold(view: View) -> float | None:
    """The threshold saved with an ensemble's members when new images are decided at it
    rather than at the slider's (test-set min-max runs; `data.new_image_decision`)."""
    if data.on_run_scale(view.predictions):
        return None
    folder = data.model_folder(view.run.folder, view.category)
    if folder is None:
        return None
    statistics = saved_ensemble_statistics(str(folder), data.folder_stamp(folder))
    return None if statistics is None else statistics.threshold


def choose_controls(view: View) -> Controls:
    predictions = view.predictions
    start, note = data.initial_threshold(
        predictions.threshold, predictions.scores, predictions.is_anomaly,
        new_images_threshold(view),
    )  # fmt: skip
    bounds = data.slider_range(predictions.scores, start)
    key = f"threshold:{view.key}"
    threshold = st.sidebar.slider(
        "Decision threshold (reject if score >)", bounds.low, bounds.high, start, bounds.step,
        format=bounds.format, key=key,
    )  # fmt: skip
    st.sidebar.caption(f"Starts at {data.score_text(start, 5)}: {note}.")
    st.sidebar.button(
        "Reset threshold", key=f"reset:{view.key}", on_click=_reset_threshold, args=(key, start)
    )
    which = st.sidebar.radio(
        "Show", data.FILTERS, key=f"filter:{view.key}", horizontal=True, help=data.FILTER_HELP
    )
    order = st.sidebar.selectbox("Sort", data.SORT_ORDERS, key=f"order:{view.key}")
    return Controls(float(threshold), predictions.threshold, which, order)


# --------------------------------------------------------------------------- overview
def _percent(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{100 * value:.2f} %"


def show_metrics(view: View) -> None:
    metrics = dict(view.predictions.metrics)
    columns = st.columns(len(HEADLINE_METRICS))
    for column, (name, label) in zip(columns, HEADLINE_METRICS, strict=True):
        column.metric(label, _percent(metrics.get(name)))
    if not view.predictions.is_anomaly.any():
        st.caption(
            "This category has no defective test images, so its detection metrics are "
            "undefined (—); the decisions below are false rejects or true accepts only."
        )


def score_histogram(view: View, controls: Controls) -> alt.LayerChart:
    predictions = view.predictions
    frame = pd.DataFrame(
        {
            "score": predictions.scores,
            "image": np.where(predictions.is_anomaly, "defective", "good"),
        }
    )
    colours = alt.Scale(domain=["good", "defective"], range=[GOOD_COLOUR, DEFECTIVE_COLOUR])
    bars = (
        alt.Chart(frame)
        .mark_bar(opacity=0.65, binSpacing=1)
        .encode(
            x=alt.X("score:Q", bin=alt.Bin(maxbins=40), title="image score"),
            y=alt.Y("count():Q", stack=None, title="images"),
            color=alt.Color("image:N", scale=colours, legend=alt.Legend(orient="top")),
        )
    )
    lines = pd.DataFrame({"score": [controls.threshold], "text": ["threshold"]})
    if controls.saved_threshold is not None and controls.saved_threshold != controls.threshold:
        lines.loc[1] = [controls.saved_threshold, "saved"]
    rule = (
        alt.Chart(lines)
        .mark_rule(strokeDash=[6, 3], size=2)
        .encode(x="score:Q", color=alt.value("black"))
    )
    labels = (
        alt.Chart(lines)
        .mark_text(align="left", dx=4, dy=-6, baseline="top")
        .encode(x="score:Q", y=alt.value(0), text="text:N")
    )
    return (bars + rule + labels).properties(height=260)


def confusion_text(confusion: data.Confusion, threshold: float) -> str:
    def rate(value: float) -> str:
        return "—" if math.isnan(value) else f"{100 * value:.1f} %"

    return (
        f"At threshold {data.score_text(threshold, 5)}: {confusion.rejected} rejected, {confusion.accepted} "
        f"accepted of {confusion.good + confusion.defective} images. "
        f"False-reject rate {rate(confusion.false_reject_rate)} "
        f"({confusion.false_reject} of {confusion.good} good); "
        f"false-accept rate (escapes) {rate(confusion.false_accept_rate)} "
        f"({confusion.false_accept} of {confusion.defective} defective)."
    )


def show_confusion(view: View, controls: Controls) -> None:
    predictions = view.predictions
    confusion = data.confusion_counts(
        predictions.scores, predictions.is_anomaly, controls.threshold
    )
    top = st.columns(2)
    top[0].metric("True reject", confusion.true_reject, help="defective images rejected")
    top[1].metric("False reject", confusion.false_reject, help="good images rejected")
    bottom = st.columns(2)
    bottom[0].metric("True accept", confusion.true_accept, help="good images accepted")
    bottom[1].metric("False accept", confusion.false_accept, help="defective images accepted")
    st.markdown(confusion_text(confusion, controls.threshold))


def show_overview(view: View, controls: Controls) -> None:
    show_metrics(view)
    chart_column, counts_column = st.columns([3, 2])
    with chart_column:
        st.markdown("**Scores of the test images**")
        st.altair_chart(score_histogram(view, controls), width="stretch")
    with counts_column:
        st.markdown("**Decisions at the threshold**")
        show_confusion(view, controls)


# ------------------------------------------------------------------------ browsing
def _select(key: str, index: int) -> None:
    st.session_state[key] = index


def page_of(view: View, order: np.ndarray) -> np.ndarray:
    pages = max(1, math.ceil(len(order) / PAGE_SIZE))
    if pages == 1:
        return order
    key = f"page:{view.key}"
    _keep_valid(key, list(range(pages)))
    page = st.selectbox(
        "Page", range(pages), key=key,
        format_func=lambda p: f"images {p * PAGE_SIZE + 1}–{min(len(order), (p + 1) * PAGE_SIZE)}"
        f" of {len(order)}",
    )  # fmt: skip
    return order[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]


def show_grid(view: View, controls: Controls, order: np.ndarray, selected_key: str) -> None:
    shown = page_of(view, order)
    rows = math.ceil(len(shown) / GRID_COLUMNS)
    height = GRID_HEIGHT if rows > GRID_ROWS_WITHOUT_SCROLL else "content"
    with st.container(height=height, border=False):
        for start in range(0, len(shown), GRID_COLUMNS):
            columns = st.columns(GRID_COLUMNS)
            for column, index in zip(columns, shown[start : start + GRID_COLUMNS], strict=False):
                with column:
                    show_tile(view, controls, int(index), selected_key)


@st.cache_data(max_entries=2048, show_spinner=False)
def tile_png(
    view_identity: tuple[str, float, tuple | None, tuple[float, float]],
    index: int,
    image_mtime: float,
    _view: View,
) -> tuple[bytes, bool]:
    """Image beside overlay as PNG bytes (encoded once), and whether the image was found."""
    image, heat, found = image_and_overlay(_view, index)
    return data.png_bytes(data.side_by_side(image, heat)), found


@st.cache_data(max_entries=4096, show_spinner=False)
def cached_coverage_note(image_path: str, defect_type: str, preprocessing: tuple | None) -> str:
    config = None if preprocessing is None else PreprocessingConfig(*preprocessing)
    return data.coverage_note(image_path, defect_type, config)


def coverage_note(view: View, index: int) -> str:
    """A defective test image's note when its defect lies (partly) outside what was inspected."""
    predictions = view.predictions
    if not predictions.is_anomaly[index]:
        return ""
    return cached_coverage_note(predictions.image_paths[index], predictions.defect_types[index],
                                view.preprocessing)  # fmt: skip


def show_tile(view: View, controls: Controls, index: int, selected_key: str) -> None:
    identity = (view.folder, view.stamp, view.preprocessing, view.scale)
    mtime = file_mtime(view.predictions.image_paths[index])
    png, found = tile_png(identity, index, mtime, view)
    caption = data.image_caption(view.predictions, index, controls.threshold)
    if not found:
        caption += " · image file not found"
    note = coverage_note(view, index)
    if note:
        caption += f" · {note}"
    st.image(png, caption=caption, width="stretch")
    st.button(
        "Inspect", key=f"inspect:{view.key}:{index}", on_click=_select, args=(selected_key, index)
    )


def show_detail(view: View, controls: Controls, order: np.ndarray, selected_key: str) -> None:
    predictions = view.predictions
    options = [int(index) for index in order]
    _keep_valid(selected_key, options)
    index = st.selectbox(
        "Image", options, key=selected_key,
        format_func=lambda i: f"{predictions.image_names[i]} ({data.score_text(predictions.scores[i])})",
    )  # fmt: skip
    score = float(predictions.scores[index])
    rejected = bool(data.rejected_mask(np.array([score]), controls.threshold)[0])
    label = data.true_label(bool(predictions.is_anomaly[index]), predictions.defect_types[index])
    st.markdown(
        f"**{predictions.image_names[index]}** · score **{data.score_text(score, 5)}** · "
        f"**{'rejected' if rejected else 'accepted'}** at {data.score_text(controls.threshold, 5)}"
        " · "
        f"true label: {label}"
    )
    st.caption(predictions.image_paths[index])
    show_patch(view, index, rejected)


def suspicious_patch(view: View, index: int) -> data.SuspiciousPatch:
    predictions = view.predictions
    model_stamp = data.folder_stamp(RunLayout(view.run.folder).model(view.category))
    return data.most_suspicious_patch(
        predictions.maps[index],
        predictions.patch_grids[index],
        float(predictions.scores[index]),
        None if predictions.patch_scores is None else predictions.patch_scores[index],
        predictions.members,
        view_config(str(view.run.folder), view.category, model_stamp),
    )


def show_patch(view: View, index: int, rejected: bool) -> None:
    predictions = view.predictions
    patch = suspicious_patch(view, index)
    image, heat, found = image_and_overlay(view, index)
    boxed_image, boxed_heat = data.draw_box(image, patch.box), data.draw_box(heat, patch.box)
    if not found:
        st.warning("The input image file was not found; only the anomaly map is shown.")
    st.image(data.side_by_side(boxed_image, boxed_heat), width="stretch")
    st.markdown(
        "**Most suspicious patch (drives the rejection)**"
        if rejected
        else "**Highest-scoring patch (below the threshold)**"
    )
    mask = predictions.masks[index] if predictions.has_mask[index] else None
    thin = data.overlay(image, predictions.maps[index], view.scale, mask, outline_thickness=1)
    zoomed = data.side_by_side(
        data.zoomed_patch(image, patch.box), data.zoomed_patch(thin, patch.box)
    )
    st.image(zoomed, caption="3 × 3 patch cells around it, enlarged", width="stretch")
    columns = st.columns(2)
    columns[0].metric(
        "Image score (decides)", data.score_text(patch.image_score, 5)
    )
    columns[1].metric(
        "Patch score (this cell)", "—" if patch.score is None else data.score_text(patch.score, 5)
    )
    st.caption(
        f"{patch.relation} The heat map's peak, {data.score_text(patch.map_peak, 5)}, is lower: "
        "the map is smoothed (Gaussian, σ = 4 px) and only colours the image; it is not "
        f"compared with the threshold. {patch_text(view, index, patch)}"
    )


def patch_text(view: View, index: int, patch: data.SuspiciousPatch) -> str:
    predictions = view.predictions
    grid_h, grid_w = predictions.patch_grids[index]
    top, left, bottom, right = patch.box
    text = (
        f"Cell row {patch.cell[0]}, column {patch.cell[1]} of the {grid_h} × {grid_w} patch "
        f"grid; pixels x {left}–{right - 1}, y {top}–{bottom - 1}."
    )
    if predictions.has_mask[index] and predictions.is_anomaly[index]:
        covered = float(predictions.masks[index][top:bottom, left:right].mean())
        text += (
            f" {100 * covered:.0f} % of the cell is ground-truth defect."
            if covered
            else " The cell does not touch the ground-truth defect."
        )
    return text


def show_browser(view: View, controls: Controls) -> None:
    predictions = view.predictions
    chosen = data.select_images(
        predictions.scores, predictions.is_anomaly, controls.threshold, controls.which
    )
    order = data.sort_images(chosen, predictions.scores, predictions.image_names, controls.order)
    st.subheader(
        f"Inspected images: {len(order)} {controls.which if controls.which != 'all' else ''}"
    )
    if not len(order):
        st.info(f"No image is among the {controls.which} at this threshold.")
        return
    show_colour_bar(view, controls)
    selected_key = f"selected:{view.key}"
    grid_column, detail_column = st.columns([3, 2], gap="medium")
    with grid_column:
        show_grid(view, controls, order, selected_key)
    with detail_column:
        show_detail(view, controls, order, selected_key)


@st.cache_data(max_entries=64, show_spinner=False)
def colour_bar_png(scale: tuple[float, float], threshold: float) -> bytes:
    return data.png_bytes(data.colour_bar(scale, threshold))


def show_colour_bar(view: View, controls: Controls) -> None:
    saved = view.predictions.threshold
    where = (
        f"the model's saved threshold, {data.score_text(saved, 5)}, sits in the middle"
        if saved is not None
        else "no saved threshold: the scale spans this category's maps"
    )
    st.image(
        colour_bar_png(view.scale, controls.threshold),
        caption=(
            "Each image beside its anomaly map, on the model's colour scale (the same colours as "
            f"the evaluation overlays and patchcore-predict's heat maps; {where}); the black "
            "line marks the threshold in use. Ground truth outlined in magenta."
        ),
        width=640,
    )


# ---------------------------------------------------------------------- new images
def show_scoring(view: View, controls: Controls) -> None:
    state_key = f"scored:{view.key}"
    with st.expander("Score new images", expanded=state_key in st.session_state):
        if not view.settings.allow_scoring:
            st.info(
                "This dashboard is read-only: scoring new images is off. Start it with "
                "`patchcore-dashboard --allow_scoring` to score folders inside the results "
                "folder."
            )
            return
        folder = data.model_folder(view.run.folder, view.category)
        if folder is None:
            st.info(
                "This run did not save the model of this category (--save_patchcore_model), "
                "so new images cannot be scored here."
            )
            return
        stamp = data.folder_stamp(folder)
        decision = data.new_image_decision(
            view.predictions, controls.threshold, saved_ensemble_statistics(str(folder), stamp)
        )
        if decision.refusal:
            st.warning(decision.refusal)
            return
        root = view.settings.root
        path = st.text_input(
            f"Folder of images inside {root.path}", key=f"new-folder:{view.key}",
            help="A folder inside the results folder (relative to it, or absolute); nothing "
                 "outside it can be read.",
        )  # fmt: skip
        recursive = st.checkbox("Include sub-folders", key=f"new-recursive:{view.key}")
        if st.button("Score images", key=f"score:{view.key}"):
            models = load_run_models(str(folder), stamp, view.settings.device)
            scored = score_folder(models, root, path, recursive) if path.strip() else None
            if not path.strip():
                st.warning("Give the folder of the images to score first.")
            if scored is not None:
                st.session_state[state_key] = scored
        if state_key in st.session_state:
            scale = view.scale if decision.scale is None else decision.scale
            show_scored(st.session_state[state_key], decision.threshold, decision.note, scale)


def score_folder(
    models, root: data.ResultsRoot, path: str, recursive: bool
) -> data.ScoredImages | None:
    try:
        files = data.folder_images(root, path, recursive)
        if not files:
            st.warning(f"{path} holds no image files.")
            return None
        with st.spinner(f"Scoring {len(files)} image(s)…"):
            return data.score_images(models, files)
    except PatchCoreError as error:
        st.error(str(error))
        return None


def show_scored(
    scored: data.ScoredImages, threshold: float, note: str, scale: tuple[float, float]
) -> None:
    decisions = [data.decision_text(score, threshold) for score in scored.scores]
    table = pd.DataFrame({"path": scored.paths, "score": scored.scores, "decision": decisions})
    st.markdown(
        f"**{len(scored.paths)} scored, {decisions.count('reject')} rejected at "
        f"{data.score_text(threshold, 5)}**"
    )
    st.caption(
        "Scored like patchcore-predict scores them (an ensemble's members combined on their "
        f"normal-image scale); {note}."
    )
    st.dataframe(table.sort_values("score", ascending=False), hide_index=True, width="stretch")
    if scored.unreadable:
        lines = "\n".join(f"- {reason}" for _, reason in scored.unreadable)
        st.warning(f"{len(scored.unreadable)} file(s) could not be read:\n{lines}")
    show_new_rejects(scored, threshold, scale)


def show_new_rejects(
    scored: data.ScoredImages, threshold: float, scale: tuple[float, float]
) -> None:
    rejected = np.flatnonzero(data.rejected_mask(scored.scores, threshold))
    top = rejected[np.argsort(-scored.scores[rejected], kind="stable")][:TOP_NEW_IMAGES]
    if not len(top):
        return
    st.markdown(f"**Top {len(top)} rejected**")
    columns = st.columns(3)
    for position, index in enumerate(top):
        heat = data.overlay(scored.images[index], scored.maps[index], scale)
        caption = (
            f"{Path(scored.paths[index]).name} · score {data.score_text(scored.scores[index])}"
        )
        columns[position % 3].image(
            data.side_by_side(scored.images[index], heat), caption=caption, width="stretch"
        )


# ---------------------------------------------------------------------------- pages
def show_results_table(run: data.RunInfo) -> None:
    path = run.folder / RESULTS_FILE
    st.dataframe(read_results(str(path), file_mtime(str(path))).style.format("{:.2f}", na_rep="—"))


def show_run_without_predictions(run: data.RunInfo) -> None:
    st.warning(
        "This run was made without --save_predictions: there are no per-image scores or maps "
        "to browse. Its results.csv (percent) is shown below; re-run training or evaluation "
        "with --save_predictions to inspect images."
    )
    show_results_table(run)


def build_view(run: data.RunInfo, category: str, settings: Settings) -> View:
    folder = data.predictions_folder(run.folder, category)
    stamp = data.folder_stamp(folder)
    predictions = load_predictions(str(folder), stamp)
    model_stamp = data.folder_stamp(RunLayout(run.folder).model(category))
    preprocessing = view_preprocessing(str(run.folder), category, model_stamp)
    scale = category_colour_range(str(folder), stamp)
    return View(run, category, predictions, str(folder), stamp, preprocessing, scale, settings)


def model_note(view: View) -> str:
    if view.preprocessing is None:
        return "no saved model: images resized to the map size"
    config = PreprocessingConfig(*view.preprocessing)
    if config.crop == "none":
        return f"whole images resized to {config.resize} (shorter side) as the saved model saw them"
    return (
        f"images resized to {config.resize} and cropped to {config.imagesize} as the saved "
        "model saw them"
    )


def show_category(view: View) -> None:
    controls = choose_controls(view)
    ensemble = ""
    if view.predictions.members > 1:
        ensemble = (
            f" · ensemble of {view.predictions.members}, scores combined with "
            f"{view.predictions.normalisation or 'an unrecorded normalisation'}"
        )
    st.caption(f"{view.run.label or '.'} · {view.category} · {model_note(view)}{ensemble}")
    show_overview(view, controls)
    show_browser(view, controls)
    show_scoring(view, controls)
    with st.expander("All categories of this run (results.csv, percent)"):
        show_results_table(view.run)


def main() -> None:
    st.set_page_config(page_title="PatchCore dashboard", layout="wide")
    st.title(TITLE)
    current = settings()
    if current.root is None:
        st.error(current.problem)
        return
    st.sidebar.caption(
        f"Runs under {current.root.path}"
        + (" · scoring new images allowed" if current.allow_scoring else " · read-only")
    )
    run = choose_run(current.root)
    if run is None:
        return
    category = choose_category(run)
    if category is None:
        show_run_without_predictions(run)
        return
    try:
        view = build_view(run, category, current)
    except PatchCoreError as error:
        st.error(str(error))
        return
    show_category(view)


if __name__ == "__main__":
    main()
