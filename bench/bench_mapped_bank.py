#!/usr/bin/env python
"""A memory bank larger than the memory a process may use: memory-mapped search under a
cgroup memory limit, against loading the bank into RAM under the same limit.

    sudo python bench/bench_mapped_bank.py [--bank_mib 2048] [--limit_mib 512] [--json]

Writes a model folder whose bank (random 1024-d features, `--bank_mib` MiB) is streamed to
disk block by block, drops the bank file from the page cache, then scores two images in
child processes, each moved into its own memory cgroup (v1 `memory.limit_in_bytes`, or v2
`memory.max`) of `--limit_mib` MiB after its imports, before it loads the model:
- `mmap`: `SearchConfig(bank_storage="mmap")`, the bank searched through a memory map;
- `memory`: the default, the bank read into RAM (expected to be killed by the limit).
The cgroup charges every page the child touches, the bank file's cached pages included;
those are clean file pages, which the kernel reclaims when the limit is reached, so the
mapped search runs with resident memory well below the bank's size. A limit on address
space (`ulimit -v`) would not show this: a mapping reserves the whole file's address
space. Printed per child: outcome, peak cgroup usage, load and scoring seconds, and whether
its scores equal those of the same model scored in the parent without a limit.

Needs root and a writable memory cgroup hierarchy; exits with code 3 when there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import tables

UNAVAILABLE = 3
DIMENSION = 1024
BLOCK_ROWS = 16384
COLUMNS = [
    ("storage", "{storage}"), ("outcome", "{outcome}"), ("peak MiB", "{peak_mib:.0f}"),
    ("load s", "{load_s:.2f}"), ("score s", "{score_s:.2f}"), ("same scores", "{same}"),
]  # fmt: skip


# --------------------------------------------------------------------- cgroups
def cgroup_root() -> tuple[str, Path] | None:
    """('v1' or 'v2', the folder new memory cgroups are made in), or None."""
    if os.geteuid() != 0:
        return None
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return "v1", v1
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return "v2", v2
    return None


class MemoryCgroup:
    """A fresh memory cgroup with a limit; removed on close."""

    def __init__(self, limit_bytes: int) -> None:
        found = cgroup_root()
        if found is None:
            raise RuntimeError("no writable memory cgroup hierarchy")
        self.version, root = found
        self.path = root / f"patchcore-bench-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        limit_file = "memory.limit_in_bytes" if self.version == "v1" else "memory.max"
        (self.path / limit_file).write_text(str(limit_bytes))

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def peak_bytes(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        file = self.path / name
        return int(file.read_text()) if file.exists() else -1

    def close(self) -> None:
        for _ in range(50):  # the killed child's charges drain first
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# ------------------------------------------------------------------------ model
def images():
    import torch

    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def model_config():
    from patchcore.config import PatchCoreConfig, PreprocessingConfig

    return PatchCoreConfig(
        backbone_name="resnet18", pretrained=False, pretrain_embed_dimension=256,
        target_embed_dimension=DIMENSION, preprocessing=PreprocessingConfig(resize=72, imagesize=64),
    )  # fmt: skip


def write_model(folder: Path, bank_mib: int) -> list[float]:
    """A model folder with a bank of `bank_mib` MiB, never whole in RAM; its scores."""
    import torch

    from patchcore.config import SearchConfig
    from patchcore.model.bank_file import temporary_bank_file
    from patchcore.model.patchcore import PatchCore
    from patchcore.model.serialization import INDEX_FILE, save_models

    rows = bank_mib * 2**20 // (4 * DIMENSION)
    generator = torch.Generator().manual_seed(3)
    blocks = (torch.randn(min(BLOCK_ROWS, rows - start), DIMENSION, generator=generator)
              for start in range(0, rows, BLOCK_ROWS))  # fmt: skip
    model = PatchCore(model_config(), search=SearchConfig(bank_storage="mmap"))
    model.set_memory_bank(temporary_bank_file(blocks, rows, DIMENSION))
    save_models(folder, [model])
    scores = model.predict(images()).scores.tolist()
    descriptor = os.open(folder / INDEX_FILE, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)  # not cached any more
    finally:
        os.close(descriptor)
    return scores


def child(folder: Path, storage: str, procs: Path) -> None:
    """Joins the cgroup, loads the model with `storage`, scores; prints JSON."""
    import torch  # noqa: F401 - imports are charged before joining

    from patchcore.config import SearchConfig
    from patchcore.model.serialization import load_models

    procs.write_text(str(os.getpid()))
    start = time.perf_counter()
    model = load_models(folder, search=SearchConfig(bank_storage=storage, faiss_num_workers=2))[0]
    loaded = time.perf_counter()
    scores = model.predict(images()).scores.tolist()
    print(json.dumps({"scores": scores, "load_s": loaded - start,
                      "score_s": time.perf_counter() - loaded}))  # fmt: skip


def run_child(folder: Path, storage: str, limit_bytes: int) -> dict:
    group = MemoryCgroup(limit_bytes)
    try:
        process = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), storage, str(group.procs)],
            capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "2"},
        )  # fmt: skip
        result = {"storage": storage, "returncode": process.returncode,
                  "peak_mib": group.peak_bytes() / 2**20}  # fmt: skip
        if process.returncode == 0:
            result.update(json.loads(process.stdout.strip().splitlines()[-1]))
        else:
            result["stderr"] = process.stderr.strip().splitlines()[-1:] if process.stderr else []
        return result
    finally:
        group.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank_mib", type=int, default=2048)
    parser.add_argument("--limit_mib", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "STORAGE", "PROCS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], Path(args.child[2]))
        return
    if cgroup_root() is None:
        print("no writable memory cgroup (needs root and cgroup v1 memory or v2 with the "
              "memory controller)", file=sys.stderr)  # fmt: skip
        sys.exit(UNAVAILABLE)
    with tempfile.TemporaryDirectory(prefix="patchcore-mapped-bank-") as temporary:
        folder = Path(temporary) / "model"
        reference = write_model(folder, args.bank_mib)
        limit = args.limit_mib * 2**20
        results = [run_child(folder, storage, limit) for storage in ("mmap", "memory")]
    for result in results:
        result["scores_equal"] = result.get("scores") == reference
        result["outcome"] = "ok" if result["returncode"] == 0 else (
            "killed" if result["returncode"] in (-9, 137) else f"exit {result['returncode']}")
    if args.json:
        print(json.dumps({"bank_mib": args.bank_mib, "limit_mib": args.limit_mib,
                          "reference": reference, "children": results}))  # fmt: skip
        return
    print(f"bank {args.bank_mib} MiB ({DIMENSION}-d), cgroup memory limit {args.limit_mib} MiB")
    table = [{**result, "load_s": result.get("load_s", float("nan")),
              "score_s": result.get("score_s", float("nan")),
              "same": result["scores_equal"] if result["returncode"] == 0 else "-"}
             for result in results]  # fmt: skip
    print(tables.format_table(COLUMNS, table))


if __name__ == "__main__":
    main()
