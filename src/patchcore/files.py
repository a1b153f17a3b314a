"""Atomic file writes: a file appears complete, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Calls write(temporary) and moves the result to `path`; a failure leaves `path` as it was.

    The temporary file has `path`'s name, in a fresh hidden folder beside it, so it gets the
    usual permissions and writers that derive content from the file name (torch archives)
    see the final name. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(staging / path.name)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(data))
