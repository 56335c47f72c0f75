"""A minimal terminal progress bar (bytes and throughput), off when not on a TTY.

Example:
    >>> bar = ProgressBar.maybe(10, progress=None)   # None: only for big loads on a terminal
    >>> bar is None
    True
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

AUTO_MIN_BYTES = 1 << 30


class ProgressBar:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._last = 0.0

    @staticmethod
    def wanted(progress: bool | None) -> bool:
        """Whether a bar may be shown at all (so callers can skip sizing the load)."""
        return progress is True or (progress is None and sys.stderr.isatty())

    @classmethod
    def maybe(cls, total: int, progress: bool | None, label: str = "",
              min_bytes: int = AUTO_MIN_BYTES) -> ProgressBar | None:
        """A bar when ``progress`` is True, or when None and ``total`` is large on a TTY."""
        if progress is False:
            return None
        if progress is None and (total < min_bytes or not sys.stderr.isatty()):
            return None
        return cls(total, label)

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self._last > 0.1 or self.done >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        rate = self.done / max(now - self.start, 1e-9) / 1e9
        filled = int(frac * 30)
        self.stream.write(f"\r{self.label[:30]} [{'#' * filled}{'.' * (30 - filled)}] "
                          f"{self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB {rate:.2f} GB/s")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.perf_counter())
        self.stream.write("\n")
        self.stream.flush()
