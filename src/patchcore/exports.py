"""Lazy public names for package `__init__` modules.

A package lists its public names and the modules defining them; a name's module is imported
on first use (PEP 562). So `import patchcore.cli` or reading a run stays fast, while
`from patchcore import PatchCore` works as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for a package exposing `exports` (name -> module)."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
