"""A set of non-negative integers held as sorted, disjoint half-open ranges.

Used for the objects a receiver still needs, blocks it holds, and NAK runs.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator


class RangeSet:
    """Sorted disjoint [start, end) ranges; adjacent ranges are merged."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    @classmethod
    def from_values(cls, values: Iterable[int]) -> RangeSet:
        """The set of the given integers."""
        out = cls()
        start = end = -1
        for v in sorted(set(values)):
            if v == end:
                end += 1
                continue
            if end > start:
                out._starts.append(start)
                out._ends.append(end)
            start, end = v, v + 1
        if end > start:
            out._starts.append(start)
            out._ends.append(end)
        return out

    def copy(self) -> RangeSet:
        out = RangeSet()
        out._starts = self._starts.copy()
        out._ends = self._ends.copy()
        return out

    def add(self, start: int, end: int) -> None:
        """Add [start, end)."""
        if end <= start:
            return
        i = bisect_left(self._ends, start)  # first range ending at or after start
        j = bisect_right(self._starts, end)  # ranges starting at or before end overlap/touch
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def discard(self, start: int, end: int) -> None:
        """Remove [start, end)."""
        if end <= start:
            return
        i = bisect_right(self._ends, start)  # first range ending after start
        j = bisect_left(self._starts, end)  # ranges starting before end
        if i >= j:
            return
        new_starts: list[int] = []
        new_ends: list[int] = []
        if self._starts[i] < start:
            new_starts.append(self._starts[i])
            new_ends.append(start)
        if self._ends[j - 1] > end:
            new_starts.append(end)
            new_ends.append(self._ends[j - 1])
        self._starts[i:j] = new_starts
        self._ends[i:j] = new_ends

    def replace_span(self, start: int, end: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Make the set within [start, end) equal to ``ranges`` clipped to it."""
        self.discard(start, end)
        for s, e in ranges:
            self.add(max(s, start), min(e, end))

    def intersection(self, other: RangeSet) -> RangeSet:
        out = RangeSet()
        i = j = 0
        a_s, a_e, b_s, b_e = self._starts, self._ends, other._starts, other._ends
        while i < len(a_s) and j < len(b_s):
            lo = max(a_s[i], b_s[j])
            hi = min(a_e[i], b_e[j])
            if lo < hi:
                out._starts.append(lo)
                out._ends.append(hi)
            if a_e[i] < b_e[j]:
                i += 1
            else:
                j += 1
        return out

    def difference(self, other: RangeSet) -> RangeSet:
        out = self.copy()
        for s, e in other:
            out.discard(s, e)
        return out

    def next_at_or_after(self, value: int) -> int | None:
        """The smallest member >= value, or None."""
        i = bisect_right(self._ends, value)
        if i == len(self._starts):
            return None
        return max(value, self._starts[i])

    def ranges_from(self, value: int) -> list[tuple[int, int]]:
        """The ranges (clipped) at or after ``value``."""
        i = bisect_right(self._ends, value)
        out = list(zip(self._starts[i:], self._ends[i:], strict=True))
        if out and out[0][0] < value:
            out[0] = (value, out[0][1])
        return out

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._ends[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def __len__(self) -> int:
        """Number of members (not of ranges)."""
        return sum(self._ends) - sum(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __hash__(self) -> int:
        raise TypeError("RangeSet is mutable")

    @property
    def range_count(self) -> int:
        return len(self._starts)

    def first(self) -> int | None:
        return self._starts[0] if self._starts else None

    def __repr__(self) -> str:
        inner = ", ".join(f"{s}..{e - 1}" if e - s > 1 else str(s) for s, e in self)
        return f"RangeSet({inner})"
