#!/usr/bin/env python
"""Where a pooled pixel AUROC comes from, on the predictions an evaluation saved.

    python bench/pixel_auroc_breakdown.py RUN/predictions/DATASET [--edges 8 16 32]

Reads `--save_predictions` output (maps and masks in the evaluation's frame) and prints:
- the pooled pixel AUROC over all test images (`results.csv`'s full_pixel_auroc);
- per defect type: the pixel AUROC of that type's images together with the normal test
  images, and the type's share of all defective pixels (a type with most of the defective
  pixels sets the pooled figure);
- the pooled pixel AUROC without the pixels closer than N pixels to an image edge, for each
  `--edges` N (an analysis of where normal pixels score high, not a metric to report).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from patchcore.evaluation.metrics import full_pixel_auroc
from patchcore.evaluation.records import read_predictions


def edge_distances(height: int, width: int) -> np.ndarray:
    """Each pixel's distance in pixels to the nearest image edge."""
    rows = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None]
    columns = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :]
    return np.minimum(rows, columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="RUN/predictions/DATASET of an evaluation")
    parser.add_argument("--edges", type=int, nargs="*", default=[8, 16, 32])
    args = parser.parse_args()
    predictions = read_predictions(args.folder)
    maps = [np.asarray(m, dtype=np.float32) for m in predictions.maps]
    masks = [np.asarray(m, dtype=bool) for m in predictions.masks]
    defective_pixels = sum(int(mask.sum()) for mask in masks)
    print(f"{args.folder}: {len(maps)} images, {defective_pixels} defective pixels")
    print(f"pooled pixel AUROC: {100 * full_pixel_auroc(maps, masks):.2f}")
    types = np.array(predictions.defect_types)
    good = [i for i, is_anomaly in enumerate(predictions.is_anomaly) if not is_anomaly]
    print(f"{'defect type':<16}{'images':>8}{'pixel AUROC':>13}{'share of defect px':>20}")
    for defect in sorted(set(types[predictions.is_anomaly.astype(bool)])):
        chosen = [i for i in range(len(maps)) if types[i] == defect]
        auroc = full_pixel_auroc([maps[i] for i in chosen + good],
                                 [masks[i] for i in chosen + good])  # fmt: skip
        share = sum(int(masks[i].sum()) for i in chosen) / max(defective_pixels, 1)
        print(f"{defect:<16}{len(chosen):>8}{100 * auroc:>13.2f}"
              f"{100 * share:>19.1f}%")  # fmt: skip
    distances = [edge_distances(*mask.shape) for mask in masks]
    for edge in args.edges:
        inner = [distance >= edge for distance in distances]  # pixels kept, image by image
        auroc = full_pixel_auroc([m[keep][None] for m, keep in zip(maps, inner)],
                                 [m[keep][None] for m, keep in zip(masks, inner)])  # fmt: skip
        print(f"without pixels within {edge} px of an edge: pooled pixel AUROC {100 * auroc:.2f}")


if __name__ == "__main__":
    main()
