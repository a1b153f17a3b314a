"""Time the evaluation overlays (`--save_segmentation_images`): seconds per image.

    PYTHONPATH=src python bench/bench_overlays.py [--images 20] [--size 224] [--out DIR]
        [--images_from FOLDER]

Images drawn at random (or the first --images files under --images_from, e.g. a dataset's
test folder, resized to --size), smooth random maps and masks at evaluate's default image
size; the PNGs are written to --out (a temporary folder by default) to be looked at.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchcore.evaluation.visualization import save_segmentation_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--images_from", type=Path, default=None)
    arguments = parser.parse_args()
    count, size = arguments.images, arguments.size
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, 3, size, size, generator=generator)
    if arguments.images_from is not None:
        files = sorted(p for p in arguments.images_from.rglob("*") if p.suffix in (".jpg", ".png"))
        for index, path in enumerate(files[:count]):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)
            images[index] = torch.from_numpy(pixels / 255).permute(2, 0, 1)
    blobs = torch.nn.functional.avg_pool2d(
        torch.rand(count, 1, size, size, generator=generator), 31, 1, 15, count_include_pad=False
    )[:, 0]
    maps = blobs * 4.0
    masks = (blobs > blobs.flatten(1).quantile(0.97, dim=1)[:, None, None]).float()[:, None]
    has_mask = [index % 4 != 0 for index in range(count)]
    names = [f"defect_{index:03d}" for index in range(count)]
    scores = maps.amax(dim=(1, 2))
    threshold = float(scores.median())
    with tempfile.TemporaryDirectory() as temporary:
        folder = arguments.out or Path(temporary)
        save_segmentation_images(folder / "warm", images[:1], maps[:1], scores[:1], names[:1])
        start = time.perf_counter()
        save_segmentation_images(folder / "overlays", images, maps, scores, names, masks=masks,
                                 has_mask=has_mask, threshold=threshold)  # fmt: skip
        elapsed = time.perf_counter() - start
    print(f"{count} overlays of {size}x{size}: {elapsed:.2f} s, {elapsed / count:.3f} s per image")


if __name__ == "__main__":
    main()
