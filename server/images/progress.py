"""A one-line progress bar with rate and ETA, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call ``update(done)`` as work advances and ``finish()`` at the end."""

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval: float = 0.2,
    ) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._done = 0

    def update(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= self.interval:
            self._last_draw = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float) -> str:
        """The bar as text: label, bar, percent, MB/s and ETA."""
        frac = min(self._done / self.total, 1.0)
        elapsed = max(now - self.started, 1e-6)
        rate = self._done / elapsed
        eta = (self.total - self._done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * 30)
        return (
            f"{self.label} [{bar:<30}] {frac * 100:5.1f}% {rate / 1e6:7.1f} MB/s "
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )

    def finish(self) -> None:
        if self.enabled:
            self._done = self.total
            self.stream.write("\r" + self.line(time.monotonic()) + "\x1b[K\n")
            self.stream.flush()

    def abort(self) -> None:
        """End the bar's line (if one was drawn) so an error message starts on its own."""
        if self.enabled and self._last_draw:
            self.stream.write("\n")
            self.stream.flush()
