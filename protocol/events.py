"""Events the engine's state machines report: frozen dataclasses named as facts.

A shell drains them with ``next_event()`` after every call into a session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.manifest import Manifest

# -- sender side ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiverJoined:
    """A receiver joined (or re-joined after a restart: a new instance)."""

    receiver_id: int
    addr: tuple[str, int]


@dataclass(frozen=True)
class ReceiverProgress:
    """A receiver's STATUS arrived."""

    receiver_id: int
    blocks_done: int
    blocks_total: int
    bytes_done: int
    loss: float  #: fraction of sender datagrams it lost since its previous STATUS
    naks: int  #: NAK datagrams received from it so far
    write_bps: int = 0  #: its shell's verified-and-written rate, bytes/s
    backlog: int = 0  #: blocks its shell has not verified yet


@dataclass(frozen=True)
class ReceiverCompleted:
    """A receiver verified every DATA block and made it durable (its DONE arrived)."""

    receiver_id: int


@dataclass(frozen=True)
class ReceiverEvicted:
    """The sender dropped a receiver; ``reason`` says why (PROTOCOL.md §7)."""

    receiver_id: int
    reason: str


@dataclass(frozen=True)
class ReceiverFailed:
    """A receiver reported a local failure (disk error, target too small ...)."""

    receiver_id: int
    reason: str


@dataclass(frozen=True)
class ReceiverLeft:
    """A receiver left of its own accord (user interrupt)."""

    receiver_id: int
    reason: str


@dataclass(frozen=True)
class TransferStarted:
    """The start rule was met (§3.2); ``receivers`` were joined at that moment."""

    receivers: int


@dataclass(frozen=True)
class SessionEnded:
    """The sender session is over.

    ``outcome``: "completed" (every receiver completed), "partial" (some were evicted or
    failed), "aborted" (close() was called) or "no-receivers".
    """

    outcome: str
    summary: dict[str, Any] = field(default_factory=dict)


# -- receiver side ----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionJoined:
    """The sender accepted our JOIN."""

    session_id: int
    sender: tuple[str, int]
    block_count: int
    data_blocks: int
    data_bytes: int


@dataclass(frozen=True)
class ManifestReceived:
    """The manifest arrived and matches the digest of the authenticated ANNOUNCE."""

    manifest: Manifest
    manifest_bytes: bytes


@dataclass(frozen=True)
class BlockReceived:
    """Every fragment of data block ``index`` arrived: ``payload`` is its stored form.

    The shell decodes and checks it, writes it, then calls ``block_verified`` or
    ``block_failed`` -- and does not touch ``payload`` after that (its buffer is reused).
    """

    index: int
    #: valid until the shell settles the block (``block_verified`` / ``block_failed``):
    #: then the session reuses its buffer for a later object
    payload: bytes | bytearray | memoryview


@dataclass(frozen=True)
class AllBlocksVerified:
    """Every DATA block was verified: the shell must fsync, then call blocks_durable."""


@dataclass(frozen=True)
class Completed:
    """The sender acknowledged our DONE: the transfer succeeded."""


@dataclass(frozen=True)
class Evicted:
    """The sender dropped us; ``reason`` says why."""

    reason: str


@dataclass(frozen=True)
class SessionAborted:
    """The session ended without success for us; ``reason`` says why."""

    reason: str


SenderEvent = (
    ReceiverJoined
    | ReceiverProgress
    | ReceiverCompleted
    | ReceiverEvicted
    | ReceiverFailed
    | ReceiverLeft
    | TransferStarted
    | SessionEnded
)
ReceiverEvent = (
    SessionJoined
    | ManifestReceived
    | BlockReceived
    | AllBlocksVerified
    | Completed
    | Evicted
    | SessionAborted
)
Event = SenderEvent | ReceiverEvent
