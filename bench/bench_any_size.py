#!/usr/bin/env python
"""Exported models of any input size: parity with torch and time per image, per runtime.

    python bench/bench_any_size.py ROOT CATEGORY [--train-images 200] [--scale 0.5]
                                   [--coreset 0.01] [--tile SIDE] [--threads 2]
                                   [--work-dir FOLDER]

Fits a whole-image PatchCore model (EfficientNet-Lite0 with its ImageNet weights, layers
_blocks.4 + _blocks.10, `--crop none --scale`, approximate greedy coreset of --coreset; with
--tile, tiles of that side) on the first --train-images training images of ROOT/CATEGORY
(an MVTec-layout dataset), the last 10 % of them held out to calibrate the threshold; saves
it, exports it with `patchcore-export`'s job (torch, ONNX, OpenVINO; graphs of any size, the
default of whole-image models), and runs `patchcore-predict`'s job over every test image of
the category with each way of scoring:
- `folder`: the saved model folder in torch (Pillow preprocessing), the reference;
- `torch`: the exported `PatchCoreModule` (.pth) on the decoded images;
- `onnxruntime`: the ONNX graph in ONNX Runtime;
- `openvino`: the OpenVINO IR.
Printed per way: the images scored and refused (error rows), the largest relative score
difference to the folder's and to the .pth's, the decisions that differ from the folder's,
the load (and compile) seconds, the wall seconds per image of the whole predict run (decode,
geometry, scoring, results file) and its ratio to `torch`, and this process's peak RSS after
the run. Every runtime uses --threads threads; predict runs with batches of 8 and no loader
workers. --work-dir keeps the model and its exports there and reuses them in a later run.
"""

from __future__ import annotations

import argparse
import csv
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import tables
import torch
from PIL import Image

WAYS = ("folder", "torch", "onnxruntime", "openvino")


def cpu_class() -> str:
    """The CPU model and its vector extensions that matter here."""
    model, flags = platform.processor() or platform.machine(), set()
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    return f"{model}; {' '.join(flag for flag in wanted if flag in flags) or 'no AVX2'}"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fit_and_export(args, work: Path) -> tuple[Path, Path]:
    """The saved model folder and the export folder (made once per --work-dir)."""
    from patchcore.apps.export import ExportOptions, export_models
    from patchcore.config import (
        EFFICIENTNET_LITE0_LAYERS,
        PatchCoreConfig,
        PreprocessingConfig,
        SamplerConfig,
        SearchConfig,
    )
    from patchcore.data.datasets import ImageDataset, SizeGroupedBatchSampler, list_samples
    from patchcore.model.patchcore import PatchCore
    from patchcore.model.serialization import save_models

    folder, exported = work / "models" / f"mvtec_{args.category}", work / "exported"
    if not folder.is_dir():
        preprocessing = PreprocessingConfig(crop="none", scale=args.scale, tile=args.tile)
        config = PatchCoreConfig(
            backbone_name="efficientnet_lite0", layers=EFFICIENTNET_LITE0_LAYERS,
            preprocessing=preprocessing, sampler=SamplerConfig(percentage=args.coreset),
        )  # fmt: skip
        samples = list_samples(args.root, args.category, "train")[: args.train_images]
        held_out = max(1, len(samples) // 10)

        def loader(part):
            dataset = ImageDataset(part, preprocessing)
            sampler = SizeGroupedBatchSampler(dataset.working_sizes(), 8)
            return torch.utils.data.DataLoader(dataset, batch_sampler=sampler)

        model = PatchCore(config, search=SearchConfig(backend="torch"))
        start = time.perf_counter()
        model.fit(loader(samples[:-held_out]))
        model.calibrate(loader(samples[-held_out:]))
        save_models(folder, [model])
        print(f"fitted on {len(samples) - held_out} images, calibrated on {held_out}: "
              f"bank {len(model.memory_bank)} x {model.memory_bank.shape[1]}, "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    if not exported.is_dir():
        start = time.perf_counter()
        export_models([folder], exported, ExportOptions(("torch", "onnx", "openvino")))
        print(f"exported (torch, ONNX, OpenVINO; any size) in {time.perf_counter() - start:.0f} s")
    return folder, exported


def read_rows(path: Path) -> dict[str, dict]:
    with path.open(newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, kind, default in (
        ("root", Path, None), ("category", str, None), ("--train-images", int, 200),
        ("--scale", float, 0.5), ("--coreset", float, 0.01), ("--tile", int, None),
        ("--threads", int, 2), ("--work-dir", Path, None),
    ):  # fmt: skip
        parser.add_argument(name, type=kind, **({"default": default} if name[0] == "-" else {}))
    args = parser.parse_args()

    from patchcore.apps.predict import PredictOptions, run_prediction
    from patchcore.apps.runtimes import open_exported

    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="bench-any-size-")
    work = args.work_dir or Path(scratch.name)
    folder, exported = fit_and_export(args, work)
    test_folder = args.root / args.category / "test"
    files = {
        "folder": folder, "torch": exported / f"{args.category}.pth",
        "onnxruntime": exported / f"{args.category}.onnx",
        "openvino": exported / f"{args.category}.xml",
    }  # fmt: skip
    results, measured = {}, {}
    for way in WAYS:
        load = 0.0
        if way != "folder":
            start = time.perf_counter()
            open_exported(files[way], way, threads=args.threads)
            load = time.perf_counter() - start
        output = work / f"{way}.csv"
        options = PredictOptions(
            model_dir=files[way], inputs=(str(test_folder),), output=output, num_workers=0,
            runtime=None if way == "folder" else way,
        )  # fmt: skip
        start = time.perf_counter()
        summary = run_prediction(options)
        elapsed = time.perf_counter() - start
        results[way] = read_rows(output)
        measured[way] = {"load": load, "elapsed": elapsed, "rss": peak_rss_gib(),
                         "images": len(results[way]), "errors": summary.unreadable}  # fmt: skip
    paths = list(results["folder"])
    rows = []
    for way in WAYS:
        scored = [path for path in paths if results[way][path]["score"] != ""]
        row = {"way": way, **measured[way], "scored": len(scored)}
        for reference in ("folder", "torch"):
            both = [p for p in scored if results[reference][p]["score"] != ""]
            got = np.array([float(results[way][p]["score"]) for p in both])
            expected = np.array([float(results[reference][p]["score"]) for p in both])
            row[f"rel_{reference}"] = float(np.max(np.abs(got - expected) / np.abs(expected)))
        row["flips"] = sum(
            results[way][p]["decision"] != results["folder"][p]["decision"] for p in paths
        )
        row["per_image"] = row["elapsed"] / row["images"]
        rows.append(row)
    for row in rows:
        row["ratio"] = row["per_image"] / next(r for r in rows if r["way"] == "torch")["per_image"]
    import onnxruntime
    import openvino

    image_sizes = {Image.open(path).size for path in paths}
    rejected = sum(row["decision"] == "reject" for row in results["folder"].values())
    print(
        f"{args.category}: {len(paths)} test images of {len(image_sizes)} sizes, "
        f"{rejected} rejected by the folder; EfficientNet-Lite0, --crop none --scale "
        f"{args.scale}{f' --tile {args.tile}' if args.tile else ''}, coreset {args.coreset:g}, "
        f"{args.train_images} training images (10 % held out for the threshold)"
    )
    print(f"CPU: {cpu_class()}; {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}")  # fmt: skip
    columns = [
        ("way", "{way}"), ("scored", "{scored}"), ("errors", "{errors}"),
        ("max rel. diff vs folder", "{rel_folder:.2e}"), ("vs .pth", "{rel_torch:.2e}"),
        ("decisions differ", "{flips}"), ("load s", "{load:.2f}"),
        ("s/image", "{per_image:.4f}"), ("vs torch", "{ratio:.2f}x"),
        ("peak RSS GiB", "{rss:.2f}"),
    ]  # fmt: skip
    print(tables.format_table(columns, rows))


if __name__ == "__main__":
    main()
