"""Every product path of the lazy selection and the re-ranking search, on every machine.

A path this CPU and build can run (`samplers.native_product_paths`) is tested natively; every
path is also tested in emulation (`emulate=True`: the path's copies, rounding and bound with
torch computing the products, bfloat16 products as float32 sums of the exact products of the
bfloat16 copies rounded once, as AMX and AVX512-BF16 compute them), so a machine of any CPU
class tests every selection and search rule. The test session's summary lists which paths
ran natively (conftest.py). Builds without `-march=native` (what an AVX2-only or baseline
x86-64 CPU gets) and an ARM64 cross-compile are checked too.
"""

import os
import platform
import shutil
import subprocess

import pytest
import torch

from patchcore.config import SearchConfig
from patchcore.errors import ConfigurationError
from patchcore.model import native, samplers
from patchcore.model.native import coreset_kernels
from patchcore.model.samplers import (
    PRODUCT_PATHS,
    PRODUCTS_VARIABLE,
    _LazyTiles,
    farthest_point_selection,
    native_product_paths,
    pruned_farthest_point_selection,
)
from patchcore.model.search import RerankedNearestNeighbours, build_index

KERNELS = coreset_kernels()
NATIVE = native_product_paths(KERNELS)
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler")


def _start(features):
    return torch.cdist(features.double(), features[:5].double()).mean(dim=1).square().float()


def _cases():
    """Structure, exact ties (repeated rows), near ties and unequal scales; 64 columns (two
    32-value blocks, the bfloat16 kernels' condition) and 37 (a tail for the vector kernels)."""
    generator = torch.Generator().manual_seed(21)
    latent = torch.randn(2600, 6, generator=generator)
    manifold = latent @ torch.randn(6, 64, generator=generator)
    manifold += 0.05 * torch.randn(2600, 64, generator=generator)
    manifold[900:1300] = manifold[7]
    near = torch.randn(400, 37, generator=generator).repeat(5, 1)
    near[400:] = torch.nextafter(near[400:], near[400:] + 1)
    scales = torch.randn(2000, 37, generator=generator) * torch.logspace(-3, 3, 2000)[:, None]
    return {"manifold": manifold, "near": near, "scales": scales}


CASES = _cases()


def _check_selection(kernels, path, emulate):
    for name, features in CASES.items():
        features = features.contiguous()
        start = _start(features)
        count = len(features) // 5
        plain = farthest_point_selection(features, None, start.clone(), count)
        for tile_size in (1024, 40):
            tiles = _LazyTiles(kernels, features, start, tile_size, path, emulate)
            assert torch.equal(tiles.run(count), plain), (name, path, tile_size)
            assert tiles.stats["path"] == path


@needs_kernels
@pytest.mark.parametrize("path", PRODUCT_PATHS)
def test_each_product_path_selects_the_plain_sweeps_rows(path):
    """Natively where this CPU can, in emulation always."""
    if path in NATIVE:
        _check_selection(KERNELS, path, emulate=False)
    _check_selection(KERNELS, path, emulate=True)


@needs_kernels
@pytest.mark.parametrize("path", ["amx", "avx512bf16", "avx2", "portable"])
def test_compiled_products_are_within_the_bound_of_their_path(path):
    """Each compiled kernel's products differ from the exact products of its copies by at
    most eta (|x|^2 + |c|^2) / 2, eta the path's bound (`products_rounding_eta`); point counts
    and dimensions exercise every block shape (AVX2: 16- and 8-point groups, then 1 to 7
    points) and a vector tail."""
    if path not in NATIVE:
        pytest.skip(f"this CPU does not run {path} products (its rounding is emulated above)")
    bfloat16 = path in samplers.BFLOAT16_PATHS
    generator = torch.Generator().manual_seed(5)
    for dimension in (64,) if bfloat16 else (64, 37):
        eta = samplers.products_rounding_eta(dimension, bfloat16)
        for count, points in ((40, 7), (33, 5), (17, 1), (16, 16), (45, 27), (50, 40)):
            scale = torch.logspace(-2, 2, count + 16)[:, None]
            rows = torch.randn(count + 16, dimension, generator=generator) * scale
            rows[count:] = 0  # the padding the kernels may read
            centres = torch.randn(points, dimension, generator=generator)
            dtype = torch.bfloat16 if bfloat16 else torch.float32
            rows, centres = rows.to(dtype).contiguous(), centres.to(dtype).contiguous()
            out = torch.empty(count, points, dtype=dtype)
            pairs = torch.empty(dimension * 16, dtype=torch.bfloat16)
            code = KERNELS.tile_products(PRODUCT_PATHS.index(path), rows.data_ptr(), count,
                                         dimension, centres.data_ptr(), points,
                                         pairs.data_ptr(), out.data_ptr())  # fmt: skip
            assert code == 0
            x, c = rows[:count].double(), centres.double()
            exact = x @ c.T
            allowed = eta * (x.square().sum(1)[:, None] + c.square().sum(1)[None, :]) / 2
            error = (out.double() - exact).abs()
            assert bool((error <= allowed).all()), (dimension, count, points)


@needs_kernels
@pytest.mark.parametrize("path", ["avx2", "portable"])
def test_float32_paths_compute_every_batch_in_compiled_code(monkeypatch, path):
    """The AVX2 and portable paths never hand a batch back to torch.mm (the helper thread
    can take part in every update)."""
    if path not in NATIVE:
        pytest.skip(f"this CPU does not run {path} products")

    def refuse(self, state):
        raise AssertionError("a batch of pending points went back to torch.mm")

    monkeypatch.setattr(samplers._LargeBatches, "apply", refuse)
    _check_selection(KERNELS, path, emulate=False)


@needs_kernels
def test_the_helper_thread_shares_float32_updates_and_selects_the_same(monkeypatch):
    """With two torch threads the helper takes chunks of the rows of updates (counted) on a
    path that computes every batch in compiled code; with one thread or switched off, none.
    (A helper that a busy machine does not schedule leaves its chunks to the calling
    thread: three tries for it to take any.)"""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU core: the calling thread would claim every chunk itself")
    path = "avx2" if "avx2" in NATIVE else "portable"
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(12000, 128, generator=generator)
    features *= torch.rand(12000, 1, generator=generator)
    start = _start(features)
    plain = farthest_point_selection(features, None, start.clone(), 800)
    threads = torch.get_num_threads()

    def shared_updates(count: int, helper: bool) -> int:
        monkeypatch.setattr(samplers, "USE_HELPER_THREAD", helper)
        tiles = _LazyTiles(KERNELS, features, start, 1024, path)
        torch.set_num_threads(count)
        try:
            assert torch.equal(tiles.run(800), plain)
        finally:
            torch.set_num_threads(threads)
        assert tiles.stats["updates"] > 0
        return tiles.stats["shared"]

    assert any(shared_updates(2, helper=True) > 0 for _ in range(3))
    assert shared_updates(1, helper=True) == 0
    assert shared_updates(2, helper=False) == 0


@needs_kernels
@pytest.mark.parametrize("path", NATIVE)
def test_torch_thread_count_is_restored_after_every_selection(path):
    features = CASES["manifold"]
    start = _start(features)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            pruned_farthest_point_selection(features, None, start, 300, products=path)
            assert torch.get_num_threads() == threads
            pruned_farthest_point_selection(features, None, start, 300, products=path,
                                            stop_at=float(start.median()))  # fmt: skip
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_a_forced_path_is_validated_with_a_one_line_error(monkeypatch):
    features = CASES["near"]
    start = _start(features)
    monkeypatch.setenv("PATCHCORE_PRODUCTS", "avx3")
    with pytest.raises(ConfigurationError, match=r"PATCHCORE_PRODUCTS: unknown product path "
                                                 r"'avx3'; expected one of amx, "):  # fmt: skip
        pruned_farthest_point_selection(features, None, start, 10)
    with pytest.raises(ConfigurationError, match="PATCHCORE_PRODUCTS"):
        RerankedNearestNeighbours()
    missing = [path for path in PRODUCT_PATHS if path not in NATIVE]
    if missing:
        monkeypatch.setenv("PATCHCORE_PRODUCTS", missing[0])
        with pytest.raises(ConfigurationError, match="cannot run on this CPU") as error:
            pruned_farthest_point_selection(features, None, start, 10)
        assert "\n" not in str(error.value)
    monkeypatch.setenv("PATCHCORE_PRODUCTS", "torch")  # forced and runnable: used
    tiles = _LazyTiles(KERNELS, features.contiguous(), start, 256)
    assert tiles.path == "torch"


class _CpuRunning:
    """Kernels stand-in: a build whose CPU runs exactly the named paths."""

    def __init__(self, *paths):
        self.mask = sum(1 << PRODUCT_PATHS.index(path) for path in paths)

    def product_paths(self):
        return self.mask


@pytest.mark.parametrize(
    ("runs", "selection", "search"),
    [
        (("amx", "avx512bf16", "avx2", "portable", "torch"), "amx", "amx"),
        (("avx512bf16", "avx2", "portable", "torch"), "avx2", "avx512bf16"),
        (("avx2", "portable", "torch"), "avx2", "avx2"),
        (("portable", "torch"), "portable", "portable"),
    ],
    ids=["sapphire-rapids", "zen4", "avx2-only", "arm64"],
)
def test_each_use_defaults_to_its_fastest_path_on_each_cpu_class(monkeypatch, runs, selection,
                                                                  search):  # fmt: skip
    """The lazy selection prefers AVX2 float32 to AVX512-BF16 (its faster kernel where both
    run); the search prefers bfloat16 products; AMX first for both."""
    from patchcore.model.samplers import SEARCH_PREFERENCE, product_path

    monkeypatch.delenv("PATCHCORE_PRODUCTS", raising=False)
    kernels = _CpuRunning(*runs)
    assert product_path(kernels) == selection
    assert product_path(kernels, preference=SEARCH_PREFERENCE) == search
    monkeypatch.setenv("PATCHCORE_PRODUCTS", runs[-1])  # a forced path wins for both uses
    assert product_path(kernels) == product_path(kernels, preference=SEARCH_PREFERENCE) == runs[-1]


# ------------------------------------------------------------------ the search
def _banks():
    generator = torch.Generator().manual_seed(4)
    far = 300.0 + 0.01 * torch.randn(800, 64, generator=generator)
    repeated = torch.randn(400, 48, generator=generator).repeat(3, 1)
    repeated[400:800] = torch.nextafter(repeated[400:800], repeated[400:800] + 1)
    grid = torch.randint(0, 3, (1000, 20), generator=generator).float()
    return {
        "far": (far, far[::3] + 1e-3 * torch.randn(267, 64, generator=generator)),
        "repeated": (
            repeated,
            torch.cat([repeated[:50], torch.randn(50, 48, generator=generator)]),
        ),
        "grid": (grid, torch.randint(0, 3, (200, 20), generator=generator).float()),
    }


def _check_search(path, emulate):
    for name, (bank, queries) in _banks().items():
        index = RerankedNearestNeighbours(max_chunk_rows=96, products=path, emulate=emulate)
        index.fit(bank)
        squared = torch.cdist(queries.double(), bank.double()).square()
        for k in (1, 4):
            distances, indices = index.search(queries, k)
            # every neighbour found is as near as the k-th true neighbour (ties either way)
            kth = torch.sort(squared, dim=1).values[:, k - 1 : k]
            found = squared.gather(1, indices)
            assert bool((found <= kth * (1 + 1e-5) + 1e-4).all()), (name, path, k)
            torch.testing.assert_close(distances.double(), found, rtol=1e-5, atol=1e-4)
            same = indices == torch.argsort(squared, dim=1, stable=True)[:, :k]
            assert float(same.double().mean()) > 0.5, name


@needs_kernels
@pytest.mark.parametrize("path", PRODUCT_PATHS)
def test_each_product_path_searches_exactly(path):
    if path in NATIVE:
        _check_search(path, emulate=False)
    _check_search(path, emulate=True)


@needs_kernels
def test_reranking_is_the_default_search_where_its_products_are_bfloat16_or_forced(monkeypatch):
    """bfloat16 product passes (AMX, AVX512-BF16) make `rerank` the default; float32 ones do
    FAISS's arithmetic and more, so FAISS stays the default there unless a path is forced."""
    from patchcore.model.search import FaissNearestNeighbours

    monkeypatch.delenv(PRODUCTS_VARIABLE, raising=False)
    index = build_index(SearchConfig(), torch.device("cpu"))
    if NATIVE[0] in ("amx", "avx512bf16"):
        assert isinstance(index, RerankedNearestNeighbours) and index.path == NATIVE[0]
    else:
        assert isinstance(index, FaissNearestNeighbours)
    monkeypatch.setattr(samplers, "product_path", lambda kernels, requested=None, preference=None: "avx2")
    assert isinstance(build_index(SearchConfig(), torch.device("cpu")), FaissNearestNeighbours)
    monkeypatch.undo()
    monkeypatch.setenv(PRODUCTS_VARIABLE, NATIVE[-2] if len(NATIVE) > 1 else NATIVE[0])
    forced = build_index(SearchConfig(), torch.device("cpu"))
    assert isinstance(forced, RerankedNearestNeighbours)
    assert forced.path == os.environ[PRODUCTS_VARIABLE]


# ------------------------------------------------------------------ portable builds
IS_X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.mark.skipif(not IS_X86, reason="x86-64 builds")
@pytest.mark.parametrize("tuning", [("-march=x86-64-v3",), ()], ids=["x86-64-v3", "baseline"])
def test_builds_without_march_native_select_the_plain_sweeps_rows(tuning):
    """`-march=x86-64-v3` is what an AVX2-only CPU's build amounts to; no flag, baseline
    x86-64 (SSE2): every path such a build runs here selects the plain sweep's rows."""
    kernels = native.build_kernels(tuning)
    if kernels is None:
        pytest.skip("no C compiler")
    paths = native_product_paths(kernels)
    assert "portable" in paths and "torch" in paths
    for path in paths:
        _check_selection(kernels, path, emulate=False)


def test_the_kernels_cross_compile_for_arm64(tmp_path):
    compiler = shutil.which("aarch64-linux-gnu-gcc")
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
    for flags in ([], ["-mcpu=neoverse-n1"]):
        completed = subprocess.run(
            [compiler, *native.REQUIRED_FLAGS, *flags, "-Wall", "-Werror", "-o",
             str(tmp_path / "kernels.so"), str(native.SOURCE), "-lm"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
