#!/usr/bin/env python
"""How often good images are rejected at a saved threshold, by how it was calibrated.

    python bench/bench_calibration.py ROOT CATEGORY [--train-images 60] [--held-out 0]
        [--percentage 0.01] [--quantile 0.99] [--backbone efficientnet_lite0] [--random]
    python bench/bench_calibration.py --synthetic FOLDER texture   # generated first if absent

Fits one model on the first `--train-images` normal training images of an MVTec-layout
category (IM224 centre crop, approximate greedy coreset), then calibrates its threshold (the
`--quantile` quantile of normal image scores) three ways: on the training images' own
in-sample scores (what `--train_val_split 1` did before), on their leave-one-image-out scores
(each image scored against the bank without its own features; the default now), and, with
`--held-out H`, on the next H training images, which the model never saw (the stronger
`--train_val_split` option). Every test image is scored once; the table gives, per
threshold, the false-reject rate on good test images (to compare with 1 - quantile) and the
escape rate on defective ones.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import (
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    SearchConfig,
    default_layers,
)
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.model.calibration import decide
from patchcore.model.patchcore import PatchCore


def _loader(samples, preprocessing):
    return torch.utils.data.DataLoader(ImageDataset(samples, preprocessing), batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("--synthetic", action="store_true",
                        help="ROOT is a synthetic data folder, generated (60 train, 100 good "
                             "test images) if it holds no CATEGORY yet")  # fmt: skip
    parser.add_argument("--train-images", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=0)
    parser.add_argument("--percentage", type=float, default=0.01)
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--random", action="store_true", help="random backbone weights")
    arguments = parser.parse_args()
    configure_process(CommonOptions(no_progress=True, log_level="warning"))
    root = Path(arguments.root)
    if arguments.synthetic and not (root / arguments.category).is_dir():
        from patchcore.data.synthetic import SyntheticSpec, generate_category

        spec = SyntheticSpec(num_train=arguments.train_images + arguments.held_out,
                             num_test_good=100, num_test_defective_per_type=10)  # fmt: skip
        generate_category(root, arguments.category, spec)

    config = PatchCoreConfig(
        backbone_name=arguments.backbone,
        layers=default_layers(arguments.backbone),
        pretrained=not arguments.random,
        preprocessing=PreprocessingConfig(),
        sampler=SamplerConfig(percentage=arguments.percentage),
    )
    model = PatchCore(config, search=SearchConfig(backend="torch"))
    normal = list_samples(root, arguments.category, "train")
    train = normal[: arguments.train_images]
    held_out = normal[arguments.train_images : arguments.train_images + arguments.held_out]
    model.fit(_loader(train, config.preprocessing))
    thresholds = {}
    model.calibrate(_loader(train, config.preprocessing), arguments.quantile)
    thresholds["training images, in-sample (before)"] = model.normal_statistics.threshold
    model.calibrate_leave_one_out(_loader(train, config.preprocessing), arguments.quantile)
    thresholds["training images, leave-one-image-out (now)"] = model.normal_statistics.threshold
    if held_out:
        model.calibrate(_loader(held_out, config.preprocessing), arguments.quantile)
        thresholds[f"{len(held_out)} held-out normal images"] = model.normal_statistics.threshold

    test = list_samples(root, arguments.category, "test")
    scores = model.predict_batches(_loader(test, config.preprocessing)).scores.double().numpy()
    labels = np.array([sample.is_anomaly for sample in test])
    good, defective = scores[~labels], scores[labels]
    print(
        f"{arguments.category}: {len(train)} training images, {len(good)} good and "
        f"{len(defective)} defective test images; {config.backbone_name} "
        f"({'random' if arguments.random else 'ImageNet'} weights), coreset "
        f"{arguments.percentage:g}, bank {len(model.memory_bank)}; quantile {arguments.quantile:g} "
        f"(expected false-reject rate {1 - arguments.quantile:.1%}); {platform.machine()} "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| calibration | threshold | false rejects (good) | false-reject rate | escapes (defective) | escape rate |")
    print("|---|---|---|---|---|---|")
    for name, threshold in thresholds.items():
        rejected = decide(good, threshold)
        escaped = ~decide(defective, threshold)
        print(
            f"| {name} | {threshold:.4g} | {int(rejected.sum())} of {len(good)} | "
            f"{rejected.mean():.1%} | {int(escaped.sum())} of {len(defective)} | "
            f"{escaped.mean() if len(defective) else float('nan'):.1%} |"
        )


if __name__ == "__main__":
    main()
