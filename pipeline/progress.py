"""Progress people can follow: a bar on a terminal, periodic log lines otherwise (log files, cron mail).

tqdm draws the bar (only after ``delay_s``, so quick steps leave no flicker); when stderr is not a
terminal a log line every ``every_s`` seconds (and at the end, for steps that took that long) says how far
a long step is, so a nightly log shows progress without carriage-return noise. Lines carry counts and
seconds only, never an item's name or value.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["track"]

T = TypeVar("T")
log = logging.getLogger("medtl.progress")


def track(
    items: Iterable[T],
    total: int | None,
    desc: str,
    unit: str = "case",
    every_s: float = 30.0,
    size: Callable[[T], int] | None = None,
    delay_s: float = 2.0,
) -> Iterator[T]:
    """Iterate ``items`` with progress shown.

    Args:
        items: The work items.
        total: How many units in all (None: ``len(items)`` when it has one).
        desc: What the step is, e.g. ``"Ingest: decoding"``.
        unit: Name of one unit of work.
        every_s: Seconds between log lines when stderr is not a terminal.
        size: Units of work in one item (default 1), e.g. the resamples of a bootstrap chunk.
        delay_s: The terminal bar appears only once a step has run this long.
    """
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit=unit, leave=False, delay=delay_s) as bar:
            for item in items:
                yield item
                bar.update(size(item) if size else 1)
        return
    t0 = last = time.monotonic()
    n = 0
    for item in items:
        yield item
        n += size(item) if size else 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s(s), %.0f s", desc, n, of, unit, now - t0)
    if n and time.monotonic() - t0 >= every_s:
        log.info("%s: done, %d %s(s) in %.0f s", desc, n, unit, time.monotonic() - t0)
