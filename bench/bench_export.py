#!/usr/bin/env python
"""Deployment benchmark: one model in torch eager, ONNX Runtime and OpenVINO on this CPU.

    python bench/bench_export.py [--train-images 200] [--backbone wideresnet50] [--pretrained]
                                 [--real ROOT CATEGORY] [--model-dir SAVED_MODEL]
                                 [--input-size 256] [--repeats 5] [--rounds 3] [--threads 2]
                                 [--work-dir FOLDER]

Fits a PatchCore model (IM224: resize 256, crop 224; layer2+layer3, 1024/1024, approximate
greedy coreset 10 %; random backbone weights unless --pretrained, timings do not depend on
them) on the first --train-images training images of a synthetic category (or of --real
ROOT CATEGORY, an MVTec-layout dataset), 10 % of them held out to calibrate the threshold,
or takes --model-dir; exports it with `patchcore-export`'s job in every format, then
measures each variant in its own process (so its peak memory is its own):
- `torch`: the `PatchCoreModule` file (.pth) in torch eager, the baseline of every ratio;
- `onnxruntime`: the ONNX graph (bank searched in chunks of 4096 rows);
- `onnxruntime-1chunk`: the same graph exported with the whole bank as one chunk, the
  [patches x bank] distance matrix materialised at once (how other exports do it);
- `openvino-fp32`, `openvino-fp16`: OpenVINO IR with FP32 / FP16 weights, computing in f32;
- `openvino-bf16`: the FP32 IR at OpenVINO's default precision on CPUs with bfloat16 units
  (computing in bfloat16), for comparison only: patchcore compiles with f32.
The ONNX Runtime and OpenVINO workers import neither torch nor patchcore: their memory is
what a deployment without PyTorch needs.

Variants are measured in --rounds rounds, each running every variant once, in turn (so a
change in the machine's load affects all of them alike); a figure is the median over rounds
of the medians over --repeats calls. Every runtime uses --threads threads.

Printed per variant: file size, load (and compile) seconds, latency at batch 1, throughput
at batch 8, peak RSS, the ratios against torch, and the accuracy on 8 test images against
torch: largest relative score difference, largest map difference relative to the largest
map value, and how many accept/reject decisions agree. --work-dir keeps the model and its
exports there and reuses them in a later run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tables

VARIANTS = (
    "torch", "onnxruntime", "onnxruntime-1chunk", "openvino-fp32", "openvino-fp16", "openvino-bf16",
)  # fmt: skip
FILES = {
    "torch": "model.pth", "onnxruntime": "model.onnx", "onnxruntime-1chunk": "one_chunk/model.onnx",
    "openvino-fp32": "model.xml", "openvino-fp16": "fp16/model.xml", "openvino-bf16": "model.xml",
}  # fmt: skip
BATCH = 8


# ------------------------------------------------------------------------ workers
def _runner(variant: str, path: Path, threads: int):
    """A function images -> (scores, maps, labels) for `variant`, without torch where possible."""
    if variant == "torch":
        import torch

        from patchcore.apps.runtimes import open_exported

        torch.set_num_threads(threads)
        model = open_exported(path, "torch")

        def run_torch(images):
            outputs = model.predict(images)
            return outputs.scores, outputs.maps, outputs.labels

        return run_torch
    if variant.startswith("onnxruntime"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        return lambda images: session.run(None, {"images": images})
    import openvino

    precision = "bf16" if variant == "openvino-bf16" else "f32"
    compiled = openvino.Core().compile_model(
        str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
    )
    request = compiled.create_infer_request()

    def run_openvino(images):
        results = request.infer({"images": images})
        return [np.array(results[output]) for output in compiled.outputs]

    return run_openvino


def measure(variant: str, path: Path, images_path: Path, args, output: Path) -> dict:
    images = np.load(images_path)
    start = time.perf_counter()
    run = _runner(variant, path, args.threads)
    load_s = time.perf_counter() - start
    run(images[:1])  # warm-up
    single = []
    for repeat in range(args.repeats):
        begin = time.perf_counter()
        run(images[repeat % len(images)][None])
        single.append(time.perf_counter() - begin)
    run(images)
    batched = []
    for _ in range(args.repeats):
        begin = time.perf_counter()
        outputs = run(images)
        batched.append(time.perf_counter() - begin)
    scores, maps, labels = (np.asarray(value) for value in outputs[:3])
    np.savez(output, scores=scores, maps=maps, labels=labels.astype(bool))
    return {
        "variant": variant,
        "load_s": load_s,
        "latency_ms": statistics.median(single) * 1e3,
        "images_per_s": len(images) / statistics.median(batched),
        "peak_rss_gib": peak_rss_gib(),
    }


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, it starts afresh at
    exec instead of inheriting the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------- preparation
def prepare(args, folder: Path) -> tuple[Path, Path]:
    """The benchmark images (8 test images, evenly spaced, resized to the input size) and a
    saved model (fitted here unless --model-dir) exported in every format; returns (export
    folder, images .npy). Reuses the images, model and exports `folder` already holds."""
    import torch

    from patchcore.apps.export import ExportOptions, export_model, write_openvino
    from patchcore.apps.runtimes import open_exported
    from patchcore.config import (
        PatchCoreConfig,
        PreprocessingConfig,
        SamplerConfig,
        SearchConfig,
        default_layers,
    )
    from patchcore.data.datasets import ImageDataset, list_samples
    from patchcore.data.preprocessing import open_image, to_tensor
    from patchcore.data.synthetic import SyntheticSpec, generate_category
    from patchcore.model.patchcore import PatchCore
    from patchcore.model.serialization import load_models, save_models

    exports, images_file = folder / "exports", folder / "images.npy"
    if args.real:
        root, category = Path(args.real[0]), args.real[1]
    else:
        root, category = folder / "data", "texture"
        spec = SyntheticSpec(num_train=args.train_images, num_test_good=4,
                             num_test_defective_per_type=2)
        if not root.is_dir():
            generate_category(root, category, spec)
    size = (args.input_size, args.input_size)
    if not images_file.is_file():
        test = list_samples(root, category, "test")
        test = [test[int(i)] for i in np.linspace(0, len(test) - 1, BATCH)]
        images = [to_tensor(open_image(s.image_path).resize(size[::-1])) for s in test]
        np.save(images_file, torch.stack(images).numpy())
    if (exports / FILES["onnxruntime-1chunk"]).is_file():
        print(f"reusing the exports in {exports}", flush=True)
        return exports, images_file
    saved = Path(args.model_dir) if args.model_dir else folder / "saved"
    if saved.is_dir():
        model = load_models(saved, "cpu", SearchConfig(backend="torch"))[0]
    else:
        config = PatchCoreConfig(
            backbone_name=args.backbone, layers=default_layers(args.backbone),
            pretrained=args.pretrained, preprocessing=PreprocessingConfig(256, 224),
            sampler=SamplerConfig("approx_greedy_coreset", args.percentage),
        )  # fmt: skip
        samples = list_samples(root, category, "train")[: args.train_images]
        held_out = max(1, len(samples) // 10)
        samples, calibration = samples[:-held_out], samples[-held_out:]
        model = PatchCore(config, search=SearchConfig(backend="torch"))
        start = time.perf_counter()
        model.fit(torch.utils.data.DataLoader(ImageDataset(samples, config.preprocessing), 8))
        model.calibrate(
            torch.utils.data.DataLoader(ImageDataset(calibration, config.preprocessing), 8)
        )
        print(f"fit on {len(samples)} images: {time.perf_counter() - start:.0f} s", flush=True)
        save_models(saved, [model])
    start = time.perf_counter()
    export_model(model, saved, exports, "model", ExportOptions(("torch", "onnx", "openvino"), size))
    print(f"export torch, onnx, openvino: {time.perf_counter() - start:.0f} s", flush=True)
    record = dataclasses.replace(open_exported(exports / "model.onnx").record, precision="fp16")
    write_openvino(exports / "model.onnx", exports / FILES["openvino-fp16"], record, fp16=True)
    start = time.perf_counter()
    one_chunk = ExportOptions(("onnx",), size, bank_chunk_size=len(model.memory_bank))
    export_model(model, saved, exports / "one_chunk", "model", one_chunk)
    print(f"export onnx with one bank chunk: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"bank: {len(model.memory_bank)} x {model.memory_bank.shape[1]}", flush=True)
    return exports, images_file


def preprocessing_difference(folder: Path, args) -> str:
    """How much the exported graph's tensor resize moves scores against the PIL chain that
    model folders use, on the 8 test files at their own size (--real data only)."""
    import torch

    from patchcore.config import SearchConfig
    from patchcore.data.datasets import list_samples
    from patchcore.data.preprocessing import image_tensor, open_image, to_tensor
    from patchcore.model.module import PatchCoreModule
    from patchcore.model.serialization import load_models

    saved = Path(args.model_dir) if args.model_dir else folder / "saved"
    model = load_models(saved, "cpu", SearchConfig(backend="torch"))[0]
    module = PatchCoreModule.from_patchcore(model)
    test = list_samples(Path(args.real[0]), args.real[1], "test")
    differences = []
    for index in np.linspace(0, len(test) - 1, BATCH):
        picture = open_image(test[int(index)].image_path, "RGB")
        reference = model.predict(image_tensor(picture, model.config.preprocessing)[None])
        whole = to_tensor(picture)[None]
        with torch.no_grad():
            score = module(whole)["pred_score"]
        differences.append(float((score - reference.scores).abs() / reference.scores.abs()))
    return (
        f"tensor resize (exported graphs) against PIL (model folders) on {BATCH} test files at "
        f"their own size: image scores differ by {np.median(differences):.1e} (median), "
        f"{max(differences):.1e} (largest), relative"
    )


def format_table(rows: list[dict]) -> str:
    columns = [
        ("variant", "{variant}"), ("file MB", "{file_mb:.0f}"), ("load s", "{load_s:.1f}"),
        ("b1 ms", "{latency_ms:.0f}"), ("b1 x", "{latency_speedup:.2f}"),
        ("b8 img/s", "{images_per_s:.2f}"), ("b8 x", "{throughput_ratio:.2f}"),
        ("peak GiB", "{peak_rss_gib:.2f}"), ("mem x", "{memory_ratio:.2f}"),
        ("score rel diff", "{score_difference:.1e}"), ("map diff", "{map_difference:.1e}"),
        ("decisions", "{decisions}"),
    ]  # fmt: skip
    return tables.format_table(columns, rows)


def file_megabytes(path: Path) -> float:
    companion = path.with_suffix(".bin")
    extra = companion.stat().st_size if path.suffix == ".xml" else 0
    return (path.stat().st_size + extra) / 1e6


def run_worker(variant: str, path: Path, images: Path, result: Path, args) -> dict:
    command = [
        sys.executable, __file__, "--repeats", str(args.repeats), "--threads", str(args.threads),
        "--worker", variant, str(path), str(images), str(result),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(variant: str, rounds: list[dict], path: Path, outputs: dict, baseline: dict) -> dict:
    """A variant's row: medians over rounds, ratios against `baseline`, accuracy against torch."""
    row = {"variant": variant, "file_mb": file_megabytes(path)}
    for key in ("load_s", "latency_ms", "images_per_s", "peak_rss_gib"):
        row[key] = statistics.median(measured[key] for measured in rounds)
    baseline = baseline or row
    reference, got = outputs["torch"], outputs[variant]
    score_difference = np.abs(got["scores"] - reference["scores"]) / np.abs(reference["scores"])
    map_difference = np.abs(got["maps"] - reference["maps"]).max() / np.abs(reference["maps"]).max()
    agreeing = int((got["labels"] == reference["labels"]).sum())
    return {
        **row,
        "latency_speedup": baseline["latency_ms"] / row["latency_ms"],
        "throughput_ratio": row["images_per_s"] / baseline["images_per_s"],
        "memory_ratio": row["peak_rss_gib"] / baseline["peak_rss_gib"],
        "score_difference": float(score_difference.max()),
        "map_difference": float(map_difference),
        "decisions": f"{agreeing}/{len(reference['labels'])}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--backbone", default="wideresnet50")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--percentage", type=float, default=0.1)
    parser.add_argument("--real", nargs=2, metavar=("ROOT", "CATEGORY"),
                        help="fit on and test with an MVTec-layout dataset instead")  # fmt: skip
    parser.add_argument("--model-dir", help="a saved model folder to export instead of fitting")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", help="keep the model and exports here (and reuse them)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, path, images, output = args.worker
        print(json.dumps(measure(variant, Path(path), Path(images), args, Path(output))))
        return
    import platform

    import torch

    from patchcore.apps.runtimes import open_exported

    variants = ["torch"] + [variant for variant in args.variants if variant != "torch"]
    with tempfile.TemporaryDirectory(prefix="bench-export-") as temporary:
        folder = Path(args.work_dir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        exports, images = prepare(args, folder)
        measured = {variant: [] for variant in variants}
        outputs = {}
        for round_number in range(args.rounds):
            for variant in variants:
                result = Path(temporary) / f"{variant}.npz"
                path = exports / FILES[variant]
                measured[variant].append(run_worker(variant, path, images, result, args))
                outputs[variant] = dict(np.load(result))
            print(f"round {round_number + 1} of {args.rounds} done", flush=True)
        rows = []
        for variant in variants:
            baseline = rows[0] if rows else None
            rows.append(summarise(variant, measured[variant], exports / FILES[variant], outputs,
                                  baseline))  # fmt: skip
        record = open_exported(exports / FILES["onnxruntime"]).record
        note = preprocessing_difference(folder, args) if args.real else ""
    print(format_table(rows))
    if note:
        print(note)
    data = args.real[1] if args.real else "synthetic"
    print(
        f"machine: {platform.machine()}, {args.threads} threads per runtime, torch "
        f"{torch.__version__}; {data} data, backbone {record.config.backbone_name} "
        f"({'pretrained' if record.config.pretrained else 'random'} weights), bank "
        f"{record.bank_size} x {record.config.target_embed_dimension}, input "
        f"{args.input_size}x{args.input_size}; {args.rounds} rounds x {args.repeats} calls"
    )


if __name__ == "__main__":
    main()
