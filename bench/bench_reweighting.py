#!/usr/bin/env python
"""What the paper's Eq. 7 re-weighting (`--score_reweighting`) does to image scores.

    python bench/bench_reweighting.py ROOT CATEGORY [--train-images 60] [--test-images 40]
                                      [--backbone efficientnet_lite0] [--neighbours 9]

Fits one model on the first `--train-images` normal training images of an MVTec-layout
category (pretrained weights, IM224 preprocessing, approximate greedy coreset 10 %), scores
`--test-images` test images (spread over the defect types) with and without Eq. 7, and
prints, per neighbourhood size b: the distribution of the weights, how many image scores
change by more than a millionth, the largest relative change, whether the ranking of the
images changes, and the image AUROC with and without re-weighting. It also prints the L2
distances Eq. 7's softmax reads (worst patch to its nearest bank feature, and the spread of
that feature's neighbourhood), which explain the weights: the softmax saturates once the
neighbourhood's distances differ by many units.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

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
from patchcore.evaluation.metrics import compute_metrics
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import reweighting_factor

BACKBONES = ("efficientnet_lite0", "wideresnet50")


def spread_subset(samples: list, count: int) -> list:
    """`count` samples taken evenly over the sorted list (so every defect type appears)."""
    if count >= len(samples):
        return samples
    positions = np.linspace(0, len(samples) - 1, count).round().astype(int)
    return [samples[position] for position in positions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("--train-images", type=int, default=60)
    parser.add_argument("--test-images", type=int, default=40)
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONES)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[3, 9])
    arguments = parser.parse_args()
    configure_process(CommonOptions(no_progress=True, log_level="warning"))

    config = PatchCoreConfig(
        backbone_name=arguments.backbone,
        layers=default_layers(arguments.backbone),
        preprocessing=PreprocessingConfig(),
        sampler=SamplerConfig(percentage=0.1),
    )
    model = PatchCore(config, search=SearchConfig(backend="torch"))
    train = list_samples(arguments.root, arguments.category, "train")[: arguments.train_images]
    loader = torch.utils.data.DataLoader(ImageDataset(train, config.preprocessing), batch_size=8)
    model.fit(loader)
    test = spread_subset(list_samples(arguments.root, arguments.category, "test"),
                         arguments.test_images)  # fmt: skip
    images = torch.stack([ImageDataset(test, config.preprocessing)[i]["image"]
                          for i in range(len(test))])  # fmt: skip
    labels = torch.tensor([sample.is_anomaly for sample in test])
    plain = torch.cat([model.predict(images[i : i + 8]).scores for i in range(0, len(test), 8)])

    features, grid = model.embed(images)
    features = features.reshape(len(test), grid[0] * grid[1], -1)
    squared, neighbours = model.index.search(features.reshape(-1, features.shape[-1]), 1)
    worst = squared.reshape(len(test), -1).argmax(dim=1)
    rows = torch.arange(len(test))
    nearest = neighbours.reshape(len(test), -1)[rows, worst]
    bank = model.memory_bank
    star = torch.linalg.vector_norm(bank[nearest] - features[rows, worst], dim=-1)
    print(f"{arguments.backbone} on {arguments.category}: {len(train)} training images, "
          f"{len(test)} test images ({int(labels.sum())} defective), bank {len(bank)}")  # fmt: skip
    print(f"L2 distance worst patch -> nearest bank feature: median {star.median():.1f}, "
          f"range {star.min():.1f}-{star.max():.1f}")  # fmt: skip
    header = ("b", "weight min", "median", "max", "scores changed", "max rel. change",
              "ranking same", "AUROC plain", "AUROC Eq. 7", "neighbourhood spread")  # fmt: skip
    print(" | ".join(header))
    plain_auroc = compute_metrics(plain, labels)["instance_auroc"]
    for b in arguments.neighbours:
        weights = reweighting_factor(features, neighbours.reshape(len(test), -1, 1), worst,
                                     model.index, b).double()  # fmt: skip
        _, hood = model.index.search(bank[nearest], b)
        distances = torch.linalg.vector_norm(bank[hood] - features[rows, worst][:, None], dim=-1)
        spread = (distances.max(dim=1).values - star).median()
        reweighted_model = PatchCore(
            dataclasses.replace(config, score_reweighting=True, reweighting_neighbours=b),
            search=SearchConfig(backend="torch"),
        )
        reweighted_model.set_memory_bank(bank)
        reweighted = torch.cat([reweighted_model.predict(images[i : i + 8]).scores
                                for i in range(0, len(test), 8)])  # fmt: skip
        relative = ((reweighted - plain).abs() / plain).double()
        same = bool(torch.equal(plain.argsort(), reweighted.argsort()))
        auroc = compute_metrics(reweighted, labels)["instance_auroc"]
        print(f"{b} | {weights.min():.6f} | {weights.median():.6f} | {weights.max():.6f} | "
              f"{int((relative > 1e-6).sum())}/{len(test)} | {relative.max():.2e} | {same} | "
              f"{plain_auroc:.4f} | {auroc:.4f} | {spread:.1f}")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
