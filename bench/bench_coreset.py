#!/usr/bin/env python
"""Coreset selection alone, against its floor: the reference loop, the plain sweep and this
library's lazy selection on the projected features of one category.

    python bench/bench_coreset.py ../shared/datasets magnetic_tile [--percentages 0.01 0.1]
        [--backbone efficientnet_lite0] [--iterations 200] [--products avx2:x86-64-v3 ...]

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
selection only the low-precision copies of the tiles it updates and their products (cache
sized), so its floor is its arithmetic: 2 (D + 1) operations per (row, point) pair it
evaluates, at the matrix-product rate measured here with torch.mm at the lazy selection's
shapes in the path's precision (bfloat16 for AMX and AVX512-BF16, float32 otherwise), on one
thread, times the torch threads (both cores of a 2-core machine: the lazy selection's helper
thread takes chunks of each tile update). The rate with every torch thread is printed too.

`--products` lists the product paths to run (`path[:march]`, see
`patchcore.model.samplers.product_path`; default: this CPU's own): `avx2:x86-64-v3` runs the
AVX2/FMA float32 path from kernels built with `-march=x86-64-v3`, what an AVX2-only CPU gets
(torch's float32 products, which set that path's floor, still use every instruction this
CPU has). The CPU class and the path of each row are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from patchcore.config import PatchCoreConfig, PreprocessingConfig, default_layers
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.model import native, samplers
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


def product_rate(dtype: torch.dtype, threads: int) -> float:
    """Matrix-product operations per second with `threads` torch threads, at the lazy
    selection's shapes (1024 rows x 128 x 256 points), best of 3 rounds of 50."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, points = torch.randn(1024, 128).to(dtype), torch.randn(256, 128).to(dtype)
        torch.mm(rows, points.T)
        rounds = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(50):
                torch.mm(rows, points.T)
            rounds.append((time.perf_counter() - start) / 50)
    finally:
        torch.set_num_threads(previous)
    return 2 * 1024 * 128 * 256 / min(rounds)


def kernel_rate(kernels, path: str) -> float:
    """Operations per second of the compiled products of `path` (None where the path has no
    compiled kernel), one thread, at the lazy selection's shapes, best of 3 rounds of 20."""
    if path not in ("amx", "avx512bf16", "avx2", "portable"):
        return float("nan")
    dtype = torch.bfloat16 if path in samplers.BFLOAT16_PATHS else torch.float32
    rows, points = torch.randn(1024 + 16, 128).to(dtype), torch.randn(256, 128).to(dtype)
    out, pairs = torch.empty(1024, 256, dtype=dtype), torch.empty(128 * 16, dtype=torch.bfloat16)
    code = samplers.PRODUCT_PATHS.index(path)
    arguments = (rows.data_ptr(), 1024, 128, points.data_ptr(), 256, pairs.data_ptr(),
                 out.data_ptr())  # fmt: skip
    kernels.tile_products(code, *arguments)
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(20):
            kernels.tile_products(code, *arguments)
        rounds.append((time.perf_counter() - start) / 20)
    return 2 * 1024 * 128 * 256 / min(rounds)


def kernels_and_path(entry: str):
    """(kernels, path) of a `--products` entry `path[:march]`."""
    path, _, march = entry.partition(":")
    kernels = native.build_kernels((f"-march={march}",)) if march else native.coreset_kernels()
    return kernels, samplers.product_path(kernels, path or None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--percentages", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument(
        "--iterations",
        type=int,
        default=200,
        help="iterations timed of the reference loop and the plain sweep",
    )
    parser.add_argument("--products", nargs="+", default=[""],
                        help="product paths to run, path[:march] (default: this CPU's own)")  # fmt: skip
    args = parser.parse_args()
    variants = [(entry or "default", *kernels_and_path(entry)) for entry in args.products]
    features = projected_features(args.root, args.category, args.backbone)
    rows, dimension = features.shape
    threads = torch.get_num_threads()
    bandwidth = read_bandwidth()
    rates = {dtype: (product_rate(dtype, 1), product_rate(dtype, threads))
             for dtype in (torch.bfloat16, torch.float32)}  # fmt: skip
    sweep_bytes = rows * (4 * dimension + 8)
    print(f"CPU: {native.cpu_class()}; torch {torch.__version__}, {threads} torch threads")
    print(f"{args.category}: N = {rows} projected features, D = {dimension}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; torch.mm products (1 thread / {threads} threads): "
          f"bfloat16 {rates[torch.bfloat16][0] / 1e9:.0f} / {rates[torch.bfloat16][1] / 1e9:.0f}"
          f" GFLOP/s, float32 {rates[torch.float32][0] / 1e9:.0f} / "
          f"{rates[torch.float32][1] / 1e9:.0f} GFLOP/s; a sweep moves "
          f"{sweep_bytes / 1e6:.0f} MB: floor {sweep_bytes / bandwidth * 1e3:.2f} ms per "
          "iteration")  # fmt: skip
    for entry, kernels, path in variants:
        rate = kernel_rate(kernels, path)
        print(f"products {entry}: path {path}, compiled kernel {rate / 1e9:.0f} GFLOP/s (1 thread)")
    header = ("  %  iterations  reference s  sweep s  products               lazy s  lazy x ref  "
              "lazy x sweep  sweep ms/it (floor)  lazy ms/it  pairs/it  floor ms/it  "
              "lazy x floor  threads after")  # fmt: skip
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
        for entry, kernels, path in variants:
            begin = time.perf_counter()
            lazy = samplers._LazyTiles(kernels, features, start, 1024, path)
            selected = lazy.run(count)
            lazy_s = time.perf_counter() - begin
            if not torch.equal(selected[:timed], plain):
                raise SystemExit(f"the lazy selection ({entry}) differs from the plain sweep")
            dtype = torch.bfloat16 if path in samplers.BFLOAT16_PATHS else torch.float32
            pairs = lazy.stats["pairs"] / count
            # both cores at the one-thread rate: small products split between threads
            # synchronise, so this is at least as fast as torch.mm with every thread
            floor = pairs * 2 * (dimension + 1) / (threads * rates[dtype][0])
            name = path + (f" ({entry.partition(':')[2]})" if ":" in entry else "")
            print(f"{percentage:3.0%}  {count:10d}  {reference_s:11.1f}  {sweep_s:7.1f}  "
                  f"{name:20s}  {lazy_s:6.1f}  {reference_s / lazy_s:10.1f}  "
                  f"{sweep_s / lazy_s:12.1f}  "
                  f"{sweep_s / count * 1e3:10.2f} ({sweep_bytes / bandwidth * 1e3:5.2f})  "
                  f"{lazy_s / count * 1e3:10.3f}  {pairs:8.0f}  {floor * 1e3:11.3f}  "
                  f"{lazy_s / count / floor:12.2f}  {torch.get_num_threads():13d}", flush=True)  # fmt: skip
    print(
        f"reference and sweep times extrapolated from {args.iterations} iterations; floors "
        f"at the path's precision, {threads} threads at the one-thread rate"
    )


if __name__ == "__main__":
    main()
