"""Decoded datagram bodies (docs/PROTOCOL.md §2.3); protocol/wire.py encodes and decodes them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Announce:
    """ANNOUNCE body (§2.3)."""

    digest: bytes
    manifest_size: int
    block_count: int
    data_blocks: int
    block_size: int
    payload_size: int
    state: int
    flags: int
    rate_bps: int
    data_bytes: int


@dataclass(frozen=True)
class Join:
    """JOIN body: flags and the blocks the receiver already holds (start, end) pairs."""

    flags: int
    have: list[tuple[int, int]]


@dataclass(frozen=True)
class JoinAck:
    """JOIN_ACK body."""

    target_id: int
    target_instance: int
    refused: bool
    text: str


@dataclass(frozen=True)
class Nak:
    """NAK body: (object, run_length, fragment mask); a run has mask 0, a mask has run 0.

    ``seen`` is the highest sender seq the receiver had processed when it wrote this.
    """

    seen: int
    entries: list[tuple[int, int, int]]
    #: (start, end) object ranges whose untagged copy failed verification: send them again
    #: with tagged datagrams only (§6.1)
    auth: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Status:
    """STATUS body; ``missing`` holds (start, end) object ranges within the span."""

    blocks_done: int
    blocks_total: int
    bytes_done: int
    loss: float
    write_bps: int
    rx_bps: int
    backlog: int
    flags: int
    seen: int  #: the highest sender seq the receiver had processed when it wrote this
    span_start: int
    span_end: int
    missing: list[tuple[int, int]]


@dataclass(frozen=True)
class Done:
    """DONE body."""

    blocks_done: int
    bytes_done: int


@dataclass(frozen=True)
class Targeted:
    """DONE_ACK / LEAVE_ACK / EVICT body: the receiver it is for, and text."""

    target_id: int
    target_instance: int
    text: str = ""


@dataclass(frozen=True)
class Leave:
    """LEAVE body."""

    code: int
    text: str


@dataclass(frozen=True)
class Abort:
    """ABORT body."""

    text: str


Message = Announce | Join | JoinAck | Nak | Status | Done | Targeted | Leave | Abort
