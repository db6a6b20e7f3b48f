"""A running session's throughput over time, bounded: the data of the session page's chart.

The runner records, about once a second, the sender's byte counter and the median receiving
machine's rate (``ThroughputHistory.record``). Samples are averaged into buckets of ``step``
seconds counted from the first sample; when there would be more than ``max_points`` buckets,
neighbouring buckets are merged pairwise (weighted by their sample counts) and ``step``
doubles. So an hour-long session keeps at most ``max_points`` points at 8 s resolution, and
a week-long one still fits. ``to_json`` is what the session keeps when it ends (in its
``stats["throughput"]``) and what the session page's ``state.json`` serves while it runs.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: The most points a history holds (the chart is 600 px wide).
MAX_POINTS = 600
#: The resolution a history starts at (seconds): the runner's stats interval.
FIRST_STEP = 1.0
MB = 1e6


@dataclass
class _Bucket:
    """The samples of one ``step``-wide interval: their sums and how many."""

    index: int
    count: int
    sender: float
    median: float

    def point(self, step: float) -> list[float]:
        """[seconds since the start, sender MB/s, median machine MB/s], rounded."""
        return [
            round(self.index * step, 3),
            round(self.sender / self.count, 3),
            round(self.median / self.count, 3),
        ]


def median_mbytes(rates_bps: Iterable[float | None]) -> float:
    """The median of the machines' measured rates (bits/s; missing or 0 skipped), in MB/s."""
    rates = [r for r in rates_bps if r]
    return statistics.median(rates) / 8 / MB if rates else 0.0


class ThroughputHistory:
    """Sender and median-machine MB/s over one session, at most ``max_points`` points.

    Thread-safe: the runner records in the server's event loop, pages read from worker
    threads.
    """

    def __init__(self, max_points: int = MAX_POINTS, step: float = FIRST_STEP) -> None:
        if max_points < 2 or step <= 0:
            raise ValueError("a throughput history needs max_points >= 2 and a step > 0")
        self.max_points, self.step = max_points, step
        self.start: float | None = None  #: wall-clock time of the first sample (epoch s)
        self._buckets: list[_Bucket] = []
        self._last: tuple[float, int] | None = None  #: (time, bytes_sent) of the last sample
        self._lock = threading.Lock()

    def record(self, now: float, bytes_sent: int, median_mbps: float) -> tuple[float, float]:
        """Add one sample taken at ``now`` (epoch seconds): the sender's total bytes sent and
        the median machine's MB/s. Returns (sender MB/s since the last sample, median MB/s).
        The first sample has no rate yet: it only sets the start."""
        with self._lock:
            last, self._last = self._last, (now, bytes_sent)
            if last is None or self.start is None:
                self.start = now
                return 0.0, median_mbps
            elapsed = now - last[0]
            sender = max(0.0, (bytes_sent - last[1]) / elapsed / MB) if elapsed > 0 else 0.0
            self._add(int(max(0.0, now - self.start) // self.step), sender, median_mbps)
            return sender, median_mbps

    def _add(self, index: int, sender: float, median: float) -> None:
        tail = self._buckets[-1] if self._buckets else None
        if tail is not None and tail.index == index:
            tail.count += 1
            tail.sender += sender
            tail.median += median
            return
        self._buckets.append(_Bucket(index, 1, sender, median))
        while len(self._buckets) > self.max_points:
            self._halve()

    def _halve(self) -> None:
        """Double the step: buckets 2k and 2k+1 become bucket k."""
        merged: list[_Bucket] = []
        for b in self._buckets:
            index = b.index // 2
            if merged and merged[-1].index == index:
                m = merged[-1]
                m.count, m.sender, m.median = (
                    m.count + b.count,
                    m.sender + b.sender,
                    m.median + b.median,
                )
            else:
                merged.append(_Bucket(index, b.count, b.sender, b.median))
        self._buckets = merged
        self.step *= 2

    def __len__(self) -> int:
        return len(self._buckets)

    def to_json(self) -> dict[str, Any]:
        """``{"start": epoch s, "step": s, "points": [[t, sender MB/s, median MB/s], ...]}``
        with ``t`` in seconds since ``start`` (the bucket's beginning)."""
        with self._lock:
            return {
                "start": self.start,
                "step": self.step,
                "points": [b.point(self.step) for b in self._buckets],
            }
