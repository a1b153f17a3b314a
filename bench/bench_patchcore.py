#!/usr/bin/env python
"""Fit and inference benchmark: this implementation against a straightforward baseline.

    python bench/bench_patchcore.py [--sizes 50 100 200] [--backbone wideresnet50]
                                    [--real ROOT CATEGORY] [--test-images 20]

For each training-set size it generates a synthetic MVTec-layout category, then runs each
variant in its own process (so peak memory is that variant's alone):
- `baseline`: the reference implementation's structure, built from this library's pieces:
  all training features concatenated in float32, greedy coreset by full sweeps over all
  projected features every iteration;
- `patchcore`: this library's default path: streamed extraction and projection, features
  kept in chunks (never concatenated), pruned farthest-point iterations.
Both use the same configuration (IM224, layer2+layer3, 1024/1024, patch size 3,
approximate greedy coreset 10 %, FAISS on the CPU) and must produce the same bank.
Timings do not depend on the backbone's weights, so random weights are used unless
`--pretrained` is given; AUROCs are only meaningful with pretrained weights.

Printed per variant: feature extraction, coreset and fit seconds, inference ms per image
(batch 1), images/s, peak RSS, coverage radius (largest distance from a feature of the
first 16 training images to its nearest bank feature, in the full feature space),
image and pixel AUROC, and the ratios against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tables
import torch

from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.evaluation.metrics import compute_metrics
from patchcore.model.patchcore import PatchCore
from patchcore.model.samplers import build_sampler, farthest_point_selection
from patchcore.data.synthetic import SyntheticSpec, generate_category

VARIANTS = ("baseline", "patchcore", "anomalib")
COVERAGE_IMAGES = 16


def baseline_fit(model: PatchCore, loader) -> tuple[float, float]:
    """Reference-style fit: concatenate every feature, full-sweep greedy coreset."""
    start = time.perf_counter()
    features = torch.cat([model.embed(batch["image"])[0] for batch in loader])
    extracted = time.perf_counter()
    sampler = build_sampler(model.config.sampler)
    projected = sampler.project(features)
    norms = projected.square().sum(dim=1)
    starts = sampler._starting_squared_distances(projected, norms)
    count = sampler.num_samples(len(projected))
    selected = farthest_point_selection(projected, norms, starts, count)
    model.set_memory_bank(features[selected])
    return extracted - start, time.perf_counter() - extracted


def library_fit(model: PatchCore, loader) -> tuple[float, float]:
    """The library's own fit, which times its two phases."""
    model.fit(loader)
    return model.fit_seconds["extraction"], model.fit_seconds["subsampling"]


def run_anomalib(root: Path, category: str, pretrained: bool, test_images: int) -> dict:
    """anomalib's PatchCore torch model on the same data, timed phase by phase.

    anomalib's features differ from the paper's (3x3 average pooling, no dimension
    reduction: 1536-d for WideResNet50), so its coverage radius is in its own space.
    """
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    preprocessing = PreprocessingConfig(256, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="wide_resnet50_2",
                           pre_trained=pretrained, num_neighbors=9)  # fmt: skip
    train = ImageDataset(list_samples(root, category, "train"), preprocessing)
    loader = torch.utils.data.DataLoader(train, batch_size=8, num_workers=1)
    model.train()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            model((batch["image"] - mean) / std)
    extracted = time.perf_counter()
    model.subsample_embedding(0.1)
    coreset_done = time.perf_counter()
    model.eval()
    items = _test_items(root, category, preprocessing, test_images)
    with torch.no_grad():
        model((items[0]["image"][None] - mean) / std)
        begin = time.perf_counter()
        outputs = [model((item["image"][None] - mean) / std) for item in items]
        infer_s = (time.perf_counter() - begin) / len(items)
    metrics = compute_metrics(
        torch.cat([o.pred_score.flatten() for o in outputs]),
        torch.tensor([item["is_anomaly"] for item in items]),
        torch.cat([o.anomaly_map.reshape(1, 224, 224) for o in outputs]),
        torch.stack([item["mask"][0] > 0.5 for item in items]),
    )
    return _figures("anomalib", len(train), extracted - start, coreset_done - extracted,
                    infer_s, float("nan"), len(model.memory_bank), metrics)  # fmt: skip


def _test_items(root: Path, category: str, preprocessing, count: int) -> list[dict]:
    samples = list_samples(root, category, "test")
    step = max(1, len(samples) // count)
    test = ImageDataset(samples[::step][:count], preprocessing)
    return [test[i] for i in range(len(test))]


def _figures(variant, train_images, extract_s, coreset_s, infer_s, radius, bank, metrics) -> dict:
    return {
        "variant": variant, "train_images": train_images, "extract_s": extract_s,
        "coreset_s": coreset_s, "fit_s": extract_s + coreset_s, "infer_ms": infer_s * 1e3,
        "images_per_s": 1.0 / infer_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "coverage_radius": radius, "bank": int(bank),
        "image_auroc": metrics["instance_auroc"], "pixel_auroc": metrics["full_pixel_auroc"],
    }  # fmt: skip


def coverage_radius(model: PatchCore, train: ImageDataset) -> float:
    """Largest distance from the features of the first COVERAGE_IMAGES training images
    to the memory bank, in the full feature space."""
    subset = torch.utils.data.Subset(train, range(min(COVERAGE_IMAGES, len(train))))
    loader = torch.utils.data.DataLoader(subset, batch_size=8)
    features = torch.cat([model.embed(batch["image"])[0] for batch in loader])
    squared, _ = model.index.search(features, 1)
    return float(squared.max().sqrt())


def run_variant(variant: str, data_root: str, category: str, backbone: str, pretrained: bool,
                test_images: int) -> dict:  # fmt: skip
    """One measurement, in this process; returns the figures as a dict."""
    preprocessing = PreprocessingConfig(256, 224)
    layers = (
        ("_blocks.4", "_blocks.10") if backbone == "efficientnet_lite0" else ("layer2", "layer3")
    )
    config = PatchCoreConfig(
        backbone_name=backbone, layers=layers, pretrained=pretrained,
        preprocessing=preprocessing, sampler=SamplerConfig("approx_greedy_coreset", 0.1),
    )  # fmt: skip
    root = Path(data_root)
    train = ImageDataset(list_samples(root, category, "train"), preprocessing)
    loader = torch.utils.data.DataLoader(train, batch_size=8, num_workers=1)
    model = PatchCore(config)
    fit = baseline_fit if variant == "baseline" else library_fit
    extract_s, coreset_s = fit(model, loader)
    items = _test_items(root, category, preprocessing, test_images)
    model.predict(items[0]["image"][None])  # warm-up
    start = time.perf_counter()
    predictions = [model.predict(item["image"][None]) for item in items]
    infer_s = (time.perf_counter() - start) / len(items)
    metrics = compute_metrics(
        torch.cat([p.scores for p in predictions]),
        torch.tensor([item["is_anomaly"] for item in items]),
        torch.cat([p.maps for p in predictions]),
        torch.stack([item["mask"][0] > 0.5 for item in items]),
    )
    radius = coverage_radius(model, train)
    return _figures(variant, len(train), extract_s, coreset_s, infer_s, radius,
                    len(model.memory_bank), metrics)  # fmt: skip


def measure_in_subprocess(variant: str, root: Path, category: str, args) -> dict:
    command = [
        sys.executable, __file__, "--worker", variant, str(root), category,
        "--backbone", args.backbone, "--test-images", str(args.test_images),
    ] + (["--pretrained"] if args.pretrained else [])  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    columns = [
        ("data", "{data}"), ("train", "{train_images}"), ("variant", "{variant}"),
        ("extract s", "{extract_s:.1f}"), ("coreset s", "{coreset_s:.1f}"),
        ("fit s", "{fit_s:.1f}"), ("fit x", "{fit_speedup:.2f}"),
        ("coreset x", "{coreset_speedup:.2f}"), ("infer ms", "{infer_ms:.0f}"),
        ("img/s", "{images_per_s:.2f}"), ("peak GiB", "{peak_rss_gib:.2f}"),
        ("mem x", "{memory_ratio:.2f}"), ("radius", "{coverage_radius:.4g}"),
        ("radius x", "{radius_ratio:.4f}"), ("img AUROC", "{image_auroc:.3f}"),
        ("px AUROC", "{pixel_auroc:.3f}"),
    ]  # fmt: skip
    return tables.format_table(columns, rows)


def with_ratios(baseline: dict, row: dict) -> dict:
    return {
        **row,
        "fit_speedup": baseline["fit_s"] / row["fit_s"],
        "coreset_speedup": baseline["coreset_s"] / row["coreset_s"],
        "memory_ratio": row["peak_rss_gib"] / baseline["peak_rss_gib"],
        "radius_ratio": row["coverage_radius"] / baseline["coverage_radius"],  # NaN: anomalib
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[50, 100, 200])
    parser.add_argument("--backbone", default="wideresnet50")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument("--real", nargs=2, metavar=("ROOT", "CATEGORY"))
    parser.add_argument("--anomalib-sizes", type=int, nargs="*", default=[50],
                        help="sizes at which anomalib is measured (its coreset is slow)")  # fmt: skip
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help="default: baseline and patchcore, plus anomalib when installed",
    )
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "ROOT", "CATEGORY"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.variants is None:
        with_anomalib = importlib.util.find_spec("anomalib") is not None
        args.variants = list(VARIANTS) if with_anomalib else list(VARIANTS[:2])
        if not with_anomalib:
            print("anomalib is not installed: its PatchCore is not measured", flush=True)
    if args.worker:
        configure_process(CommonOptions())  # the same process set-up as the commands
        variant, root, category = args.worker
        if variant == "anomalib":
            result = run_anomalib(Path(root), category, args.pretrained, args.test_images)
        else:
            result = run_variant(variant, root, category, args.backbone, args.pretrained,
                                 args.test_images)  # fmt: skip
        print(json.dumps(result))
        return
    datasets = []
    with tempfile.TemporaryDirectory() as temporary:
        for size in args.sizes:
            spec = SyntheticSpec(num_train=size, num_test_good=10, num_test_defective_per_type=4)
            generate_category(Path(temporary) / f"n{size}", "texture", spec)
            datasets.append(("synthetic", Path(temporary) / f"n{size}", "texture", size))
        if args.real:
            datasets.append((args.real[1], Path(args.real[0]), args.real[1], None))
        rows = []
        for name, root, category, size in datasets:
            variants = [v for v in args.variants if v != "anomalib" or size in args.anomalib_sizes]
            measured = {v: measure_in_subprocess(v, root, category, args) for v in variants}
            reference = measured.get("baseline", next(iter(measured.values())))
            for row in measured.values():
                rows.append({"data": name, **with_ratios(reference, row)})
                print(format_table(rows), flush=True)
                print()
    import platform

    cores = torch.get_num_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} torch threads, "
          f"torch {torch.__version__}, backbone {args.backbone} "
          f"({'pretrained' if args.pretrained else 'random'} weights)")  # fmt: skip


if __name__ == "__main__":
    main()
