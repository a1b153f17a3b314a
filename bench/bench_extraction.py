#!/usr/bin/env python
"""Where training-feature extraction spends its time, and how close fitting comes to the
backbone's own forward time.

    python bench/bench_extraction.py ROOT CATEGORY [--backbone efficientnet_lite0]
        [--images 200] [--crop center none] [--large 40] [--workers 0 1 2]

Data: the first `--images` training images of a category; with `--large N`, also N of them
upscaled to 2000 x 1500 RGB and saved as PNG and as JPEG (quality 90) in a temporary
MVTec-layout category each, the large files users bring.

Table 1, stages (one process, no loader workers, each stage timed on its own, torch's
threads as configured): reading and decoding the file with the resize and crop
(`ImageDataset`, PIL), the backbone, the patch aggregation, the random projection for the
coreset, and the write to the spill file on the calling thread: of the features
(`SpilledFeatureStore`, `spill`) and of the layer maps instead (`SpilledLayerMaps`,
`spill maps`; not counted in `ms/image`).

Table 2, fitting as it runs: the extraction part of `PatchCore.fit` (`fit_seconds`) over a
loader in batches of 2 with `--workers` decoding processes, per image, with each spill
(`spill`): the layer maps (`maps`, on the calling thread; fit's default where the maps are
much smaller than the features), the features on the calling thread (`features`) and on a
writer thread (`features-thread`); `gather ms/img`: reading the bank's rows back (for
`maps`, every part aggregated again; `fit_seconds["bank"]`). Beside them the backbone's own
forward time per image at the same batch size (FIT_IMAGES_AT_ONCE images per call) on the
same images decoded beforehand, measured in the same process right before, and the ratios
`fit / backbone` (what extraction costs beyond the network itself) and `+gather /
backbone` (the same with the gather).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import tables
import torch
from PIL import Image

import patchcore.model.patchcore as patchcore_module
from patchcore.cli.common import CommonOptions, configure_process
from patchcore.config import (
    DatasetConfig,
    PatchCoreConfig,
    PreprocessingConfig,
    SamplerConfig,
    default_layers,
    default_loader_workers,
)
from patchcore.data.datasets import ImageDataset, list_samples, make_loader
from patchcore.model.feature_store import SpilledFeatureStore, SpilledLayerMaps
from patchcore.model.patchcore import FIT_IMAGES_AT_ONCE, PatchCore
from patchcore.model.samplers import build_sampler

STAGES = ("decode", "backbone", "aggregate", "project", "spill")
SPILLS = ("maps", "features", "features-thread")
BACKBONES = ("efficientnet_lite0", "wideresnet50")
LARGE_SIZE = (2000, 1500)  # width, height


def model_config(backbone: str, crop: str) -> PatchCoreConfig:
    return PatchCoreConfig(backbone_name=backbone, layers=default_layers(backbone),
                           pretrained=backbone == "efficientnet_lite0",
                           preprocessing=PreprocessingConfig(256, 224, crop=crop),
                           sampler=SamplerConfig("approx_greedy_coreset", 0.01))  # fmt: skip


def stages(root: Path, category: str, backbone: str, crop: str, count: int) -> dict:
    config = model_config(backbone, crop)
    model = PatchCore(config)
    sampler = build_sampler(config.sampler)
    dataset = ImageDataset(list_samples(root, category, "train")[:count], config.preprocessing)
    seconds = dict.fromkeys(STAGES, 0.0)
    store = SpilledFeatureStore(background=False)
    map_store = SpilledLayerMaps(model.embedder.aggregator, background=False)
    map_seconds = 0.0

    def timed(stage, function, *arguments):
        start = time.perf_counter()
        result = function(*arguments)
        seconds[stage] += time.perf_counter() - start
        return result

    pending: list[torch.Tensor] = []  # images of one size, embedded together as in fit

    def embed_pending():
        nonlocal map_seconds
        maps = timed("backbone", model.embedder.extractor, torch.stack(pending))
        features, _ = timed("aggregate", model.embedder.aggregator, maps)
        timed("project", sampler.project, features)
        timed("spill", store.append, features)
        start = time.perf_counter()
        map_store.append(features, maps)
        map_seconds += time.perf_counter() - start
        pending.clear()

    try:
        with torch.inference_mode():
            for index in range(len(dataset)):
                image = timed("decode", dataset.__getitem__, index)["image"]
                if pending and pending[0].shape != image.shape:
                    embed_pending()
                pending.append(image)
                if len(pending) == FIT_IMAGES_AT_ONCE:
                    embed_pending()
            if pending:
                embed_pending()
    finally:
        store.close()
        map_store.close()
    total = sum(seconds.values())
    row = {"crop": crop, "images": len(dataset), "total": 1e3 * total / len(dataset),
           "spill_maps": 1e3 * map_seconds / len(dataset)}  # fmt: skip
    for stage in STAGES:
        row[stage] = 1e3 * seconds[stage] / len(dataset)
        row[f"{stage}_share"] = seconds[stage] / total
    return row


def backbone_seconds(model: PatchCore, dataset: ImageDataset) -> float:
    """The backbone's forward time over the dataset's images, decoded beforehand, in groups
    of FIT_IMAGES_AT_ONCE images of one size (as fit embeds them); best of two passes."""
    images = [dataset[index]["image"] for index in range(len(dataset))]
    groups, pending = [], []
    for image in images:
        if pending and (pending[0].shape != image.shape or len(pending) == FIT_IMAGES_AT_ONCE):
            groups.append(torch.stack(pending))
            pending = []
        pending.append(image)
    groups.append(torch.stack(pending))
    best = float("inf")
    with torch.inference_mode():
        model.embedder.extractor(groups[0])  # warm-up
        for _ in range(2):
            start = time.perf_counter()
            for group in groups:
                model.embedder.extractor(group)
            best = min(best, time.perf_counter() - start)
    return best


def pipeline(root: Path, category: str, backbone: str, crop: str, count: int, workers: int,
             spill: str) -> dict:  # fmt: skip
    config = model_config(backbone, crop)
    dataset = ImageDataset(list_samples(root, category, "train")[:count], config.preprocessing)
    loader = make_loader(dataset, DatasetConfig("mvtec", str(root), (category,), batch_size=2,
                         num_workers=workers, preprocessing=config.preprocessing),
                         torch.device("cpu"))  # fmt: skip
    model = PatchCore(config)
    forward = backbone_seconds(model, dataset)
    store_for = patchcore_module.feature_store_for
    # each spill, whatever fit's default is here
    patchcore_module.feature_store_for = lambda device, aggregate: (
        SpilledLayerMaps(model.embedder.aggregator, background=False) if spill == "maps"
        else SpilledFeatureStore(background=spill == "features-thread"))  # fmt: skip
    try:
        model.fit(loader)
    finally:
        patchcore_module.feature_store_for = store_for
    extraction, gather = model.fit_seconds["extraction"], model.fit_seconds["bank"]
    return {"crop": crop, "images": len(dataset), "workers": workers, "spill": spill,
            "fit": 1e3 * extraction / len(dataset), "gather": 1e3 * gather / len(dataset),
            "backbone": 1e3 * forward / len(dataset), "ratio": extraction / forward,
            "with_gather": (extraction + gather) / forward}  # fmt: skip


def make_large_categories(root: Path, category: str, count: int, folder: Path) -> list[tuple]:
    """`count` training images upscaled to LARGE_SIZE, as PNG and as JPEG categories."""
    made = []
    samples = list_samples(root, category, "train")[:count]
    for suffix, options in ((".png", {}), (".jpg", {"quality": 90})):
        train = folder / f"large{suffix[1:]}" / "train" / "good"
        train.mkdir(parents=True)
        for sample in samples:
            picture = Image.open(sample.image_path).convert("RGB").resize(LARGE_SIZE,
                                                                       Image.Resampling.BILINEAR)
            picture.save(train / f"{sample.image_path.stem}{suffix}", **options)
        made.append((f"{LARGE_SIZE[0]}x{LARGE_SIZE[1]} {suffix[1:]}", folder,
                     f"large{suffix[1:]}"))  # fmt: skip
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONES)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--crop", nargs="+", default=["center", "none"])
    parser.add_argument("--large", type=int, default=0,
                        help="also this many 2000x1500 PNG and JPEG images")
    parser.add_argument("--workers", type=int, nargs="+",
                        default=sorted({0, default_loader_workers()}))
    args = parser.parse_args()
    configure_process(CommonOptions())
    with tempfile.TemporaryDirectory() as scratch:
        data = [(args.category, args.root, args.category)]
        if args.large:
            data += make_large_categories(args.root, args.category, args.large, Path(scratch))
        stage_rows, pipeline_rows = [], []
        for name, root, category in data:
            count = args.images if category == args.category else args.large
            for crop in args.crop:
                stage_rows.append({"data": name, **stages(root, category, args.backbone, crop,
                                                          count)})  # fmt: skip
                for workers in args.workers:
                    for spill in SPILLS:
                        pipeline_rows.append({"data": name, **pipeline(
                            root, category, args.backbone, crop, count, workers, spill)})
    columns = [("data", "{data}"), ("crop", "{crop}"), ("images", "{images}"),
               ("ms/image", "{total:.1f}")] + [
        (stage, f"{{{stage}:.1f}} ({{{stage}_share:.0%}})") for stage in STAGES
    ] + [("spill maps", "{spill_maps:.1f}")]  # fmt: skip
    print(tables.format_table(columns, stage_rows))
    print("stages timed one by one, no loader workers; milliseconds per image (share)\n")
    columns = [("data", "{data}"), ("crop", "{crop}"), ("images", "{images}"),
               ("workers", "{workers}"), ("spill", "{spill}"), ("fit ms/img", "{fit:.1f}"),
               ("gather ms/img", "{gather:.1f}"), ("backbone ms/img", "{backbone:.1f}"),
               ("fit / backbone", "{ratio:.2f}"),
               ("+gather / backbone", "{with_gather:.2f}")]  # fmt: skip
    print(tables.format_table(columns, pipeline_rows))
    print(f"fit's extraction over a loader (batch 2) against the backbone's forward at "
          f"{FIT_IMAGES_AT_ONCE} images per call, same process")
    print(f"backbone {args.backbone}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, CPU {tables.cpu_class()}")


if __name__ == "__main__":
    main()
