"""Scoring new images with a saved model: accept/reject decisions, heat maps and masks.

The job behind `patchcore-predict MODEL INPUT...`. INPUTs are image files, folders
(searched recursively) or glob patterns. MODEL is a saved model folder or a file written by
`patchcore-export`, run by `--runtime`:
- a model folder (runtime `torch`, the default): images go through the model's own
  preprocessing (`patchcore.data.preprocessing`), exactly as in evaluation, and are scored by
  the model or, for an ensemble, by its members combined with their normal-image statistics
  (`patchcore.evaluation.ensemble.predict_new_images`);
- an exported file (`.pth` with `torch`, `.onnx` with `onnxruntime` or `openvino`, `.xml`
  with `openvino`; see `patchcore.apps.runtimes`): the decoded image enters the exported
  graph whole, as float RGB in [0, 1], and the graph does the resize and crop on tensors
  and returns the map on the image's own frame. ONNX and OpenVINO graphs take either any
  size (`patchcore-export --input_size any`, the default of whole-image models) or the size
  fixed at export; an image of a size the model cannot take (another fixed size, or a
  working image too small for the patch grid or a tile) gets an error row naming it.
An image is rejected by `patchcore.model.calibration.decide`: its score is above the
threshold (`--threshold`, or the one saved with the model) or is not a finite number.

Results (path, score, threshold, decision per image, and the heat-map and mask files written
for it; CSV, or JSON lines for a `.jsonl` output) are streamed to a temporary file next to the
output as images are scored, and moved into place when the run ends, so a large folder never
has to fit in memory. An ensemble decides on its members' combined normal-image scale, with the
threshold saved with its members (`patchcore-train` with held-out normal images).

Heat maps and masks are PNGs named after each input as given on the command line (a symbolic
link's own name, not its target's), relative to the inputs' common folder. The heat map is the
input image at its own size with the anomaly map blended over it (the crop's map is mapped back
onto the whole image by `patchcore.data.preprocessing.map_to_input_frame`); pixels outside a
centre crop, which the model never saw, are drawn grey. Below the image (its first H rows are
pixel-aligned with the input) is the colour bar with the decision threshold marked. Every heat
map of a model uses the same colour scale, the model's own
(`patchcore.model.calibration.colour_range`: from the lowest pixel score of its held-out normal
images up to the value that puts its saved threshold in the middle; with no saved threshold,
the decision threshold in the middle from 0), so a colour means the same score in predict's heat
maps, evaluation overlays and the dashboard; values outside are clipped.
A mask (same size as the input) marks the pixels, inside the inspected region only, whose
anomaly-map value is above the decision threshold (or `--mask_threshold`) or is not a finite
number (`decide`, per pixel). The map never exceeds its image score (without score
re-weighting), so accepted images get empty masks; the Gaussian smoothing lowers narrow peaks,
so a rejected image whose anomaly is a single patch may get an empty mask too (a lower
`--mask_threshold` then shows it).

Every input gets a row, in input order: an input
that cannot be scored (unreadable, or of a size an exported graph does not take) gets
decision `error`, no score and the reason in `error`; the run goes on. Every row names the
model that decided (`model_id`, its content hash, `patchcore.model.identity`; `model_format`)
and the threshold used. Where an input is a test image of the MVTec layout whose
ground-truth mask exists, `inspection` says when its defect lies wholly or partly outside the
region the model inspects (`patchcore.evaluation.quality.ground_truth_note`, as
`inspection_coverage.csv` counts it); empty otherwise. The exit code (`PredictionSummary.exit_code`) is 0 when every image
was accepted, 3 when any was rejected and none failed, 4 when any input could not be scored
(1: the run failed, no results file; 2: a wrong command line). INPUT folders are
searched through symbolic links to folders too (each real folder once). The output file's
folder and the heat-map and mask folders are checked for writing before any image is scored.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from patchcore.apps.runtimes import EXPORT_FORMAT_NAME, ExportedModel, open_exported
from patchcore.config import (
    RUNTIMES,
    PreprocessingConfig,
    SearchConfig,
    check_loader_settings,
    default_loader_workers,
)
from patchcore.data.datasets import IMAGE_EXTENSIONS, image_files
from patchcore.data.preprocessing import (
    check_working_size,
    image_tensor,
    inspected_region,
    map_to_input_frame,
    open_image,
    to_tensor,
)
from patchcore.errors import ConfigurationError, DataError, ModelFormatError
from patchcore.evaluation.ensemble import decision_statistics, predict_new_images
from patchcore.evaluation.quality import ground_truth_note
from patchcore.evaluation.visualization import (
    blend_heatmap,
    colour_bar_rgb,
    decision_caption,
    grey_out,
    hidden_reject_note,
    mark_peak,
)
from patchcore.files import (
    atomic_write,
    check_writable,
    printable_name,
    staged_path,
    unique_file_stems,
)
from patchcore.model.calibration import NormalStatistics, colour_range, decide, decision_label
from patchcore.model.identity import model_identity, saved_model_format
from patchcore.model.patchcore import PatchCore
from patchcore.model.serialization import PARAMS_FILE, load_ensemble_statistics, load_models
from patchcore.progress import track

LOGGER = logging.getLogger(__name__)

COLUMNS = ("path", "score", "threshold", "decision", "heatmap", "mask", "error", "model_id",
           "model_format", "inspection")  # fmt: skip
ERROR = "error"  # the decision of an input that could not be scored
# Exit codes of `patchcore-predict` (1 and 2 are click's: the run failed, the command line is
# wrong); a line script reads them with the results file.
EXIT_ALL_ACCEPTED = 0
EXIT_ANY_REJECTED = 3
EXIT_ANY_ERROR = 4


@dataclass(frozen=True)
class PredictOptions:
    """A prediction job; checked once when built."""

    model_dir: Path
    inputs: tuple[str, ...]
    output: Path
    heatmaps: Path | None = None
    masks: Path | None = None
    threshold: float | None = None
    mask_threshold: float | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 8
    num_workers: int = field(default_factory=default_loader_workers)
    search: SearchConfig = field(default_factory=SearchConfig)
    runtime: str | None = None

    def __post_init__(self) -> None:
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise ConfigurationError(
                f"--runtime must be one of {', '.join(RUNTIMES)}, got '{self.runtime}'"
            )
        if not self.inputs:
            raise ConfigurationError("give at least one INPUT image, folder or pattern")
        check_loader_settings(self.batch_size, self.num_workers)
        for option, value in (
            ("--threshold", self.threshold),
            ("--mask_threshold", self.mask_threshold),
        ):
            if value is not None and not math.isfinite(value):
                raise ConfigurationError(f"{option} must be a finite number, got {value}")

    @property
    def json_lines(self) -> bool:
        return self.output.suffix.lower() == ".jsonl"

    @property
    def keeps_originals(self) -> bool:
        return self.heatmaps is not None or self.masks is not None


@dataclass(frozen=True)
class PredictionSummary:
    """What a run did."""

    scored: int
    rejected: int
    unreadable: int
    output: Path

    @property
    def exit_code(self) -> int:
        """EXIT_ANY_ERROR if any input could not be scored, else EXIT_ANY_REJECTED if any
        image was rejected, else EXIT_ALL_ACCEPTED."""
        if self.unreadable:
            return EXIT_ANY_ERROR
        return EXIT_ANY_REJECTED if self.rejected else EXIT_ALL_ACCEPTED

    @property
    def accepted(self) -> int:
        return self.scored - self.rejected

    def line(self) -> str:
        return (
            f"{self.scored} scored: {self.rejected} rejected, {self.accepted} accepted; "
            f"{self.unreadable} unreadable (decision {ERROR}). Results: {self.output}"
        )


# ------------------------------------------------------------------------ inputs
def _expand(text: str) -> list[Path]:
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = image_files(path, recursive=True)
        if not files:
            raise DataError(
                f"{path}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return files
    matches = [Path(match) for match in sorted(glob.glob(text, recursive=True))]
    files = [
        match for match in matches if match.is_file() and match.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not files:
        raise DataError(f"{text}: no such file or folder, and no image matches it as a pattern")
    return files


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image files of the INPUT arguments, in order, each once."""
    return list(dict.fromkeys(path for text in inputs for path in _expand(text)))


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Unique file stems for per-image outputs: each path as given (made absolute, symbolic
    links not followed) relative to the inputs' common folder, parts joined by '_' (e.g.
    `crack/000.png` -> `crack_000`); clashes get `-2`, ..."""
    absolute = [Path(os.path.abspath(path)) for path in paths]
    root = Path(os.path.commonpath([path.parent for path in absolute])) if absolute else Path()
    return unique_file_stems(
        ["_".join(path.relative_to(root).with_suffix("").parts) for path in absolute]
    )


@dataclass(frozen=True)
class LoadedImage:
    """One input: the model's input tensor and the decoded original, or why it failed."""

    index: int
    image: torch.Tensor | None
    original: torch.Tensor | None
    error: str


class PredictionDataset(torch.utils.data.Dataset):
    """Decodes inputs through the evaluation pipeline (or, with `preprocessing` None, whole,
    as float RGB in [0, 1] for exported graphs); unreadable files become errors."""

    def __init__(
        self,
        paths: Sequence[Path],
        preprocessing: PreprocessingConfig | None,
        keep_originals: bool,
    ) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.keep_originals = keep_originals

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        try:
            picture = open_image(self.paths[index], "RGB")
            image = model_input(picture, self.paths[index], self.preprocessing)
        except DataError as error:
            return LoadedImage(index, None, None, str(error))
        original = original_pixels(picture) if self.keep_originals else None
        return LoadedImage(index, image, original, "")


def model_input(
    picture: Image.Image, path: Path, preprocessing: PreprocessingConfig | None
) -> torch.Tensor:
    """A decoded RGB image as a scorer takes it: through `preprocessing`'s chain (its working
    size checked, a DataError naming `path`), or whole as float RGB in [0, 1] when
    `preprocessing` is None (exported graphs). `patchcore-serve` prepares uploads here too."""
    if preprocessing is None:
        return to_tensor(picture)
    check_working_size(path, (picture.height, picture.width), preprocessing)
    return image_tensor(picture, preprocessing)


def original_pixels(picture: Image.Image) -> torch.Tensor:
    """A decoded RGB image as uint8 [3, H, W], what heat maps are drawn on."""
    return torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1)


# ----------------------------------------------------------------------- outputs
class ResultWriter:
    """Writes one record per image to an open CSV or JSON-lines stream."""

    def __init__(self, handle, json_lines: bool) -> None:
        self.handle = handle
        self.temporary = Path(handle.name)
        self.csv = None if json_lines else csv.writer(handle)
        if self.csv is not None:
            self.csv.writerow(COLUMNS)

    def write(self, record: dict) -> None:
        if self.csv is None:
            self.handle.write(json.dumps(record) + "\n")
        else:
            self.csv.writerow([printable_name(value) if isinstance(value, str) else value
                               for value in (record[column] for column in COLUMNS)])  # fmt: skip
        self.handle.flush()


@contextlib.contextmanager
def streamed_results(path: Path, json_lines: bool) -> Iterator[ResultWriter]:
    """A ResultWriter on a staging file beside `path`, moved into place when the block ends
    normally and removed otherwise."""
    with staged_path(Path(path)) as temporary, temporary.open("x", newline="", encoding="utf-8") as handle:
        yield ResultWriter(handle, json_lines)
        handle.flush()
        os.fsync(handle.fileno())


def write_png(path: Path, array: np.ndarray) -> None:
    """Writes a uint8 [H, W] or [H, W, 3] array as a PNG, atomically."""
    atomic_write(path, lambda temporary: Image.fromarray(array).save(temporary, format="PNG"))


@dataclass(frozen=True)
class ImageOutputs:
    """Where and how per-image PNGs are drawn."""

    heatmaps: Path | None
    masks: Path | None
    mask_threshold: float
    colour_range: tuple[float, float]
    preprocessing: PreprocessingConfig
    threshold: float | None = None  # marked on the colour bar
    maps_on_input_frame: bool = False  # True for exported graphs' maps

    def write(
        self, original: torch.Tensor, model_map, stem: str, score: float | None = None,
        rejected: bool = False,
    ) -> dict:  # fmt: skip
        """original uint8 [3, H, W] and its anomaly map -> heat map and mask PNGs for H x W;
        returns their paths under `heatmap` and `mask` ('' when not asked for). The map is
        on the model's input frame (mapped back here), or already [H, W] with
        `maps_on_input_frame`. With a `score`, the heat map marks the map's peak (the most
        suspicious place) and a caption below the colour bar gives the score, the
        threshold and the decision, and why a reject shows no region above the threshold."""
        full_map, seen = self._on_input_frame(original, model_map)
        written = {"heatmap": "", "mask": ""}
        if self.heatmaps is not None:
            written["heatmap"] = str(self.heatmaps / f"{stem}.png")
            heat = self._heatmap(original, full_map, seen, score, rejected)
            write_png(Path(written["heatmap"]), heat)
        if self.masks is not None:
            mask = (decide(full_map, self.mask_threshold) & seen).astype(np.uint8) * 255
            written["mask"] = str(self.masks / f"{stem}.png")
            write_png(Path(written["mask"]), mask)
        return written

    def heatmap(
        self, original: torch.Tensor, model_map, score: float | None = None,
        rejected: bool = False,
    ) -> np.ndarray:  # fmt: skip
        """The heat map `write` draws, as a uint8 [H', W, 3] array (`patchcore-serve`)."""
        full_map, seen = self._on_input_frame(original, model_map)
        return self._heatmap(original, full_map, seen, score, rejected)

    def _on_input_frame(self, original: torch.Tensor, model_map) -> tuple[np.ndarray, np.ndarray]:
        """The map on the original's [H, W] frame, and the region the model inspected."""
        size = tuple(original.shape[-2:])
        if self.maps_on_input_frame:
            full_map = np.asarray(model_map, dtype=np.float32)
        else:
            full_map = map_to_input_frame(model_map[None].float(), size, self.preprocessing)
            full_map = full_map[0].numpy()
        return full_map, inspected_region(size, self.preprocessing).numpy()

    def _heatmap(self, original, full_map, seen, score, rejected) -> np.ndarray:
        image = original.permute(1, 2, 0).numpy()
        heat = grey_out(blend_heatmap(image, full_map, self.colour_range), image, seen)
        parts = [heat, colour_bar_rgb(self.colour_range, self.threshold, heat.shape[1])]
        if score is not None and self.threshold is not None:
            parts[0] = mark_peak(heat, full_map, seen)
            text = (f"score {score:.4g}, threshold {self.threshold:.4g}: "
                    f"{decision_label(rejected)}. "
                    f"{hidden_reject_note(rejected, full_map, self.threshold)}")  # fmt: skip
            parts.append(decision_caption(heat.shape[1], text, rejected))
        return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------- running
Score = Callable[[torch.Tensor], tuple[np.ndarray, object]]


@dataclass(frozen=True)
class Scorer:
    """What scores a batch of same-size images, whichever the runtime.

    `whole_images`: `score` takes decoded images whole and returns maps on their own frame
    (exported graphs); otherwise images go through `preprocessing`'s PIL chain first and
    maps come back on the model's input frame. `threshold`: the saved decision threshold,
    or None; `statistics`: the normal-image statistics whose scale the heat maps use, or
    None. `input_size`: the only (height, width) `score` takes, if fixed. `size_problem`:
    why an image of (height, width) can not be scored, naming the file ('' when it can),
    or None when every decoded image's size is checked while loading.
    """

    score: Score
    preprocessing: PreprocessingConfig
    whole_images: bool
    threshold: float | None
    statistics: NormalStatistics | None
    input_size: tuple[int, int] | None
    name: str
    ensemble: bool = False
    identity: str = ""  # the model's content hash (patchcore.model.identity)
    model_format: str = ""  # e.g. patchcore-model/3, patchcore-export/1, reference
    size_problem: Callable[[tuple[int, int], str], str] | None = None


class ScorerSource(Protocol):
    """What loading a scorer reads from a job: `PredictOptions`, or one category of
    `patchcore-serve` (`patchcore.apps.serve.ServedModel`)."""

    model_dir: Path
    runtime: str | None
    device: torch.device
    search: SearchConfig
    threshold: float | None


def load_scoring_models(options: ScorerSource) -> list[PatchCore]:
    """The model (or ensemble members) of MODEL_DIR; an ensemble's members must carry their
    normal-image statistics, the scale its scores are combined on."""
    models = load_models(options.model_dir, options.device, options.search)
    if len(models) > 1 and any(model.normal_statistics is None for model in models):
        raise ConfigurationError(
            f"{options.model_dir}: an ensemble without normal-image statistics cannot score "
            "new images (its members' scores cannot be combined without a test set); "
            "retrain with --train_val_split < 1"
        )
    return models


def saved_decision_statistics(models: list[PatchCore], model_dir: Path) -> NormalStatistics | None:
    """The normal statistics whose threshold decides for the model in `model_dir`: a single
    model's own; an ensemble's combined-scale statistics saved with its members."""
    return decision_statistics(models, load_ensemble_statistics(model_dir))


def folder_scorer(options: ScorerSource) -> Scorer:
    """A saved model folder (or ensemble) scored by this library in torch."""
    models = load_scoring_models(options)

    def score(images: torch.Tensor) -> tuple[np.ndarray, object]:
        scores, maps = predict_new_images(models, images)
        return scores.numpy(), maps

    statistics = saved_decision_statistics(models, options.model_dir)
    threshold = None if statistics is None else statistics.threshold
    return Scorer(
        score, models[0].config.preprocessing, False, threshold, statistics, None,
        str(options.model_dir), ensemble=len(models) > 1,
        identity=model_identity(options.model_dir),
        model_format=saved_model_format(options.model_dir),
    )  # fmt: skip


def exported_scorer(model: ExportedModel) -> Scorer:
    """An exported file run by its runtime on whole images."""

    def score(images: torch.Tensor) -> tuple[np.ndarray, object]:
        outputs = model.predict(images)
        return outputs.scores, outputs.maps

    return Scorer(
        score, model.config.preprocessing, True, model.threshold, model.normal_statistics,
        model.input_size, str(model.path), identity=model_identity(model.path),
        model_format=f"{EXPORT_FORMAT_NAME}/{model.record.format_version if model.record else '?'}",
        size_problem=model.size_problem,
    )  # fmt: skip


EXPORTED_SUFFIXES = {
    "torch": (".pth", ".pt"), "onnxruntime": (".onnx",), "openvino": (".xml", ".onnx"),
}  # fmt: skip


def _exported_file_in(folder: Path, runtime: str) -> Path:
    """The one exported file of `runtime` in an export folder."""
    for suffix in EXPORTED_SUFFIXES[runtime]:
        files = sorted(path for path in folder.glob(f"*{suffix}") if path.is_file())
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ConfigurationError(
                f"{folder}: several {suffix} files ({', '.join(path.name for path in files)}); "
                "give the file itself as MODEL"
            )
    raise ModelFormatError(
        f"{folder}: no {' or '.join(EXPORTED_SUFFIXES[runtime])} file for --runtime {runtime}, "
        f"and no saved model ({PARAMS_FILE}); for an exported runtime run patchcore-export "
        "MODEL_DIR -o OUT --format onnx (or openvino) and give OUT or the file"
    )


def load_scorer(options: ScorerSource) -> Scorer:
    """The scorer of MODEL and --runtime (see the module docstring)."""
    path = Path(options.model_dir)
    runtime = options.runtime
    if path.is_dir() and any(path.glob(f"*{PARAMS_FILE}")):
        if runtime not in (None, "torch"):
            raise ConfigurationError(
                f"{path} is a saved model folder, which runs in torch; for --runtime {runtime} "
                f"export it first: patchcore-export {path} -o OUT --format "
                f"{'onnx' if runtime == 'onnxruntime' else 'openvino'}"
            )
        return folder_scorer(options)
    if path.is_dir():
        path = _exported_file_in(path, runtime or "torch")
    model = open_exported(path, runtime, options.device)
    LOGGER.info("Scoring with %s in %s", path, model.runtime)
    return exported_scorer(model)


def decision_threshold(scorer: Scorer, options: ScorerSource) -> float:
    """--threshold, else the model's saved threshold; an error naming both when neither."""
    if options.threshold is not None:
        return options.threshold
    if scorer.threshold is not None:
        return scorer.threshold
    what = (
        "the ensemble has no saved threshold on its combined scale"
        if scorer.ensemble
        else "the model has no saved threshold"
    )
    raise ConfigurationError(
        f"{options.model_dir}: {what} and no --threshold was given; pass --threshold T, or "
        "retrain with --save_patchcore_model (which calibrates and saves a threshold on "
        "held-out normal images, see --train_val_split)"
    )


def _loader(
    paths: list[Path], preprocessing: PreprocessingConfig | None, options: PredictOptions
):
    dataset = PredictionDataset(paths, preprocessing, options.keeps_originals)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.num_workers,
        collate_fn=list,
    )


@dataclass(frozen=True)
class _Job:
    """What every batch needs: the scorer, the threshold, and where results go."""

    scorer: Scorer
    threshold: float
    paths: list[Path]
    stems: list[str]
    images: ImageOutputs
    draw: bool


def _same_size_groups(items: list[LoadedImage]) -> list[list[LoadedImage]]:
    """Items grouped by input size (whole-image mode), each group in input order."""
    groups: dict[tuple[int, ...], list[LoadedImage]] = {}
    for item in items:
        groups.setdefault(tuple(item.image.shape), []).append(item)
    return list(groups.values())


def size_problem(scorer: Scorer, path: Path | str, image: torch.Tensor) -> str:
    """Why the scorer cannot take the input `image` [3, H, W] of `path` ('' when it can)."""
    if scorer.size_problem is None:
        return ""
    return scorer.size_problem(tuple(image.shape[-2:]), str(path))


def decision_fields(scorer: Scorer, threshold: float, score: float | None) -> dict:
    """The decision part of a results row, shared by predict and `patchcore-serve`: the
    score (None: not scored), the threshold, the decision (`decide`: above the threshold or
    not finite is a reject; no score is `error`) and the model that made it."""
    decision = ERROR if score is None else decision_label(bool(decide(score, threshold)))
    return {"score": score, "threshold": threshold, "decision": decision,
            "model_id": scorer.identity, "model_format": scorer.model_format}  # fmt: skip


def _record(job: _Job, index: int, score: float | None = None, **values) -> dict:
    """One results row (in COLUMNS order): the input, the decision and the model that made it."""
    row = {
        "path": str(job.paths[index]), "heatmap": "", "mask": "", "error": "",
        **decision_fields(job.scorer, job.threshold, score),
        "inspection": ground_truth_note(job.paths[index], job.scorer.preprocessing), **values,
    }  # fmt: skip
    return {column: row[column] for column in COLUMNS}


def _score_batch(job: _Job, batch: list[LoadedImage], writer: ResultWriter) -> tuple[int, int]:
    """Scores the readable images of a batch and writes a row for every input of it, in input
    order (an input that cannot be scored gets decision `error` and the reason);
    returns (scored, rejected)."""
    scorable, records = [], {}
    for item in batch:
        problem = (
            item.error
            if item.image is None
            else size_problem(job.scorer, job.paths[item.index], item.image)
        )
        if problem:
            LOGGER.warning("Cannot score %s", problem)
            records[item.index] = _record(job, item.index, error=problem)
        else:
            scorable.append(item)
    scored = rejected = 0
    for group in _same_size_groups(scorable):
        scores, maps = job.scorer.score(torch.stack([item.image for item in group]))
        for item, score, model_map in zip(group, scores, maps, strict=True):
            is_rejected = bool(decide(float(score), job.threshold))
            rejected += int(is_rejected)
            written = {"heatmap": "", "mask": ""}
            if job.draw:
                written = job.images.write(item.original, model_map, job.stems[item.index],
                                           float(score), is_rejected)  # fmt: skip
            records[item.index] = _record(job, item.index, score=float(score), **written)
        scored += len(group)
    for index in sorted(records):
        writer.write(records[index])
    return scored, rejected


def image_outputs(
    scorer: Scorer, threshold: float, heatmaps: Path | None = None, masks: Path | None = None,
    mask_threshold: float | None = None,
) -> ImageOutputs:  # fmt: skip
    """How heat maps and masks of `scorer`'s images are drawn: on the model's colour scale,
    the decision threshold marked (masks at `mask_threshold`, default the threshold)."""
    statistics = scorer.statistics
    return ImageOutputs(
        heatmaps,
        masks,
        threshold if mask_threshold is None else mask_threshold,
        colour_range(statistics.threshold if statistics else threshold, statistics),
        scorer.preprocessing,
        threshold,
        maps_on_input_frame=scorer.whole_images,
    )


def run_prediction(options: PredictOptions) -> PredictionSummary:
    """Scores every input image, streaming results; returns the counts."""
    for folder in (options.output.parent, options.heatmaps, options.masks):
        if folder is not None:
            check_writable(folder)
    paths = resolve_inputs(options.inputs)
    scorer = load_scorer(options)
    threshold = decision_threshold(scorer, options)
    images = image_outputs(scorer, threshold, options.heatmaps, options.masks,
                           options.mask_threshold)  # fmt: skip
    job = _Job(scorer, threshold, paths, output_stems(paths), images, options.keeps_originals)
    scored = rejected = 0
    loader = _loader(paths, None if scorer.whole_images else scorer.preprocessing, options)
    with streamed_results(options.output, options.json_lines) as writer:
        for batch in track(loader, "Predicting", unit="batch"):
            batch_scored, batch_rejected = _score_batch(job, batch, writer)
            scored += batch_scored
            rejected += batch_rejected
    return PredictionSummary(scored, rejected, len(paths) - scored, options.output)
