"""Fidelity end to end, on real weights (EfficientNet-Lite0) and real data where present:

- per-image scores of the library (identity sampler, so no randomness) equal those of a
  transcription of the reference's load, embed and nearest-neighbour scoring, within 1e-5
  relative, on magnetic tile and a synthetic set;
- one file gets one score whatever scores it: a saved model folder, its exported module
  (`.pth`, torch) and its exported graphs (ONNX Runtime, OpenVINO) agree within 1e-5
  relative on real magnetic-tile files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_MAGNETIC_TILE
from patchcore.apps.predict import EXIT_ALL_ACCEPTED, EXIT_ANY_REJECTED
from patchcore.apps.runtimes import open_exported
from patchcore.config import PatchCoreConfig, PreprocessingConfig, SamplerConfig, SearchConfig
from patchcore.data.datasets import list_samples
from patchcore.data.preprocessing import load_image, open_image, to_tensor
from patchcore.model.patchcore import PatchCore
from patchcore.model.serialization import save_models
from test_export import read_rows, run_export, run_predict
from test_reference_statistics import EFFICIENTNET_LAYERS, transcribed_features

RELATIVE_TOLERANCE = 1e-5
HAVE_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_magnetic_tile = pytest.mark.skipif(
    not SHARED_MAGNETIC_TILE.is_dir(), reason=f"{SHARED_MAGNETIC_TILE} is not present"
)


def real_config(**changes) -> PatchCoreConfig:
    fields = {
        "backbone_name": "efficientnet_lite0",
        "layers": EFFICIENTNET_LAYERS,
        "sampler": SamplerConfig(name="identity", percentage=1.0),
        "preprocessing": PreprocessingConfig(),
    }
    return PatchCoreConfig(**{**fields, **changes})


def images_of(paths: list[Path], preprocessing: PreprocessingConfig) -> torch.Tensor:
    return torch.stack([load_image(path, preprocessing)[0] for path in paths])


def transcribed_scores(config: PatchCoreConfig, train: torch.Tensor, test: torch.Tensor):
    """The reference's image scores: the identity sampler keeps every training feature, a
    patch's score is its squared L2 distance to the nearest (FAISS IndexFlatL2, k = 1), an
    image's the largest patch score (computed here exactly, in float64)."""
    bank = transcribed_features(config, train).double()
    queries = transcribed_features(config, test).double().reshape(len(test), -1, bank.shape[1])
    return torch.stack([torch.cdist(image, bank).square().amin(dim=1).amax() for image in queries])


def library_scores(config: PatchCoreConfig, train: torch.Tensor, test: torch.Tensor):
    model = PatchCore(config, search=SearchConfig(backend="faiss"))
    model.fit([train])
    return model.predict(test).scores.double()


def assert_relatively_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    relative = ((ours - theirs).abs() / theirs.abs()).max()
    assert float(relative) < RELATIVE_TOLERANCE, float(relative)


@needs_magnetic_tile
def test_magnetic_tile_scores_equal_the_transcribed_reference():
    config = real_config()
    train = images_of(
        [sample.image_path for sample in list_samples(SHARED_MAGNETIC_TILE.parent,
                                                      "magnetic_tile", "train")[:6]],
        config.preprocessing,
    )  # fmt: skip
    samples = list_samples(SHARED_MAGNETIC_TILE.parent, "magnetic_tile", "test")
    test = images_of([sample.image_path for sample in samples[:: len(samples) // 8][:8]],
                     config.preprocessing)  # fmt: skip
    assert_relatively_close(library_scores(config, train, test), transcribed_scores(config, train, test))


def test_synthetic_scores_equal_the_transcribed_reference(synthetic_root):
    config = real_config(preprocessing=PreprocessingConfig(resize=160, imagesize=128))
    train = images_of(
        [sample.image_path for sample in list_samples(synthetic_root, "object", "train")[:6]],
        config.preprocessing,
    )
    test = images_of(
        [sample.image_path for sample in list_samples(synthetic_root, "object", "test")[::2]],
        config.preprocessing,
    )
    ours = library_scores(config, train, test)
    assert_relatively_close(ours, transcribed_scores(config, train, test))
    # the untouched pretrained statistics give other scores: the pass is what makes them equal
    pretrained = library_scores(
        real_config(preprocessing=config.preprocessing, backbone_statistics="pretrained"),
        train, test,
    )  # fmt: skip
    assert float(((pretrained - ours).abs() / ours).max()) > 1e-3


@needs_magnetic_tile
def test_one_file_gets_one_score_from_the_folder_and_every_export(tmp_path):
    """20 real magnetic-tile files of many sizes: predict on the model folder, on its `.pth`
    (any size) and, for the files of the export's input size, on its ONNX and OpenVINO
    graphs: the same scores within 1e-5 relative (the graphs read the file's 8-bit pixels
    and resize them as Pillow does, so the model input is the folder's, bit for bit)."""
    config = real_config(sampler=SamplerConfig(name="approx_greedy_coreset", percentage=0.1))
    train = images_of(
        [sample.image_path for sample in list_samples(SHARED_MAGNETIC_TILE.parent,
                                                      "magnetic_tile", "train")[:8]],
        config.preprocessing,
    )  # fmt: skip
    model = PatchCore(config)
    model.fit([train])
    model.calibrate([train])
    folder = tmp_path / "model"
    save_models(folder, [model])
    samples = list_samples(SHARED_MAGNETIC_TILE.parent, "magnetic_tile", "test")
    files = tmp_path / "files"
    files.mkdir()
    for sample in samples[:: len(samples) // 20][:20]:
        (files / sample.image_path.name).symlink_to(sample.image_path)
    first_file = min(files.iterdir())
    first = open_image(first_file, "RGB")
    size = f"{first.height}x{first.width}"
    formats = ["torch"] + ["onnx"] * HAVE_ONNXRUNTIME + ["openvino"] * HAVE_OPENVINO
    code, output = run_export(folder, "-o", tmp_path / "exported",
                              *[f"--format={name}" for name in formats], "--input_size", size)  # fmt: skip
    assert code == 0, output
    exported = min((tmp_path / "exported").glob("*.pth"))

    def scores_of(model_path) -> dict[str, float]:
        out = tmp_path / f"{Path(model_path).name}.csv"
        code, output = run_predict(model_path, files, "-o", out)
        assert code in (EXIT_ALL_ACCEPTED, EXIT_ANY_REJECTED), output  # no file in error
        return {Path(row["path"]).name: float(row["score"]) for row in read_rows(out)}

    reference = scores_of(folder)
    assert len(reference) == 20
    from_module = scores_of(exported)
    names = sorted(reference)
    assert_relatively_close(torch.tensor([from_module[name] for name in names], dtype=torch.float64),
                            torch.tensor([reference[name] for name in names], dtype=torch.float64))
    # the fixed-size graphs, on the file of their input size
    for suffix, present in ((".onnx", HAVE_ONNXRUNTIME), (".xml", HAVE_OPENVINO)):
        if not present:
            continue
        graph = open_exported(next((tmp_path / "exported").glob(f"*{suffix}")))
        score = graph.predict(to_tensor(first)[None]).scores[0]
        expected = reference[first_file.name]
        assert abs(float(score) - expected) / expected < RELATIVE_TOLERANCE, suffix
    assert np.isfinite(list(reference.values())).all()


def test_the_coreset_projection_is_the_references_linear_layer():
    """The coreset's random projection is the weight the reference's sampler draws: its
    global generator seeded by fix_seeds(seed), then the backbone built (ResNet18's random
    initialisation draws from it), its statistics pass, one base seed drawn by the training
    DataLoader's iterator, then `torch.nn.Linear(D, 128, bias=False)`."""
    import torchvision

    from conftest import small_config
    from patchcore.model.patchcore import PatchCore
    from patchcore.model.samplers import build_sampler

    config = small_config(seed=3, pretrain_embed_dimension=64, target_embed_dimension=64)
    model = PatchCore(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        torchvision.models.resnet18()
        next(iter(torch.utils.data.DataLoader([torch.zeros(3)] * 4, batch_size=2)))
        expected = torch.nn.Linear(64, 128, bias=False).weight.detach()
    sampler = build_sampler(config.sampler, model.reference_projection_state())
    assert torch.equal(sampler._projection(64, torch.device("cpu")), expected)
    # a different seed draws another projection
    other = PatchCore(small_config(seed=4, pretrain_embed_dimension=64,
                                   target_embed_dimension=64))  # fmt: skip
    assert not torch.equal(build_sampler(other.config.sampler, other.reference_projection_state())
                           ._projection(64, torch.device("cpu")), expected)  # fmt: skip
