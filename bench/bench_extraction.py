#!/usr/bin/env python
"""Where training-feature extraction spends its time, stage by stage, per image.

    python bench/bench_extraction.py ROOT CATEGORY [--backbone efficientnet_lite0]
        [--images 200] [--crop center none]

For the first `--images` training images of a category, one process, no loader workers, each
stage timed on its own (torch's threads as configured): reading and decoding the file with
the resize and crop (`ImageDataset`, PIL), the backbone, the patch aggregation, the random
projection for the coreset, and the write to the spill file (`SpilledFeatureStore`). Rows:
one per `--crop` mode; columns: milliseconds per image and each stage's share. Fitting runs
the first stage in loader workers beside the others, so it overlaps them there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tables
import torch

from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import (
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    default_layers,
)
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.model.feature_store import SpilledFeatureStore
from patchcore.model.patchcore import FIT_IMAGES_AT_ONCE, PatchCore
from patchcore.model.samplers import build_sampler

STAGES = ("decode", "backbone", "aggregate", "project", "spill")
BACKBONES = ("efficientnet_lite0", "wideresnet50")


def measure(root: Path, category: str, backbone: str, crop: str, count: int) -> dict:
    preprocessing = PreprocessingConfig(256, 224, crop=crop)
    config = PatchCoreConfig(backbone_name=backbone, layers=default_layers(backbone),
                             preprocessing=preprocessing,
                             sampler=SamplerConfig("approx_greedy_coreset", 0.1))  # fmt: skip
    model = PatchCore(config)
    sampler = build_sampler(config.sampler)
    dataset = ImageDataset(list_samples(root, category, "train")[:count], preprocessing)
    seconds = dict.fromkeys(STAGES, 0.0)
    store = SpilledFeatureStore()

    def timed(stage, function, *arguments):
        start = time.perf_counter()
        result = function(*arguments)
        seconds[stage] += time.perf_counter() - start
        return result

    pending: list[torch.Tensor] = []  # images of one size, embedded together as in fit

    def embed_pending():
        maps = timed("backbone", model.embedder.extractor, torch.stack(pending))
        features, _ = timed("aggregate", model.embedder.aggregator, maps)
        timed("project", sampler.project, features)
        timed("spill", store.append, features)
        pending.clear()

    try:
        with torch.inference_mode():
            for index in range(len(dataset)):
                image = timed("decode", dataset.__getitem__, index)["image"]
                if pending and pending[0].shape != image.shape:
                    embed_pending()
                pending.append(image)
                if len(pending) == FIT_IMAGES_AT_ONCE:
                    embed_pending()
            if pending:
                embed_pending()
    finally:
        store.close()
    total = sum(seconds.values())
    row = {"crop": crop, "images": len(dataset), "total": 1e3 * total / len(dataset)}
    for stage in STAGES:
        row[stage] = 1e3 * seconds[stage] / len(dataset)
        row[f"{stage}_share"] = seconds[stage] / total
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONES)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--crop", nargs="+", default=["center", "none"])
    args = parser.parse_args()
    configure_process(CommonOptions())
    rows = [measure(args.root, args.category, args.backbone, crop, args.images)
            for crop in args.crop]  # fmt: skip
    columns = [("crop", "{crop}"), ("images", "{images}"), ("ms/image", "{total:.1f}")] + [
        (stage, f"{{{stage}:.1f}} ({{{stage}_share:.0%}})") for stage in STAGES
    ]
    print(tables.format_table(columns, rows))
    print(f"backbone {args.backbone}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; milliseconds per image (share of the total)")


if __name__ == "__main__":
    main()
