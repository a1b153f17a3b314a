#!/usr/bin/env python
"""Load test of `patchcore-serve` on loopback, against predict and the in-process floor.

    PYTHONPATH=src python bench/bench_serve.py [--model-dir SAVED_MODEL] [--work-dir FOLDER]
        [--data ../shared/datasets] [--category magnetic_tile] [--images 48]
        [--requests 96] [--seconds 60] [--concurrency 1 8 32] [--max-batch 1 8]

Fits (or takes --model-dir) an EfficientNet-Lite0 PatchCore model at IM224 (resize 256, crop
224) with a 1 % approximate-greedy coreset bank on the first 200 training images of
--category (180 fitted, 20 held out to calibrate the threshold), then measures on --images
test images spread over the category's test set (mixed sizes):
- `patchcore-predict` as a line would call it, once per image (start-up, model load and one
  image), and once for all the images (its per-image share);
- the in-process floor: `PatchCore.predict` on prepared tensors, one image at a time and in
  batches of 8 (the model alone, no decoding);
- `patchcore-serve` (a child process on 127.0.0.1, for each --max-batch) at each
  --concurrency: closed-loop clients each posting the next image as soon as the previous
  answer arrives, --requests requests or --seconds seconds per level, whichever ends first.
  Every answer is checked against predict's score for the same file (relative difference
  <= 1e-4, same decision); a missing, failed or different answer counts as lost/wrong.
Printed: throughput and p50/p99 latency per level, ratios against the floor (p99 / floor
time per image; throughput / floor batch-of-8 throughput), lost and wrong answers, the
server's peak RSS, and the CPU. Stops by itself; run it alone (`flock` on the shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tables

SOURCE = Path(__file__).resolve().parents[1] / "src"
TRAIN_IMAGES, HELD_OUT = 200, 20
TOLERANCE = 1e-4


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def cpu_line() -> str:
    model, flags = platform.processor() or "cpu", set()
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name") and model in ("cpu", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    extensions = [name for name in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
                  if name in flags]  # fmt: skip
    return f"{model}, {os.cpu_count()} cores, {' '.join(extensions) or 'no AVX'}"


# ------------------------------------------------------------------ model and images
def fit_model(root: Path, category: str, folder: Path) -> Path:
    import torch

    from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig, default_layers
    from patchcore.data.datasets import ImageDataset, list_samples
    from patchcore.model.patchcore import PatchCore
    from patchcore.model.serialization import save_models

    saved = folder / f"mvtec_{category}"
    if saved.is_dir():
        return saved
    config = PatchCoreConfig(
        backbone_name="efficientnet_lite0", layers=default_layers("efficientnet_lite0"),
        pretrained=True, preprocessing=PreprocessingConfig(256, 224),
        sampler=SamplerConfig("approx_greedy_coreset", 0.01),
    )  # fmt: skip
    samples = list_samples(root, category, "train")[:TRAIN_IMAGES]
    fitted, held_out = samples[:-HELD_OUT], samples[-HELD_OUT:]
    model = PatchCore(config)
    start = time.perf_counter()
    model.fit(torch.utils.data.DataLoader(ImageDataset(fitted, config.preprocessing), 8))
    model.calibrate(torch.utils.data.DataLoader(ImageDataset(held_out, config.preprocessing), 8))
    print(f"fit on {len(fitted)} images: {time.perf_counter() - start:.0f} s", flush=True)
    save_models(saved, [model])
    return saved


def test_images(root: Path, category: str, count: int) -> list[Path]:
    from patchcore.data.datasets import list_samples

    samples = list_samples(root, category, "test")
    chosen = np.linspace(0, len(samples) - 1, min(count, len(samples))).round().astype(int)
    return [samples[int(index)].image_path for index in dict.fromkeys(chosen)]


# ------------------------------------------------------------------ predict, floor
PREDICT = "from patchcore.cli.predict import predict_main; predict_main()"


def run_predict(model: Path, images: list[Path], output: Path) -> float:
    """Seconds one `patchcore-predict` call takes, start-up included."""
    command = [sys.executable, "-c", PREDICT, str(model), *map(str, images), "-o", str(output),
               "--no_progress", "--device", "cpu", "--log_level", "warning"]  # fmt: skip
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment(),
                               check=False)  # fmt: skip
    elapsed = time.perf_counter() - start
    if completed.returncode not in (0, 3):
        raise SystemExit(f"patchcore-predict failed:\n{completed.stderr[-2000:]}")
    return elapsed


def predict_scores(model: Path, images: list[Path], folder: Path) -> tuple[dict, float]:
    """predict's score and decision per file, and its per-image share of one call."""
    output = folder / "predictions.jsonl"
    elapsed = run_predict(model, images, output)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    return {row["path"]: (row["score"], row["decision"]) for row in rows}, elapsed / len(images)


def in_process_floor(model_dir: Path, images: list[Path], repeats: int = 3) -> dict:
    """`PatchCore.predict` on prepared tensors: median seconds per image at batch 1, and
    images per second in batches of 8."""
    import torch

    from patchcore.config import SearchConfig
    from patchcore.data.preprocessing import image_tensor, open_image
    from patchcore.model.serialization import load_models

    (model,) = load_models(model_dir, "cpu", SearchConfig())
    tensors = [image_tensor(open_image(path, "RGB"), model.config.preprocessing)
               for path in images]  # fmt: skip
    with torch.inference_mode():
        model.predict(torch.stack(tensors[:8]))  # warm-up
        singles = []
        for tensor in tensors[:16] * repeats:
            start = time.perf_counter()
            model.predict(tensor[None])
            singles.append(time.perf_counter() - start)
        batches = []
        for _ in range(repeats):
            for first in range(0, len(tensors) - 7, 8):
                start = time.perf_counter()
                model.predict(torch.stack(tensors[first:first + 8]))
                batches.append(time.perf_counter() - start)
    return {"single_s": statistics.median(singles), "batch8_per_s": 8 / statistics.median(batches)}


# ------------------------------------------------------------------ the service
SERVE = "from patchcore.cli.serve import serve_main; serve_main()"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, max_batch: int, log: Path, args) -> tuple[subprocess.Popen, int]:
    import httpx

    port = free_port()
    command = [sys.executable, "-c", SERVE, f"bench={model}", "--port", str(port),
               "--max_batch", str(max_batch), "--queue_size", "64", "--device", "cpu",
               "--batch_wait_ms", str(args.batch_wait_ms),
               "--decode_threads", str(args.decode_threads),
               "--log_level", "warning"]  # fmt: skip
    handle = log.open("w")
    server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return server, port
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.kill()
    raise SystemExit(f"patchcore-serve did not start:\n{log.read_text()[-2000:]}")


def peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


async def load_level(port: int, images: list[Path], expected: dict, concurrency: int,
                     requests: int, seconds: float) -> dict:  # fmt: skip
    """`concurrency` closed-loop clients; every answer checked against predict's."""
    import httpx

    payloads = [(str(path), path.read_bytes()) for path in images]
    url = f"http://127.0.0.1:{port}/v1/categories/bench/inspect"
    latencies, batches = [], []
    counts = {"sent": 0, "lost": 0, "wrong": 0}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(worker: int, session: httpx.AsyncClient) -> None:
        while counts["sent"] < requests and time.monotonic() < deadline:
            path, data = payloads[counts["sent"] % len(payloads)]
            counts["sent"] += 1
            start = time.perf_counter()
            try:
                answer = await session.post(url, content=data, timeout=60)
            except httpx.HTTPError:
                counts["lost"] += 1
                continue
            latencies.append(time.perf_counter() - start)
            if answer.status_code != 200:
                counts["lost"] += 1
                continue
            body = answer.json()
            score, decision = expected[path]
            batches.append(body["batch_size"])
            if body["decision"] != decision or abs(body["score"] - score) > TOLERANCE * abs(score):
                counts["wrong"] += 1

    async with httpx.AsyncClient(limits=limits) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(worker, session) for worker in range(concurrency)))
        elapsed = time.perf_counter() - start
    answered = len(latencies)
    return {
        "concurrency": concurrency, "requests": counts["sent"], "lost": counts["lost"],
        "wrong": counts["wrong"], "images_per_s": answered / elapsed,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "mean_batch": float(np.mean(batches)) if batches else 0.0,
    }  # fmt: skip


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SOURCE.parents[1] / "shared" / "datasets")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--predict-calls", type=int, default=3)
    args = parser.parse_args()

    from patchcore.data.preprocessing import image_size_of

    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work = args.work_dir or scratch
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model_dir or fit_model(args.data, args.category, work)
        images = test_images(args.data, args.category, args.images)
        sizes = {image_size_of(path) for path in images}
        print(f"model {model}; {len(images)} test images of {len(sizes)} sizes", flush=True)

        expected, predict_share = predict_scores(model, images, scratch)
        single_calls = [run_predict(model, [images[index]], scratch / f"one{index}.csv")
                        for index in range(args.predict_calls)]  # fmt: skip
        floor = in_process_floor(model, images)
        floor_ms = 1000 * floor["single_s"]
        print(f"predict CLI, one call per image: {statistics.median(single_calls):.2f} s; "
              f"one call for {len(images)} images: {1000 * predict_share:.0f} ms per image; "
              f"in-process PatchCore.predict: {floor_ms:.1f} ms at batch 1, "
              f"{floor['batch8_per_s']:.1f} images/s at batch 8", flush=True)  # fmt: skip

        rows = []
        for max_batch in args.max_batch:
            server, port = start_server(model, max_batch, scratch / f"serve{max_batch}.log", args)
            try:
                asyncio.run(load_level(port, images, expected, 2, 8, 30))  # warm-up
                for concurrency in args.concurrency:
                    row = asyncio.run(load_level(port, images, expected, concurrency,
                                                 args.requests, args.seconds))  # fmt: skip
                    row.update(max_batch=max_batch, peak_gib=peak_rss_gib(server.pid),
                               p99_ratio=row["p99_ms"] / floor_ms,
                               throughput_ratio=row["images_per_s"] / floor["batch8_per_s"])  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                server.terminate()
                server.wait(60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    columns = [
        ("max_batch", "{max_batch}"), ("clients", "{concurrency}"), ("requests", "{requests}"),
        ("img/s", "{images_per_s:.1f}"), ("x floor b8", "{throughput_ratio:.2f}"),
        ("p50 ms", "{p50_ms:.0f}"), ("p99 ms", "{p99_ms:.0f}"), ("p99 / floor", "{p99_ratio:.2f}"),
        ("mean batch", "{mean_batch:.1f}"), ("lost", "{lost}"), ("wrong", "{wrong}"),
        ("server peak GiB", "{peak_gib:.2f}"),
    ]  # fmt: skip
    print()
    print(f"# {cpu_line()}; server: --batch_wait_ms {args.batch_wait_ms:g} "
          f"--decode_threads {args.decode_threads}, torch's default threads")
    print(f"# patchcore-predict CLI: {statistics.median(single_calls):.2f} s per call for one "
          f"image (start-up included), {1000 * predict_share:.0f} ms per image in one call for "
          f"{len(images)}")  # fmt: skip
    print(f"# in-process floor (PatchCore.predict, prepared tensors): {floor_ms:.1f} ms per image "
          f"at batch 1, {floor['batch8_per_s']:.1f} images/s at batch 8")  # fmt: skip
    print(tables.format_table(columns, rows))


if __name__ == "__main__":
    main()
