#!/usr/bin/env python
"""Wall time of a sweep on Ray against the same runs one after another.

    python bench/bench_sweep.py [--repeats 2] [--num_cpus 1] [--keep DIR]

Writes a synthetic MVTec-layout dataset with 2 categories and a sweep file with 2
configurations (EfficientNet-Lite0, IM224, approximate greedy coreset 10 % and 1 %), then,
`--repeats` times and interleaved:
- `sequential`: the 4 (category, configuration) pairs as 4 `patchcore-train` commands run
  one after another (what sample_training.sh does), each using the whole machine (torch and
  FAISS threads, image loaders: the defaults);
- `sequential-1cpu`: the same commands with the settings each sweep task gets at
  `--num_cpus 1` (one torch thread, `OMP_NUM_THREADS=1`, one image loader, one FAISS
  thread), so that the sweep's gain from running tasks side by side shows apart from the
  gain from threading settings;
- `sweep`: `patchcore-sweep --num_cpus N`, a local Ray instance started and stopped by the
  command, one task per pair, as many at once as the machine has CPUs for.
All are timed from outside (process start to exit), so Ray's start-up counts. Printed: wall
seconds of each, the ratio sequential / that variant, and the load average when each
started (other work on the machine makes the figures noisy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tables

BIN = Path(sys.executable).parent
CATEGORIES = ("texture", "object")
CONFIGURATIONS = {
    "lite0_p10": ["sampler", "-p", "0.1", "approx_greedy_coreset"],
    "lite0_p01": ["sampler", "-p", "0.01", "approx_greedy_coreset"],
}
MODEL = ["patch_core", "-b", "efficientnet_lite0", "-le", "_blocks.4", "-le", "_blocks.10"]
DATASET = ["dataset", "--resize", "256", "--imagesize", "224"]
COLUMNS = [
    ("repeat", "{repeat}"), ("variant", "{variant}"), ("wall s", "{seconds:.1f}"),
    ("load avg", "{load:.2f}"), ("sequential / this", "{ratio:.2f}"),
]  # fmt: skip


def sweep_file(folder: Path, data: Path) -> Path:
    lines = [f"data_path: {data}", f"categories: [{', '.join(CATEGORIES)}]",
             "log_project: sweep", "configurations:"]  # fmt: skip
    for name, sampler in CONFIGURATIONS.items():
        words = ", ".join(f'"{word}"' for word in [*MODEL, *sampler, *DATASET])
        lines.append(f"  {name}: {{args: [{words}]}}")
    path = folder / "sweep.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(command: list[str], environment: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **(environment or {})})  # fmt: skip
    return time.perf_counter() - start


def sequential(results: Path, data: Path, one_cpu: bool) -> float:
    """The pairs one after another; `one_cpu`: with a sweep task's settings at 1 CPU."""
    model = [*MODEL, "--faiss_num_workers", "1"] if one_cpu else MODEL
    dataset = [*DATASET, "--num_workers", "1"] if one_cpu else DATASET
    environment = {"OMP_NUM_THREADS": "1"} if one_cpu else None
    total = 0.0
    for name, sampler in CONFIGURATIONS.items():
        for category in CATEGORIES:
            total += timed([
                str(BIN / "patchcore-train"), "--log_project", "sequential", "--log_group", name,
                "--no_progress", str(results), *model, *sampler, *dataset, "-d", category,
                "mvtec", str(data),
            ], environment)  # fmt: skip
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num_cpus", default="1")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="patchcore-bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.is_dir():
        subprocess.run([str(BIN / "patchcore-synthetic"), str(data), "--log_level", "warning"],
                       check=True)  # fmt: skip
    path = sweep_file(work, data)
    rows = []
    for repeat in range(args.repeats):
        for variant in ("sequential", "sequential-1cpu", "sweep"):
            results = work / f"results_{variant}_{repeat}"
            shutil.rmtree(results, ignore_errors=True)
            load = os.getloadavg()[0]
            if variant.startswith("sequential"):
                seconds = sequential(results, data, one_cpu=variant == "sequential-1cpu")
            else:
                shutil.copy(path, work / "sweep_run.yaml")
                text = path.read_text() + f"results_path: {results}\n"
                (work / "sweep_run.yaml").write_text(text)
                seconds = timed([str(BIN / "patchcore-sweep"), str(work / "sweep_run.yaml"),
                                 "--num_cpus", args.num_cpus, "--no_progress"])  # fmt: skip
            rows.append((repeat, variant, seconds, load))
    print(f"\n{len(CATEGORIES)} categories x {len(CONFIGURATIONS)} configurations, "
          f"{os.cpu_count()} CPUs, sweep --num_cpus {args.num_cpus}")  # fmt: skip
    table = []
    for repeat, variant, seconds, load in rows:
        baseline = next(s for r, v, s, _ in rows if r == repeat and v == "sequential")
        table.append({"repeat": repeat, "variant": variant, "seconds": seconds, "load": load,
                      "ratio": baseline / seconds})  # fmt: skip
    print(tables.format_table(COLUMNS, table))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
