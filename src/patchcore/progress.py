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
    for item, _ in _shown(((item, 1) for item in iterable), description, total, unit):
        yield item


def track_blocks(total: int, block: int, description: str, unit: str = "it") -> Iterator[int]:
    """Yields the ends of consecutive blocks of `block` items covering `total` items (the
    caller does a block's items at once), showing progress in items."""
    ends = [*range(block, total, block), total]
    for end, _ in _shown(((end, end - begin) for begin, end in zip([0, *ends], ends)),
                         description, total, unit):  # fmt: skip
        yield end


def _shown(
    items: Iterable[tuple[Item, int]], description: str, total: int | None, unit: str
) -> Iterator[tuple[Item, int]]:
    """Yields (item, amount) pairs; once the caller is done with one, `amount` units of
    progress are shown: on a bar, or as a log line a minute and one at the end."""
    if bars_enabled():
        with tqdm.tqdm(desc=description, total=total, unit=unit, leave=False) as bar:
            for item, amount in items:
                yield item, amount
                bar.update(amount)
        return
    start = last = time.monotonic()
    count = 0
    for item, amount in items:
        yield item, amount
        count += amount
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
