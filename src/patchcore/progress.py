"""Progress of long loops: a bar on a terminal, a few readable log lines otherwise.

A bar (tqdm, on stderr) is drawn when stderr is a terminal and progress is not switched off
(`--no_progress` on any command, or `PATCHCORE_PROGRESS=0` in the environment, which worker
processes inherit). Otherwise (output redirected to a file, CI, `nohup`) a loop logs one
line when it ends, and one a minute while it runs, instead of thousands of carriage-return
updates.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import tqdm

LOGGER = logging.getLogger("patchcore.progress")

PROGRESS_ENVIRONMENT_VARIABLE = "PATCHCORE_PROGRESS"
LOG_INTERVAL_SECONDS = 60.0

Item = TypeVar("Item")


def bars_enabled() -> bool:
    """True when progress bars should be drawn."""
    if os.environ.get(PROGRESS_ENVIRONMENT_VARIABLE, "1") == "0":
        return False
    return sys.stderr.isatty()


def disable_bars() -> None:
    """Switches bars off for this process and the processes it starts (`--no_progress`)."""
    os.environ[PROGRESS_ENVIRONMENT_VARIABLE] = "0"


def track(
    iterable: Iterable[Item], description: str, total: int | None = None, unit: str = "it"
) -> Iterator[Item]:
    """Yields the items of `iterable`, showing progress as a bar or as log lines."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if bars_enabled():
        yield from tqdm.tqdm(iterable, desc=description, total=total, unit=unit, leave=False)
        return
    yield from _logged(iterable, description, total, unit)


def _logged(
    iterable: Iterable[Item], description: str, total: int | None, unit: str
) -> Iterator[Item]:
    start = last = time.monotonic()
    count = 0
    for item in iterable:
        yield item
        count += 1
        now = time.monotonic()
        if now - last >= LOG_INTERVAL_SECONDS:
            last = now
            LOGGER.info("%s: %s so far, %.0f s", description, _amount(count, total, unit), now - start)
    LOGGER.info("%s: %s in %.1f s", description, _amount(count, total, unit, done=True),
                time.monotonic() - start)  # fmt: skip


def _amount(count: int, total: int | None, unit: str, done: bool = False) -> str:
    if total is None or done:
        return f"{count} {unit}"
    return f"{count}/{total} {unit} ({100.0 * count / max(total, 1):.0f} %)"
