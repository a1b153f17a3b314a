#!/usr/bin/env python
"""Coreset selection alone, against its floor: the reference loop, the plain sweep and this
library's lazy selection on the projected features of one category.

    python bench/bench_coreset.py ../shared/datasets magnetic_tile [--percentages 0.01 0.1]
        [--backbone efficientnet_lite0] [--iterations 200]

Extracts the category's training features once (pretrained `--backbone`, IM224) and
projects them to 128 dimensions as the approximate greedy coreset does. Then, per
percentage: the reference-structured loop and the plain sweep (`farthest_point_selection`)
are timed over `--iterations` iterations and extrapolated (every iteration of either does
the same work: one pass over all N features), and the library's selection
(`pruned_farthest_point_selection`) runs in full and is checked against the plain sweep
over the same first iterations.

The floor of a sweep is the bytes it must move per iteration, N (4 D + 8) (the float32
features, the minimum distances read and written), over the memory bandwidth measured
here (reading a 1 GiB tensor with every torch thread). The lazy selection moves per
selection only the bfloat16 copies of the tiles it updates and their products (cache
sized), so its floor is its arithmetic: 2 (D + 1) operations per (row, point) pair, at the
bfloat16 matrix-product rate measured here on one thread (where torch has two or more
threads, the lazy selection's helper thread takes half of each tile update, so it can come
closer to that floor than one thread could).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from patchcore.config import PatchCoreConfig, PreprocessingConfig, default_layers
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.model import samplers
from patchcore.model.patchcore import PatchCore
from patchcore.model.samplers import ApproximateGreedyCoresetSampler, farthest_point_selection

sys.path.insert(0, str(Path(__file__).parent))
from bench_patchcore import reference_coreset


def projected_features(root: Path, category: str, backbone: str) -> torch.Tensor:
    preprocessing = PreprocessingConfig(256, 224)
    model = PatchCore(PatchCoreConfig(backbone_name=backbone, layers=default_layers(backbone),
                                      preprocessing=preprocessing))  # fmt: skip
    train = ImageDataset(list_samples(root, category, "train"), preprocessing)
    loader = torch.utils.data.DataLoader(train, batch_size=8, num_workers=1)
    sampler = ApproximateGreedyCoresetSampler(0.1)
    return torch.cat([sampler.project(model.embed(batch["image"])[0]) for batch in loader])


def read_bandwidth() -> float:
    """Bytes per second reading a 1 GiB float32 tensor (best of 3)."""
    data = torch.ones(2**28)
    data.sum()
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        seconds.append(time.perf_counter() - start)
    return data.numel() * 4 / min(seconds)


def product_rate() -> float:
    """bfloat16 matrix-product operations per second on one thread, at the lazy selection's
    shapes (1024 rows x 128 x 256 points)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    rows, points = torch.randn(1024, 128).bfloat16(), torch.randn(256, 128).bfloat16()
    torch.mm(rows, points.T)
    start = time.perf_counter()
    for _ in range(50):
        torch.mm(rows, points.T)
    seconds = (time.perf_counter() - start) / 50
    torch.set_num_threads(previous)
    return 2 * 1024 * 128 * 256 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--percentages", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--iterations", type=int, default=200,
                        help="iterations timed of the reference loop and the plain sweep")  # fmt: skip
    args = parser.parse_args()
    features = projected_features(args.root, args.category, args.backbone)
    rows, dimension = features.shape
    bandwidth, rate = read_bandwidth(), product_rate()
    sweep_bytes = rows * (4 * dimension + 8)
    print(f"{args.category}: N = {rows} projected features, D = {dimension}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, bfloat16 products {rate / 1e9:.0f} GFLOP/s (1 thread); "
          f"a sweep moves {sweep_bytes / 1e6:.0f} MB: floor {sweep_bytes / bandwidth * 1e3:.2f} "
          "ms per iteration")  # fmt: skip
    header = ("  %  iterations  reference s  sweep s  lazy s  lazy x ref  lazy x sweep  "
              "sweep ms/it (floor)  lazy ms/it  pairs/it  floor ms/it")  # fmt: skip
    print(header)
    for percentage in args.percentages:
        sampler = ApproximateGreedyCoresetSampler(percentage)
        norms = features.square().sum(dim=1)
        start = sampler._starting_squared_distances(features, norms)
        count = sampler.num_samples(rows)
        timed = min(count, args.iterations)
        reference_s, _ = reference_coreset(features, sampler, count, timed)
        minimum = start.clone()
        begin = time.perf_counter()
        plain = farthest_point_selection(features, norms, minimum, timed)
        sweep_s = (time.perf_counter() - begin) * count / timed
        begin = time.perf_counter()
        lazy = samplers._LazyTiles(samplers.coreset_kernels(), features, start, 1024)
        selected = lazy.run(count)
        lazy_s = time.perf_counter() - begin
        if not torch.equal(selected[:timed], plain):
            raise SystemExit("the lazy selection differs from the plain sweep")
        pairs = lazy.stats["pairs"] / count
        floor = pairs * 2 * (dimension + 1) / rate
        print(f"{percentage:3.0%}  {count:10d}  {reference_s:11.1f}  {sweep_s:7.1f}  "
              f"{lazy_s:6.1f}  {reference_s / lazy_s:10.1f}  {sweep_s / lazy_s:12.1f}  "
              f"{sweep_s / count * 1e3:10.2f} ({sweep_bytes / bandwidth * 1e3:5.2f})  "
              f"{lazy_s / count * 1e3:10.3f}  {pairs:8.0f}  {floor * 1e3:11.3f}", flush=True)  # fmt: skip
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}; reference and sweep times extrapolated "
          f"from {args.iterations} iterations")  # fmt: skip


if __name__ == "__main__":
    main()
