#!/usr/bin/env python
"""Memory-bank search: exact against FAISS approximate indexes, on one category.

    python bench/bench_search.py ROOT CATEGORY [--backbone efficientnet_lite0]
        [--sampler approx_greedy_coreset] [-p 0.1] [--model_dir CACHE]
        [--variants exact ivf ivf:nprobe=32 ivfpq hnsw] [--threads 2]

Fits one model (or loads it from `--model_dir`, where it is saved after a first fit), builds
every index variant over the same memory bank, then makes one pass over the test set:
each batch's patch features are extracted once and scored with every variant through the
library's scorer (`score_features`), so only the search differs. Printed per variant:
build seconds, index size, search milliseconds per image (the k-NN calls only) and the
speed-up against exact search, recall@1 of the nearest bank feature against exact search (the first variant),
image AUROC, pixel AUROC and PRO, and their differences from exact in points.

A variant is `kind[:name=value,...]` with IndexConfig fields, e.g. `ivfpq:pq_m=128,nprobe=16`,
or, for exact search, the backend: `exact:backend=faiss` (default: the library's default,
`rerank`), and for `rerank` the product path: `exact:products=avx2` (see
`patchcore.model.samplers.product_path`; default: this CPU's own; the bfloat16 paths, AMX
and AVX512-BF16, give the product pass bfloat16 copies, the others float32). The CPU class
and each `rerank` variant's product path are printed. Neighbour distances are recomputed
from the bank vectors by the scorer for every variant, as in the library, so only the
neighbours found differ.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import tables
import torch

from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import (
    IndexConfig,
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    SearchConfig,
    default_layers,
)
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.evaluation.metrics import compute_metrics
from patchcore.model.indexes import build_bank_index
from patchcore.model.native import cpu_class
from patchcore.model.patchcore import PatchCore
from patchcore.model.scoring import patch_scores_to_maps, score_patches
from patchcore.model.search import RerankedNearestNeighbours
from patchcore.model.serialization import load_models, save_models
from patchcore.progress import track

COLUMNS = [
    ("variant", "{variant}"), ("build s", "{build:.1f}"), ("index MiB", "{mib:.1f}"),
    ("ms/img", "{ms:.1f}"), ("speed x", "{speed:.2f}"), ("recall@1", "{recall:.4f}"),
    ("img AUROC", "{img:.2f}"), ("d img", "{d_img:+.2f}"), ("px AUROC", "{px:.2f}"),
    ("d px", "{d_px:+.2f}"), ("PRO", "{pro:.2f}"), ("d PRO", "{d_pro:+.2f}"),
]  # fmt: skip


def parse_variant(text: str) -> tuple[str, IndexConfig, str, str | None]:
    """(name, index configuration, exact-search backend, product path) of a `--variants`
    entry."""
    kind, _, settings = text.partition(":")
    values, backend, products = {}, SearchConfig().backend, None
    for item in filter(None, settings.split(",")):
        name, _, value = item.partition("=")
        if name == "backend":
            backend = value
        elif name == "products":
            products = value
        else:
            values[name] = int(value)
    return text, IndexConfig(kind=kind, **values), backend, products


@dataclass
class Variant:
    """One index over the bank and what was measured with it."""

    name: str
    index: object
    build_seconds: float
    size_bytes: int
    search_seconds: float = 0.0
    matches: int = 0
    queries: int = 0
    patch_scores: list[torch.Tensor] = field(default_factory=list)
    image_scores: list[torch.Tensor] = field(default_factory=list)
    nearest: torch.Tensor | None = None  # nearest bank feature of each query of the last search

    # The scorer's view of an index: `bank` and a timed `search`.
    @property
    def bank(self) -> torch.Tensor:
        return self.index.bank

    def search(self, queries: torch.Tensor, k: int):
        start = time.perf_counter()
        distances, indices = self.index.search(queries, k)
        self.search_seconds += time.perf_counter() - start
        self.nearest = indices[:, 0]
        return distances, indices


def build_variant(name: str, config: IndexConfig, backend: str, products: str | None,
                  bank: torch.Tensor, threads: int) -> Variant:  # fmt: skip
    search = SearchConfig(backend=backend, faiss_num_workers=threads)
    if products is not None and backend == "rerank" and not config.approximate:
        index = RerankedNearestNeighbours(products=products)
    else:
        index = build_bank_index(config, search, torch.device("cpu"))
    start = time.perf_counter()
    index.fit(bank)
    seconds = time.perf_counter() - start
    size = index.size_bytes() if config.approximate else bank.numel() * 4
    return Variant(name, index, seconds, size)


def fitted_model(args) -> PatchCore:
    folder = Path(args.model_dir) if args.model_dir else None
    if folder is not None and folder.is_dir():
        return load_models(folder)[0]
    config = PatchCoreConfig(
        backbone_name=args.backbone,
        layers=default_layers(args.backbone),
        preprocessing=PreprocessingConfig(),
        sampler=SamplerConfig(args.sampler, args.percentage),
    )
    model = PatchCore(config)
    samples = list_samples(Path(args.root), args.category, "train")
    loader = torch.utils.data.DataLoader(
        ImageDataset(samples, config.preprocessing), batch_size=8, num_workers=args.workers
    )
    model.fit(loader)
    if folder is not None:
        save_models(folder, [model])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sampler", default="approx_greedy_coreset")
    parser.add_argument("-p", "--percentage", type=float, default=0.1)
    parser.add_argument("--model_dir", default=None, help="cache of the fitted model")
    parser.add_argument("--variants", nargs="+",
                        default=["exact", "exact:backend=faiss", "ivf", "ivfpq", "hnsw"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--test_images", type=int, default=None, help="first N test images")
    args = parser.parse_args()
    configure_process(CommonOptions(no_progress=True))
    torch.set_num_threads(args.threads)

    model = fitted_model(args)
    bank = model.memory_bank
    if args.variants[0].partition(":")[0] != "exact":
        parser.error("the first variant must be exact: it is the reference of the others")
    variants = [
        build_variant(name, config, backend, products, bank, args.threads)
        for name, config, backend, products in map(parse_variant, args.variants)
    ]

    samples = list_samples(Path(args.root), args.category, "test")[: args.test_images]
    loader = torch.utils.data.DataLoader(
        ImageDataset(samples, model.config.preprocessing), batch_size=8,
        num_workers=args.workers,
    )  # fmt: skip
    labels, masks = [], []
    with torch.inference_mode():
        for batch in track(loader, "Scoring the test set", unit="batch"):
            features, grid = model.embed(batch["image"])
            for variant in variants:
                patch_scores, image_scores = score_patches(features, grid, variant, model.config)
                variant.patch_scores.append(patch_scores)
                variant.image_scores.append(image_scores)
                variant.matches += int((variant.nearest == variants[0].nearest).sum())
                variant.queries += len(features)
            labels.append(torch.as_tensor(batch["is_anomaly"]))
            masks.append(batch["mask"][:, 0] > 0.5)
    labels, masks = torch.cat(labels), torch.cat(masks)
    image_size = tuple(masks.shape[-2:])

    rows = []
    for variant in variants:
        maps = patch_scores_to_maps(torch.cat(variant.patch_scores), image_size)
        metrics = compute_metrics(torch.cat(variant.image_scores), labels, maps, masks)
        rows.append((variant, metrics))
    reference_variant, reference = rows[0]
    print(f"\n{args.category}: {len(samples)} test images, bank {tuple(bank.shape)} "
          f"({model.config.backbone_name}, {model.config.sampler.name} "
          f"{model.config.sampler.percentage:g}); {platform.machine()} "
          f"{args.threads} threads, torch {torch.__version__}")  # fmt: skip
    print(f"CPU: {cpu_class()}")
    for variant in variants:
        if isinstance(variant.index, RerankedNearestNeighbours):
            print(f"  {variant.name}: re-ranking search, {variant.index.path} products")
    reference_ms = 1000 * reference_variant.search_seconds / len(samples)
    table = []
    for variant, metrics in rows:
        per_image = 1000 * variant.search_seconds / len(samples)
        row = {"variant": variant.name, "build": variant.build_seconds,
               "mib": variant.size_bytes / 2**20, "ms": per_image, "speed": reference_ms / per_image,
               "recall": variant.matches / max(variant.queries, 1)}  # fmt: skip
        for key, short in (("instance_auroc", "img"), ("full_pixel_auroc", "px"), ("pro", "pro")):
            row[short] = 100 * metrics[key]
            row["d_" + short] = 100 * (metrics[key] - reference[key])
        table.append(row)
    print(tables.format_table(COLUMNS, table))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"peak resident memory of this process: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
