"""What every command-line entry point shares: logging set-up and one-line errors."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

import click

from patchcore.config import SEARCH_BACKENDS
from patchcore.errors import PatchCoreError

nn_backend_option = click.option(
    "--nn_backend", type=click.Choice(SEARCH_BACKENDS), default="faiss", show_default=True,
    help="Exact nearest-neighbour search with FAISS or with torch matrix products.",
)  # fmt: skip

GLIBC_M_TRIM_THRESHOLD = -1
GLIBC_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def configure_process() -> None:
    """Process set-up of a command-line program: logging, and glibc's heap behaviour.

    glibc raises its mmap threshold after large blocks are freed, so the big temporaries
    of feature extraction end up on the heap and stay resident (hundreds of MB, varying
    run to run). A fixed 4 MiB threshold returns such blocks to the system on free, and a
    high trim threshold keeps the heap of smaller blocks from being trimmed and re-faulted.
    """
    configure_logging()
    library = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None) if library else None
    if mallopt is not None:
        mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        mallopt(GLIBC_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def run_guarded(job: Callable[[], None]) -> None:
    """Runs `job`; a PatchCoreError becomes one line on stderr and exit code 1."""
    try:
        job()
    except PatchCoreError as error:
        # Errors raised in DataLoader workers arrive wrapped; their last line is ours.
        lines = str(error).strip().splitlines()
        raise click.ClickException(lines[-1] if lines else repr(error)) from error
