#!/usr/bin/env python
"""Leave-one-image-out calibration from the features fit kept, against embedding again.

    python bench/bench_leave_one_out.py ROOT CATEGORY [--images 200] [--crop center none]
        [--percentage 0.1] [--backbone efficientnet_lite0] [--random]

Training without held-out images and saving a model calibrates the threshold on the
training images' leave-one-image-out scores. Before, that scored every training image again
from its pixels (a second backbone pass over the training set); now `fit` keeps the
features it extracted (`keep_training_features=True`, in its temporary file) and the
calibration scores those. Per crop mode, one process fits a model on the first `--images`
training images (loader batch 2, the default workers), calibrates from the kept features,
then calibrates again the old way on the same loader (the baseline of the same run). The
table gives each calibration's seconds and its ratio to the baseline, fit plus calibration
(what training spends before evaluation) and its ratio, the two thresholds' relative
difference (the features of a batch of 2 against one image at a time differ by float
rounding), and the process's peak resident memory after each crop mode.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from tables import cpu_class, format_table

from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import (
    DatasetConfig,
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    default_layers,
    default_loader_workers,
)
from patchcore.data.datasets import ImageDataset, list_samples, make_loader
from patchcore.model.patchcore import PatchCore


def measure(root: Path, category: str, arguments, crop: str) -> list[dict]:
    preprocessing = PreprocessingConfig(256, 224, crop=crop)
    config = PatchCoreConfig(backbone_name=arguments.backbone,
                             layers=default_layers(arguments.backbone),
                             pretrained=not arguments.random, preprocessing=preprocessing,
                             sampler=SamplerConfig("approx_greedy_coreset", arguments.percentage))  # fmt: skip
    samples = list_samples(root, category, "train")[: arguments.images]
    loader = make_loader(
        ImageDataset(samples, preprocessing),
        DatasetConfig("mvtec", str(root), (category,), batch_size=2,
                      num_workers=default_loader_workers(), preprocessing=preprocessing),
        torch.device("cpu"),
    )  # fmt: skip
    model = PatchCore(config)
    start = time.perf_counter()
    model.fit(loader, keep_training_features=True)
    fit = time.perf_counter() - start
    timings, thresholds = {}, {}
    for name, batches in (("kept features", None), ("embedded again (before)", loader)):
        start = time.perf_counter()
        model.calibrate_leave_one_out(batches)
        timings[name] = time.perf_counter() - start
        thresholds[name] = model.normal_statistics.threshold
    baseline = "embedded again (before)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return [
        {"crop": crop, "images": len(samples), "calibration": name, "seconds": seconds,
         "per_image": 1e3 * seconds / len(samples), "ratio": seconds / timings[baseline],
         "fit": fit, "training": fit + seconds,
         "training_ratio": (fit + seconds) / (fit + timings[baseline]),
         "difference": abs(thresholds[name] / thresholds[baseline] - 1.0), "peak": peak}
        for name, seconds in timings.items()
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--crop", nargs="+", default=["center"], choices=["center", "none"])
    parser.add_argument("--percentage", type=float, default=0.1)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--random", action="store_true", help="random backbone weights")
    arguments = parser.parse_args()
    configure_process(CommonOptions(no_progress=True, log_level="warning"))
    rows = [row for crop in arguments.crop
            for row in measure(Path(arguments.root), arguments.category, arguments, crop)]  # fmt: skip
    print(format_table([
        ("crop", "{crop}"), ("images", "{images}"), ("calibration", "{calibration}"),
        ("s", "{seconds:.1f}"), ("ms/img", "{per_image:.1f}"), ("x", "{ratio:.2f}"),
        ("fit s", "{fit:.1f}"), ("fit+calibration s", "{training:.1f}"),
        ("fit+calibration x", "{training_ratio:.2f}"), ("threshold rel diff", "{difference:.1e}"),
        ("peak GiB", "{peak:.2f}"),
    ], rows))  # fmt: skip
    weights = "random" if arguments.random else "pretrained"
    print(f"{arguments.backbone} ({weights} weights), coreset {arguments.percentage:g}, loader "
          f"batch 2, {default_loader_workers()} loader workers; x: against embedding again in "
          f"the same process; {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"CPU: {cpu_class()}")


if __name__ == "__main__":
    main()
