#!/usr/bin/env python
"""One file, one score: how far the ways of scoring a file are from the model folder's.

    python bench/score_parity.py ../shared/datasets magnetic_tile [--train-images 8 --files 20]

Fits an EfficientNet-Lite0 model (ImageNet weights, IM224 centre crop, 10 % coreset) on the
first training images, then scores test files of many sizes:
- `folder`: the model as a saved folder scores it (`load_image`, the file path: Pillow);
- `module on file`: the exported module (`PatchCoreModule`, the challenge `.pth`) on the
  decoded file at its own size (its tensor path transcribes Pillow's 8-bit resize);
- `challenge 256x256`: the same module on the tensor the challenge evaluator feeds it, the
  file resized to 256 x 256 by the evaluator first (`fixed_size_pair`);
and prints, per way, the median and largest relative difference to the folder's score and
how many decisions (at the model's training-image threshold) differ.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from patchcore.config import (
    EFFICIENTNET_LITE0_LAYERS,
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
)
from patchcore.data.datasets import list_samples
from patchcore.data.preprocessing import fixed_size_pair, load_image, open_image, to_tensor
from patchcore.model.calibration import decide
from patchcore.model.module import PatchCoreModule
from patchcore.model.patchcore import PatchCore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--train-images", type=int, default=8)
    parser.add_argument("--files", type=int, default=20)
    args = parser.parse_args()

    config = PatchCoreConfig(
        backbone_name="efficientnet_lite0", layers=EFFICIENTNET_LITE0_LAYERS,
        preprocessing=PreprocessingConfig(), sampler=SamplerConfig(percentage=0.1),
    )  # fmt: skip
    train_paths = [s.image_path for s in list_samples(args.root, args.category, "train")]
    train = torch.stack([load_image(p, config.preprocessing)[0] for p in train_paths[: args.train_images]])
    model = PatchCore(config)
    model.fit([train])
    model.calibrate([train])
    threshold = model.normal_statistics.threshold
    module = PatchCoreModule.from_patchcore(model)

    samples = list_samples(args.root, args.category, "test")
    chosen = samples[:: max(1, len(samples) // args.files)][: args.files]
    rows = {"module on file": [], "challenge 256x256": []}
    folder_scores = []
    for sample in chosen:
        folder = float(model.predict(load_image(sample.image_path, config.preprocessing)[0][None]).scores[0])
        folder_scores.append(folder)
        on_file = module(to_tensor(open_image(sample.image_path, "RGB"))[None])["pred_score"]
        challenge = module(fixed_size_pair(sample.image_path, None, 256)[0][None])["pred_score"]
        rows["module on file"].append(float(on_file[0]))
        rows["challenge 256x256"].append(float(challenge[0]))
    folder_scores = np.array(folder_scores)
    sizes = {open_image(s.image_path, "RGB").size for s in chosen}
    print(f"{args.category}: {len(chosen)} test files of {len(sizes)} sizes; EfficientNet-Lite0, "
          f"IM224, {args.train_images} training images; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"{'way':<20} {'median rel. diff':>17} {'max rel. diff':>14} {'decisions differ':>17}")
    for way, scores in rows.items():
        scores = np.array(scores)
        relative = np.abs(scores - folder_scores) / np.abs(folder_scores)
        flips = sum(decide(a, threshold) != decide(b, threshold) for a, b in zip(scores, folder_scores))
        print(f"{way:<20} {np.median(relative):>17.2e} {relative.max():>14.2e} {flips:>10} of {len(scores)}")


if __name__ == "__main__":
    main()
