"""Progress reporting for long loops: log lines with counts, items/s and ETA, plus an optional callback
(tasks/base.py forwards it to Luigi's progress percentage and status message)."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("captioner")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts `done` out of `total` items of `unit`; every `every` seconds (and at the end) logs
    "label: done/total unit (pct%), rate unit/s, ETA ..." and calls `callback(percent, message)`."""

    def __init__(self, total: int, label: str, unit: str = "items", callback=None, every: float = 5.0):
        self.total, self.label, self.unit = max(int(total), 0), label, unit
        self.callback, self.every = callback, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def message(self) -> str:
        rate = self.rate()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                f"{rate:.1f} {self.unit}/s, ETA {eta}")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self.report()

    def report(self) -> None:
        message = self.message()
        log.info(message)
        if self.callback is not None:
            pct = 100 * self.done // self.total if self.total else 100
            self.callback(min(int(pct), 100), message)
