"""Atomic writes: a file or folder appears complete, or not at all.

Everything this library writes (results, predictions, overlays, models, exports) goes
through `staged_path`: the content is written to a hidden staging path beside the target
and moved into place when complete. A crash leaves the previous version (or nothing) and a
hidden `.<name>.partial-<host>-<pid>-*` leftover that readers skip (`is_staging`); the next
save of the same folder removes the leftovers of processes of this host that have ended.

A folder that already exists is replaced by exchanging it with the complete new version in
one step (`renameat2(RENAME_EXCHANGE)`, Linux on ext4, XFS, Btrfs, tmpfs, ...), so at every
instant the folder is a complete version, the old one or the new one. Where the file system
cannot exchange (NFS, other systems) the new version is first renamed `.<name>.ready-*`,
then the old one is moved aside (`.retired-*`) and the new one into place; a crash between
those two renames leaves no folder for an instant, and `recover_folder` (called by the next
save and by every model load) moves the ready version, or else the retired one, back into
place. A folder given as a symbolic link is replaced at its target (`link_target`), so the
link stays a link.

A write that fails in the file system (disk full, read-only folder, ...) raises an
`OutputError` naming the file and the fix (`output_error`); `check_writable` finds an
unwritable output before any work is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from patchcore.errors import OutputError

STAGING_MARK = ".partial-"
RETIRED_MARK = ".retired-"
READY_MARK = ".ready-"
_MARKS = (STAGING_MARK, READY_MARK, RETIRED_MARK)
_OWNER = re.compile(
    r"(?:\.partial-|\.ready-|\.retired-)(?P<host>\w*)-(?P<pid>\d+)-[0-9a-f]+$", re.ASCII
)
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
# What renameat2 answers where the kernel or the file system cannot exchange two names.
_CANNOT_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def is_staging(path: Path) -> bool:
    """True for the hidden staging, ready and retired leftovers of `staged_path`."""
    name = Path(path).name
    return name.startswith(".") and any(mark in name for mark in _MARKS)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]


def _hidden_sibling(path: Path, mark: str) -> Path:
    owner = f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return path.parent / f".{path.name}{mark}{owner}"


def output_error(path: Path, error: OSError) -> OutputError:
    """The one-line error for `path` that could not be written because of `error`."""
    reason = error.strerror or str(error)
    if error.errno in _FULL:
        fix = "free space on that disk, or write the output somewhere else"
    elif error.errno in _NOT_WRITABLE:
        fix = "the folder is not writable: choose another output location or change its permissions"
    else:
        fix = "check that the output location is a writable folder"
    return OutputError(f"{path}: cannot write ({reason}); {fix}")


def check_writable(path: Path) -> Path:
    """Checks, before any work, that `path` (a folder, created later if missing) can be
    written: a probe folder is created and removed in it or in its nearest existing parent,
    so nothing is left behind. Raises `output_error`'s OutputError; returns `path`."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{path}: cannot write there, {existing} is not a folder")
    probe = _hidden_sibling(existing / "write-check", STAGING_MARK)
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as error:
        raise output_error(path, error) from error
    return path


def make_folder(folder: Path) -> Path:
    """Creates `folder` and its parents if missing; an OutputError (`output_error`) if not
    possible. Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(folder, error) from error
    return folder


def _owner_has_ended(leftover: str) -> bool:
    """True when the staging name `leftover` was made by a process of this host that has
    ended (its id is not running); False when it may still be writing, or is not ours."""
    owner = _OWNER.search(leftover)
    if owner is None or owner["host"] != _host():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, but belongs to another user
        return False
    return False


def link_target(path: Path) -> Path:
    """`path`, or the folder it finally points to when it is a symbolic link: a save
    replaces the target and keeps the link."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _stale_leftovers(path: Path, mark: str) -> list[Path]:
    """The `mark` leftovers of `path` whose processes (of this host) have ended, newest first."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}{mark}"
    with os.scandir(path.parent) as entries:
        found = [(entry.stat(follow_symlinks=False).st_mtime_ns, entry.path) for entry in entries
                 if entry.name.startswith(prefix) and _owner_has_ended(entry.name)]  # fmt: skip
    return [Path(name) for _, name in sorted(found, reverse=True)]


def remove_stale_leftovers(path: Path) -> list[Path]:
    """Removes the staging, ready and retired leftovers of `path` that crashed processes of
    this host left behind (see `_owner_has_ended`); returns what was removed."""
    path = Path(path)
    removed = [leftover for mark in _MARKS for leftover in _stale_leftovers(path, mark)]
    for leftover in removed:
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def recover_folder(path: Path) -> Path:
    """Puts back a folder that a replacement killed between its two renames left missing
    (only where the file system cannot exchange folders, see the module notes): the complete
    new version (`.ready-`) if there is one, else the old one (`.retired-`); then removes the
    other leftovers of ended processes. Leftovers of running processes are left alone.
    Without write permission nothing changes (a warning-free no-op). Returns `path`."""
    path = link_target(path)
    if not path.exists() and not path.is_symlink():
        candidates = _stale_leftovers(path, READY_MARK) + _stale_leftovers(path, RETIRED_MARK)
        for candidate in candidates:
            with contextlib.suppress(OSError):  # another process recovered it first
                candidate.rename(path)
                break
    with contextlib.suppress(OSError):
        remove_stale_leftovers(path)
    return path


def _about(error: OSError, path: Path, staging: Path) -> bool:
    """Whether `error` concerns writing `path` (no file named, or a file of the staging)."""
    names = [name for name in (error.filename, error.filename2) if name is not None]
    return not names or any(
        str(name).startswith(str(staging)) or Path(name) == path for name in names
    )


@contextlib.contextmanager
def staged_path(path: Path, folder: bool = False) -> Iterator[Path]:
    """Yields where to write `path`'s new content; it replaces `path` if the block succeeds.

    For a file the yielded path is a not-yet-existing file with `path`'s name (writers that
    derive content from the name, such as torch archives, see the final name); for a folder
    (`folder=True`) it is an empty folder. Parent folders are created. Staging folders are
    made with `os.mkdir`, so the result gets the permissions the umask gives any other file.
    If the block raises, the staging is removed and `path` is left as it was; a file-system
    error while writing `path` becomes an OutputError (`output_error`). Saving a folder
    first removes the leftovers of earlier saves of it that crashed (`remove_stale_leftovers`).
    """
    path = link_target(path) if folder else Path(path)
    staging = _hidden_sibling(path, STAGING_MARK)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            recover_folder(path)
        os.mkdir(staging)
    except OSError as error:
        raise output_error(path, error) from error
    try:
        if folder:
            yield staging
            _replace_folder(staging, path)
        else:
            yield staging / path.name
            os.replace(staging / path.name, path)
    except OSError as error:
        if not _about(error, path, staging):
            raise
        raise output_error(path, error) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@functools.cache
def _renameat2():
    """The C library's renameat2 (Linux, glibc 2.28 and later), or None."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_uint]  # fmt: skip
        function.restype = ctypes.c_int
    return function


def exchange_folders(first: Path, second: Path) -> bool:
    """Swaps the names of two existing folders in one atomic step; False (nothing changed)
    where the system or file system cannot, an OSError for any other failure."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                _RENAME_EXCHANGE) == 0:  # fmt: skip
        return True
    code = ctypes.get_errno()
    if code in _CANNOT_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _replace_folder(staging: Path, path: Path) -> None:
    """Puts the complete folder `staging` in place of `path`. After an exchange, the old
    version sits at `staging`, which `staged_path` then removes."""
    if not path.exists():
        staging.rename(path)
        return
    if exchange_folders(staging, path):
        return
    ready = _hidden_sibling(path, READY_MARK)
    staging.rename(ready)
    retired = _hidden_sibling(path, RETIRED_MARK)
    path.rename(retired)
    ready.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock for the block, so several processes (also on other machines
    sharing the folder over NFS, which supports these locks) take turns. The lock is the
    hidden file `.<name>.lock` beside `path`, left in place for the next user."""
    with _locked(path, wait=True):
        yield


@contextlib.contextmanager
def exclusive_lock_if_free(path: Path) -> Iterator[bool]:
    """`exclusive_lock` without waiting: yields True and holds the lock for the block when
    no other process holds it, else yields False at once. The system releases the lock of a
    process that dies, so a crash never leaves a claim behind."""
    with _locked(path, wait=False) as held:
        yield held


@contextlib.contextmanager
def _locked(path: Path, wait: bool) -> Iterator[bool]:
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+b")  # noqa: SIM115 (closed below, after the unlock)
    except OSError as error:
        raise output_error(lock, error) from error
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process (only without waiting)
            yield False
            return
        try:
            yield True
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


def printable_name(name: str) -> str:
    """`name` as it may be written into a UTF-8 text output (CSV, a figure's title).

    A file name whose bytes are not valid UTF-8 reaches Python with each such byte as a lone
    surrogate (`os.fsdecode`), which no UTF-8 file can hold. Such a name is written with each
    of those bytes as `\\xNN` and each backslash doubled, so the bytes can be recovered
    (`name_of_printable`); every other name is written unchanged."""
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return name
    return "".join(_escaped(c) for c in name)


def _escaped(character: str) -> str:
    code = ord(character)
    if character == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:  # any other lone surrogate
        return f"\\u{code:04x}"
    return character


def name_of_printable(printed: str) -> str:
    """The file name `printable_name` printed as `printed` (for a name it escaped)."""
    pieces = re.split(r"(\\\\|\\x[0-9a-f]{2}|\\u[0-9a-f]{4})", printed)
    decoded = []
    for piece in pieces:
        if piece == "\\\\":
            decoded.append("\\")
        elif piece.startswith("\\x") and len(piece) == 4:
            decoded.append(chr(0xDC00 + int(piece[2:], 16)))  # noqa: FURB166 (a \\x prefix)
        elif piece.startswith("\\u") and len(piece) == 6:
            decoded.append(chr(int(piece[2:], 16)))  # noqa: FURB166 (a \\u prefix)
        else:
            decoded.append(piece)
    return "".join(decoded)


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
