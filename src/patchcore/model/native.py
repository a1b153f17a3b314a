"""Compiled coreset kernels (`coreset_kernels.c`), built once per machine and loaded with ctypes.

The kernels are compiled with the system's C compiler (`$CC`, else `cc`, `gcc` or `clang`)
the first time they are needed, with `-ffp-contract=off` so that their float32 arithmetic is
exactly the one written in the source (no fused multiply-add; the AVX2 products' fused
multiply-adds are written as intrinsics and bounded as such), and tuned for the machine
(`-march=native` on x86-64, `-mcpu=native` elsewhere; without them where the compiler refuses).
The instruction-set kernels (AMX, AVX512-BF16, AVX2) carry their own target attributes and
run only where `product_paths()` finds the CPU and the kernel allow them, so any build runs
on any CPU of its architecture (`build_kernels` makes one with other flags, e.g. the
`-march=x86-64-v3` an AVX2-only CPU would get). The library is cached under
`$PATCHCORE_CACHE_DIR` (default `~/.cache/patchcore`), keyed by the source, the compiler and the CPU, and replaced
atomically, so concurrent processes are safe. Without a compiler `coreset_kernels()` returns
None and callers use their pure-torch forms, which give identical results, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

LOGGER = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("coreset_kernels.c")
REQUIRED_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
TUNING_FLAGS = (
    ("-march=native", "-mprefer-vector-width=512")
    if platform.machine() in ("x86_64", "AMD64")
    else ("-mcpu=native",)
)

_P, _I, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "exact_distances": ([_P, _I, _P, _I, _P, _P], None),
    "transpose_blocks": ([_P, _I, _I, _I, _I, _P], None),
    "sweep_blocks": ([_P, _I, _I, _I, _P, _P, _I, _P, _P], None),
    "prepare_tiles": (
        [_P, _I, _P, _P, _I, _I, _F, _P, _I32, _P, _P, _P, _P, _P, _P, _P, _P],
        None,
    ),
    "apply_points": (
        [_P, _I, _P, _I, _P, _I32, _I, _I, _P, _P, _P, _P, _P, _F, _F, _P, _P, _P, _P],
        _I,
    ),
    "lazy_steps": ([_P, _I], _I),
    "product_paths": ([], _I),
    "tile_products": ([_I, _P, _I, _I, _P, _I, _P, _P], _I),
    "extended_copies": ([_P, _I, _I, _P, _I32, _I32, _P, _I, _P, _P], None),
    "rerank_neighbours": (
        [_P, _P, _I, _I, _I, _P, _I32, _I, _P, _P, _F, _F, _F, _I, _P, _P, _P, _P],
        _I,
    ),
}


def cache_directory() -> Path:
    configured = os.environ.get("PATCHCORE_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patchcore"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_signature() -> str:
    """The CPU model and feature flags: `-march=native` builds only run where they were made."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def _compile(compiler: str, flags: list[str], target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staged = Path(scratch) / target.name
        command = [compiler, *flags, "-o", str(staged), str(SOURCE), "-lm"]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            LOGGER.debug("compiling %s failed: %s", SOURCE.name, completed.stderr.strip())
            return False
        os.replace(staged, target)
    return True


def coreset_kernels() -> ctypes.CDLL | None:
    """The compiled kernels tuned for this machine, building them on first use; None
    without a working compiler."""
    return build_kernels(TUNING_FLAGS)


@functools.lru_cache(maxsize=8)
def build_kernels(tuning: tuple[str, ...]) -> ctypes.CDLL | None:
    """The kernels compiled with REQUIRED_FLAGS and `tuning` (without `tuning` if the compiler
    refuses it); None without a working compiler."""
    compiler = _compiler()
    if compiler is None:
        LOGGER.warning(
            "no C compiler found ($CC, cc, gcc, clang): the coreset uses its pure-torch "
            "form, which selects the same features but is much slower"
        )
        return None
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    for flags in (REQUIRED_FLAGS + list(tuning), REQUIRED_FLAGS):
        key = hashlib.sha256(
            b"\0".join(s.encode() if isinstance(s, str) else s
                       for s in (source, compiler, version, " ".join(flags), _cpu_signature()))
        ).hexdigest()[:20]  # fmt: skip
        target = cache_directory() / "native" / f"coreset_kernels-{key}.so"
        if target.is_file() or _compile(compiler, flags, target):
            library = ctypes.CDLL(str(target))
            for name, (arguments, result) in SIGNATURES.items():
                function = getattr(library, name)
                function.argtypes, function.restype = arguments, result
            return library
    LOGGER.warning(
        "compiling the coreset kernels with %s failed: the coreset uses its pure-torch "
        "form, which selects the same features but is much slower",
        compiler,
    )
    return None


def cpu_class() -> str:
    """This CPU in one line, for benchmark tables: its model name, the vector and matrix
    instruction sets the product paths use, and the cores this process may use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == (
                platform.processor() or platform.machine()
            ):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    named = [("AVX2+FMA", {"avx2", "fma"}), ("AVX-512", {"avx512f"}),
             ("AVX512-BF16", {"avx512_bf16"}), ("AMX-BF16", {"amx_bf16", "amx_tile"}),
             ("NEON", {"asimd"}), ("BF16", {"bf16"})]  # fmt: skip
    present = [name for name, needed in named if needed <= flags]
    absent = [name for name, needed in named[:4] if not needed <= flags]
    if platform.machine() not in ("x86_64", "AMD64"):
        absent = []
    described = ", ".join(present + [f"no {name}" for name in absent]) or "no listed extensions"
    return f"{model} ({platform.machine()}; {described}; {len(os.sched_getaffinity(0))} cores)"
