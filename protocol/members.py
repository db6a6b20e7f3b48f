"""What the sender knows about each receiver (docs/PROTOCOL.md §4.1, §6.2, §7)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from protocol.rangeset import RangeSet
from protocol.retry import Retry

REPLAY_WINDOW = 64


class ReplayWindow:
    """A sliding window over a source's sequence numbers (§6.2), like IPsec's."""

    __slots__ = ("_highest", "_mask")

    def __init__(self, first: int) -> None:
        self._highest = first
        self._mask = 1

    def accept(self, seq: int) -> bool:
        """True (and remembered) when ``seq`` is new; False for a replay or a too-old one."""
        if seq > self._highest:
            shift = seq - self._highest
            # Never shift by a peer-chosen amount: a jump of 2**32 would allocate 512 MiB.
            mask = (self._mask << shift) | 1 if shift < REPLAY_WINDOW else 1
            self._mask = mask & ((1 << REPLAY_WINDOW) - 1)
            self._highest = seq
            return True
        offset = self._highest - seq
        if offset >= REPLAY_WINDOW or self._mask >> offset & 1:
            return False
        self._mask |= 1 << offset
        return True


class MemberState(Enum):
    """Where a receiver stands with the sender."""

    ACTIVE = "active"
    COMPLETED = "completed"
    EVICTED = "evicted"
    FAILED = "failed"
    LEFT = "left"


@dataclass
class Member:
    """One joined receiver instance."""

    receiver_id: int
    instance: int
    addr: tuple[str, int]
    joined_at: float
    missing: RangeSet
    replay: ReplayWindow
    state: MemberState = MemberState.ACTIVE
    last_heard: float = 0.0
    #: the highest seq of ours it reported having processed (STATUS)
    seen: int = 0
    naks: int = 0
    #: object -> (NAKs that came after a repair of it, time of the last NAK)
    object_naks: dict[int, tuple[int, float]] = field(default_factory=dict)
    #: losing far more than the group: its repairs wait until the sweep is idle (§4.3)
    outlier: bool = False
    #: fragments its NAKs named the first time they named their object, and the fragments
    #: of the objects it read past since it joined (and how many it had passed then): its
    #: datagram loss, before any STATUS and smoother than one STATUS window (§4.3)
    nak_lacked: int = 0
    passed_frags: int = 0
    passed_at_join: int = 0
    #: share of the objects it read past that its NAKs named (before its first STATUS)
    nak_share: float = 0.0
    last_status_seq: int = -1
    last_status_time: float = -1.0
    loss: float = 0.0
    blocks_done: int = 0
    blocks_total: int = 0
    bytes_done: int = 0
    write_bps: int = 0
    rx_bps: int = 0  #: UDP payload bits/s it received from us over its last STATUS interval
    #: the last seq of the datagrams sent to it alone (FLAG_UNICAST), a space of its own
    useq: int = 0
    lag: float = 0.0  #: how far behind our sending its reading was at its last STATUS (s)
    backlog: int = 0
    reason: str = ""
    ended_at: float | None = None
    #: EVICT retransmission (§7); None = not sending
    evict: Retry | None = None

    @property
    def active(self) -> bool:
        return self.state is MemberState.ACTIVE

    @property
    def nak_loss(self) -> float:
        """The share of the datagrams it read past that its NAKs said it lacked."""
        return self.nak_lacked / self.passed_frags if self.passed_frags else 0.0

    def summary(self) -> dict[str, object]:
        """Per-receiver figures for the session's stats and summary."""
        return {
            "instance": self.instance,
            "addr": f"{self.addr[0]}:{self.addr[1]}",
            "state": self.state.value,
            "reason": self.reason,
            "blocks_done": self.blocks_done,
            "blocks_total": self.blocks_total,
            "bytes_done": self.bytes_done,
            "loss": round(self.loss, 4),
            "naks": self.naks,
            "write_bps": self.write_bps,
        }
