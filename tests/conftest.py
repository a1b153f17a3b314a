"""Shared fixtures: small random-weight models for mechanics, synthetic data for accuracy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig

SHARED_MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"


@pytest.fixture(autouse=True)
def _quiet_faiss_loader():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def small_config(**changes) -> PatchCoreConfig:
    """A fast random-weight resnet18 configuration for tests of mechanics."""
    fields = {
        "backbone_name": "resnet18",
        "pretrained": False,
        "pretrain_embed_dimension": 64,
        "target_embed_dimension": 48,
        "preprocessing": PreprocessingConfig(resize=72, imagesize=64),
        "sampler": SamplerConfig(name="approx_greedy_coreset", percentage=0.25),
    }
    fields.update(changes)
    return PatchCoreConfig(**fields)


@pytest.fixture
def random_images() -> torch.Tensor:
    return torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout dataset with both categories (generated once)."""
    from patchcore.data.synthetic import SyntheticSpec, generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(
        root,
        spec=SyntheticSpec(num_train=12, num_test_good=4, num_test_defective_per_type=3, seed=3),
    )
    return root
