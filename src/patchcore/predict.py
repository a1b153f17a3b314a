"""Scoring new images with a saved model: accept/reject decisions, heat maps and masks.

    predict_patchcore.py MODEL_DIR INPUT... [--output predictions.csv|.jsonl]
                         [--heatmaps DIR] [--masks DIR [--mask_threshold P]]
                         [--threshold T] [--gpu N] [--batch_size B] [--num_workers W]

INPUTs are image files, folders (searched recursively) or glob patterns. Images go
through the model's own preprocessing (shorter side resized, centre crop), exactly as in
evaluation. An image is rejected when its score is above the threshold (`--threshold`, or
the one saved with the model), accepted otherwise.

Results (path, score, threshold, decision per image; CSV, or JSON lines for a `.jsonl`
output) are streamed to a temporary file next to the output as images are scored, and moved
into place when the run ends, so a large folder never has to fit in memory.

Heat maps and masks are PNGs at each input image's own size (the crop's map is mapped back
onto the whole image as `patchcore.deploy.uncrop_maps` does; outside the crop the nearest
crop-edge value is used). Every heat map uses the same colour scale, fixed by the model:
from the lowest pixel score of its held-out normal images (0 without statistics) up to the
value that puts the threshold in the middle of the colour bar; values outside are clipped.
A mask marks the pixels whose anomaly-map value is above the decision threshold (or
`--mask_threshold`). The map never exceeds its image score (without score re-weighting), so
accepted images get empty masks; the Gaussian smoothing lowers narrow peaks, so a rejected
image whose anomaly is a single patch may get an empty mask too (a lower `--mask_threshold`
then shows it).

Unreadable files are logged, skipped and counted; the run goes on.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
import tqdm
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from patchcore.cli_support import configure_process, nn_backend_option, run_guarded
from patchcore.config import PreprocessingConfig, SearchConfig
from patchcore.datasets import IMAGE_EXTENSIONS, ImageDataset, image_files, open_image
from patchcore.deploy import uncrop_maps
from patchcore.errors import ConfigurationError, DataError
from patchcore.files import atomic_write
from patchcore.model import NormalStatistics, PatchCore
from patchcore.model_io import load_models
from patchcore.runs import select_device
from patchcore.visualization import blend_heatmap, sanitise_file_stem

LOGGER = logging.getLogger(__name__)

COLUMNS = ("path", "score", "threshold", "decision")
REJECT = "reject"
ACCEPT = "accept"


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
    num_workers: int = 4
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigurationError("give at least one INPUT image, folder or pattern")
        if self.batch_size < 1:
            raise ConfigurationError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigurationError(f"--num_workers must be >= 0, got {self.num_workers}")
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
    def accepted(self) -> int:
        return self.scored - self.rejected

    def line(self) -> str:
        return (
            f"{self.scored} scored: {self.rejected} rejected, {self.accepted} accepted; "
            f"{self.unreadable} unreadable. Results: {self.output}"
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
    """Unique file stems for per-image outputs: each path relative to the inputs' common
    folder, parts joined by '_' (e.g. `crack/000.png` -> `crack_000`); clashes get `-2`, ..."""
    resolved = [path.resolve() for path in paths]
    root = Path(os.path.commonpath([path.parent for path in resolved])) if resolved else Path()
    stems, used = [], set()
    for path in resolved:
        stem = sanitise_file_stem("_".join(path.relative_to(root).with_suffix("").parts))
        candidate, counter = stem, 1
        while candidate.casefold() in used:
            counter += 1
            candidate = f"{stem}-{counter}"
        used.add(candidate.casefold())
        stems.append(candidate)
    return stems


@dataclass(frozen=True)
class LoadedImage:
    """One input: the model's input tensor and the decoded original, or why it failed."""

    index: int
    image: torch.Tensor | None
    original: torch.Tensor | None
    error: str


class PredictionDataset(torch.utils.data.Dataset):
    """Decodes inputs through the evaluation pipeline; unreadable files become errors."""

    def __init__(
        self, paths: Sequence[Path], preprocessing: PreprocessingConfig, keep_originals: bool
    ) -> None:
        self.paths = list(paths)
        self.transform = ImageDataset([], preprocessing).image_transform
        self.keep_originals = keep_originals

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        try:
            image = open_image(self.paths[index], "RGB")
        except DataError as error:
            return LoadedImage(index, None, None, str(error))
        original = TF.pil_to_tensor(image) if self.keep_originals else None
        return LoadedImage(index, self.transform(image), original, "")


# ----------------------------------------------------------------------- outputs
class ResultWriter:
    """Records streamed to a temporary file beside `path`; `commit` moves it into place."""

    def __init__(self, path: Path, json_lines: bool) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self.temporary = self.staging / self.path.name
        self.handle = self.temporary.open("x", newline="", encoding="utf-8")
        self.csv = None if json_lines else csv.writer(self.handle)
        if self.csv is not None:
            self.csv.writerow(COLUMNS)

    def write(self, record: dict) -> None:
        if self.csv is None:
            self.handle.write(json.dumps(record) + "\n")
        else:
            self.csv.writerow([record[column] for column in COLUMNS])
        self.handle.flush()

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        """Closes and removes the temporary folder (all that is left of it after `commit`)."""
        self.handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)


@contextlib.contextmanager
def streamed_results(path: Path, json_lines: bool) -> Iterator[ResultWriter]:
    """A ResultWriter committed when the block ends normally, discarded otherwise."""
    writer = ResultWriter(path, json_lines)
    try:
        yield writer
        writer.commit()
    finally:
        writer.discard()


def heatmap_colour_range(
    threshold: float, statistics: NormalStatistics | None
) -> tuple[float, float]:
    """(low, high): normal images' lowest pixel score (or 0) to 2 * threshold - low."""
    low = min(statistics.pixel_score_min if statistics else 0.0, threshold)
    high = 2.0 * threshold - low
    return (low, high) if high > low else (low, low + 1.0)


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

    def write(self, original: torch.Tensor, crop_map: torch.Tensor, stem: str) -> None:
        """original uint8 [3, H, W], crop_map [c, c] -> heat map and mask PNGs at H x W."""
        size = tuple(original.shape[-2:])
        full_map = uncrop_maps(crop_map[None].float(), size, self.preprocessing)[0].numpy()
        if self.heatmaps is not None:
            image = original.permute(1, 2, 0).numpy()
            write_png(
                self.heatmaps / f"{stem}.png", blend_heatmap(image, full_map, self.colour_range)
            )
        if self.masks is not None:
            mask = (full_map > self.mask_threshold).astype(np.uint8) * 255
            write_png(self.masks / f"{stem}.png", mask)


# ---------------------------------------------------------------------- running
def load_single_model(options: PredictOptions) -> PatchCore:
    models = load_models(options.model_dir, options.device, options.search)
    if len(models) != 1:
        raise ConfigurationError(
            f"{options.model_dir}: an ensemble of {len(models)} models; prediction supports "
            "single-backbone models only"
        )
    return models[0]


def decision_threshold(model: PatchCore, options: PredictOptions) -> float:
    """--threshold, else the model's saved threshold; an error naming both when neither."""
    if options.threshold is not None:
        return options.threshold
    if model.normal_statistics is not None:
        return model.normal_statistics.threshold
    raise ConfigurationError(
        f"{options.model_dir}: the model has no saved threshold and no --threshold was given; "
        "pass --threshold T, or retrain with --save_patchcore_model (which calibrates and "
        "saves a threshold on held-out normal images, see --train_val_split)"
    )


def _loader(paths: list[Path], model: PatchCore, options: PredictOptions):
    dataset = PredictionDataset(paths, model.config.preprocessing, options.keeps_originals)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.num_workers,
        collate_fn=list,
    )


@dataclass(frozen=True)
class _Job:
    """What every batch needs: the model, its threshold, and where results go."""

    model: PatchCore
    threshold: float
    paths: list[Path]
    stems: list[str]
    images: ImageOutputs
    draw: bool


def _score_batch(job: _Job, batch: list[LoadedImage], writer: ResultWriter) -> tuple[int, int]:
    """Scores the readable images of a batch and writes their results; (scored, rejected)."""
    for item in batch:
        if item.image is None:
            LOGGER.warning("Skipping unreadable file: %s", item.error)
    readable = [item for item in batch if item.image is not None]
    if not readable:
        return 0, 0
    prediction = job.model.predict(torch.stack([item.image for item in readable]))
    rejected = 0
    for item, score, crop_map in zip(readable, prediction.scores, prediction.maps, strict=True):
        decision = REJECT if float(score) > job.threshold else ACCEPT
        rejected += int(decision == REJECT)
        writer.write({
            "path": str(job.paths[item.index]), "score": float(score),
            "threshold": job.threshold, "decision": decision,
        })  # fmt: skip
        if job.draw:
            job.images.write(item.original, crop_map, job.stems[item.index])
    return len(readable), rejected


def run_prediction(options: PredictOptions) -> PredictionSummary:
    """Scores every input image, streaming results; returns the counts."""
    paths = resolve_inputs(options.inputs)
    model = load_single_model(options)
    threshold = decision_threshold(model, options)
    images = ImageOutputs(
        options.heatmaps,
        options.masks,
        threshold if options.mask_threshold is None else options.mask_threshold,
        heatmap_colour_range(threshold, model.normal_statistics),
        model.config.preprocessing,
    )
    job = _Job(model, threshold, paths, output_stems(paths), images, options.keeps_originals)
    scored = rejected = 0
    progress = tqdm.tqdm(total=len(paths), desc="Predicting", unit="image")
    with progress, streamed_results(options.output, options.json_lines) as writer:
        for batch in _loader(paths, model, options):
            batch_scored, batch_rejected = _score_batch(job, batch, writer)
            scored += batch_scored
            rejected += batch_rejected
            progress.update(len(batch))
    return PredictionSummary(scored, rejected, len(paths) - scored, options.output)


# --------------------------------------------------------------------------- CLI
@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("predictions.csv"),
    show_default=True,
    help="Results file: CSV, or JSON lines when it ends with .jsonl.",
)
@click.option(
    "--heatmaps",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for one heat-map PNG per image.",
)
@click.option(
    "--masks",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for one binary mask PNG per image (anomaly map > mask threshold).",
)
@click.option(
    "--mask_threshold",
    type=float,
    help="Pixel threshold of --masks; default: the decision threshold.",
)
@click.option(
    "--threshold",
    type=float,
    help="Reject images scoring above this; default: the model's saved threshold.",
)
@click.option(
    "--gpu",
    type=int,
    default=0,
    show_default=True,
    help="CUDA device id; -1 (or no CUDA) runs on the CPU.",
)
@click.option("--batch_size", type=int, default=8, show_default=True)
@click.option("--num_workers", type=int, default=4, show_default=True)
@nn_backend_option
def predict_cli(
    model_dir, inputs, output, heatmaps, masks, mask_threshold, threshold, gpu, batch_size,
    num_workers, nn_backend,
):  # fmt: skip
    """Score new images (INPUTS: files, folders, glob patterns) with the model in MODEL_DIR."""

    def job() -> None:
        options = PredictOptions(
            model_dir=model_dir,
            inputs=tuple(inputs),
            output=output,
            heatmaps=heatmaps,
            masks=masks,
            threshold=threshold,
            mask_threshold=mask_threshold,
            device=select_device((gpu,)),
            batch_size=batch_size,
            num_workers=num_workers,
            search=SearchConfig(backend=nn_backend),
        )
        click.echo(run_prediction(options).line())

    run_guarded(job)


def predict_main() -> None:
    """Entry point of `patchcore-predict` and bin/predict_patchcore.py."""
    configure_process()
    predict_cli()
