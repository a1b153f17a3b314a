"""What every command-line entry point shares: logging set-up and one-line errors."""

from __future__ import annotations

import logging
from collections.abc import Callable

import click

from patchcore.errors import PatchCoreError


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
