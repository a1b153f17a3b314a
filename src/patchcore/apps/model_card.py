"""The model card: a human-readable description written into each saved model folder
(`MODEL_CARD.md`), and what `patchcore-predict --describe MODEL` prints.

The card says what data the model saw (how many training images, from which folder, and a
hash of their sorted file list), its preprocessing, backbone and normalisation statistics,
bank size, how its threshold was calibrated (how, on what, quantile, threshold), the test
metrics and decision rates when the run evaluated it, and the package versions. It is a
description only: loading never reads it, and the model's identity (its content hash,
`patchcore.model.identity`) leaves it out, so `--describe` prints that hash beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from patchcore.model.calibration import NormalStatistics
from patchcore.model.identity import MODEL_CARD_FILE, model_identity, saved_model_format
from patchcore.model.scoring import image_score_rule

PACKAGES = ("patchcore", "torch", "torchvision", "numpy", "scipy", "faiss-cpu", "pillow")


@dataclasses.dataclass(frozen=True)
class TrainingImages:
    """What a model was fitted on."""

    folder: str
    paths: tuple[str, ...]

    @property
    def list_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the sorted file names relative to `folder`, one a
        line: equal for the same images, whatever disk they lie on."""
        names = sorted(str(Path(path).relative_to(self.folder)) for path in self.paths)
        return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _statistics_lines(statistics: NormalStatistics | None) -> list[str]:
    if statistics is None:
        return ["- no threshold saved (pass --threshold to patchcore-predict)"]
    threshold = (f"- threshold: {statistics.threshold:.6g} (the "
                 f"{statistics.threshold_quantile:g} quantile of {statistics.num_images} "
                 "normal image scores)")  # fmt: skip
    ranges = (f"- normal image scores: {statistics.image_score_min:.6g} to "
              f"{statistics.image_score_max:.6g}; pixel scores "
              f"{statistics.pixel_score_min:.6g} to {statistics.pixel_score_max:.6g}")  # fmt: skip
    return [threshold, ranges]


def model_card(
    name: str,
    models: Sequence,
    ensemble_statistics: NormalStatistics | None,
    training: TrainingImages,
    metrics: dict[str, float] | None = None,
    by_type: Sequence[dict] = (),
) -> str:
    """The card's Markdown text for the model (or ensemble) `models` of dataset `name`."""
    first = models[0]
    preprocessing = dataclasses.asdict(first.config.preprocessing)
    written = (f"Written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. A "
               "description only; `patchcore-predict --describe FOLDER` prints it with the "
               "model's content hash.")  # fmt: skip
    lines = [
        f"# PatchCore model: {name}",
        "",
        written,
        "",
        "## Training images",
        f"- {len(training.paths)} normal images from `{training.folder}`",
        f"- hash of their sorted file list (SHA-256, 16 hex digits): {training.list_hash}",
        "",
        "## Preprocessing",
        *[f"- {key}: {value}" for key, value in preprocessing.items()],
    ]
    for position, model in enumerate(models):
        config = model.config
        extractor = model.embedder.extractor
        title = "## Model" if len(models) == 1 else f"## Member {position + 1} of {len(models)}"
        weights = "ImageNet" if config.pretrained else "random"
        mean = [round(value, 4) for value in extractor.mean.flatten().tolist()]
        std = [round(value, 4) for value in extractor.std.flatten().tolist()]
        lines += [
            "",
            title,
            f"- backbone: {config.backbone_name} ({weights} weights), layers {', '.join(config.layers)}",
            f"- normalisation statistics: mean {mean}, std {std}",
            (f"- features: {config.pretrain_embed_dimension} -> {config.target_embed_dimension}, "
             f"patch size {config.patchsize}, k = {config.num_nn} nearest neighbours, "
             f"{config.distance} distance, Eq. 7 re-weighting "
             f"{'on' if config.score_reweighting else 'off'}"),
            f"- image score: {image_score_rule(config)}",
            (f"- memory bank: {len(model.memory_bank)} features of dimension "
             f"{model.memory_bank.shape[1]} ({config.sampler.name}, "
             f"{config.sampler.percentage:g} of the training patch features, seed "
             f"{config.sampler.seed})"),
            f"- calibration: {model.calibration_method or 'none'}",
            *_statistics_lines(model.normal_statistics),
        ]  # fmt: skip
    if len(models) > 1:
        lines += ["", "## Ensemble decision scale (normal_stats)",
                  *_statistics_lines(ensemble_statistics)]  # fmt: skip
    if metrics:
        lines += ["", "## Test metrics (at training time)",
                  *[f"- {key}: {_number(value)}" for key, value in metrics.items()]]  # fmt: skip
    if by_type:
        lines += ["", "| test folder | images | image AUROC | rejected at the threshold |",
                  "|---|---|---|---|"]  # fmt: skip
        for row in by_type:
            rate = row["rejected_rate"]
            shown = "-" if rate is None else f"{row['rejected']} ({rate:.1%})"
            lines.append(f"| {row['defect_type']} | {row['images']} | "
                         f"{_number(row['image_auroc'])} | {shown} |")  # fmt: skip
    lines += ["", "## Package versions",
              *[f"- {key}: {value}" for key, value in package_versions().items()], ""]  # fmt: skip
    return "\n".join(lines)


def describe_model(path: Path) -> str:
    """What `patchcore-predict --describe` prints: the model's identity and format, then its
    card (or, for a folder saved before cards existed, a note that it has none)."""
    path = Path(path)
    header = [f"Model: {path}", f"Content hash (model_id): {model_identity(path)}"]
    if path.is_dir():
        header.append(f"Format: {saved_model_format(path)}")
        card = path / MODEL_CARD_FILE
        if card.is_file():
            return "\n".join(header) + "\n\n" + card.read_text(encoding="utf-8")
    note = (f"No {MODEL_CARD_FILE} (saved before model cards, or an exported file); its "
            "configuration is in patchcore_meta.json or the exported file")  # fmt: skip
    return "\n".join([*header, "", note])
