#!/usr/bin/env python
"""Fit and inference benchmark: this implementation against a reference-structured baseline.

    python bench/bench_patchcore.py [--sizes 50 100 200] [--backbone wideresnet50]
        [--real ROOT CATEGORY] [--real-backbone efficientnet_lite0]
        [--real-percentages 0.01 0.1] [--baseline-iterations N] [--test-images 20]

Rows: synthetic MVTec-layout texture categories of `--sizes` training images (10 % coreset,
random backbone weights: timings do not depend on them), and with `--real` a real category
at each of `--real-percentages` with the pretrained `--real-backbone` (hard data: textured
surfaces whose features prune poorly). Each variant runs in its own process, so its peak
memory is its own:

- `baseline`: the reference implementation's structure, built from this library's pieces.
  The backbone runs its own layers in torch's default NCHW layout, as the reference's does
  (this library runs it channels-last, BatchNorm folded into the convolutions). Fit: every training feature concatenated in float32, projected,
  and the approximate greedy coreset as the reference loops it (each iteration recomputes
  all squared norms with batched products, takes square-rooted distances to the new point,
  concatenates them to the running minima and takes the minimum). Inference: backbone; the
  reference's aggregation (deeper layers' unfolded neighbourhoods bilinearly resized before
  pooling); FAISS IndexFlatL2 through numpy; maps upsampled in torch and smoothed per map with
  scipy.ndimage.gaussian_filter on numpy arrays. With `--baseline-iterations N` its coreset
  loop is timed on its first N iterations only and extrapolated (every iteration does the
  same work), and its bank is then the exact selection (marked `~` in the table).
  The baseline process also times the plain sweep (`farthest_point_selection`: one exact
  pass over all projected features per iteration, compiled, both cores) on the same
  features for `SWEEP_ITERATIONS` iterations and extrapolates it: `sweep x` is that time
  over the row's coreset time.
- `patchcore`: this library's default path (`PatchCore.fit` / `predict`).
- `whole-image` (real rows only): the same with `crop="none"`, the whole image with its
  shorter side resized to 256 and its aspect ratio kept: the cost of inspecting whole images
  instead of the centre 224 x 224 (its ratios are still against the cropped baseline).
- `anomalib` (when installed, synthetic rows of `--anomalib-sizes` only).

Printed per row: feature extraction, coreset and fit seconds, inference ms per image
(batch 1, after one warm-up image; for the baseline and this library's variants measured
afresh in one more process, `paired_inference`: alternating rounds over the same test
images, the best round of each, so that the machine's drift between processes does not
enter the ratio), peak RSS of the process, fit memory (the peak RSS reached by the end of fit
minus the RSS just before it: what fitting adds to the process, whose torch libraries and
backbone alone take about 1.0 to 1.2 GiB), coverage radius (largest distance from a
feature of the first 16 training images to its nearest bank feature), image and pixel
AUROC, and ratios against the baseline measured in the same run (`infer x` is this row's
time over the baseline's: lower is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tables
import torch
import torch.nn.functional as F

from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import (
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    default_layers,
)
from patchcore.data.datasets import ImageDataset, SizeGroupedBatchSampler, list_samples
from patchcore.data.synthetic import SyntheticSpec, generate_category
from patchcore.evaluation.metrics import compute_metrics
from patchcore.model.features import patch_grid_size
from patchcore.model.patchcore import PatchCore
from patchcore.model.samplers import (
    build_sampler,
    farthest_point_selection,
    pruned_farthest_point_selection,
)
from patchcore.model.search import FaissNearestNeighbours

VARIANTS = ("baseline", "patchcore", "whole-image", "anomalib")
COVERAGE_IMAGES = 16
SWEEP_ITERATIONS = 30
BATCH_SIZE = 8


# ---------------------------------------------------------------- reference structure
def reference_coreset(projected: torch.Tensor, sampler, count: int, iterations: int):
    """The reference's approximate greedy loop: each iteration recomputes all squared norms
    with batched products, takes square-rooted distances to the new point, concatenates
    them to the running minima and takes the minimum. Runs `iterations` of `count`
    iterations; returns (seconds extrapolated to `count`, the selection if complete)."""

    def distances(matrix_a, matrix_b):
        a_times_a = matrix_a.unsqueeze(1).bmm(matrix_a.unsqueeze(2)).reshape(-1, 1)
        b_times_b = matrix_b.unsqueeze(1).bmm(matrix_b.unsqueeze(2)).reshape(1, -1)
        a_times_b = matrix_a.mm(matrix_b.T)
        return (-2 * a_times_b + a_times_a + b_times_b).clamp(0, None).sqrt()

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(sampler.seed + 1)
    starts = torch.randperm(len(projected), generator=generator)[: sampler.num_starting_points]
    minimum = distances(projected, projected[starts]).mean(dim=-1).reshape(-1, 1)
    selected = []
    for _ in range(iterations):
        index = torch.argmax(minimum).item()
        selected.append(index)
        new = distances(projected, projected[index : index + 1])
        minimum = torch.min(torch.cat([minimum, new], dim=-1), dim=1).values.reshape(-1, 1)
    seconds = (time.perf_counter() - start) * count / max(1, iterations)
    return seconds, (torch.tensor(selected) if iterations == count else None)


def plain_sweep_seconds(projected: torch.Tensor, sampler, count: int) -> float:
    """The plain sweep on these features, timed over SWEEP_ITERATIONS and extrapolated."""
    norms = projected.square().sum(dim=1)
    minimum = sampler._starting_squared_distances(projected, norms)
    iterations = min(count, SWEEP_ITERATIONS)
    farthest_point_selection(projected, norms, minimum.clone(), 2)  # warm-up
    start = time.perf_counter()
    farthest_point_selection(projected, norms, minimum, iterations)
    return (time.perf_counter() - start) * count / iterations


def baseline_fit(model: PatchCore, loader, iterations: int | None) -> dict:
    """Reference-structured fit (see the module docstring); returns its figures."""
    start = time.perf_counter()
    features = torch.cat([model.embed(batch["image"])[0] for batch in loader])
    extracted = time.perf_counter()
    sampler = build_sampler(model.config.sampler, model.reference_projection_state())
    projected = sampler.project(features)
    count = sampler.num_samples(len(projected))
    projected_s = time.perf_counter() - extracted
    capped = iterations is not None and iterations < count
    loop_s, selected = reference_coreset(projected, sampler, count,
                                         iterations if capped else count)  # fmt: skip
    if selected is None:  # capped: the bank of the exact selection (the same algorithm)
        norms = projected.square().sum(dim=1)
        starts = sampler._starting_squared_distances(projected, norms)
        selected = pruned_farthest_point_selection(projected, norms, starts, count)
    gather_start = time.perf_counter()
    model.set_memory_bank(features[selected])
    gather_s = time.perf_counter() - gather_start
    return {
        "extract_s": extracted - start,
        "coreset_s": projected_s + loop_s + gather_s,
        "estimated": capped,
        "sweep_s": plain_sweep_seconds(projected, sampler, count),
    }


class ReferenceStructuredScorer:
    """The reference implementation's inference structure around this library's backbone
    and memory bank (see the module docstring)."""

    def __init__(self, model: PatchCore) -> None:
        self.model = model
        self.config = model.config
        self.index = FaissNearestNeighbours(num_workers=torch.get_num_threads())
        self.index.fit(model.memory_bank)

    def _aggregate(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        """Unfold every layer; resize the deeper layers' unfolded neighbourhoods to the first
        layer's grid; pool each layer to the pretrain dimension, then all to the target."""
        patchsize, stride = self.config.patchsize, self.config.patchstride
        padding = (patchsize - 1) // 2
        patches, grids = [], []
        for feature_map in feature_maps:
            unfolded = F.unfold(feature_map, patchsize, padding=padding, stride=stride)
            grids.append([patch_grid_size(s, patchsize, stride) for s in feature_map.shape[-2:]])
            unfolded = unfolded.reshape(*feature_map.shape[:2], patchsize, patchsize, -1)
            patches.append(unfolded.permute(0, 4, 1, 2, 3))  # [B, h*w, C, p, p]
        grid = tuple(grids[0])
        for layer in range(1, len(patches)):
            batch, _, channels = patches[layer].shape[:3]
            resized = patches[layer].reshape(batch, *grids[layer], channels, patchsize, patchsize)
            resized = resized.permute(0, 3, 4, 5, 1, 2).reshape(-1, *grids[layer])
            resized = F.interpolate(resized.unsqueeze(1), size=grid, mode="bilinear",
                                    align_corners=False).squeeze(1)  # fmt: skip
            resized = resized.reshape(batch, channels, patchsize, patchsize, *grid)
            patches[layer] = resized.permute(0, 4, 5, 1, 2, 3).reshape(
                batch, -1, channels, patchsize, patchsize
            )
        pooled = torch.stack([
            F.adaptive_avg_pool1d(p.reshape(-1, 1, p[0, 0].numel()),
                                  self.config.pretrain_embed_dimension).squeeze(1)
            for p in patches
        ], dim=1)  # fmt: skip
        features = F.adaptive_avg_pool1d(pooled.reshape(len(pooled), 1, -1),
                                         self.config.target_embed_dimension)  # fmt: skip
        return features.reshape(len(features), -1), grid

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from scipy import ndimage

        features, grid = self._aggregate(self.model.embedder.extractor(images.float()))
        query = np.ascontiguousarray(features.cpu().numpy())
        distances, _ = self.index.index.search(query, self.config.num_nn)
        patch_scores = np.mean(distances, axis=-1).reshape(len(images), -1)
        maps = F.interpolate(torch.from_numpy(patch_scores.reshape(len(images), 1, *grid)),
                             size=tuple(images.shape[-2:]), mode="bilinear",
                             align_corners=False).squeeze(1).numpy()  # fmt: skip
        maps = np.stack([ndimage.gaussian_filter(single, sigma=4) for single in maps])
        return patch_scores.max(axis=1), maps


# ----------------------------------------------------------------------- measurement
def variant_config(args, variant: str, percentage: float) -> PatchCoreConfig:
    """The model configuration a variant measures."""
    crop = "none" if variant == "whole-image" else "center"
    return PatchCoreConfig(
        backbone_name=args.backbone, layers=default_layers(args.backbone),
        pretrained=args.pretrained,
        preprocessing=PreprocessingConfig(256, 224, crop=crop),
        sampler=SamplerConfig("approx_greedy_coreset", percentage),
    )  # fmt: skip


def run_variant(args, variant: str, root: str, category: str, percentage: float) -> dict:
    """One measurement, in this process; returns the figures as a dict. With `--bank-dir`,
    the fitted memory bank is saved there for `paired_inference`."""
    config = variant_config(args, variant, percentage)
    preprocessing = config.preprocessing
    root_path = Path(root)
    train = ImageDataset(list_samples(root_path, category, "train"), preprocessing)
    loader = size_grouped_loader(train, num_workers=1)
    model = PatchCore(config)
    figures = {"variant": variant, "train_images": len(train), "percentage": percentage,
               "sweep_s": math.nan}  # fmt: skip
    resident_before_fit = resident_gib()
    if variant == "baseline":
        # the reference's: the network's own layers, NCHW
        model.embedder.extractor.use_runtime("torch-unfolded")
        model.embedder.extractor.use_memory_format(torch.contiguous_format)
        figures.update(baseline_fit(model, loader, args.baseline_iterations))
        predict = ReferenceStructuredScorer(model).predict
    else:
        model.fit(loader)
        figures.update(extract_s=model.fit_seconds["extraction"],
                       coreset_s=model.fit_seconds["subsampling"], estimated=False)  # fmt: skip

        def predict(image):
            prediction = model.predict(image)
            return prediction.scores.numpy(), prediction.maps.numpy()

    figures["fit_memory_gib"] = peak_resident_gib() - resident_before_fit
    if args.bank_dir and variant != "baseline":
        torch.save(model.memory_bank.detach().cpu(), Path(args.bank_dir) / f"{variant}.pt")

    items = _test_items(root_path, category, preprocessing, args.test_images)
    predict(items[0]["image"][None])  # warm-up
    start = time.perf_counter()
    outputs = [predict(item["image"][None]) for item in items]
    infer_s = (time.perf_counter() - start) / len(items)
    metrics = compute_metrics(  # maps and masks as lists: whole images differ in size
        torch.from_numpy(np.concatenate([scores for scores, _ in outputs])),
        torch.tensor([item["is_anomaly"] for item in items]),
        [torch.from_numpy(maps[0]) for _, maps in outputs],
        [item["mask"][0] > 0.5 for item in items],
    )
    return _figures(figures, infer_s, coverage_radius(model, train), len(model.memory_bank),
                    metrics)  # fmt: skip


PAIRED_ROUNDS = 3


def paired_inference(args, root: str, category: str, percentage: float) -> dict:
    """Inference ms per image of the baseline and of this library's variants in one process,
    in alternating rounds over the same test images; the best round of each. Timings taken
    in separate processes minutes apart drift with the machine (the same backbone call moved
    between 75 and 95 ms here); interleaved, both sides see the same machine. The baseline
    scores with the `patchcore` bank, which is its own selection (equal radii and AUROCs in
    the table)."""
    bank_dir = Path(args.bank_dir)
    predictors = {}
    for variant in ("patchcore", "whole-image"):
        if not (bank_dir / f"{variant}.pt").is_file():
            continue
        model = PatchCore(variant_config(args, variant, percentage))
        model.set_memory_bank(torch.load(bank_dir / f"{variant}.pt"))
        predictors[variant] = (model.predict, model.config.preprocessing)
        if variant == "patchcore":
            reference = PatchCore(model.config)
            reference.embedder.extractor.use_runtime("torch-unfolded")
            reference.embedder.extractor.use_memory_format(torch.contiguous_format)
            reference.set_memory_bank(model.memory_bank)
            predictors["baseline"] = (ReferenceStructuredScorer(reference).predict,
                                      model.config.preprocessing)  # fmt: skip
    images = {
        variant: [item["image"][None]
                  for item in _test_items(Path(root), category, preprocessing, args.test_images)]
        for variant, (_, preprocessing) in predictors.items()
    }  # fmt: skip
    best = dict.fromkeys(predictors, math.inf)
    for variant, (predict, _) in predictors.items():
        predict(images[variant][0])  # warm-up
    for _ in range(PAIRED_ROUNDS):
        for variant, (predict, _) in predictors.items():
            start = time.perf_counter()
            for image in images[variant]:
                predict(image)
            best[variant] = min(best[variant], (time.perf_counter() - start) / len(images[variant]))
    return {variant: seconds * 1e3 for variant, seconds in best.items()}


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
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH_SIZE, num_workers=1)
    model.train()
    resident_before_fit = resident_gib()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            model((batch["image"] - mean) / std)
    extracted = time.perf_counter()
    model.subsample_embedding(0.1)
    coreset_done = time.perf_counter()
    fit_memory_gib = peak_resident_gib() - resident_before_fit
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
    figures = {"variant": "anomalib", "train_images": len(train), "percentage": 0.1,
               "extract_s": extracted - start, "coreset_s": coreset_done - extracted,
               "estimated": False, "sweep_s": math.nan,
               "fit_memory_gib": fit_memory_gib}  # fmt: skip
    return _figures(figures, infer_s, math.nan, len(model.memory_bank), metrics)


def resident_gib() -> float:
    """This process's resident memory now (VmRSS), GiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 2**20


def peak_resident_gib() -> float:
    """This process's peak resident memory so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _figures(figures: dict, infer_s: float, radius: float, bank: int, metrics: dict) -> dict:
    return {
        **figures, "fit_s": figures["extract_s"] + figures["coreset_s"],
        "infer_ms": infer_s * 1e3,
        "peak_rss_gib": peak_resident_gib(),
        "coverage_radius": radius, "bank": int(bank),
        "image_auroc": metrics["instance_auroc"], "pixel_auroc": metrics["full_pixel_auroc"],
    }  # fmt: skip


def coverage_radius(model: PatchCore, train: ImageDataset) -> float:
    """Largest distance from the features of the first COVERAGE_IMAGES training images
    to the memory bank, in the full feature space."""
    loader = size_grouped_loader(train, COVERAGE_IMAGES)
    features = torch.cat([model.embed(batch["image"])[0] for batch in loader])
    squared, _ = model.index.search(features, 1)
    return float(squared.max().sqrt())


def size_grouped_loader(
    dataset: ImageDataset, count: int | None = None, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """The first `count` images (all by default) in batches of BATCH_SIZE images of one
    working size (whole images differ in size)."""
    sizes = dataset.working_sizes()[:count]
    subset = torch.utils.data.Subset(dataset, range(len(sizes)))
    return torch.utils.data.DataLoader(
        subset, batch_sampler=SizeGroupedBatchSampler(sizes, BATCH_SIZE), num_workers=num_workers
    )


def _test_items(root: Path, category: str, preprocessing, count: int) -> list[dict]:
    samples = list_samples(root, category, "test")
    step = max(1, len(samples) // count)
    test = ImageDataset(samples[::step][:count], preprocessing)
    return [test[i] for i in range(len(test))]


# ------------------------------------------------------------------------- the table
def measure_in_subprocess(variant: str, dataset: dict, args, bank_dir: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", variant, str(dataset["root"]),
        dataset["category"], str(dataset["percentage"]), "--backbone", dataset["backbone"],
        "--test-images", str(args.test_images), "--bank-dir", bank_dir,
    ] + (["--pretrained"] if dataset["pretrained"] else []) + (
        ["--baseline-iterations", str(args.baseline_iterations)]
        if args.baseline_iterations else []
    )  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


COLUMNS = [
    ("data", "{data}"), ("train", "{train_images}"), ("%", "{percentage:.0%}"),
    ("variant", "{variant}"), ("extract s", "{extract_s:.1f}"), ("coreset s", "{coreset}"),
    ("coreset x", "{coreset_speedup}"), ("sweep x", "{sweep_speedup}"),
    ("fit s", "{fit}"), ("infer ms", "{infer_ms:.0f}"), ("infer x", "{infer_ratio:.2f}"),
    ("peak GiB", "{peak_rss_gib:.2f}"), ("mem x", "{memory_ratio:.2f}"),
    ("fit GiB", "{fit_memory_gib:.2f}"), ("fit mem x", "{fit_memory_ratio:.2f}"),
    ("radius", "{coverage_radius:.4g}"), ("radius x", "{radius_ratio:.4f}"),
    ("img AUROC", "{image_auroc:.3f}"), ("px AUROC", "{pixel_auroc:.3f}"),
]  # fmt: skip


def format_table(rows: list[dict]) -> str:
    return tables.format_table(COLUMNS, rows)


def with_ratios(baseline: dict, row: dict) -> dict:
    """Ratios against the baseline of the same data; `~` marks extrapolated times."""
    mark = "~" if baseline["estimated"] else ""
    own_mark = "~" if row["estimated"] else ""
    speedup = baseline["coreset_s"] / row["coreset_s"]
    return {
        **row,
        "coreset": f"{own_mark}{row['coreset_s']:.1f}", "fit": f"{own_mark}{row['fit_s']:.1f}",
        "coreset_speedup": f"{mark}{speedup:.1f}",
        "sweep_speedup": f"~{baseline['sweep_s'] / row['coreset_s']:.1f}",
        "infer_ratio": row["infer_ms"] / baseline["infer_ms"],
        "memory_ratio": row["peak_rss_gib"] / baseline["peak_rss_gib"],
        "fit_memory_ratio": row["fit_memory_gib"] / baseline["fit_memory_gib"],
        "radius_ratio": row["coverage_radius"] / baseline["coverage_radius"],  # NaN: anomalib
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[50, 100, 200],
        help="synthetic categories' training-set sizes (10 %% coreset)",
    )
    parser.add_argument("--backbone", default="wideresnet50", help="backbone of synthetic rows")
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help="pretrained weights for the synthetic rows (random otherwise)",
    )
    parser.add_argument(
        "--real",
        nargs=2,
        metavar=("ROOT", "CATEGORY"),
        help="a real MVTec-layout category, e.g. ../shared/datasets magnetic_tile",
    )
    parser.add_argument(
        "--real-backbone",
        default="efficientnet_lite0",
        help="backbone of the real rows (pretrained weights)",
    )
    parser.add_argument("--real-percentages", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument(
        "--baseline-iterations",
        type=int,
        help="time only this many iterations of the baseline's coreset loop "
        "and extrapolate (marked ~)",
    )
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument(
        "--anomalib-sizes",
        type=int,
        nargs="*",
        default=[50],
        help="sizes at which anomalib is measured (its coreset is slow)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help="default: baseline and patchcore, plus anomalib when installed",
    )
    parser.add_argument("--worker", nargs=4, metavar=("VARIANT", "ROOT", "CATEGORY", "PCT"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--bank-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        configure_process(CommonOptions())  # the same process set-up as the commands
        variant, root, category, percentage = args.worker
        if variant == "anomalib":
            result = run_anomalib(Path(root), category, args.pretrained, args.test_images)
        elif variant == "paired":
            result = paired_inference(args, root, category, float(percentage))
        else:
            result = run_variant(args, variant, root, category, float(percentage))
        print(json.dumps(result))
        return
    if args.variants is None:
        with_anomalib = importlib.util.find_spec("anomalib") is not None
        args.variants = [v for v in VARIANTS if v != "anomalib" or with_anomalib]
        if not with_anomalib:
            print("anomalib is not installed: its PatchCore is not measured", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        datasets = []
        for size in args.sizes:
            spec = SyntheticSpec(num_train=size, num_test_good=10, num_test_defective_per_type=4)
            generate_category(Path(temporary) / f"n{size}", "texture", spec)
            datasets.append(
                {
                    "data": "synthetic",
                    "root": Path(temporary) / f"n{size}",
                    "category": "texture",
                    "percentage": 0.1,
                    "size": size,
                    "backbone": args.backbone,
                    "pretrained": args.pretrained,
                }
            )
        for percentage in args.real_percentages if args.real else []:
            datasets.append(
                {
                    "data": args.real[1],
                    "root": Path(args.real[0]),
                    "category": args.real[1],
                    "percentage": percentage,
                    "size": None,
                    "backbone": args.real_backbone,
                    "pretrained": True,
                }
            )
        for dataset in datasets:
            variants = [
                v
                for v in args.variants
                if (v != "anomalib" or dataset["size"] in args.anomalib_sizes)
                and (v != "whole-image" or dataset["size"] is None)
            ]
            with tempfile.TemporaryDirectory() as bank_dir:
                measured = {v: measure_in_subprocess(v, dataset, args, bank_dir)
                            for v in variants}  # fmt: skip
                if "baseline" in measured and "patchcore" in measured:
                    paired = measure_in_subprocess("paired", dataset, args, bank_dir)
                    for variant, milliseconds in paired.items():
                        measured[variant]["infer_ms"] = milliseconds
            reference = measured.get("baseline", next(iter(measured.values())))
            for row in measured.values():
                rows.append({"data": dataset["data"], **with_ratios(reference, row)})
            print(format_table(rows), flush=True)
            print(flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}; synthetic rows: {args.backbone} "
          f"({'pretrained' if args.pretrained else 'random'} weights); real rows: "
          f"{args.real_backbone} (pretrained weights)")  # fmt: skip


if __name__ == "__main__":
    main()
