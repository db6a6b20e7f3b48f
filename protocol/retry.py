"""Send-until-answered timing for control messages (docs/PROTOCOL.md §3)."""

from __future__ import annotations


class Retry:
    """First try at once, then after ``first`` seconds, doubling up to ``cap``; give up at
    ``now + timeout``."""

    __slots__ = ("_cap", "_interval", "deadline", "next")

    def __init__(self, now: float, first: float, cap: float, timeout: float) -> None:
        self.next = now
        self._interval = first
        self._cap = cap
        self.deadline = now + timeout

    def due(self, now: float) -> bool:
        return now >= self.next

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def sent(self, now: float, jitter: float = 1.0) -> None:
        """One try went out at ``now``: schedule the next one."""
        self.next = now + self._interval * jitter
        self._interval = min(2 * self._interval, self._cap)
