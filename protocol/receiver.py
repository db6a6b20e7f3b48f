"""The receiver's state machine: no I/O, time is a parameter (docs/PROTOCOL.md).

A shell feeds it datagrams, sends what ``datagrams_to_send`` returns (all unicast to the
sender), calls ``handle_timer`` at ``get_timer()``, and drains ``next_event``: on
``BlockReceived`` it decodes, checks and writes the block, then calls ``block_verified``
or ``block_failed``; on ``AllBlocksVerified`` it fsyncs and calls ``blocks_durable``.
"""

from __future__ import annotations

import hmac
import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from protocol import wire
from protocol.config import EngineConfig
from protocol.events import (
    AllBlocksVerified,
    BlockReceived,
    Completed,
    Event,
    Evicted,
    ManifestReceived,
    SessionAborted,
    SessionJoined,
)
from protocol.manifest import Manifest
from protocol.rangeset import RangeSet
from protocol.reassembly import (
    NEEDED,
    PARTIAL,
    RECEIVED,
    VERIFIED,
    Meter,
    Partial,
    Reassembly,
    check_manifest,
    nak_bodies,
)
from protocol.retry import Retry
from protocol.wire import MANIFEST_BASE, PacketType, Transmit, WireError

logger = logging.getLogger(__name__)

_DATA_BODY = wire.DATA_BODY
_BODY_SIZE = wire.DATA_BODY.size
_DATA_HEADER = wire.DATA_HEADER
_DATA_HEAD = wire.DATA_HEADER.size
_DATA_MIN = wire.DATA_OVERHEAD
_DATA = int(PacketType.DATA)
_TAG = wire.TAG_SIZE
_TAGGED = wire.FLAG_TAGGED
_UNICAST = wire.FLAG_UNICAST
_REPAIR = wire.FLAG_REPAIR
_FLAGS_AT = _DATA_HEAD - 2  #: offset of a DATA datagram's flags byte
_compare = hmac.compare_digest
#: How long to wait for an ABORT's reason once an ANNOUNCE says the session was aborted.
ABORT_GRACE = 0.5
#: Least time between JOINs sent because data flows while we wait for a JOIN_ACK.
JOIN_HURRY = 0.01
#: Most objects lacked entirely that one NAK names (§4.3); the sweep brings the rest.
WHOLE_NAK_MAX = 32
_mac = wire._mac


class ReceiverState(Enum):
    """Where the receiver stands (PROTOCOL.md §3)."""

    LISTENING = "listening"  #: waiting for an ANNOUNCE
    JOINING = "joining"  #: sending JOIN until JOIN_ACK
    RECEIVING = "receiving"  #: manifest and blocks
    VERIFIED = "verified"  #: every block verified; waiting for blocks_durable
    DONE_WAIT = "done-wait"  #: sending DONE until DONE_ACK
    LEAVING = "leaving"  #: sending LEAVE (failed, or acknowledging EVICT / ABORT)
    CLOSED = "closed"


_S = ReceiverState
_TRANSITIONS: dict[ReceiverState, frozenset[ReceiverState]] = {
    _S.LISTENING: frozenset({_S.JOINING, _S.CLOSED}),
    _S.JOINING: frozenset({_S.RECEIVING, _S.LISTENING, _S.LEAVING, _S.CLOSED}),
    _S.RECEIVING: frozenset({_S.VERIFIED, _S.LEAVING, _S.CLOSED}),
    _S.VERIFIED: frozenset({_S.DONE_WAIT, _S.LEAVING, _S.CLOSED}),
    _S.DONE_WAIT: frozenset({_S.LEAVING, _S.CLOSED}),
    _S.LEAVING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class ReceiverSession:
    """One receiver of one multicast session (PROTOCOL.md §3-§4)."""

    def __init__(
        self,
        *,
        key: bytes,
        config: EngineConfig,
        now: float,
        rng: random.Random,
        receiver_id: int | None = None,
    ) -> None:
        """Raises ValueError for a bad key or receiver id."""
        if len(key) < 16:
            raise ValueError("the session key must be at least 16 bytes (32 from a key file)")
        rid = receiver_id if receiver_id is not None else rng.randrange(1, 1 << 32)
        if not 0 < rid < 1 << 32:
            raise ValueError(f"receiver id {rid} must be between 1 and 2**32-1")
        self.receiver_id = rid
        self._key = key
        self._config = config
        self._rng = rng
        self._instance = rng.randrange(1, 1 << 32)
        self._seq = 0
        self._state = ReceiverState.LISTENING
        self.outcome = ""
        self.fail_reason = ""
        self._created = now
        self._now = now
        self._events: deque[Event] = deque()
        self._out: list[Transmit] = []
        self._dropped: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._n_datagrams = self._n_accepted = 0
        self._ignored: set[tuple[int, int]] = set()
        self._session = 0
        self._sender_instance = 0
        self._sender: tuple[str, int] | None = None
        self._announce: wire.Announce | None = None
        self._last_heard = now
        self._declared: set[int] = set()
        # object bookkeeping (set up on JOIN_ACK / manifest)
        self.manifest: Manifest | None = None
        self._objs = Reassembly(config)
        self._early: dict[int, memoryview] = {}
        self._data_total = 0
        self._verified = 0
        self._bytes_done = 0
        #: blocks handed to the shell (BlockReceived) and not settled yet: index -> stored size
        self._handed: dict[int, int] = {}
        #: their payload buffers, recycled for new partials once settled
        self._handed_bufs: dict[int, memoryview] = {}
        self._handed_bytes = 0
        self._failures: Counter[int] = Counter()
        #: §6.1: every DATA must be tagged (the ANNOUNCE says so), or untagged DATA is
        #: taken too (the manifest's block hashes authenticate what it carries)
        self._tagged_only = False
        self._untagged_ok = False
        #: blocks whose untagged copy failed verification: only tagged datagrams from now
        #: on; those still needed are asked for again (NAK AUTH) with every STATUS
        self._strict: set[int] = set()
        self._auth_pending: set[int] = set()
        #: smoothed wait from a NAK to the first repair of its object (§4.3)
        self._repair_wait = config.nak_repeat / 3
        self._join_sent_at = -1e9
        # timers; None = not armed
        self._join: Retry | None = None
        self._next_status: float | None = None
        self._nak_at: float | None = None
        self._last_nak = -1e9
        #: an IDLE ANNOUNCE came: the next NAK names the objects we lack entirely, too
        self._whole_due = False
        #: object -> when a NAK last named it as lacked entirely
        self._whole_naked: dict[int, float] = {}
        self._control: Retry | None = None  # DONE or LEAVE
        self._abort_deadline: float | None = None  # an ABORT's reason is on its way
        self._leave: tuple[wire.LeaveCode, str, bool] | None = None
        self._leave_repeats = 0
        self._meter = Meter(0, now)  # loss and rates between STATUS reports
        self._span_next = 0

    # -- public API ---------------------------------------------------------------------

    @property
    def state(self) -> ReceiverState:
        return self._state

    @property
    def finished(self) -> bool:
        """True once the session is over for this receiver (see ``outcome``)."""
        return self._state is ReceiverState.CLOSED

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: datagrams, fragments, duplicates, NAKs sent, drops by reason, progress, loss.

        ``loss`` is the fraction of sender datagrams lost in the interval of the last STATUS;
        ``loss_total`` is ``lost_datagrams / expected_datagrams`` over every STATUS since the
        JOIN_ACK (both 0.0 before the first STATUS).
        """
        return {
            "state": self._state.value,
            "outcome": self.outcome,
            "receiver_id": self.receiver_id,
            "session_id": self._session,
            "blocks_done": self._verified,
            "blocks_total": self._data_total,
            "bytes_done": self._bytes_done,
            "partial_objects": len(self._objs.partials),
            "unverified": len(self._handed),
            "datagrams": self._n_datagrams,
            "accepted": self._n_accepted,
            "fragments": self._objs.fragments,
            "duplicates": self._objs.duplicates,
            "partials_dropped": self._objs.partials_dropped,
            "partials_compacted": self._objs.partials_compacted,
            # §4.4: the loss fraction of the last STATUS, and lost / expected since joining
            "loss": self._meter.last_loss,
            "loss_total": self._meter.total_loss,
            "lost_datagrams": self._meter.lost_total,
            "expected_datagrams": self._meter.expected_total,
            **dict(self._counts),
            "dropped": dict(self._dropped),
        }

    def receive_datagram(self, data: bytes | memoryview, addr: tuple[str, int], now: float) -> None:
        """Handle one datagram from the network; never raises on bad input (§2.2)."""
        self._now = now
        self._n_datagrams += 1
        try:
            view = memoryview(data)
            n = len(view)
            if n > _DATA_HEAD and view[3] == _DATA:
                if self._state is ReceiverState.RECEIVING:
                    self._fast_data(view, n, now)  # the hot path: same checks, fewer calls
                elif view[_FLAGS_AT] & _TAGGED:
                    self._receive(view, addr, now)
                else:
                    self._untagged_elsewhere(view, now)
            else:
                self._receive(view, addr, now)
            self._n_accepted += 1
        except WireError as exc:
            self._dropped[exc.reason] += 1
        except Exception:  # a bug must not kill the receiver; the fuzz test keeps this at 0
            logger.exception("receiver %08x: internal error on a datagram", self.receiver_id)
            self._dropped["internal_error"] += 1

    def receive_datagrams(
        self, data: memoryview, seg: int, addr: tuple[str, int], now: float
    ) -> None:
        """Handle the datagrams of one read (a UDP GRO train): each ``seg`` bytes long but
        the last. The same as ``receive_datagram`` on each, with one call per datagram on
        the data path instead of two; never raises on bad input (§2.2)."""
        n = len(data)
        start = 0
        while start < n:
            end = min(start + seg, n)
            view = data[start:end]
            size = end - start
            start = end
            if size > _DATA_HEAD and view[3] == _DATA and self._state is ReceiverState.RECEIVING:
                self._now = now
                self._n_datagrams += 1
                try:
                    self._fast_data(view, size, now)
                    self._n_accepted += 1
                except WireError as exc:
                    self._dropped[exc.reason] += 1
                except Exception:  # a bug must not kill the receiver (fuzz test: 0)
                    logger.exception(
                        "receiver %08x: internal error on a datagram", self.receiver_id
                    )
                    self._dropped["internal_error"] += 1
            else:
                self.receive_datagram(view, addr, now)

    def _fast_data(self, view: memoryview, n: int, now: float) -> None:
        """A DATA datagram while receiving: §2.2 checks in order, then reassembly.

        An untagged datagram (§6.1) is taken only for a block (the manifest's hash checks it)
        whose untagged copy never failed; it does not count as word from the
        sender (timeouts) and moves the loss meter only a bounded step.
        """
        magic, version, _t, session, source, instance, seq, obj, size, frag, flags = (
            _DATA_HEADER.unpack_from(view)
        )
        if magic != wire.MAGIC or version != wire.VERSION:
            raise WireError("bad_magic" if magic != wire.MAGIC else "bad_version")
        tagged = flags & _TAGGED
        if tagged:
            if n <= _DATA_MIN:
                raise WireError("short", f"{n} bytes")
            end = n - _TAG
            mac = _mac(self._key).copy()
            mac.update(view[:end])
            if not _compare(mac.digest()[:_TAG], view[end:]):
                raise WireError("bad_tag")
        elif not self._untagged_ok or obj in self._strict or obj >= MANIFEST_BASE:
            raise WireError("untagged")
        else:
            end = n
        if session != self._session or instance != self._sender_instance:
            raise WireError("foreign_session")
        if source:
            raise WireError("invalid", "sender datagram with a receiver id")
        if flags & _REPAIR:
            self._repair_came(obj, now)
        if flags & _UNICAST:
            self._meter.seen_unicast(seq, n, bool(tagged))
            if tagged:
                self._last_heard = now
        elif tagged:
            self._last_heard = now
            self._meter.seen(seq, n)
        else:
            self._meter.seen_near(seq, n)
        self._on_fragment(obj, size, frag, view[_DATA_HEAD:end], now)

    def _repair_came(self, obj: int, now: float) -> None:
        """Measure how long repairs take to come after a NAK (§4.3)."""
        p = self._objs.partials.get(obj)
        if p is not None and not p.answered:
            p.answered = True
            wait = now - p.naked_at
            if 0.0 <= wait < 1.0:
                self._repair_wait += 0.25 * (wait - self._repair_wait)

    def _nak_gap(self) -> float:
        """Least time between NAK bursts: twice the repair wait, within its bounds."""
        cfg = self._config
        return min(cfg.nak_interval, max(cfg.nak_min, 2 * self._repair_wait))

    def _nak_repeat(self) -> float:
        """NAK an object again after this long without progress: three repair waits."""
        cfg = self._config
        return min(cfg.nak_repeat, max(cfg.nak_min, 3 * self._repair_wait))

    def _untagged_elsewhere(self, view: memoryview, now: float) -> None:
        """An untagged DATA datagram outside RECEIVING: not for us yet, or no longer."""
        if self._state is ReceiverState.JOINING:
            _m, _v, _t, session, _s, instance, *_ = _DATA_HEADER.unpack_from(view)
            if session == self._session and instance == self._sender_instance:
                self._hurry_join(now)
        if self._state in (ReceiverState.LISTENING, ReceiverState.JOINING):
            raise WireError("not_joined")
        if self._state is ReceiverState.CLOSED:
            raise WireError("closed")
        self._objs.duplicates += 1

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """JOIN, NAK, STATUS, DONE and LEAVE datagrams due at ``now`` (unicast to the sender)."""
        self._now = now
        out, self._out = self._out, []
        self._counts["sent"] += len(out)
        return out

    def get_timer(self) -> float | None:
        """The absolute time at which handle_timer must next be called; None when closed."""
        if self._state is ReceiverState.CLOSED:
            return None
        retries = (r.next for r in (self._join, self._control) if r is not None)
        times = [
            t
            for t in (self._next_status, self._nak_at, self._abort_deadline, *retries)
            if t is not None
        ]
        if self._state is ReceiverState.LISTENING:
            if self._config.listen_timeout is not None:
                times.append(self._created + self._config.listen_timeout)
        elif self._state is not ReceiverState.LEAVING:
            times.append(self._last_heard + self._config.sender_timeout)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Retries, NAKs, STATUS and timeouts due at ``now``."""
        self._now = now
        if self._state is ReceiverState.CLOSED:
            return
        if self._check_timeouts(now):
            return
        if self._join is not None and self._join.due(now):
            self._send_join(now)
        if self._nak_at is not None and now >= self._nak_at:
            self._send_naks(now)
        if self._next_status is not None and now >= self._next_status:
            self._send_status(now)
        if self._control is not None and self._control.due(now):
            self._send_control(now)

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def declare_have(self, blocks: Iterable[int], now: float) -> None:
        """Blocks already on the target (verified by the shell): they are not needed."""
        wanted = set(blocks)
        if self.manifest is None:
            self._declared |= wanted
            return
        for index in sorted(wanted):
            if not 0 <= index < len(self._objs.blocks):
                raise ValueError(f"block {index} is outside the image")
            self._take_have(index)
        self._check_all_verified()

    def _take_have(self, index: int) -> None:
        if self._objs.blocks[index] in (NEEDED, PARTIAL):
            self._objs.drop_partial(index)
            self._mark_verified(index)

    def block_verified(self, index: int, now: float) -> None:
        """The shell decoded block ``index``, checked its hash and wrote it."""
        if self._state in (ReceiverState.LEAVING, ReceiverState.CLOSED):
            return
        self._settle(index)
        self._mark_verified(index)
        self._check_all_verified()

    def block_failed(self, index: int, now: float, reason: str) -> None:
        """Block ``index`` did not decode or match its hash: it is requested again."""
        if self._state in (ReceiverState.LEAVING, ReceiverState.CLOSED):
            return
        self._settle(index)
        self._objs.set_state(index, NEEDED)
        self._counts["blocks_failed"] += 1
        if not self._tagged_only and index not in self._strict:
            # Its copy may hold forged untagged datagrams: get it again, tagged (§6.1).
            self._strict.add(index)
            self._auth_pending.add(index)
            self._counts["untagged_blocks_failed"] += 1
            self._send_auth()
            return
        self._failures[index] += 1
        if self._failures[index] >= self._config.max_block_failures:
            self.fail(
                now, f"block {index} failed verification {self._failures[index]} times: {reason}"
            )

    def blocks_durable(self, now: float) -> None:
        """The shell made every block durable (fsync): report DONE until acknowledged."""
        if self._state in (ReceiverState.LEAVING, ReceiverState.CLOSED):
            return
        if self._state is not ReceiverState.VERIFIED:
            raise ValueError(
                f"blocks_durable called in state {self._state.value}, before AllBlocksVerified"
            )
        self._set_state(ReceiverState.DONE_WAIT)
        self._arm_control(now)

    def fail(self, now: float, reason: str) -> None:
        """A local failure: tell the sender (LEAVE failed) and stop."""
        if self._state in (ReceiverState.LEAVING, ReceiverState.CLOSED):
            return
        self.outcome = "failed"
        self.fail_reason = reason
        if self._state is ReceiverState.LISTENING:
            self._close()
            return
        self._start_leave(now, wire.LeaveCode.FAILED, reason, need_ack=True)

    # -- state ----------------------------------------------------------------------------

    def _set_state(self, new: ReceiverState) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise AssertionError(f"receiver transition {self._state} -> {new} is not allowed")
        logger.debug("receiver %08x: %s -> %s", self.receiver_id, self._state.value, new.value)
        self._state = new

    def _close(self) -> None:
        self._set_state(ReceiverState.CLOSED)
        self._next_status = self._nak_at = self._join = self._control = None
        self._objs.clear()
        self._early.clear()

    def _abort(self, reason: str, outcome: str = "aborted") -> None:
        self.outcome = outcome
        self._events.append(SessionAborted(reason))
        self._close()

    def _start_leave(self, now: float, code: wire.LeaveCode, text: str, need_ack: bool) -> None:
        self._set_state(ReceiverState.LEAVING)
        self._next_status = self._nak_at = self._join = None
        self._objs.clear()
        self._leave = (code, text, need_ack)
        self._leave_repeats = 3
        self._arm_control(now)

    def _arm_control(self, now: float) -> None:
        cfg = self._config
        self._control = Retry(now, cfg.control_retry, cfg.control_retry_max, cfg.control_timeout)
        self._send_control(now)

    def _check_timeouts(self, now: float) -> bool:
        cfg = self._config
        if self._abort_deadline is not None and now >= self._abort_deadline:
            if self._state in (ReceiverState.LEAVING, ReceiverState.CLOSED):
                self._abort_deadline = None
            else:
                self._abort("the sender aborted the session (its reason was lost on the way)")
                return True
        if self._state is ReceiverState.LISTENING:
            if cfg.listen_timeout is not None and now >= self._created + cfg.listen_timeout:
                self._abort(
                    f"no fleetcast session heard in {cfg.listen_timeout:.0f} s", "no-session"
                )
                return True
        elif (
            self._state is not ReceiverState.LEAVING
            and now >= self._last_heard + cfg.sender_timeout
        ):
            self._abort(f"nothing heard from the sender for {now - self._last_heard:.1f} s")
            return True
        return False

    # -- receiving ------------------------------------------------------------------------

    def _receive(self, data: bytes | memoryview, addr: tuple[str, int], now: float) -> None:
        hdr, body = wire.open_datagram(self._key, data)
        ptype = hdr.type
        if ptype not in wire.SENDER_TYPES:
            known = ptype in PacketType._value2member_map_
            raise WireError("unexpected_type" if known else "bad_type")
        if hdr.source != 0:
            raise WireError("invalid", "sender datagram with a receiver id")
        state = self._state
        if state is ReceiverState.CLOSED:
            raise WireError("closed")
        if state is ReceiverState.LISTENING:
            if ptype != PacketType.ANNOUNCE:
                raise WireError("not_joined")
            if (hdr.session, hdr.instance) in self._ignored:
                raise WireError("ignored_session")
            self._on_first_announce(hdr, wire.decode_announce(body), addr, now)
            return
        if hdr.session != self._session or hdr.instance != self._sender_instance:
            raise WireError("foreign_session")
        if state is ReceiverState.JOINING and ptype not in (
            PacketType.ANNOUNCE,
            PacketType.JOIN_ACK,
        ):
            if ptype == PacketType.DATA:
                self._hurry_join(now)
            raise WireError("not_joined")
        self._last_heard = now
        if ptype == PacketType.DATA:
            if len(body) > _BODY_SIZE and body[_BODY_SIZE - 2] & _UNICAST:
                self._meter.seen_unicast(hdr.seq, len(data), True)
            else:
                self._meter.seen(hdr.seq, len(data))
            self._on_data(body, now)
            return
        self._meter.seen(hdr.seq, len(data))
        msg = wire.DECODERS[ptype](body)
        self._HANDLERS[ptype](self, hdr, msg, now)

    def _on_first_announce(
        self, hdr: wire.Header, a: wire.Announce, addr: tuple[str, int], now: float
    ) -> None:
        if a.state == wire.AnnounceState.ENDING:
            raise WireError("session_ending")
        if a.manifest_size == 0 or a.manifest_size > self._config.max_manifest_bytes:
            self._ignored.add((hdr.session, hdr.instance))
            raise WireError("invalid", f"manifest of {a.manifest_size} bytes")
        if a.payload_size - wire.DATA_OVERHEAD <= 0 or a.block_count == 0:
            raise WireError("invalid", "announce geometry")
        self._session, self._sender_instance = hdr.session, hdr.instance
        self._sender, self._announce = addr, a
        self._tagged_only = bool(a.flags & wire.ANNOUNCE_TAGGED_DATA)
        self._untagged_ok = not self._tagged_only
        self._last_heard = now
        self._set_state(ReceiverState.JOINING)
        cfg = self._config
        self._join = Retry(now, cfg.join_interval, cfg.control_retry_max, cfg.join_timeout)
        self._send_join(now)

    def _on_announce(self, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        assert isinstance(msg, wire.Announce) and self._announce is not None
        old = self._announce
        if (msg.digest, msg.block_count, msg.payload_size) != (
            old.digest,
            old.block_count,
            old.payload_size,
        ):
            raise WireError("invalid", "announce changed within the session")
        self._announce = msg
        if msg.flags & wire.ANNOUNCE_IDLE and self._state is ReceiverState.RECEIVING:
            self._sender_idle(now, msg.state == wire.AnnounceState.TRANSFERRING)
        if msg.state == wire.AnnounceState.ENDING and self._state in (
            ReceiverState.JOINING,
            ReceiverState.RECEIVING,
            ReceiverState.VERIFIED,
        ):
            if msg.flags & wire.ANNOUNCE_ABORTED:
                # Its ABORT was lost; another copy with the reason is due shortly (§3.4).
                if self._abort_deadline is None:
                    self._abort_deadline = now + ABORT_GRACE
            else:
                self._abort("the sender ended the session before this receiver completed")

    def _sender_idle(self, now: float, transferring: bool) -> None:
        """The sender has nothing queued or held back: what our partials lack is lost, and
        once the transfer runs so is every object we lack entirely (it was swept): NAK them
        soon, the whole objects as runs (§4.3), not at the next STATUS. (Before the start
        only the manifest goes: the rest waits for the group.)"""
        partials = self._objs.partials
        for p in partials.values():
            p.passed = True
        if transferring and self._objs.needed:
            self._whole_due = True
        elif not partials:
            return
        # one NAK datagram per receiver covers every object: only a short spread is needed
        at = max(now, self._last_nak + self._nak_gap())
        at += self._rng.uniform(0, self._config.nak_delay / 5)
        if self._nak_at is None or at < self._nak_at:
            self._nak_at = at

    def _on_join_ack(self, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        assert isinstance(msg, wire.JoinAck) and self._announce is not None
        if (msg.target_id, msg.target_instance) != (self.receiver_id, self._instance):
            raise WireError("for_other_receiver")
        if self._state is not ReceiverState.JOINING:
            return
        if msg.refused:
            self._abort(f"the sender refused this receiver: {msg.text}", "refused")
            return
        a = self._announce
        self._set_state(ReceiverState.RECEIVING)
        self._join = None
        self._objs.start(a)
        for start, end in RangeSet.from_values(self._declared):
            # a STATUS sent before the manifest arrives must not undo the JOIN's have list
            self._objs.needed.discard(start, end)
        self._data_total = a.data_blocks
        self._meter = Meter(hdr.seq, now)
        self._next_status = now + self._jitter(self._config.status_interval)
        assert self._sender is not None
        self._events.append(
            SessionJoined(self._session, self._sender, a.block_count, a.data_blocks, a.data_bytes)
        )

    def _targeted(self, msg: wire.Message) -> wire.Targeted:
        assert isinstance(msg, wire.Targeted)
        if (msg.target_id, msg.target_instance) != (self.receiver_id, self._instance):
            raise WireError("for_other_receiver")
        return msg

    def _on_done_ack(self, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        self._targeted(msg)
        if self._state is ReceiverState.DONE_WAIT:
            self.outcome = "completed"
            self._events.append(Completed())
            self._close()

    def _on_leave_ack(self, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        self._targeted(msg)
        if self._state is ReceiverState.LEAVING:
            self._close()

    def _on_evict(self, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        t = self._targeted(msg)
        if self._state is ReceiverState.LEAVING:
            return
        self.outcome = "evicted"
        self._events.append(Evicted(t.text))
        self._start_leave(now, wire.LeaveCode.EVICTED_ACK, t.text, need_ack=False)

    def _on_abort(self, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        assert isinstance(msg, wire.Abort)
        if self._state is ReceiverState.LEAVING:
            return
        self.outcome = "aborted"
        self._events.append(SessionAborted(f"the sender aborted the session: {msg.text}"))
        self._start_leave(now, wire.LeaveCode.ABORTED_ACK, msg.text, need_ack=False)

    _HANDLERS: dict[int, Callable[[ReceiverSession, wire.Header, wire.Message, float], None]]

    # -- data path (hot) ------------------------------------------------------------------

    def _on_data(self, body: memoryview, now: float) -> None:
        if self._state is not ReceiverState.RECEIVING:
            self._objs.duplicates += 1
            return
        if len(body) <= _BODY_SIZE:
            raise WireError("malformed", "data without payload")
        obj, size, frag, _flags = _DATA_BODY.unpack_from(body)
        self._on_fragment(obj, size, frag, body[_BODY_SIZE:], now)

    def _on_fragment(self, obj: int, size: int, frag: int, payload: memoryview, now: float) -> None:
        done = self._objs.fragment(obj, size, frag, payload, now)
        if self._nak_at is None and self._objs.partials:
            start = max(now, self._last_nak + self._nak_gap())
            self._nak_at = start + self._rng.uniform(0, self._config.nak_delay)
        if done is not None:
            self._complete(obj, done, now)

    def _complete(self, obj: int, p: Partial, now: float) -> None:
        objs = self._objs
        if obj >= MANIFEST_BASE:
            objs.set_state(obj, RECEIVED)
            objs.chunk_data[obj - MANIFEST_BASE] = bytes(p.buf)
            objs.recycle(p.buf)
            if len(objs.chunk_data) == len(objs.chunk_states):
                self._manifest_complete(now)
            return
        cfg = self._config
        if (
            len(self._handed) >= cfg.max_unverified_blocks
            or self._handed_bytes + p.size > cfg.max_unverified_bytes
        ):
            # The shell is behind: drop, report it as loss, get it again later.
            objs.forget(obj)
            objs.recycle(p.buf)
            objs.dropped_frags += p.count
            self._counts["backlog_drops"] += 1
            return
        objs.set_state(obj, RECEIVED)
        self._handed[obj] = p.size
        self._handed_bufs[obj] = p.buf
        self._handed_bytes += p.size
        self._counts["blocks_received"] += 1
        # p.buf is ours alone now (the partial is gone): hand it over without a copy; it is
        # recycled when the shell settles the block (block_verified / block_failed).
        if self.manifest is None:
            self._early[obj] = p.buf
        else:
            self._events.append(BlockReceived(obj, p.buf))

    # -- manifest -------------------------------------------------------------------------

    def _manifest_complete(self, now: float) -> None:
        assert self._announce is not None
        chunks = self._objs.chunk_data
        data = b"".join(chunks[k] for k in range(len(self._objs.chunk_states)))
        chunks.clear()
        try:
            manifest, data_blocks = check_manifest(data, self._announce)
        except ValueError as exc:
            self.fail(now, str(exc))
            return
        self.manifest = manifest
        self._data_total = len(data_blocks)
        self._objs.apply_manifest(manifest, data_blocks)
        self._events.append(ManifestReceived(manifest, data))
        for index in sorted(self._declared):
            if 0 <= index < len(self._objs.blocks):
                self._take_have(index)
        self._declared.clear()
        self._release_early()
        self._check_all_verified()

    def _release_early(self) -> None:
        assert self.manifest is not None
        for obj, payload in sorted(self._early.items()):
            state = self._objs.blocks[obj]
            if state == RECEIVED and len(payload) == self.manifest.stored_sizes[obj]:
                self._events.append(BlockReceived(obj, payload))
                continue
            self._counts["early_blocks_invalid"] += 1
            self._handed_bytes -= self._handed.pop(obj, 0)
            self._objs.recycle(self._handed_bufs.pop(obj, payload))
            if state == RECEIVED:
                self._objs.forget(obj)
        self._early.clear()

    # -- progress -------------------------------------------------------------------------

    def _settle(self, index: int) -> None:
        """The shell is done with handed-out block ``index``; ValueError if it was not ours."""
        size = self._handed.pop(index, None)
        if size is None or self._objs.blocks[index] != RECEIVED:
            raise ValueError(f"block {index} was not handed out by BlockReceived (or was settled)")
        self._handed_bytes -= size
        buf = self._handed_bufs.pop(index, None)
        if buf is not None:
            self._objs.recycle(buf)

    def _mark_verified(self, index: int) -> None:
        assert self.manifest is not None
        self._objs.set_state(index, VERIFIED)
        self._verified += 1
        length = self.manifest.block_length(index)
        self._bytes_done += length
        self._meter.written(length)

    def _check_all_verified(self) -> None:
        if (
            self._state is ReceiverState.RECEIVING
            and self.manifest is not None
            and self._verified == self._data_total
        ):
            self._set_state(ReceiverState.VERIFIED)
            self._nak_at = None
            self._events.append(AllBlocksVerified())

    # -- sending --------------------------------------------------------------------------

    def _jitter(self, interval: float) -> float:
        return interval * self._rng.uniform(0.75, 1.25)

    def _send(self, ptype: PacketType, body: bytes) -> None:
        assert self._sender is not None
        hdr = wire.Header(ptype, self._session, self.receiver_id, self._instance, self._seq)
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        data = wire.seal(self._key, hdr, body)
        self._out.append(Transmit(data, len(data), self._sender))

    def _capacity(self, fixed: int) -> int:
        assert self._announce is not None
        size = min(self._config.payload_size, self._announce.payload_size)
        return size - wire.HEADER.size - wire.TAG_SIZE - fixed

    def _hurry_join(self, now: float) -> None:
        """Data flows and we are not in: our JOIN or its JOIN_ACK was lost. JOIN again now
        (at most every JOIN_HURRY), not at the retry's backoff: every datagram until then
        is one we drop."""
        join = self._join
        if join is not None:
            join.next = min(join.next, max(now, self._join_sent_at + JOIN_HURRY))

    def _send_join(self, now: float) -> None:
        assert self._join is not None
        self._join_sent_at = now
        if self._join.expired(now):
            # Nobody answers: a dead or replayed session. Forget it and listen again (§3.1).
            self._counts["join_timeouts"] += 1
            self._ignored.add((self._session, self._sender_instance))
            self._join = None
            self._set_state(ReceiverState.LISTENING)
            return
        have = RangeSet.from_values(self._declared)
        ranges, _ = wire.encode_ranges(list(have), self._capacity(wire.JOIN.size))
        self._send(PacketType.JOIN, wire.encode_join(wire.JOIN_NEED_MANIFEST, ranges))
        self._counts["joins_sent"] += 1
        self._join.sent(now, self._jitter(1.0))

    def _send_naks(self, now: float) -> None:
        cfg = self._config
        due = self._objs.due_naks(now, cfg.nak_idle, self._nak_repeat())
        runs = self._whole_runs(now) if self._whole_due else []
        self._whole_due = False
        if runs:
            self._counts["whole_naked"] += sum(e - s for s, e in runs)
        if due or runs:
            for body in nak_bodies(self._meter.max_seq, due, self._capacity(0), runs):
                self._send(PacketType.NAK, body)
                self._counts["naks_sent"] += 1
            for _obj, p in due:
                p.naked_at = now
                p.answered = False
            self._last_nak = now
        self._nak_at = now + self._jitter(self._nak_gap()) if self._objs.partials else None

    def _whole_runs(self, now: float) -> list[tuple[int, int]]:
        """Objects we lack entirely, at most WHOLE_NAK_MAX, none NAKed again within the
        repeat time (its repair may be on the way), as (start, end) runs."""
        repeat = self._nak_repeat()
        naked = self._whole_naked
        picked: list[int] = []
        for start, end in self._objs.needed:
            for obj in range(start, end):
                if now - naked.get(obj, -1e9) >= repeat:
                    naked[obj] = now
                    picked.append(obj)
                    if len(picked) >= WHOLE_NAK_MAX:
                        return list(RangeSet.from_values(picked))
        return list(RangeSet.from_values(picked))

    def _send_status(self, now: float) -> None:
        loss, rx_bps, write_bps = self._meter.report(now, self._objs.dropped_frags)
        self._objs.dropped_frags = 0
        ranges = self._objs.needed.ranges_from(self._span_next)
        encoded, used = wire.encode_ranges(ranges, self._capacity(wire.STATUS.size))
        span_start = self._span_next
        span_end = 0 if used == len(ranges) else ranges[used][0]
        self._span_next = span_end
        status = wire.Status(
            self._verified,
            max(self._data_total, self._verified),
            self._bytes_done,
            loss,
            write_bps,
            rx_bps,
            len(self._handed),
            0,
            self._meter.max_seq,
            span_start,
            span_end,
            [],
        )
        self._send(PacketType.STATUS, wire.encode_status(status, encoded))
        self._counts["status_sent"] += 1
        if self._auth_pending:
            self._send_auth()
        self._next_status = now + self._jitter(self._config.status_interval)

    def _send_auth(self) -> None:
        """NAK AUTH for the strict blocks still needed: send them tagged (§6.1)."""
        blocks = self._objs.blocks
        self._auth_pending = {i for i in self._auth_pending if blocks[i] == NEEDED}
        ranges = RangeSet.from_values(self._auth_pending)
        for body in wire.encode_nak_bodies(
            self._meter.max_seq, [], [], self._capacity(0), auth=list(ranges)
        ):
            self._send(PacketType.NAK, body)
            self._counts["auth_naks_sent"] += 1

    def _send_control(self, now: float) -> None:
        assert self._control is not None
        if self._control.expired(now):
            if self._state is ReceiverState.DONE_WAIT:
                self._abort(
                    "every block is verified and durable, but the sender never acknowledged "
                    f"DONE in {self._config.control_timeout:.0f} s",
                    "unacknowledged",
                )
            else:
                self._close()
            return
        if self._state is ReceiverState.DONE_WAIT:
            self._send(PacketType.DONE, wire.encode_done(self._verified, self._bytes_done))
        elif self._state is ReceiverState.LEAVING and self._leave is not None:
            code, text, need_ack = self._leave
            self._send(PacketType.LEAVE, wire.encode_leave(code, text))
            self._leave_repeats -= 1
            if not need_ack and self._leave_repeats <= 0:
                self._close()
                return
        self._control.sent(now)


ReceiverSession._HANDLERS = {
    PacketType.ANNOUNCE: ReceiverSession._on_announce,
    PacketType.JOIN_ACK: ReceiverSession._on_join_ack,
    PacketType.DONE_ACK: ReceiverSession._on_done_ack,
    PacketType.LEAVE_ACK: ReceiverSession._on_leave_ack,
    PacketType.EVICT: ReceiverSession._on_evict,
    PacketType.ABORT: ReceiverSession._on_abort,
}
