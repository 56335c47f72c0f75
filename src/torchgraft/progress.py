"""A minimal terminal progress bar (bytes, throughput and ETA), off when not on a TTY.

``progress`` everywhere means: True shows a bar, False never, None ("auto") only on a terminal
(stderr is a TTY) for work that is large (``AUTO_MIN_BYTES``) or, with :meth:`ProgressBar.auto`,
that turns out slow (the bar appears once ``AUTO_DELAY`` seconds have passed).

Example:
    >>> bar = ProgressBar.maybe(10, progress=None)   # None: only for big loads on a terminal
    >>> bar is None
    True
    >>> fmt_eta(83.4), fmt_eta(4000)
    ('1:23', '1:06:40')
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

AUTO_MIN_BYTES = 1 << 30
AUTO_DELAY = 2.0  # seconds of work after which an auto bar appears whatever the size


def fmt_eta(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for a duration in seconds."""
    s = max(int(seconds + 0.5), 0)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _fmt_size(n: float, unit: float) -> str:
    return f"{n / unit:.2f}" if unit >= 1e9 else f"{n / unit:.1f}"


class ProgressBar:
    """``bar.update(nbytes)`` as work is done, ``bar.close()`` at the end. With ``delay`` the bar
    stays invisible until that many seconds have passed (and writes nothing at all if the work
    finishes sooner)."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None,
                 delay: float = 0.0) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.delay = delay
        self.drawn = False
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

    @classmethod
    def auto(cls, total: int, progress: bool | None, label: str = "",
             min_bytes: int = AUTO_MIN_BYTES, delay: float = AUTO_DELAY) -> ProgressBar | None:
        """As :meth:`maybe`, but with ``progress=None`` small work on a terminal also gets a
        bar, one that appears only after ``delay`` seconds (slow work, e.g. statistics)."""
        if progress is False or (progress is None and not sys.stderr.isatty()):
            return None
        wait = delay if progress is None and total < min_bytes else 0.0
        return cls(total, label, delay=wait)

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.start < self.delay:
            return
        if now - self._last > 0.1 or self.done >= self.total:
            self._last = now
            self._draw(now)
            self.drawn = True

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        filled = int(frac * 30)
        unit, name = (1e9, "GB") if self.total >= 1e9 else (1e6, "MB")
        if self.done >= self.total:
            eta = f"in {fmt_eta(elapsed)}"
        elif self.done > 0:
            eta = f"ETA {fmt_eta((self.total - self.done) / rate)}"
        else:
            eta = "ETA ?"
        self.stream.write(f"\r{self.label[:30]} [{'#' * filled}{'.' * (30 - filled)}] "
                          f"{_fmt_size(self.done, unit)}/{_fmt_size(self.total, unit)} {name} "
                          f"{rate / 1e9:.2f} GB/s {eta:<11}")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (nothing when a delayed bar never appeared)."""
        if self.delay and not self.drawn and time.perf_counter() - self.start < self.delay:
            return
        self._draw(time.perf_counter())
        self.stream.write("\n")
        self.stream.flush()
