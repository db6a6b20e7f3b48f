"""Run one multicast session of an image from the store: ``send_image`` (used by the CLI).

Builds the SenderSession from the store's manifest and blocks, drives it with a
SenderTransport, keeps a per-receiver record from the session's events, and returns a
SendReport once the session has ended. ``close`` on cancellation tells receivers (ABORT).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import events as ev
from protocol.config import EngineConfig
from protocol.manifest import Manifest
from protocol.sender import SenderSession
from server.multicast.readahead import ReadAhead
from server.multicast.sender import SenderTransport, open_sender_socket

log = logging.getLogger(__name__)

#: Rate changes kept in SendReport.rates.
MAX_RATE_POINTS = 2000
#: After close()/the end, wait at most this long for the session's linger to finish.
END_GRACE = 10.0


@dataclass
class SendOptions:
    """What ``fleetcast send`` was asked to do."""

    group: str
    port: int
    iface: str
    key: bytes
    min_receivers: int = 1
    max_wait: float | None = None
    rate_bps: int | None = None
    auto_rate: bool = True
    ttl: int = 1
    session_id: int = field(default_factory=lambda: secrets.randbelow(0xFFFFFFFF) + 1)
    gso: bool = True
    payload_size: int = 1472  #: UDP payload per datagram: 1472 for MTU 1500, 8972 for 9000
    tag_data: bool = False  #: tag every DATA datagram (docs/PROTOCOL.md §6.1)


@dataclass
class ReceiverRecord:
    """What the sender knows about one receiver."""

    receiver_id: int
    address: str = ""
    state: str = "joined"  #: joined, completed, evicted, failed, left
    reason: str = ""
    done_bytes: int = 0
    blocks_done: int = 0
    blocks_total: int = 0
    loss: float = 0.0
    naks: int = 0
    joined_at: float = 0.0
    ended_at: float = 0.0


@dataclass
class SendReport:
    """How a session ended."""

    image: str
    manifest: Manifest
    receivers: dict[int, ReceiverRecord] = field(default_factory=dict)
    elapsed: float = 0.0
    #: SessionEnded.outcome (completed, partial, aborted, no-receivers), or "error"
    outcome: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    wire: dict[str, Any] = field(default_factory=dict)
    session: dict[str, Any] = field(default_factory=dict)
    #: when things happened (time.monotonic(), comparable across processes on one host):
    #: "run" (the session started), "transfer" (the start rule fired), "joined:ID",
    #: "completed:ID", "ended" -- where a transfer's time goes (bench/compare.py)
    timeline: dict[str, float] = field(default_factory=dict)
    #: (time.monotonic(), rate in bit/s, receiver id, its loss, lag s, read bit/s) at each
    #: STATUS that found the pacer at a new rate: how auto mode moved (bounded)
    rates: list[tuple[float, int, str, float, float, int]] = field(default_factory=list)

    def count(self, state: str) -> int:
        """How many receivers ended in ``state``."""
        return sum(1 for r in self.receivers.values() if r.state == state)


class SessionRunner:
    """One session: store blocks -> SenderSession -> socket. ``await run()``."""

    def __init__(
        self,
        name: str,
        manifest_bytes: bytes,
        manifest: Manifest,
        read_payload: Callable[[bytes], bytes],
        options: SendOptions,
        *,
        config: EngineConfig | None = None,
        on_update: Callable[[SendReport], None] | None = None,
    ) -> None:
        self.options = options
        self.config = config or EngineConfig(
            payload_size=options.payload_size,
            rate_bps=options.rate_bps,
            auto_rate=options.auto_rate,
            tag_data=options.tag_data,
        )
        self.report = SendReport(image=name, manifest=manifest)
        self._manifest_bytes = manifest_bytes
        self.read_ahead = ReadAhead(manifest, read_payload)
        self.on_update = on_update
        #: called with a receiver's record as soon as the engine ends it (completed, evicted,
        #: failed, left); the server records evictions and failures at once with it
        self.on_receiver_end: Callable[[ReceiverRecord], None] | None = None
        self.transport: SenderTransport | None = None

    async def run(self) -> SendReport:
        """Send until every receiver has ended (or none came); raises SenderSocketError."""
        loop = asyncio.get_running_loop()
        o = self.options
        started = time.monotonic()
        self.report.timeline["run"] = started
        session = SenderSession(
            session_id=o.session_id,
            key=o.key,
            manifest_bytes=self._manifest_bytes,
            read_block=self.read_ahead,
            config=self.config,
            now=loop.time(),
            rng=random.Random(),
            min_receivers=o.min_receivers,
            max_wait=o.max_wait,
        )
        self.session = session
        sock = open_sender_socket(o.iface, ttl=o.ttl)
        self.transport = SenderTransport(
            session,
            sock,
            loop=loop,
            group=(o.group, o.port),
            on_event=self._on_event,
            on_error=self._internal_error,
            gso=o.gso,
        )
        self.transport.start()
        try:
            await self.transport.finished.wait()
        except asyncio.CancelledError:
            session.close(loop.time(), "sender interrupted")
            self.transport.process()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.transport.finished.wait(), END_GRACE)
            raise
        finally:
            self.report.elapsed = time.monotonic() - started
            self.report.timeline["ended"] = time.monotonic()
            last = self.transport.stats.last_data_at
            if last is not None:
                self.report.timeline["last_data"] = last
            self.report.wire = vars(self.transport.stats).copy()
            self.report.session = _as_dict(getattr(session, "stats", None))
            self.transport.close()
            self.read_ahead.close()
            self.report.wire["readahead_hits"] = self.read_ahead.hits
            self.report.wire["readahead_misses"] = self.read_ahead.misses
        return self.report

    # -- events -------------------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)
        if self.on_update is not None:
            self.on_update(self.report)

    def _record(self, event: Any) -> ReceiverRecord:
        rid = int(event.receiver_id)
        rec = self.report.receivers.get(rid)
        if rec is None:
            rec = ReceiverRecord(receiver_id=rid, joined_at=time.monotonic())
            self.report.receivers[rid] = rec
        if isinstance(event, ev.ReceiverJoined):
            rec.address = event.addr[0]
        return rec

    def _joined(self, event: ev.ReceiverJoined) -> None:
        rec = self._record(event)
        rec.state = "joined"
        self.report.timeline.setdefault(f"joined:{rec.receiver_id:08x}", time.monotonic())
        log.info(
            "session %08x: receiver %08x joined from %s",
            self.options.session_id,
            rec.receiver_id,
            rec.address,
        )

    def _progress(self, event: ev.ReceiverProgress) -> None:
        rec = self._record(event)
        rate = self.session.rate_bps or 0
        rates = self.report.rates
        if (not rates or rates[-1][1] != rate) and len(rates) < MAX_RATE_POINTS:
            m = self.session.member(event.receiver_id)
            lag, read = (m.lag, m.rx_bps) if m is not None else (0.0, 0)
            rates.append((time.monotonic(), rate, f"{rec.receiver_id:08x}", event.loss, lag, read))
        rec.done_bytes = event.bytes_done
        rec.blocks_done, rec.blocks_total = event.blocks_done, event.blocks_total
        rec.loss, rec.naks = event.loss, event.naks

    def _transfer_started(self, event: ev.TransferStarted) -> None:
        self.report.timeline.setdefault("transfer", time.monotonic())

    def _completed(self, event: ev.ReceiverCompleted) -> None:
        rec = self._record(event)
        self.report.timeline[f"completed:{rec.receiver_id:08x}"] = time.monotonic()
        rec.done_bytes = self.report.manifest.data_bytes()  # its last STATUS may predate DONE
        self._end(event, "completed", "")

    def _evicted(self, event: ev.ReceiverEvicted) -> None:
        self._end(event, "evicted", event.reason)

    def _failed(self, event: ev.ReceiverFailed) -> None:
        self._end(event, "failed", event.reason)

    def _internal_error(self, exc: BaseException) -> None:
        self.report.outcome = "error"
        self.report.summary["error"] = f"internal error in the sender: {exc!r}"

    def _left(self, event: ev.ReceiverLeft) -> None:
        self._end(event, "left", event.reason)

    def _session_ended(self, event: ev.SessionEnded) -> None:
        self.report.outcome = event.outcome
        self.report.summary = dict(event.summary)

    def _end(self, event: Any, state: str, reason: str) -> None:
        rec = self._record(event)
        rec.state, rec.reason, rec.ended_at = state, reason, time.monotonic()
        if self.on_receiver_end is not None:
            try:
                self.on_receiver_end(rec)
            except Exception:  # the server's bookkeeping must not stop the sender
                log.exception("session %08x: on_receiver_end failed", self.options.session_id)
        log.info(
            "session %08x: receiver %08x %s %s",
            self.options.session_id,
            rec.receiver_id,
            state,
            reason,
        )


_HANDLERS: dict[type, Callable[[SessionRunner, Any], None]] = {
    ev.ReceiverJoined: SessionRunner._joined,
    ev.TransferStarted: SessionRunner._transfer_started,
    ev.ReceiverProgress: SessionRunner._progress,
    ev.ReceiverCompleted: SessionRunner._completed,
    ev.ReceiverEvicted: SessionRunner._evicted,
    ev.ReceiverFailed: SessionRunner._failed,
    ev.ReceiverLeft: SessionRunner._left,
    ev.SessionEnded: SessionRunner._session_ended,
}


def _as_dict(stats: object) -> dict[str, Any]:
    if stats is None:
        return {}
    if isinstance(stats, dict):
        return dict(stats)
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dict(dataclasses.asdict(stats))
    return dict(vars(stats))
