"""A one-line progress bar for terminals (stderr); nothing is drawn when not a TTY."""

from __future__ import annotations

import time
from typing import TextIO

#: Redraw at most this often (seconds).
REDRAW = 0.2
WIDTH = 30


class ProgressBar:
    """``start(total)``, ``update(done)``, ``close()``: bytes verified out of ``total``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.total = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def start(self, total: int) -> None:
        """The transfer begins: ``total`` bytes are to be verified."""
        self.total = total
        self._started = time.monotonic()
        self.update(0, force=True)

    def update(self, done: int, *, force: bool = False) -> None:
        """``done`` bytes are verified; redraws at most every REDRAW seconds."""
        now = time.monotonic()
        if not force and now - self._drawn < REDRAW and done < self.total:
            return
        self._drawn = now
        frac = done / self.total if self.total else 1.0
        filled = int(frac * WIDTH)
        rate = done / (1 << 20) / max(now - self._started, 1e-6)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (WIDTH - filled)}] {frac * 100:5.1f}% "
            f"{done / (1 << 20):8.1f}/{self.total / (1 << 20):.1f} MiB {rate:6.1f} MiB/s"
        )
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        self.stream.write("\n")
        self.stream.flush()
