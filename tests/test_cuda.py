"""CUDA: what runs on a GPU computes what the CPU computes, and GPU limits give one-line errors.

Tests marked `cuda` need a CUDA device (`pytest -m cuda`; skipped, with the reason, where
`torch.cuda.is_available()` is false). The others check on any machine what can be checked
without one (device choice and memory checks, with torch's CUDA queries replaced).

Tolerances, CUDA against the CPU, same inputs and weights:
- float32 arithmetic (TF32 off for cuDNN and cuBLAS, `float32_arithmetic`): image scores
  within a relative 1e-4, anomaly maps within 1e-4 of the largest map value; float32
  rounding in another summation order leaves about 1e-6.
- torch's defaults on the GPU (cuDNN convolutions in TF32, a 10-bit mantissa, unit
  roundoff 2^-11 ~ 4.9e-4): image scores and maps within 5e-2 of the largest value; the
  backbone's features carry a relative error of a few 1e-3, and a squared distance to a near
  neighbour amplifies it by |feature| / distance.
- Coreset selection: the CPU compares exact float32 squared differences, the GPU the
  matrix-product form (||x||^2 - 2 x.y + ||y||^2) of the same float32 values; both pick the
  farthest row, ties to the lower index. Their selections are equal up to the first pick
  where two candidates' distances are equal within float32 rounding (a near tie); there
  they may differ, and the test checks that any difference is such a tie.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import small_config
from patchcore.config import SamplerConfig, SearchConfig
from patchcore.errors import ConfigurationError
from patchcore.model import search as search_module
from patchcore.model.module import PatchCoreModule
from patchcore.model.patchcore import PatchCore
from patchcore.model.samplers import ApproximateGreedyCoresetSampler, GreedyCoresetSampler
from patchcore.model.search import FaissNearestNeighbours, TorchNearestNeighbours, faiss_has_gpu

HAVE_CUDA = torch.cuda.is_available()


def needs_cuda(function):
    """Marks a test `cuda` and skips it, saying why, where torch sees no CUDA device."""
    skip = pytest.mark.skipif(
        not HAVE_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is false)"
    )
    return pytest.mark.cuda(skip(function))


FLOAT32_SCORE_RTOL = 1e-4
FLOAT32_MAP_ATOL = 1e-4  # times the largest map value
TF32_TOLERANCE = 5e-2  # times the largest score or map value
NEAR_TIE_RTOL = 1e-4  # two squared distances this close may be ordered either way


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _fake_gpus(monkeypatch, count: int) -> None:
    """torch's CUDA queries answer as on a machine with `count` GPUs (no GPU is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "fake GPU")


# ------------------------------------------------------------ on any machine
def test_a_gpu_id_beyond_the_machines_gpus_is_a_one_line_error(
    synthetic_root, tmp_path, monkeypatch
):
    from patchcore.cli.common import resolve_device
    from patchcore.cli.runs import train_cli
    from test_cli import SMALL_DATA, SMALL_RANDOM

    _fake_gpus(monkeypatch, 1)
    assert resolve_device((0,), None) == torch.device("cuda:0")
    for gpu, device, option in (((1,), None, "--gpu 1"), ((), "cuda:1", "--device cuda:1")):
        with pytest.raises(ConfigurationError) as error:
            resolve_device(gpu, device)
        assert str(error.value) == f"{option}: this machine has 1 CUDA device(s), ids 0 to 0"
    outcome = CliRunner().invoke(train_cli, [
        "--gpu", "1", str(tmp_path / "results"), "patch_core", *SMALL_RANDOM,
        "sampler", "-p", "0.1", "approx_greedy_coreset",
        "dataset", *SMALL_DATA, "-d", "texture", "mvtec", str(synthetic_root),
    ])  # fmt: skip
    assert outcome.exit_code == 1, outcome.output
    assert _errors(outcome.output) == [
        "Error: --gpu 1: this machine has 1 CUDA device(s), ids 0 to 0"
    ], outcome.output
    assert "Traceback" not in outcome.output


def test_a_bank_too_large_for_the_gpu_is_refused_in_one_line_before_any_copy(monkeypatch):
    monkeypatch.setattr(search_module, "available_memory_bytes", lambda device: 2**20)
    bank = torch.zeros(1, 64).expand(10_000, 64)  # 2.4 MiB as float32, stored as one row
    with pytest.raises(ConfigurationError) as error:
        TorchNearestNeighbours(torch.device("cuda", 0)).fit(bank)  # refused before any copy
    message = str(error.value)
    assert message.startswith("the memory bank (10000 features x 64, with the search about ")
    assert "does not fit in the 0.00 GiB free on cuda:0 for the torch search; search on the " in (
        message
    )
    assert "\n" not in message
    on_cpu = TorchNearestNeighbours(torch.device("cpu"))  # nothing is checked on the CPU
    on_cpu.fit(bank)
    assert on_cpu.bank.shape == (10_000, 64)


def test_torch_search_splits_queries_so_products_stay_within_the_budget(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 16, generator=generator)
    queries = torch.randn(70, 16, generator=generator)
    whole = TorchNearestNeighbours(torch.device("cpu"))
    whole.fit(bank)
    assert whole.chunk_rows() == 4096
    expected = whole.search(queries, 3)
    monkeypatch.setattr(search_module, "SEARCH_PRODUCT_BUDGET", 4 * 500 * 8)  # 8 query rows
    chunked = TorchNearestNeighbours(torch.device("cpu"))
    chunked.fit(bank)
    assert chunked.chunk_rows() == 8
    calls = []
    original = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(a[1].shape[0]) or
                        original(*a, **k))  # fmt: skip
    got = chunked.search(queries, 3)
    assert calls == [8] * 8 + [6]
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-5)  # blocking rounds
    assert torch.equal(got[1], expected[1])


@pytest.mark.skipif(faiss_has_gpu(), reason="this faiss has GPU support")
def test_a_faiss_without_gpu_support_says_why_and_how_to_repair_it(monkeypatch, caplog):
    import importlib.metadata

    from patchcore.model.search import faiss_gpu_problem

    assert faiss_gpu_problem().startswith("this faiss is a CPU build; install faiss-gpu")
    real = importlib.metadata.distributions

    faiss_gpu = types.SimpleNamespace(metadata={"Name": "faiss-gpu"})
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), faiss_gpu])
    assert faiss_gpu_problem() == (
        "faiss-gpu is installed but the module faiss is a CPU build (faiss-cpu, installed after "
        "it, replaced its files); run pip install --force-reinstall --no-deps faiss-gpu"
    )
    index = FaissNearestNeighbours(on_gpu=True)
    assert not index.on_gpu
    assert [r.getMessage() for r in caplog.records if "--faiss_on_gpu" in r.getMessage()] == [
        f"--faiss_on_gpu given, but {faiss_gpu_problem()}; searching on the CPU"
    ]


def test_fit_memory_estimate_counts_the_patch_features_held_on_a_gpu():
    model = PatchCore(small_config())  # an 8 x 8 patch grid at 64 px, dimension 48
    on_cpu = model.fit_memory_estimate([(64, 64)] * 10)
    model.device = torch.device("cuda", 0)  # only the estimate reads it
    on_gpu = model.fit_memory_estimate([(64, 64)] * 10)
    assert on_gpu.patch_features == on_cpu.patch_features == 640
    assert on_gpu.bytes - on_cpu.bytes == 640 * 48 * 4


# ------------------------------------------------------------------ on CUDA
@pytest.fixture
def float32_arithmetic():
    """TF32 off for cuDNN convolutions and cuBLAS matrix products for the test."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _fit_and_predict(device: str, config, train: torch.Tensor, test: torch.Tensor):
    model = PatchCore(config, device=device)
    model.fit([train[:4], train[4:]])
    return model, model.predict(test)


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arithmetic", ["float32", "torch_default"])
@needs_cuda
def test_fit_and_predict_on_cuda_equal_the_cpus(arithmetic, request):
    if arithmetic == "float32":
        request.getfixturevalue("float32_arithmetic")
    config = small_config(sampler=SamplerConfig(name="identity"))
    train, test = _images(8, 0), _images(3, 1)
    cpu_model, on_cpu = _fit_and_predict("cpu", config, train, test)
    cuda_model, on_cuda = _fit_and_predict("cuda", config, train, test)
    assert cuda_model.memory_bank.device.type == "cuda"
    assert on_cuda.scores.device.type == "cpu" and on_cuda.maps.shape == on_cpu.maps.shape
    largest_score = float(on_cpu.scores.abs().max())
    largest_map = float(on_cpu.maps.abs().max())
    if arithmetic == "float32":
        torch.testing.assert_close(cuda_model.memory_bank.cpu(), cpu_model.memory_bank,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(on_cuda.scores, on_cpu.scores, rtol=FLOAT32_SCORE_RTOL, atol=0)
        torch.testing.assert_close(on_cuda.maps, on_cpu.maps, rtol=0,
                                   atol=FLOAT32_MAP_ATOL * largest_map)  # fmt: skip
    else:
        torch.testing.assert_close(on_cuda.scores, on_cpu.scores, rtol=0,
                                   atol=TF32_TOLERANCE * largest_score)  # fmt: skip
        torch.testing.assert_close(on_cuda.maps, on_cpu.maps, rtol=0,
                                   atol=TF32_TOLERANCE * largest_map)  # fmt: skip


def _first_divergence(first: torch.Tensor, second: torch.Tensor) -> int | None:
    different = torch.nonzero(first != second)
    return int(different[0]) if len(different) else None


@pytest.mark.parametrize("sampler_class", [GreedyCoresetSampler, ApproximateGreedyCoresetSampler])
@needs_cuda
def test_coreset_selection_on_cuda_is_the_cpus_up_to_a_near_tie(sampler_class, float32_arithmetic):
    features = torch.randn(3000, 256, generator=torch.Generator().manual_seed(4))
    sampler = sampler_class(0.05, projection_dimension=128, seed=0)
    projected_cpu = sampler.project(features)
    projected_cuda = sampler.project(features.cuda())
    torch.testing.assert_close(projected_cuda.cpu(), projected_cpu, rtol=1e-5, atol=1e-5)
    on_cpu = sampler.select_projected(projected_cpu)
    on_cuda = sampler.select_projected(projected_cuda).cpu()
    assert len(on_cpu) == len(on_cuda) == 150
    step = _first_divergence(on_cpu, on_cuda)
    if step is None:
        return
    # Where the picks first differ, both rows must be equally far (in float64) from the
    # rows picked before, within float32 rounding: a near tie, not a wrong pick.
    points = projected_cpu.double()
    start = sampler._starting_squared_distances(projected_cpu, projected_cpu.square().sum(1))
    minimum = start.double()
    for picked in on_cpu[:step]:
        minimum = torch.minimum(minimum, (points - points[picked]).square().sum(dim=1))
    cpu_pick, cuda_pick = float(minimum[on_cpu[step]]), float(minimum[on_cuda[step]])
    assert cuda_pick == pytest.approx(cpu_pick, rel=NEAR_TIE_RTOL), (
        f"selections differ at pick {step} by more than a near tie: {cpu_pick} vs {cuda_pick}"
    )


@needs_cuda
@pytest.mark.skipif(not faiss_has_gpu(), reason="this faiss has no GPU support (the gpu extra, "
                                                "faiss-gpu, is not installed here)")
def test_faiss_gpu_index_equals_the_torch_search_on_cuda(float32_arithmetic):
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(5000, 128, generator=generator)
    queries = torch.randn(300, 128, generator=generator)
    faiss_index = FaissNearestNeighbours(on_gpu=True)
    assert faiss_index.on_gpu
    faiss_index.fit(bank)
    torch_index = TorchNearestNeighbours(torch.device("cuda"))
    torch_index.fit(bank)
    faiss_distances, faiss_indices = faiss_index.search(queries, 5)
    torch_distances, torch_indices = (part.cpu() for part in torch_index.search(queries, 5))
    torch.testing.assert_close(faiss_distances, torch_distances, rtol=1e-4, atol=1e-3)
    exact = torch.cdist(queries.double(), bank.double()).square()
    differ = faiss_indices != torch_indices
    rows = torch.nonzero(differ)[:, 0]
    torch.testing.assert_close(exact[rows, faiss_indices[differ]], exact[rows, torch_indices[differ]],
                               rtol=1e-5, atol=1e-4)  # fmt: skip


@needs_cuda
def test_a_bank_larger_than_the_gpu_is_a_one_line_error_not_a_cuda_error():
    total = torch.cuda.mem_get_info()[1]
    rows = total // (1024 * 4) + 1  # more float32 rows of 1024 than the whole GPU holds
    bank = torch.zeros(1, 1024).expand(rows, 1024)  # one stored row, no host memory used
    with pytest.raises(ConfigurationError, match=r"^the memory bank \(\d+ features x 1024, .* "
                                                 r"does not fit in the .* GiB free on cuda"):
        TorchNearestNeighbours(torch.device("cuda")).fit(bank)
    if faiss_has_gpu():
        with pytest.raises(ConfigurationError, match=r"for FAISS \(--faiss_on_gpu\)"):
            FaissNearestNeighbours(on_gpu=True).fit(bank)


@needs_cuda
def test_torch_search_on_cuda_keeps_products_within_the_budget(float32_arithmetic):
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(400_000, 64, generator=generator)  # products of 4096 queries: 6.1 GiB
    queries = torch.randn(4096, 64, generator=generator)
    index = TorchNearestNeighbours(torch.device("cuda"))
    index.fit(bank)
    assert index.chunk_rows() == search_module.SEARCH_PRODUCT_BUDGET // (4 * 400_000)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    distances, _ = index.search(queries, 3)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 4 * search_module.SEARCH_PRODUCT_BUDGET, peak
    on_cpu = TorchNearestNeighbours(torch.device("cpu"))
    on_cpu.fit(bank)
    sample = torch.arange(0, 4096, 97)
    expected_distances, _ = on_cpu.search(queries[sample], 3)
    torch.testing.assert_close(distances[sample].cpu(), expected_distances, rtol=1e-4, atol=1e-3)


@needs_cuda
def test_the_exported_module_on_cuda_scores_like_on_the_cpu(tmp_path, float32_arithmetic):
    model = PatchCore(small_config(), device="cpu")
    model.fit([_images(8, 0)])
    module = PatchCoreModule.from_patchcore(model, threshold=1.0)
    torch.save(module.state_dict(), tmp_path / "category.pth")
    loaded = PatchCoreModule()  # as an evaluator restores it, then moves it to the GPU
    loaded.load_state_dict(torch.load(tmp_path / "category.pth", weights_only=True))
    on_gpu = copy.deepcopy(loaded).cuda()
    assert on_gpu.memory_bank.device.type == "cuda"
    images = torch.rand(3, 3, 90, 70, generator=torch.Generator().manual_seed(3))
    expected = loaded(images)
    got = on_gpu(images.cuda())
    assert got["pred_score"].device.type == "cuda"
    torch.testing.assert_close(got["pred_score"].cpu(), expected["pred_score"],
                               rtol=FLOAT32_SCORE_RTOL, atol=0)  # fmt: skip
    largest = float(expected["anomaly_maps"].abs().max())
    torch.testing.assert_close(got["anomaly_maps"].cpu(), expected["anomaly_maps"], rtol=0,
                               atol=FLOAT32_MAP_ATOL * largest)  # fmt: skip
    assert torch.equal(got["pred_label"].cpu(), expected["pred_label"])


@needs_cuda
def test_the_cli_trains_on_cuda_and_refuses_a_gpu_id_it_lacks(synthetic_root, tmp_path):
    from patchcore.cli.runs import train_cli
    from test_cli import SMALL_DATA, SMALL_RANDOM

    arguments = [str(tmp_path / "results"), "patch_core", *SMALL_RANDOM,
                 "sampler", "-p", "0.1", "approx_greedy_coreset",
                 "dataset", *SMALL_DATA, "-d", "texture", "mvtec", str(synthetic_root)]  # fmt: skip
    count = torch.cuda.device_count()
    refused = CliRunner().invoke(train_cli, ["--gpu", str(count), *arguments])
    assert refused.exit_code == 1
    assert _errors(refused.output) == [
        f"Error: --gpu {count}: this machine has {count} CUDA device(s), ids 0 to {count - 1}"
    ], refused.output
    trained = CliRunner().invoke(train_cli, ["--gpu", "0", *arguments])
    assert trained.exit_code == 0, trained.output


@needs_cuda
def test_predict_cli_refuses_a_bank_the_gpu_cannot_hold_in_one_line(tmp_path, monkeypatch):
    from patchcore.cli.predict import predict_cli
    from patchcore.model.serialization import save_models

    model = PatchCore(small_config(), search=SearchConfig(backend="torch"))
    model.fit([_images(6, 0)])
    save_models(tmp_path / "model", [model])
    image = tmp_path / "image.png"
    Image.fromarray((_images(1, 1)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(image)
    monkeypatch.setattr(search_module, "available_memory_bytes", lambda device: 2**10)
    outcome = CliRunner().invoke(predict_cli, [
        str(tmp_path / "model"), str(image), "--output", str(tmp_path / "out"), "--gpu", "0",
        "--num_workers", "0", "--nn_backend", "torch",
    ])  # fmt: skip
    assert outcome.exit_code == 1, outcome.output
    errors = _errors(outcome.output)
    assert len(errors) == 1 and "does not fit in the 0.00 GiB free on cuda:0" in errors[0], (
        outcome.output
    )
    assert "Traceback" not in outcome.output and "CUDA out of memory" not in outcome.output
