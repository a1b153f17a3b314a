"""Per-image cost of the challenge evaluator against evaluate's, on one saved model.

    PYTHONPATH=src python bench/bench_challenge.py MODEL_FOLDER DATA_ROOT CATEGORY
        [--rounds 2] [--drift]

In one process, interleaved rounds (the best of each is reported, so a busy machine hurts
both alike): evaluate's path (`evaluate_models` over the test split, batch 1, no loader
workers) and the challenge's (`evaluate_category`: the exported `<category>.pth` loaded once,
each test image decoded once at 256 x 256, scored alone, metrics). Seconds per test image,
without loading the model in either (the challenge's loading of the weights file is timed
on its own and taken off).
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from patchcore.apps.challenge import ChallengeOptions, evaluate_category, load_submission
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.evaluation.testset import evaluate_models
from patchcore.model.module import PatchCoreModule
from patchcore.model.serialization import load_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--drift", action="store_true")
    arguments = parser.parse_args()
    models = load_models(arguments.model)
    samples = list_samples(arguments.root, arguments.category, "test", masks_required=True)
    dataset = ImageDataset(samples, models[0].config.preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=0)
    with tempfile.TemporaryDirectory() as temporary:
        weights = Path(temporary)
        module = PatchCoreModule.from_patchcore(models[0])
        torch.save(module.state_dict(), weights / f"{arguments.category}.pth")
        options = ChallengeOptions(
            module_path="patchcore.model.module", class_name="PatchCoreModule",
            weights_path=weights, dataset_path=arguments.root,
            categories=(arguments.category,), seed=42, drift=arguments.drift,
            output=weights / "out.csv", device=torch.device("cpu"),
        )  # fmt: skip
        evaluate_times, challenge_times = [], []
        for _ in range(arguments.rounds):
            start = time.perf_counter()
            evaluate_models(models, loader, arguments.category)
            evaluate_times.append((time.perf_counter() - start) / len(samples))
            start = time.perf_counter()
            load_submission(PatchCoreModule, weights / f"{arguments.category}.pth", options.device)
            loading = time.perf_counter() - start
            start = time.perf_counter()
            evaluate_category(PatchCoreModule, arguments.category, options)
            challenge_times.append((time.perf_counter() - start - loading) / len(samples))
    best_evaluate, best_challenge = min(evaluate_times), min(challenge_times)
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")).split()  # fmt: skip
    print(f"{platform.machine()}, AVX-512 {'yes' if 'avx512f' in flags else 'no'}, AMX "
          f"{'yes' if 'amx_tile' in flags else 'no'}, torch {torch.__version__}")  # fmt: skip
    print(f"{len(samples)} test images, threads {torch.get_num_threads()}, drift {arguments.drift}")
    print(f"evaluate:  {best_evaluate:.3f} s per image (rounds {evaluate_times})")
    print(f"challenge: {best_challenge:.3f} s per image (rounds {challenge_times})")
    print(f"ratio challenge / evaluate: {best_challenge / best_evaluate:.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
