#!/usr/bin/env python
"""Image scores on parts of different areas: the largest patch score against area-insensitive
rules (`--image_score quantile / top_k_mean`), per preprocessing.

    PYTHONPATH=src python bench/bench_wide_parts.py ROOT CATEGORY [--train-every 3]
        [--test-every 2] [--variants center none scale0.5] [--percentage 0.01]
    PYTHONPATH=src python bench/bench_wide_parts.py --synthetic FOLDER texture --panels 4
        # generated first if absent: image_size x (panels * image_size) wide parts

Per preprocessing variant (`center`: the reference's 224 px centre crop of the 256 px
resize; `none`: whole images, shorter side 256; `scaleF`: whole images resized by F;
`tileT`: `none` cut into T px tiles overlapping by 0.25), one model is fitted (EfficientNet-
Lite0, ImageNet weights, approximate greedy coreset) on every `--train-every`-th normal
training image and calibrated on their leave-one-image-out scores, as `patchcore-train`
does without a validation split; every `--test-every`-th test image is scored once. Each
image-score rule is then applied, through the one scorer's `image_scores_of`, to the same
patch-score maps of the calibration and test images, so the rules differ in nothing else.

Table per variant and rule: image AUROC, pixel AUROC (the maps, the same for every rule),
the false-reject rate of good test images at the calibrated threshold (quantile 0.99) and
the escape rate of defective ones. Then the mechanism, per variant: patches per image, the
rank correlation of the good test images' scores with their number of patches (the
extreme-value effect: the largest of more patch scores is larger), and the medians of good
and defective images' scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import resource
import time
from pathlib import Path

import numpy as np
import tables
import torch
from scipy import stats

from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import (
    DatasetConfig,
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    SearchConfig,
    default_layers,
)
from patchcore.data.datasets import ImageDataset, list_samples, make_loader
from patchcore.evaluation.metrics import compute_metrics
from patchcore.model.calibration import DEFAULT_THRESHOLD_QUANTILE, decide
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import image_scores_of

RULES = {
    "max": {"image_score": "max"},
    "quantile 0.99": {"image_score": "quantile", "image_score_quantile": 0.99},
    "quantile 0.999": {"image_score": "quantile", "image_score_quantile": 0.999},
    "top_k_mean 10": {"image_score": "top_k_mean", "image_score_top_k": 10},
}


def preprocessing_of(variant: str) -> PreprocessingConfig:
    if variant == "center":
        return PreprocessingConfig()
    if variant == "none":
        return PreprocessingConfig(crop="none")
    scale = re.fullmatch(r"scale([0-9.]+)", variant)
    if scale:
        return PreprocessingConfig(crop="none", scale=float(scale.group(1)))
    tile = re.fullmatch(r"tile([0-9]+)", variant)
    if tile:
        return PreprocessingConfig(crop="none", tile=int(tile.group(1)), tile_overlap=0.25)
    raise SystemExit(f"--variants: unknown variant '{variant}' (center, none, scaleF, tileT)")


def rule_scores(prediction, config: PatchCoreConfig) -> np.ndarray:
    """Image scores of a prediction under `config`'s rule, from its patch-score maps (the
    model's own scores for max: with tiles its maximum is over the stitched pixels)."""
    if config.image_score == "max":
        return prediction.scores.double().numpy()
    return np.array([float(image_scores_of(single[None], config)[0])
                     for single in prediction.patch_scores])  # fmt: skip


def run_variant(variant: str, arguments, train, test) -> tuple[list[dict], dict]:
    preprocessing = preprocessing_of(variant)
    config = PatchCoreConfig(
        backbone_name=arguments.backbone,
        layers=default_layers(arguments.backbone),
        preprocessing=preprocessing,
        sampler=SamplerConfig(percentage=arguments.percentage),
    )
    dataset = DatasetConfig("mvtec", str(arguments.root), (arguments.category,), batch_size=1,
                            num_workers=0, preprocessing=preprocessing)  # fmt: skip
    model = PatchCore(config, search=SearchConfig(backend="rerank"))

    def loader(samples):
        return make_loader(ImageDataset(samples, preprocessing), dataset, torch.device("cpu"))

    start = time.perf_counter()
    train_loader = loader(train)
    model.fit(train_loader)
    calibration = model.calibrate_leave_one_out(train_loader)
    test_loader = loader(test)
    test_prediction = model.predict_batches(test_loader)
    seconds = time.perf_counter() - start
    # The loader groups images by size: take labels and masks in its order.
    order = [index for batch in test_loader.batch_sampler for index in batch]
    labels = np.array([test[index].is_anomaly for index in order])
    masks = [test_loader.dataset[index]["mask"][0] > 0.5 for index in order]
    maps = list(test_prediction.maps)
    pixel_auroc = compute_metrics(test_prediction.scores, labels, maps, masks)["full_pixel_auroc"]
    patches = np.array([single.numel() for single in test_prediction.patch_scores])
    # The extreme-value effect alone: the largest of n patch scores drawn from the good test
    # images' pooled patch scores, for the centre crop's 28 x 28 patches and four times more.
    pooled = torch.cat([single.flatten() for single, bad in
                        zip(test_prediction.patch_scores, labels, strict=True) if not bad])
    generator = np.random.default_rng(0)
    drawn_max = {n: float(np.mean([generator.choice(pooled.numpy(), n).max() for _ in range(200)]))
                 for n in (784, 4 * 784)}  # fmt: skip
    rows, mechanism = [], {"variant": variant, "patches_min": int(patches.min()),
                           "patches_median": int(np.median(patches)),
                           "patches_max": int(patches.max()), "drawn_max": drawn_max,
                           "pooled_q99": float(np.quantile(pooled.numpy(), 0.99))}  # fmt: skip
    for name, fields in RULES.items():
        rule = dataclasses.replace(config, **fields)
        calibration_scores = rule_scores(calibration, rule)
        scores = rule_scores(test_prediction, rule)
        threshold = float(np.quantile(calibration_scores, DEFAULT_THRESHOLD_QUANTILE))
        good, defective = scores[~labels], scores[labels]
        rows.append({
            "variant": variant, "rule": name,
            "image_auroc": 100 * compute_metrics(scores, labels)["instance_auroc"],
            "pixel_auroc": 100 * pixel_auroc,
            "frr": 100 * decide(good, threshold).mean(),
            "escape": 100 * (~decide(defective, threshold)).mean(),
            "seconds": seconds / (2 * len(train) + len(test)),
        })  # fmt: skip
        good_patches = patches[~labels]
        correlation = (stats.spearmanr(good_patches, good).statistic
                       if np.ptp(good_patches) else float("nan"))  # fmt: skip
        mechanism[name] = (correlation, float(np.median(good)), float(np.median(defective)))
    return rows, mechanism


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--synthetic", action="store_true",
                        help="ROOT is a synthetic data folder, generated if it holds no CATEGORY")
    parser.add_argument("--panels", type=int, default=1, help="synthetic: panels per image")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic: panel side")
    parser.add_argument("--train-every", type=int, default=1)
    parser.add_argument("--test-every", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["center", "none", "scale0.5"])
    parser.add_argument("--percentage", type=float, default=0.01)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    arguments = parser.parse_args()
    configure_process(CommonOptions(no_progress=True, log_level="warning"))
    if arguments.synthetic and not (arguments.root / arguments.category).is_dir():
        from patchcore.data.synthetic import SyntheticSpec, generate_category

        spec = SyntheticSpec(image_size=arguments.image_size, num_train=60, num_test_good=40,
                             num_test_defective_per_type=10, panels=arguments.panels)  # fmt: skip
        generate_category(arguments.root, arguments.category, spec)
    train = list_samples(arguments.root, arguments.category, "train")[:: arguments.train_every]
    test = list_samples(arguments.root, arguments.category, "test")[:: arguments.test_every]
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")).split()  # fmt: skip
    print(
        f"{arguments.category}: {len(train)} training images, {len(test)} test images "
        f"({sum(not s.is_anomaly for s in test)} good); {arguments.backbone} (ImageNet weights), "
        f"coreset {arguments.percentage:g}, leave-one-image-out threshold at quantile "
        f"{DEFAULT_THRESHOLD_QUANTILE:g}; {platform.machine()}, AVX-512 "
        f"{'yes' if 'avx512f' in flags else 'no'}, AMX {'yes' if 'amx_tile' in flags else 'no'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    rows, mechanisms = [], []
    for variant in arguments.variants:
        variant_rows, mechanism = run_variant(variant, arguments, train, test)
        rows += variant_rows
        mechanisms.append(mechanism)
    print(tables.format_table([
        ("preprocessing", "{variant}"), ("image score", "{rule}"),
        ("image AUROC", "{image_auroc:.2f}"), ("pixel AUROC", "{pixel_auroc:.2f}"),
        ("FRR % (good)", "{frr:.1f}"), ("escapes % (defective)", "{escape:.1f}"),
        ("s / image", "{seconds:.3f}"),
    ], rows))  # fmt: skip
    print()
    print("Mechanism (test images): patches per image; per rule, the Spearman correlation of "
          "good images' scores with their number of patches, median good / defective score")
    mechanism_rows = []
    for mechanism in mechanisms:
        row = {"variant": mechanism["variant"],
               "patches": f"{mechanism['patches_min']}/{mechanism['patches_median']}/"
                          f"{mechanism['patches_max']}",
               "drawn": " / ".join(f"{value:.3g}" for value in mechanism["drawn_max"].values()),
               "q99": f"{mechanism['pooled_q99']:.3g}"}  # fmt: skip
        for position, name in enumerate(RULES):
            correlation, good, defective = mechanism[name]
            row[f"r{position}"] = f"{correlation:+.2f}  {good:.3g} / {defective:.3g}"
        mechanism_rows.append(row)
    print(tables.format_table([("preprocessing", "{variant}"), ("patches min/median/max", "{patches}"),
                               ("max of 784 / 3136 good patches", "{drawn}"),
                               ("good patches' 0.99 quantile", "{q99}")]
                       + [(name, f"{{r{position}}}") for position, name in enumerate(RULES)],
                       mechanism_rows))  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
