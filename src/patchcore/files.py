"""Atomic writes: a file or folder appears complete, or not at all.

Everything this library writes (results, predictions, overlays, models, exports) goes
through `staged_path`: the content is written to a hidden staging path beside the target
and moved into place when complete. A crash leaves the previous version (or nothing) and a
hidden `.<name>.partial-*` leftover that readers skip (`is_staging`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

STAGING_MARK = ".partial-"
RETIRED_MARK = ".retired-"


def is_staging(path: Path) -> bool:
    """True for the hidden staging and retired leftovers of `staged_path`."""
    name = Path(path).name
    return name.startswith(".") and (STAGING_MARK in name or RETIRED_MARK in name)


def _hidden_sibling(path: Path, mark: str) -> Path:
    return path.parent / f".{path.name}{mark}{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def staged_path(path: Path, folder: bool = False) -> Iterator[Path]:
    """Yields where to write `path`'s new content; it replaces `path` if the block succeeds.

    For a file the yielded path is a not-yet-existing file with `path`'s name (writers that
    derive content from the name, such as torch archives, see the final name); for a folder
    (`folder=True`) it is an empty folder. Parent folders are created. Staging folders are
    made with `os.mkdir`, so the result gets the permissions the umask gives any other file.
    If the block raises, the staging is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(path, STAGING_MARK)
    os.mkdir(staging)
    try:
        if folder:
            yield staging
            _replace_folder(staging, path)
        else:
            yield staging / path.name
            os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(staging: Path, path: Path) -> None:
    if not path.exists():
        staging.rename(path)
        return
    retired = _hidden_sibling(path, RETIRED_MARK)
    path.rename(retired)
    staging.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock for the block, so several processes (also on other machines
    sharing the folder over NFS, which supports these locks) take turns. The lock is the
    hidden file `.<name>.lock` beside `path`, left in place for the next user."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Calls write(temporary) and moves the result to `path`; a failure leaves `path` as it was."""
    with staged_path(path) as temporary:
        write(temporary)
    return Path(path)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> Path:
    """Writes UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def safe_file_stem(name: str) -> str:
    """`name` made safe as a file stem: letters and digits (any script), '.', '_' and '-'
    are kept, every other character becomes '_'; an empty name becomes '_'."""
    kept = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name))
    return kept.lstrip(".") or "_"


def unique_file_stems(names: Sequence[str]) -> list[str]:
    """Safe file stems of `names`, one per name and all distinct: a stem already taken
    (compared case-insensitively, for case-insensitive file systems) gets `-2`, `-3`, ..."""
    stems, used = [], set()
    for name in names:
        stem = safe_file_stem(name)
        candidate, counter = stem, 1
        while candidate.casefold() in used:
            counter += 1
            candidate = f"{stem}-{counter}"
        used.add(candidate.casefold())
        stems.append(candidate)
    return stems
