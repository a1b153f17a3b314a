#!/usr/bin/env python
"""PatchCore on a GPU: fit and inference figures, with a CPU baseline from the same run.

    python bench/bench_gpu.py [--device cuda] [--images 200] [-p 0.1]
        [--backbone wideresnet50] [--resize 256] [--imagesize 224]
        [--cpu_images 8] [--peak_tflops 67] [--variants fp32 nchw bf16 fp16 compile]
        [--json FILE]
    python bench/bench_gpu.py --smoke --device cpu   # checks this script on any machine

The category is `--images` synthetic images (uniform noise, fixed seed) at the model's
input size, the backbone has random weights (seeded; timings do not depend on the weight
values), the configuration is the reference's IM224 WR50 10 % one (layers 2 and 3,
1024-d features, approximate greedy coreset) with the library's default search. Printed:

1. Fit on `--device`: seconds of extraction, coreset selection and bank (gathering the
   selected rows and building the search index), from `PatchCore.fit_seconds`; peak GPU
   memory (`torch.cuda.max_memory_allocated`) of the fit.
2. Inference images/s at batch 1 and batch 32 on `--device`, and at batch 1 on the CPU
   (`--cpu_images` images, same weights and memory bank: the baseline, and the ratio);
   the largest relative difference of the CPU's image scores from the device's.
3. The search's arithmetic floor: 2 x patches x bank rows x dimension FLOPs per image
   (2 * 784 * M * 1024 at IM224), at `--peak_tflops` (default 67, an H100 SXM's FP32
   rate without tensor cores: torch's float32 matrix products do not use TF32 unless asked),
   against the measured search time per image at batch 1.
4. Backbone variants at batch 32, as options only (the library runs fp32 channels-last with
   BatchNorm folded into the convolutions; the variants run the network's layers as they
   are, `--backbone_runtime torch-unfolded`): NCHW layout, bfloat16 / float16 autocast of the backbone, torch.compile of the backbone;
   images/s against part 2's batch 32 (the library's fp32 channels-last), the largest
   relative image-score difference from its scores, and whether it is within the
   variant's stated tolerance (VARIANT_TOLERANCE).

Each table is printed as soon as its part is done, and `--json` receives every figure so far,
so a run cut short by a time limit keeps what it measured. Nothing here has been run on a GPU
by the authors of this script at the time of writing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import tables
import torch

from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig, default_layers
from patchcore.model.patchcore import PatchCore

# Largest relative image-score difference from fp32 accepted per variant. fp32 is the same
# computation again (1e-5: a GPU may sum in another order from run to run). float32 variants
# differ by summation order only (cuDNN picks other algorithms; TF32 convolutions where torch
# allows them, its default): 1e-2. float16 autocast keeps 11 significant bits, bfloat16 8,
# and a squared distance to a near neighbour amplifies the features' error.
# torch.compile last: its compilation takes longest, so a time limit cuts it first.
VARIANT_TOLERANCE = {"fp32": 1e-5, "nchw": 1e-2, "bf16": 5e-2, "fp16": 2e-2, "compile": 1e-2}
VARIANTS = tuple(VARIANT_TOLERANCE)
DEFAULT_PEAK_TFLOPS = 67.0  # H100 SXM5, FP32 without tensor cores (NVIDIA's datasheet)


class AutocastGraph(torch.nn.Module):
    """The backbone's graph under autocast to `dtype`; its layer maps back in float32, so
    everything after the backbone runs as in the library."""

    def __init__(self, graph: torch.nn.Module, dtype: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.graph = graph
        self.dtype = dtype
        self.device_type = device_type

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device_type, dtype=self.dtype):
            maps = self.graph(images)
        return {name: value.float() for name, value in maps.items()}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu [cuda]")
    parser.add_argument("--images", type=int, default=200, help="training images [200]")
    parser.add_argument("--test_images", type=int, default=64,
                        help="images scored at batch 32 (and per variant) [64]")  # fmt: skip
    parser.add_argument("--batch1_images", type=int, default=20,
                        help="images scored one at a time on --device [20]")  # fmt: skip
    parser.add_argument("--cpu_images", type=int, default=8,
                        help="images scored one at a time on the CPU, the baseline [8]")  # fmt: skip
    parser.add_argument("-p", "--percentage", type=float, default=0.1)
    parser.add_argument("--backbone", default="wideresnet50")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--imagesize", type=int, default=224)
    parser.add_argument("--dimension", type=int, default=1024,
                        help="pretrain and target embedding dimension [1024]")  # fmt: skip
    parser.add_argument("--peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="the device's float32 peak, TFLOP/s, for the search's floor "
                             f"[{DEFAULT_PEAK_TFLOPS:g}: H100 SXM FP32]")  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (resnet18, 64 px, 8 images) to check the script")  # fmt: skip
    arguments = parser.parse_args(argv)
    if arguments.smoke:
        arguments.backbone, arguments.resize, arguments.imagesize = "resnet18", 72, 64
        arguments.dimension, arguments.images, arguments.test_images = 64, 8, 4
        arguments.batch1_images, arguments.cpu_images = 2, 2
    return arguments


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak memory torch allocated on the GPU since `reset_peak`; NaN on the CPU."""
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30


def images_per_second(model: PatchCore, images: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    """Images/s of `model.predict` over `images` in batches of `batch` (one warm-up batch
    first, not timed), and the image scores."""
    model.predict(images[:batch])
    synchronize(model.device)
    start = time.perf_counter()
    scores = [model.predict(part).scores for part in images.split(batch)]
    synchronize(model.device)
    return len(images) / (time.perf_counter() - start), torch.cat(scores)


def search_ms_per_image(model: PatchCore, image: torch.Tensor, repeats: int = 5) -> float:
    """Milliseconds of the bank search for one image's patch features (after a warm-up)."""
    features, _ = model.embed(image)
    model.index.search(features, model.config.num_nn)
    synchronize(model.device)
    start = time.perf_counter()
    for _ in range(repeats):
        model.index.search(features, model.config.num_nn)
    synchronize(model.device)
    return (time.perf_counter() - start) / repeats * 1000


def relative_difference(scores: torch.Tensor, reference: torch.Tensor) -> float:
    return float((scores - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def set_variant(model: PatchCore, variant: str, graph: torch.nn.Module) -> None:
    """Runs `model`'s backbone as `variant` (from the fp32 channels-last `graph`)."""
    extractor = model.embedder.extractor
    extractor.graph = graph
    extractor.use_runtime("torch" if variant == "fp32" else "torch-unfolded")
    extractor.use_memory_format(torch.contiguous_format if variant == "nchw"
                                else torch.channels_last)  # fmt: skip
    if variant in ("bf16", "fp16"):
        dtype = torch.bfloat16 if variant == "bf16" else torch.float16
        extractor.graph = AutocastGraph(graph, dtype, model.device.type)
    elif variant == "compile":
        extractor.graph = torch.compile(graph)


def print_table(title: str, columns, rows) -> None:
    print(f"\n{title}\n{tables.format_table(columns, rows)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    device = torch.device(arguments.device)
    figures: dict = {"arguments": {k: str(v) for k, v in vars(arguments).items()}}

    def save() -> None:
        if arguments.json is not None:
            arguments.json.write_text(json.dumps(figures, indent=2))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    figures["machine"] = {"cpu": tables.cpu_class(), "gpu": gpu, "torch": torch.__version__,
                          "python": platform.python_version(),
                          "cpu_threads": torch.get_num_threads()}  # fmt: skip
    print(f"device {device} ({gpu}); CPU {figures['machine']['cpu']}, {torch.get_num_threads()} "
          f"torch threads; torch {torch.__version__}", flush=True)  # fmt: skip
    config = PatchCoreConfig(
        backbone_name=arguments.backbone, pretrained=False,
        layers=default_layers(arguments.backbone),
        pretrain_embed_dimension=arguments.dimension, target_embed_dimension=arguments.dimension,
        preprocessing=PreprocessingConfig(resize=arguments.resize, imagesize=arguments.imagesize),
        sampler=SamplerConfig(name="approx_greedy_coreset", percentage=arguments.percentage),
    )  # fmt: skip
    side = arguments.imagesize
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(arguments.images, 3, side, side, generator=generator)
    test = torch.rand(max(arguments.test_images, 32), 3, side, side, generator=generator)

    # 1. fit
    model = PatchCore(config, device=device)
    reset_peak(device)
    start = time.perf_counter()
    model.fit(train.split(32))
    synchronize(device)
    fit_total = time.perf_counter() - start
    seconds = model.fit_seconds
    patch_features = model.fit_memory_estimate([(side, side)] * arguments.images).patch_features
    figures["fit"] = {"images": arguments.images, "patch_features": patch_features,
                      "bank_rows": len(model.memory_bank),
                      "extraction_s": seconds["extraction"], "coreset_s": seconds["coreset"],
                      "bank_and_index_s": seconds["bank"], "total_s": fit_total,
                      "peak_gpu_gib": peak_gib(device)}  # fmt: skip
    save()
    print_table(f"Fit on {device}: {arguments.images} images, {arguments.backbone}, "
                f"{arguments.imagesize} px, {arguments.percentage:.0%} coreset", [
        ("patch features", "{patch_features}"), ("bank rows", "{bank_rows}"), ("extraction s", "{extraction_s:.2f}"),
        ("coreset s", "{coreset_s:.2f}"), ("bank+index s", "{bank_and_index_s:.2f}"),
        ("total s", "{total_s:.2f}"), ("peak GPU GiB", "{peak_gpu_gib:.2f}"),
    ], [figures["fit"]])  # fmt: skip

    # 2. inference, against the CPU at batch 1
    reset_peak(device)
    batch1, batch1_scores = images_per_second(model, test[: arguments.batch1_images], 1)
    batch1_peak = peak_gib(device)
    reset_peak(device)
    batch32, reference_scores = images_per_second(model, test[: arguments.test_images], 32)
    batch32_peak = peak_gib(device)
    cpu_model = PatchCore(config, device="cpu")
    cpu_model.set_memory_bank(model.memory_bank.cpu())
    arguments.cpu_images = min(arguments.cpu_images, arguments.batch1_images)
    cpu_batch1, cpu_scores = images_per_second(cpu_model, test[: arguments.cpu_images], 1)
    rows = [
        {"where": "CPU", "batch": 1, "images_per_s": cpu_batch1, "ratio": 1.0, "peak": float("nan"),
         "score_difference": 0.0},
        {"where": str(device), "batch": 1, "images_per_s": batch1, "ratio": batch1 / cpu_batch1,
         "peak": batch1_peak, "score_difference": relative_difference(
             batch1_scores[: arguments.cpu_images], cpu_scores)},
        {"where": str(device), "batch": 32, "images_per_s": batch32, "ratio": batch32 / cpu_batch1,
         "peak": batch32_peak, "score_difference": relative_difference(
             reference_scores[: arguments.cpu_images], cpu_scores)},
    ]  # fmt: skip
    figures["inference"] = rows
    save()
    print_table("Inference (images/s; ratio against the CPU at batch 1; score difference: "
                "largest relative difference of image scores from the CPU's)", [
        ("where", "{where}"), ("batch", "{batch}"), ("images/s", "{images_per_s:.2f}"),
        ("ratio", "{ratio:.1f}x"), ("peak GPU GiB", "{peak:.2f}"),
        ("score difference", "{score_difference:.1e}"),
    ], rows)  # fmt: skip
    del cpu_model

    # 3. the search's arithmetic floor
    features, _ = model.embed(test[:1])
    patches, bank_rows = len(features), len(model.memory_bank)
    flops = 2 * patches * bank_rows * features.shape[1]
    floor_ms = flops / (arguments.peak_tflops * 1e12) * 1000
    measured_ms = search_ms_per_image(model, test[:1])
    figures["search"] = {"patches": patches, "bank_rows": bank_rows,
                         "dimension": int(features.shape[1]), "gflop_per_image": flops / 1e9,
                         "peak_tflops": arguments.peak_tflops, "floor_ms": floor_ms,
                         "measured_ms": measured_ms, "index": type(model.index).__name__}  # fmt: skip
    save()
    print_table(f"Search per image on {device} ({type(model.index).__name__}); floor = "
                f"2 x {patches} x {bank_rows} x {features.shape[1]} FLOPs at "
                f"{arguments.peak_tflops:g} TFLOP/s (--peak_tflops)", [
        ("GFLOP", "{gflop_per_image:.1f}"), ("floor ms", "{floor_ms:.4f}"),
        ("measured ms", "{measured_ms:.3f}"),
    ], [figures["search"]])  # fmt: skip

    # 4. backbone variants at batch 32
    graph = model.embedder.extractor.graph
    variant_rows = []
    for variant in arguments.variants:
        set_variant(model, variant, graph)
        reset_peak(device)
        speed, scores = images_per_second(model, test[: arguments.test_images], 32)
        difference = relative_difference(scores, reference_scores)
        variant_rows.append({
            "variant": variant, "images_per_s": speed, "ratio": speed / batch32,
            "peak": peak_gib(device), "score_difference": difference,
            "tolerance": VARIANT_TOLERANCE[variant],
            "within": "yes" if difference <= VARIANT_TOLERANCE[variant] else "NO",
        })  # fmt: skip
        figures["variants"] = variant_rows
        save()
        print(f"  variant {variant}: {speed:.2f} images/s, score difference {difference:.1e}",
              flush=True)  # fmt: skip
    set_variant(model, "fp32", graph)
    print_table("Backbone variants at batch 32 (ratio against part 2's batch 32, the library's "
                "fp32 channels-last; the fp32 row measures it again; score difference: largest "
                "relative image-score difference from part 2's)", [
        ("variant", "{variant}"), ("images/s", "{images_per_s:.2f}"), ("ratio", "{ratio:.2f}x"),
        ("peak GPU GiB", "{peak:.2f}"), ("score difference", "{score_difference:.1e}"),
        ("tolerance", "{tolerance:.0e}"), ("within", "{within}"),
    ], variant_rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
