"""Receiver-side reassembly of one object, and NAK building (docs/PROTOCOL.md §4.3)."""

from __future__ import annotations

from collections.abc import Sequence

from protocol import wire

#: Object states held in the receiver's per-block / per-chunk bytearrays.
NEEDED, PARTIAL, RECEIVED, VERIFIED, SKIP = 0, 1, 2, 3, 4


class Partial:
    """A partly received object: its buffer and which fragments arrived."""

    __slots__ = ("buf", "count", "fragments", "got", "last_rx", "naked_at", "passed", "size")

    def __init__(self, size: int, fragments: int, now: float) -> None:
        self.size = size
        self.fragments = fragments
        self.buf = bytearray(size)
        self.got = bytearray(fragments)
        self.count = 0
        self.last_rx = now
        #: a datagram of another object arrived after our last fragment (§4.3)
        self.passed = False
        self.naked_at = -1e9

    def missing(self) -> list[int]:
        """Indices of the fragments not received, ascending."""
        got = self.got
        out: list[int] = []
        start = got.find(0)
        while start != -1:
            out.append(start)
            start = got.find(0, start + 1)
        return out


def nak_bodies(due: Sequence[tuple[int, Partial]], capacity: int) -> list[bytes]:
    """NAK bodies for the missing fragments of ``due`` (object, Partial) pairs, by object."""
    return wire.encode_nak_bodies([], [(obj, p.missing()) for obj, p in due], capacity)
