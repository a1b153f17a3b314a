#!/usr/bin/env python
"""Where a pooled pixel AUROC comes from, on the predictions an evaluation saved.

    python bench/pixel_auroc_breakdown.py RUN/predictions/DATASET [--edges 8 16 32]

Reads `--save_predictions` output (maps and masks in the evaluation's frame) and prints:
- the pooled pixel AUROC over all test images (`results.csv`'s full_pixel_auroc);
- per defect type: the pixel AUROC of that type's images together with the normal test
  images; the pooled pixel AUROC of all test images but that type's; the type's share of
  all defective pixels (a type with most of the defective pixels sets the pooled figure);
  the median over that type's images of the AUROC inside one image (its defective pixels
  against its own normal pixels: does the map put the defect above the rest of the image?);
  and the share of the type's defective pixels within the first `--edges` distance of an
  image edge;
- the median score of the normal test images' pixels by distance to the image edge (do
  normal pixels near an edge score high?).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from patchcore.evaluation.metrics import full_pixel_auroc
from patchcore.evaluation.records import read_predictions


def edge_distances(height: int, width: int) -> np.ndarray:
    """Each pixel's distance in pixels to the nearest image edge."""
    rows = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None]
    columns = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :]
    return np.minimum(rows, columns)


def pooled(maps: list[np.ndarray], masks: list[np.ndarray], chosen: list[int]) -> float:
    """Pooled pixel AUROC (in %) of the images `chosen`."""
    return 100 * full_pixel_auroc([maps[i] for i in chosen], [masks[i] for i in chosen])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="RUN/predictions/DATASET of an evaluation")
    parser.add_argument("--edges", type=int, nargs="*", default=[8, 16, 32])
    args = parser.parse_args()
    predictions = read_predictions(args.folder)
    maps = [np.asarray(m, dtype=np.float32) for m in predictions.maps]
    masks = [np.asarray(m, dtype=bool) for m in predictions.masks]
    distances = [edge_distances(*mask.shape) for mask in masks]
    everything = list(range(len(maps)))
    defective_pixels = sum(int(mask.sum()) for mask in masks)
    print(f"{args.folder}: {len(maps)} images, {defective_pixels} defective pixels")
    print(f"pooled pixel AUROC: {pooled(maps, masks, everything):.2f}")

    types = np.array(predictions.defect_types)
    good = [i for i in everything if not predictions.is_anomaly[i]]
    edge_columns = "".join(f"{f'px <{edge}':>9}" for edge in args.edges)
    print("pixel AUROC of a type's images with the normal ones, of all images but the type's,")
    print("the type's share of defective pixels, median AUROC inside one image, and the share")
    print("of the type's defective pixels closer than N px to an image edge:")
    print(f"{'defect type':<12}{'images':>7}{'with normal':>13}{'all but it':>12}"
          f"{'share px':>10}{'in-image':>10}{edge_columns}")  # fmt: skip
    for defect in sorted(set(types[predictions.is_anomaly.astype(bool)])):
        chosen = [i for i in everything if types[i] == defect]
        others = [i for i in everything if types[i] != defect]
        own_pixels = sum(int(masks[i].sum()) for i in chosen)
        in_image = [pooled(maps, masks, [i]) for i in chosen if 0 < masks[i].mean() < 1]
        near_edge = [100 * sum(int((masks[i] & (distances[i] < edge)).sum()) for i in chosen)
                     / max(own_pixels, 1) for edge in args.edges]  # fmt: skip
        share = 100 * own_pixels / max(defective_pixels, 1)
        median_in_image = np.median(in_image) if in_image else float("nan")
        print(f"{defect:<12}{len(chosen):>7}{pooled(maps, masks, chosen + good):>13.2f}"
              f"{pooled(maps, masks, others):>12.2f}{share:>9.1f}%{median_in_image:>10.1f}"
              + "".join(f"{percent:>8.0f}%" for percent in near_edge))  # fmt: skip

    bands = [0, *args.edges, None]
    medians = []
    for low, high in itertools.pairwise(bands):
        scores = [maps[i][(distances[i] >= low) & ((distances[i] < high) if high else True)]
                  for i in good]  # fmt: skip
        medians.append(f"{low}-{high or 'max'} px: {np.median(np.concatenate(scores)):.4g}")
    print("normal test images, median pixel score by distance to an edge: " + ", ".join(medians))


if __name__ == "__main__":
    main()
