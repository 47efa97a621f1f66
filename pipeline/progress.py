"""Progress people can follow: a bar on a terminal, periodic log lines otherwise (log files, cron mail).

tqdm draws the bar; when stderr is not a terminal a log line every ``every_s`` seconds (and at the end)
says how far a long step is, so a nightly log shows progress without carriage-return noise.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["track"]

T = TypeVar("T")
log = logging.getLogger("medtl.progress")


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "case", every_s: float = 30.0) -> Iterator[T]:
    """Iterate ``items`` with progress shown (counts only: never an item's name or value)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        return
    t0 = last = time.monotonic()
    n = 0
    for item in items:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s(s), %.0f s", desc, n, of, unit, now - t0)
    if n and time.monotonic() - t0 >= every_s:
        log.info("%s: done, %d %s(s) in %.0f s", desc, n, unit, time.monotonic() - t0)
