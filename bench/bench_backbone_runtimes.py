#!/usr/bin/env python
"""Ways to run the same backbone on a CPU, in process: time per image and what they change.

    python bench/bench_backbone_runtimes.py ROOT CATEGORY [--backbone efficientnet_lite0]
        [--train-images 100] [--test-images 20] [--rounds 3] [--runtimes ...]

One process. A model is fitted with this library's default path (eager torch, channels-last,
BatchNorm folded) on the first `--train-images` training images of the category (10 %
coreset), then each runtime runs the backbone part (normalisation and the traced graph up
to the last extracted layer; aggregation, search and maps stay the library's) on
`--test-images` test images:

- `eager-nchw`: eager torch over the network's own layers in torch's default NCHW layout
  (the reference's);
- `eager-cl` (`--backbone_runtime torch-unfolded`): the same, channels-last;
- `eager-folded` (`--backbone_runtime torch`, the default): eager torch channels-last with
  BatchNorm folded into the convolutions (`patchcore.model.folding`);
- `compile`: `torch.compile` (inductor, `dynamic=False`) of the channels-last extractor;
  the first call of each shape compiles (the `build s` column);
- `jit-onednn` (`--backbone_runtime torchscript`): `torch.jit.trace` + `torch.jit.freeze`
  with `torch.jit.enable_onednn_fusion` (oneDNN graph fusion), channels-last inputs;
- `openvino`: the backbone part converted in process (`torch.export` with a dynamic batch,
  then `openvino.convert_model` of the exported program) and compiled for the CPU at f32
  precision (`INFERENCE_PRECISION_HINT=f32`), torch's thread count; measured only, not a
  `--backbone_runtime` (see `patchcore.model.features.CompiledBackbone`);
- `openvino-bf16` (where the CPU has bfloat16 instructions): the same at bf16 precision.

Per runtime: build (conversion/compilation) seconds, the backbone's forward ms per image at
batch 1 and at the fit batch (FIT_IMAGES_AT_ONCE), whole `predict` ms per image at batch 1,
each the best of `--rounds` alternating rounds over the same images (every runtime sees the
same machine), the ratio of each against `eager-nchw` measured in the same run, the largest
relative difference of the layer maps, patch features and image scores against `eager-nchw`
(max |a - b| / max |b| over the test images), and the resident memory the runtime added
(RSS after its build and first calls minus before). The last line gives the CPU class.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
import time
from pathlib import Path

import tables
import torch

from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig, default_layers
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.model.features import FeatureExtractor, LayerMaps
from patchcore.model.patchcore import FIT_IMAGES_AT_ONCE, PatchCore

RUNTIMES = ("eager-nchw", "eager-cl", "eager-folded", "compile", "jit-onednn", "openvino",
            "openvino-bf16")  # fmt: skip


def resident_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 2**20


def peak_resident_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _Runner(torch.nn.Module):
    """A runtime in the extractor's place inside a model's embedder."""

    def __init__(self, runner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.runner(images)


# --backbone_runtime
LIBRARY_RUNTIMES = {"eager-cl": "torch-unfolded", "eager-folded": "torch",
                    "jit-onednn": "torchscript"}  # fmt: skip


def openvino_backbone(extractor: FeatureExtractor, precision: str):
    """The extractor's backbone part (normalisation included) compiled by OpenVINO's CPU
    runtime at `precision`, for inputs of any batch and the size of its first call."""
    import openvino

    extractor.use_memory_format(torch.contiguous_format)
    module = LayerMaps(extractor.graph, extractor.layers).eval()
    built: dict[tuple[int, ...], object] = {}

    def build(shape: tuple[int, ...]):
        example = torch.zeros(2, *shape[1:])
        with torch.no_grad():
            program = torch.export.export(module, (example,), dynamic_shapes={
                "images": {0: torch.export.Dim("batch", min=1)}})  # fmt: skip
        compiled = openvino.Core().compile_model(
            openvino.convert_model(program), "CPU",
            {"INFERENCE_PRECISION_HINT": precision,
             "INFERENCE_NUM_THREADS": torch.get_num_threads()},
        )  # fmt: skip
        return compiled, compiled.create_infer_request()

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        shape = tuple(images.shape)
        if shape[1:] not in built:
            built[shape[1:]] = build(shape)
        compiled, request = built[shape[1:]]
        results = request.infer({0: ((images - extractor.mean) / extractor.std).numpy()})
        return [torch.from_numpy(results[output].copy()) for output in compiled.outputs]

    return run


def build_runtime(name: str, extractor: FeatureExtractor):
    """A callable images [B, 3, H, W] in [0, 1] -> list of layer maps, for runtime `name`."""
    if name == "eager-nchw":
        extractor.use_runtime("torch-unfolded")
        extractor.use_memory_format(torch.contiguous_format)
        return extractor
    if name in LIBRARY_RUNTIMES:
        extractor.use_runtime(LIBRARY_RUNTIMES[name])
        return extractor
    if name == "compile":
        compiled = torch.compile(extractor, dynamic=False)
        return lambda images: list(compiled(images))
    if name in ("openvino", "openvino-bf16"):  # measured, not offered
        return openvino_backbone(extractor, "bf16" if name == "openvino-bf16" else "f32")
    raise ValueError(name)


def best_of(rounds: int, runners: dict, function) -> dict:
    """{name: best seconds of `function(runner)` over alternating rounds}."""
    best = dict.fromkeys(runners, math.inf)
    for _ in range(rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            function(runner)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--random-weights", action="store_true",
                        help="random backbone weights (timings do not depend on them)")
    parser.add_argument("--train-images", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    args = parser.parse_args()
    configure_process(CommonOptions())
    threads = torch.get_num_threads()
    flags = tables.cpu_class()
    runtimes = [name for name in args.runtimes
                if name != "openvino-bf16" or "avx512_bf16" in flags or "amx_bf16" in flags]
    preprocessing = PreprocessingConfig(256, 224)
    config = PatchCoreConfig(
        backbone_name=args.backbone, layers=default_layers(args.backbone),
        pretrained=not args.random_weights, preprocessing=preprocessing,
        sampler=SamplerConfig("approx_greedy_coreset", 0.1),
    )  # fmt: skip
    train = ImageDataset(list_samples(args.root, args.category, "train")[: args.train_images],
                         preprocessing)  # fmt: skip
    model = PatchCore(config)
    model.fit([train[i]["image"][None] for i in range(len(train))])
    samples = list_samples(args.root, args.category, "test")
    step = max(1, len(samples) // args.test_images)
    test = ImageDataset(samples[::step][: args.test_images], preprocessing)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    example = images[:FIT_IMAGES_AT_ONCE]

    rows, outputs, runners, predictors = [], {}, {}, {}
    for name in runtimes:
        gc.collect()
        before = resident_gib()
        # a model of its own per runtime (its layout or graph), sharing the fitted bank
        own = PatchCore(config)
        own.set_memory_bank(model.memory_bank)
        start = time.perf_counter()
        try:
            runner = build_runtime(name, own.embedder.extractor)
            with torch.inference_mode():
                runner(images[:1])
                runner(example)
        except Exception as error:  # noqa: BLE001 -- a runtime this machine cannot run: say so
            print(f"{name}: not measured ({type(error).__name__}: {str(error)[:200]})",
                  file=sys.stderr, flush=True)  # fmt: skip
            continue
        build_s = time.perf_counter() - start
        if runner is not own.embedder.extractor:  # the model's predict goes through it
            own.embedder.extractor = _Runner(runner)
        with torch.inference_mode():
            maps = [runner(image[None]) for image in images]
            features = torch.cat([own.embedder.aggregator(m)[0] for m in maps])
            scores = own.predict(images).scores if name.startswith("eager") else torch.cat(
                [own.predict(image[None]).scores for image in images])
        outputs[name] = ([torch.cat([m[i] for m in maps]) for i in range(len(maps[0]))],
                         features, scores)  # fmt: skip
        runners[name], predictors[name] = runner, own.predict
        rows.append({"runtime": name, "build_s": build_s,
                     "added_gib": resident_gib() - before})  # fmt: skip

    with torch.inference_mode():
        single = best_of(args.rounds, runners, lambda run: [run(image[None]) for image in images])
        pairs = best_of(args.rounds, runners,
                        lambda run: [run(part) for part in images.split(FIT_IMAGES_AT_ONCE)])
        predict = best_of(args.rounds, predictors,
                          lambda run: [run(image[None]) for image in images])
    reference_name = "eager-nchw" if "eager-nchw" in outputs else next(iter(outputs))
    reference = outputs[reference_name]
    for row in rows:
        name = row["runtime"]
        maps, features, scores = outputs[name]
        row.update(
            batch1_ms=1e3 * single[name] / len(images),
            fit_ms=1e3 * pairs[name] / len(images),
            predict_ms=1e3 * predict[name] / len(images),
            batch1_x=single[name] / single[reference_name],
            fit_x=pairs[name] / pairs[reference_name],
            predict_x=predict[name] / predict[reference_name],
            maps_rel=max(relative(m, r) for m, r in zip(maps, reference[0], strict=True)),
            features_rel=relative(features, reference[1]),
            scores_rel=relative(scores, reference[2]),
        )
    columns = [
        ("runtime", "{runtime}"), ("build s", "{build_s:.1f}"),
        ("b1 ms/img", "{batch1_ms:.1f}"), ("b1 x", "{batch1_x:.2f}"),
        (f"b{FIT_IMAGES_AT_ONCE} ms/img", "{fit_ms:.1f}"), (f"b{FIT_IMAGES_AT_ONCE} x", "{fit_x:.2f}"),
        ("predict ms/img", "{predict_ms:.1f}"), ("predict x", "{predict_x:.2f}"),
        ("maps rel", "{maps_rel:.1e}"), ("features rel", "{features_rel:.1e}"),
        ("scores rel", "{scores_rel:.1e}"), ("added GiB", "{added_gib:.2f}"),
    ]  # fmt: skip
    print(tables.format_table(columns, rows))
    print(f"{args.backbone} ({'random' if args.random_weights else 'pretrained'} weights), "
          f"{preprocessing.imagesize} px, {len(images)} test images, best of {args.rounds} "
          f"rounds; ratios and differences against {reference_name} in this run; peak RSS "
          f"{peak_resident_gib():.2f} GiB")  # fmt: skip
    print(f"CPU: {flags}; {threads} torch threads; torch {torch.__version__}")


if __name__ == "__main__":
    main()
