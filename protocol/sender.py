"""The sender's state machine: no I/O, time is a parameter (docs/PROTOCOL.md).

A shell feeds it datagrams (``receive_datagram``), sends what ``datagrams_to_send``
returns, calls ``handle_timer`` at ``get_timer()``, and drains ``next_event``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from typing import Any

from protocol import wire
from protocol.config import EngineConfig
from protocol.events import (
    Event,
    ReceiverCompleted,
    ReceiverEvicted,
    ReceiverFailed,
    ReceiverJoined,
    ReceiverLeft,
    ReceiverProgress,
    SessionEnded,
    TransferStarted,
)
from protocol.manifest import BlockKind, Manifest
from protocol.members import Member, MemberState, ReplayWindow
from protocol.pacing import Pacer, SendLog
from protocol.rangeset import RangeSet
from protocol.retry import Retry
from protocol.scheduler import POLL_INTERVAL, Need, Scheduler, unseen
from protocol.wire import MANIFEST_BASE, MANIFEST_CHUNK, PacketType, Transmit, WireError

logger = logging.getLogger(__name__)

#: Unicast repairs while a fragment one receiver lacks is at least this likely to be lacked
#: by no other (median loss p, N receivers: (1-p)**(N-1)); else one multicast copy is
#: cheaper than the copies the other receivers' NAKs would ask for (§4.3).
SOLO_REPAIR_ALONE = 0.75

#: Before its first STATUS, a receiver whose NAKs named more than this share of the objects
#: it read past is an outlier (§4.3): a port that takes a fraction of our rate; judged once
#: it read past NAK_JUDGE_OBJECTS objects.
NAK_OUTLIER_SHARE = 0.5
NAK_JUDGE_OBJECTS = 8

#: Most objects one NAK's runs (objects lacked entirely) have repaired; the rest wait for
#: the sweep (§4.3).
RUN_REPAIRS = 64

#: When the send queue runs dry, the next ANNOUNCE goes this soon, flagged IDLE (§3.1).
IDLE_ANNOUNCE = 0.002


class SenderState(Enum):
    """§3: waiting for receivers, transferring, lingering after the end, ended."""

    WAITING = "waiting"
    TRANSFERRING = "transferring"
    ENDING = "ending"
    ENDED = "ended"


_TRANSITIONS: dict[SenderState, frozenset[SenderState]] = {
    SenderState.WAITING: frozenset({SenderState.TRANSFERRING, SenderState.ENDING}),
    SenderState.TRANSFERRING: frozenset({SenderState.ENDING}),
    SenderState.ENDING: frozenset({SenderState.ENDED}),
    SenderState.ENDED: frozenset(),
}

_ANNOUNCE_STATE = {
    SenderState.WAITING: wire.AnnounceState.WAITING,
    SenderState.TRANSFERRING: wire.AnnounceState.TRANSFERRING,
    SenderState.ENDING: wire.AnnounceState.ENDING,
    SenderState.ENDED: wire.AnnounceState.ENDING,
}


def data_block_ranges(manifest: Manifest) -> RangeSet:
    """The DATA blocks of ``manifest`` as a RangeSet."""
    return RangeSet.from_values(i for i, k in enumerate(manifest.kinds) if k == BlockKind.DATA)


class SenderSession:
    """One multicast session from the sender's side (PROTOCOL.md §3-§7)."""

    def __init__(
        self,
        *,
        session_id: int,
        key: bytes,
        manifest_bytes: bytes,
        read_block: Callable[[int], bytes],
        config: EngineConfig,
        now: float,
        rng: random.Random,
        min_receivers: int = 1,
        max_wait: float | None = None,
    ) -> None:
        """Raises ValueError (ManifestError) for a bad session id, key or manifest."""
        if not 0 < session_id < 1 << 32:
            raise ValueError(f"session id {session_id} must be between 1 and 2**32-1")
        if len(key) < 16:
            raise ValueError("the session key must be at least 16 bytes (32 from a key file)")
        if min_receivers < 1:
            raise ValueError("min_receivers must be at least 1")
        self.manifest = Manifest.from_bytes(manifest_bytes)
        self._manifest_bytes = bytes(manifest_bytes)
        self._key = key
        self._session_id = session_id
        self._config = config
        self._rng = rng
        self._min_receivers = min_receivers
        self._max_wait = max_wait
        self._instance = rng.randrange(1, 1 << 32)
        self._seq = 0
        self._send_log = SendLog()
        self._state = SenderState.WAITING
        self._outcome = ""
        self._outcome_reason = ""
        self._started_at = now
        self._transfer_started_at: float | None = None
        self._end_at = 0.0
        self._now = now
        self._data = data_block_ranges(self.manifest)
        self._chunks = max(1, -(-len(manifest_bytes) // MANIFEST_CHUNK))  # == Scheduler.chunks
        self._objects = self._data.copy()
        self._objects.add(MANIFEST_BASE, MANIFEST_BASE + self._chunks)
        self._digest = hashlib.sha256(manifest_bytes).digest()
        self._members: dict[int, Member] = {}
        self._old_instances: dict[int, set[int]] = {}
        self._events: deque[Event] = deque()
        self._control: list[Transmit] = []
        self._group_loss = 0.0
        self._blocked = False
        self._idle = False  # the last look found nothing to send, and nothing changed since
        #: ... but outliers' work may be waiting for their pacer: then we are not idle (§3.1)
        self._low_held = False
        self._data_since_announce = False
        self._pacer = Pacer(config, now)
        #: what only outliers need goes at their pace, not the group's (§4.3)
        self._low_pacer = Pacer(replace(config, auto_rate=False, rate_bps=None), now)
        self._next_announce = now
        self._next_poll = now
        self._next_rate = now + config.rate_interval
        self._last_rate_update = now
        self._last_completion: float | None = None
        self._aborts_left = 0
        self._next_abort = 0.0
        self._dropped: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._sched = Scheduler(
            key=key,
            header=(session_id, 0, self._instance, 0),
            manifest=self.manifest,
            manifest_bytes=self._manifest_bytes,
            read_block=read_block,
            config=config,
            next_seq=self._next_seq,
            counts=self._counts,
        )

    # -- public API ---------------------------------------------------------------------

    @property
    def state(self) -> SenderState:
        return self._state

    @property
    def finished(self) -> bool:
        """True once the session has ended (after the linger time)."""
        return self._state is SenderState.ENDED

    @property
    def rate_bps(self) -> int | None:
        """The pacer's current rate; None when unpaced."""
        return self._pacer.rate_bps

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: datagrams/bytes sent, retransmissions, NAKs, drops, per receiver."""
        return {
            "state": self._state.value,
            "outcome": self._outcome,
            "rate_bps": self._pacer.rate_bps,
            "passes": self._sched.passes,
            **dict(self._counts),
            "retransmitted_datagrams": self._counts["repair_datagrams"]
            + self._counts["resweep_datagrams"],
            "dropped": dict(self._dropped),
            "receivers": {rid: m.summary() for rid, m in self._members.items()},
        }

    def receive_datagram(self, data: bytes | memoryview, addr: tuple[str, int], now: float) -> None:
        """Handle one datagram from the network; never raises on bad input (§2.2)."""
        self._now = now
        self._counts["datagrams_received"] += 1
        try:
            self._receive(data, addr, now)
            self._counts["accepted"] += 1
            self._idle = False  # what receivers need may have changed
        except WireError as exc:
            self._dropped[exc.reason] += 1
        except Exception:  # a bug must not kill the session; the fuzz test keeps this at 0
            logger.exception("session %08x: internal error on a datagram", self._session_id)
            self._dropped["internal_error"] += 1

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """Control datagrams, then as much data as the pacer allows at ``now``."""
        self._now = now
        self._poll(now)
        out = self._control
        self._control = []
        if self._aborts_left and now >= self._next_abort:
            out.append(self._multicast(PacketType.ABORT, wire.encode_abort(self._outcome_reason)))
            self._aborts_left -= 1
            self._next_abort = now + self._config.linger / max(1, self._config.abort_repeats)
        if now >= self._next_announce and self._state is not SenderState.ENDED:
            out.append(self._announce())
            waiting = self._state is SenderState.WAITING
            interval = self._config.waiting_announce_interval if waiting else 0
            self._next_announce = now + (interval or self._config.announce_interval)
        for t in out:
            self._pacer.consume(len(t.data))
        out.extend(self._data_transmits(now))
        for t in out:
            self._counts["datagrams_sent"] += t.count
            self._counts["bytes_sent"] += len(t.data)
        return out

    def get_timer(self) -> float | None:
        """The absolute time at which handle_timer must next be called; None when ended."""
        if self._state is SenderState.ENDED:
            return None
        times = [self._next_announce, self._next_poll]
        if self._state is SenderState.ENDING:
            times.append(self._end_at)
        if self._aborts_left:
            times.append(self._next_abort)
        if self._blocked:
            times.append(self._pacer.ready_at(self._now))
        elif self._sched.idle_until is not None:
            times.append(self._sched.idle_until)
        return min(times)

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (start rule, evictions, rate, end)."""
        self._now = now
        self._poll(now)

    def member(self, receiver_id: int) -> Member | None:
        """What the session knows about a receiver (for diagnostics), or None."""
        return self._members.get(receiver_id)

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def start_transfer(self, now: float) -> bool:
        """Start the transfer now with the receivers that joined, whatever ``min_receivers``.

        For a controller (the server's start policies) that holds the session at a high
        ``min_receivers`` and decides itself when to start. Returns False, changing
        nothing, unless the session is still waiting and at least one receiver joined.
        """
        if self._state is not SenderState.WAITING or not self._members:
            return False
        self._min_receivers = len(self._members)
        self._check_start(now)
        return self._transfer_started_at is not None

    def close(self, now: float, reason: str) -> None:
        """Abort the session: tell the receivers (ABORT) and end after the linger time."""
        if self._state in (SenderState.ENDING, SenderState.ENDED):
            return
        self._outcome_reason = reason
        self._aborts_left = max(1, self._config.abort_repeats)
        self._next_abort = now
        for m in self._members.values():
            if m.active:
                m.state = MemberState.LEFT
                m.reason = f"session aborted: {reason}"
                m.ended_at = now
        self._end(now, "aborted")

    # -- state ----------------------------------------------------------------------------

    def _set_state(self, new: SenderState) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise AssertionError(f"sender transition {self._state} -> {new} is not allowed")
        logger.debug("session %08x: %s -> %s", self._session_id, self._state.value, new.value)
        self._state = new

    def _end(self, now: float, outcome: str) -> None:
        self._outcome = outcome
        self._end_at = now + self._config.linger
        self._next_announce = now
        self._set_state(SenderState.ENDING)

    def _poll(self, now: float) -> None:
        if self._state is SenderState.ENDING and now >= self._end_at:
            self._set_state(SenderState.ENDED)
            self._events.append(SessionEnded(self._outcome, self._summary(now)))
            return
        if now < self._next_poll:
            return
        self._next_poll = now + POLL_INTERVAL
        self._send_evictions(now)
        if self._state is SenderState.WAITING:
            self._check_start(now)
        if self._state in (SenderState.WAITING, SenderState.TRANSFERRING):
            self._check_members(now)
            self._check_end(now)
            self._pace_outliers(now)
        if now >= self._next_rate:
            self._next_rate = now + self._config.rate_interval
            self._update_rate(now)

    def _check_start(self, now: float) -> None:
        # Every receiver that joined counts, even one that failed or died since: the others
        # must not wait forever for a machine that showed up and broke (§3.2).
        joined = len(self._members)
        waited = self._max_wait is not None and now - self._started_at >= self._max_wait
        if joined >= self._min_receivers or (waited and joined > 0):
            self._transfer_started_at = now
            self._idle = False
            self._set_state(SenderState.TRANSFERRING)
            self._next_announce = now
            self._events.append(TransferStarted(sum(1 for m in self._members.values() if m.active)))
            self._check_end(now)
        elif waited:
            self._end(now, "no-receivers")

    def _check_end(self, now: float) -> None:
        if self._state is not SenderState.TRANSFERRING:
            return
        if any(m.active for m in self._members.values()):
            return
        states = [m.state for m in self._members.values()]
        if not states:
            outcome = "no-receivers"
        elif all(s is MemberState.COMPLETED for s in states):
            outcome = "completed"
        else:
            outcome = "partial"
        self._end(now, outcome)

    def _check_members(self, now: float) -> None:
        cfg = self._config
        grace = cfg.straggler_grace
        if self._last_completion is not None and self._transfer_started_at is not None:
            grace = max(grace, self._last_completion - self._transfer_started_at)
        for m in list(self._members.values()):
            if not m.active:
                continue
            if now - m.last_heard > cfg.receiver_timeout:
                self._evict(m, now, f"silent: nothing heard for {now - m.last_heard:.1f} s")
            elif self._last_completion is not None and (
                now > max(self._last_completion, m.joined_at) + grace
            ):
                self._evict(
                    m,
                    now,
                    f"straggler: still {len(m.missing)} objects short {grace:.0f} s after "
                    "the others completed",
                )
        self._sched.solo_repairs = self._solo_repairs_pay()

    def _solo_repairs_pay(self) -> bool:
        """Repair a fragment only one receiver asked for to it alone (§4.3) while the
        group's loss makes it unlikely that another one lacks it too."""
        # The loss its NAKs tell, over all it read: one STATUS window's figure swings with
        # bursts (a lost GSO train is 44 of an object's ~250 datagrams: 0% one window, 10%
        # the next), and each swing above the bound sent a spell of repairs to everyone.
        losses = sorted(m.nak_loss for m in self._members.values() if m.active)
        if len(losses) < 2:
            return False
        p = losses[len(losses) // 2]
        return (1.0 - p) ** (len(losses) - 1) >= SOLO_REPAIR_ALONE

    def _update_rate(self, now: float) -> None:
        cfg = self._config
        fresh, quiet = now - 2 * cfg.status_interval, now - cfg.suspect_after
        # The group: who still receives and is heard from. One that has not reported yet
        # counts as no loss, so the first report (maybe a slow port's) does not set the rate.
        receiving = [
            m
            for m in self._members.values()
            if m.active and m.blocks_done < m.blocks_total and m.last_heard >= quiet
        ]
        reports = [m for m in receiving if m.last_status_time >= fresh]
        if any(m.last_status_time > self._last_rate_update for m in reports):
            figures = [(m.loss, m.rx_bps, m.lag) for m in reports]
            self._pacer.adjust(now, figures, group=len(receiving))
            self._last_rate_update = now
            losses = sorted(m.loss for m in reports)
            losses[:0] = [0.0] * (len(receiving) - len(losses))
            self._group_loss = losses[int(cfg.rate_quantile * (len(losses) - 1))]
            self._judge()

    def _judge(self) -> None:
        """Flag the receivers losing far more than the group (a slow port, a busy CPU) (§4.3).

        By the STATUS loss once there is one. Before it, by the share of the objects it
        read past that its NAKs named: a port that takes a tenth of our rate lacks part of
        every object, while bursty loss (a lost GSO train, 44 datagrams) touches a few. (The
        share of fragments its NAKs lack cannot tell them apart: a lost train is most of a
        small object.) A group is not an outlier from itself: when every active receiver
        would be one, none is (all of them being slow is the group's rate, §5).
        """
        bound = max(self._config.loss_threshold, 2 * self._group_loss)
        active = [m for m in self._members.values() if m.active]
        flags = [
            m.loss > bound if m.last_status_time >= 0 else m.nak_share > NAK_OUTLIER_SHARE
            for m in active
        ]
        alone = len(active) < 2 or all(flags)
        for m, flag in zip(active, flags, strict=True):
            m.outlier = flag and not alone

    def _evict(self, m: Member, now: float, reason: str) -> None:
        m.state = MemberState.EVICTED
        m.reason = reason
        m.ended_at = now
        cfg = self._config
        m.evict = Retry(now, cfg.control_retry, cfg.control_retry_max, cfg.control_timeout)
        self._counts["evictions"] += 1
        logger.info(
            "session %08x: evicting receiver %08x: %s", self._session_id, m.receiver_id, reason
        )
        self._events.append(ReceiverEvicted(m.receiver_id, reason))
        self._send_evictions(now)  # before any ENDING announce, so it learns why
        self._check_end(now)

    def _send_evictions(self, now: float) -> None:
        for m in self._members.values():
            if m.evict is None or not m.evict.due(now):
                continue
            if m.evict.expired(now):
                m.evict = None
                continue
            body = wire.encode_targeted(m.receiver_id, m.instance, m.reason)
            self._control.append(self._multicast(PacketType.EVICT, body))
            m.evict.sent(now)

    # -- receiving ------------------------------------------------------------------------

    def _receive(self, data: bytes | memoryview, addr: tuple[str, int], now: float) -> None:
        hdr, body = wire.open_datagram(self._key, data)
        if hdr.type not in wire.RECEIVER_TYPES:
            known = hdr.type in PacketType._value2member_map_
            raise WireError("unexpected_type" if known else "bad_type")
        if hdr.session != self._session_id:
            raise WireError("foreign_session")
        if hdr.source == 0:
            raise WireError("invalid", "receiver id 0")
        member = self._members.get(hdr.source)
        if member is None or member.instance != hdr.instance:
            if hdr.instance in self._old_instances.get(hdr.source, ()):
                raise WireError("replayed", "an old instance of this receiver")
            if hdr.type != PacketType.JOIN:
                raise WireError("unknown_receiver")
            self._on_new_join(hdr, wire.decode_join(body), addr, now)
            return
        if not member.replay.accept(hdr.seq):
            raise WireError("replayed")
        member.last_heard = now
        member.addr = addr
        msg = wire.DECODERS[hdr.type](body)
        self._HANDLERS[hdr.type](self, member, hdr, msg, now)

    def _on_new_join(
        self, hdr: wire.Header, join: wire.Join, addr: tuple[str, int], now: float
    ) -> None:
        refusal = ""
        active = sum(1 for m in self._members.values() if m.active)
        if self._state in (SenderState.ENDING, SenderState.ENDED):
            refusal = "the session is ending"
        elif active >= self._config.max_receivers:
            refusal = f"the session is full ({active} receivers)"
        if refusal:
            self._counts["joins_refused"] += 1
            body = wire.encode_join_ack(hdr.source, hdr.instance, True, refusal)
            self._control.append(self._multicast(PacketType.JOIN_ACK, body))
            return
        old = self._members.get(hdr.source)
        if old is not None:
            self._old_instances.setdefault(hdr.source, set()).add(old.instance)
        missing = self._data.difference(RangeSet(join.have))
        if join.flags & wire.JOIN_NEED_MANIFEST:
            missing.add(MANIFEST_BASE, MANIFEST_BASE + self._chunks)
        m = Member(
            receiver_id=hdr.source,
            instance=hdr.instance,
            addr=addr,
            joined_at=now,
            missing=missing,
            replay=ReplayWindow(hdr.seq),
            last_heard=now,
            blocks_total=len(self._data),
            seen=(self._seq - 1) & 0xFFFFFFFF,  # it cannot have read anything sent later
        )
        m.blocks_done = m.blocks_total - len(missing.intersection(self._data))
        m.passed_at_join = self._sched.passed(m.seen)[1]
        self._members[hdr.source] = m
        self._sched.solo_repairs = self._solo_repairs_pay()  # then every poll
        self._counts["joins"] += 1
        self._events.append(ReceiverJoined(hdr.source, addr))
        self._reply_join(m)
        if self._state is SenderState.WAITING and len(self._members) >= self._min_receivers:
            self._check_start(now)  # at once, not at the next poll: a start costs no wait

    def _reply_join(self, m: Member) -> None:
        refused = m.state in (MemberState.EVICTED, MemberState.FAILED, MemberState.LEFT)
        text = m.reason if refused else ""
        body = wire.encode_join_ack(m.receiver_id, m.instance, refused, text)
        self._control.append(self._multicast(PacketType.JOIN_ACK, body))

    def _on_join(self, m: Member, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        self._reply_join(m)

    def _on_nak(self, m: Member, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        assert isinstance(msg, wire.Nak)
        if not m.active:
            raise WireError("inactive_receiver")
        for obj, run, mask in msg.entries:
            self._check_nak_entry(obj, run, mask)
        for start, end in msg.auth:
            self._check_nak_entry(start, end - start, 0)
        m.naks += 1
        self._counts["naks_received"] += 1
        passed = self._note_read(m, msg.seen)
        m.nak_lacked += sum(
            mask.bit_count()
            for obj, run, mask in msg.entries
            if not run and obj not in m.object_naks
        )
        # before its first STATUS, judged by what its NAKs name
        if m.last_status_time < 0 and passed >= NAK_JUDGE_OBJECTS:
            named = {obj for obj, run, _ in msg.entries if not run} | m.object_naks.keys()
            m.nak_share = len(named) / passed
            self._judge()  # before its repairs are queued: an outlier's wait (§4.3)
        for start, end in msg.auth:
            self._on_auth_request(m, start, end)
        # before the start only manifest chunks go: the blocks wait for the group
        budget = RUN_REPAIRS if self._state is SenderState.TRANSFERRING else 0
        for obj, run, mask in msg.entries:
            if run:
                # Lacked entirely after we went idle: lost. Repair them like fragments
                # (the seen check drops what is still on its way), the first few at least.
                wanted = RangeSet([(obj, obj + run)]).intersection(self._objects)
                for s, e in wanted:
                    m.missing.add(s, e)
                    for o in range(s, min(e, s + budget)):
                        whole = (1 << self._sched.fragments(o)) - 1
                        low = m.outlier and o < MANIFEST_BASE
                        self._sched.add_repair(o, whole, now, low=low, seen=msg.seen, who=m)
                    budget -= min(e - s, budget)
                continue
            count, last = m.object_naks.get(obj, (0, -1.0))
            if self._sched.last_sent.get(obj, -1.0) > last:
                count += 1  # counts only NAKs that follow a repair: repairs that failed
            m.object_naks[obj] = (count, now)
            # The manifest is small and nothing can be handed on without it: never later.
            low = m.outlier and obj < MANIFEST_BASE
            self._sched.add_repair(obj, mask, now, low=low, seen=msg.seen, who=m)
            if count > self._config.max_object_naks:
                self._evict(
                    m,
                    now,
                    f"cannot keep up: object {obj} still incomplete after {count} repairs",
                )
                return

    def _on_auth_request(self, m: Member, start: int, end: int) -> None:
        """Its untagged copy of these objects failed verification (maybe forged): from now
        on they go tagged, to everyone, and it gets them again (§6.1)."""
        for s, e in RangeSet([(start, end)]).intersection(self._objects):
            m.missing.add(s, e)
            for obj in range(s, e):
                if obj not in self._sched.tagged:
                    self._sched.tagged.add(obj)
                    self._counts["objects_tagged"] += 1

    def _note_read(self, m: Member, seen: int) -> int:
        """It has read up to seq ``seen``: note the fragments it read past since it joined
        (its loss figure's denominator, §4.3); return the objects it read past."""
        passed, frags = self._sched.passed(seen)
        m.passed_frags = max(m.passed_frags, frags - m.passed_at_join)
        return passed

    def _check_nak_entry(self, obj: int, run: int, mask: int) -> None:
        if run:
            if obj + run > 1 << 32:
                raise WireError("invalid", "nak run beyond the object space")
            return
        if obj not in self._objects:
            raise WireError("invalid", f"nak for object {obj} that is not sent")
        if mask.bit_length() > self._sched.fragments(obj):
            raise WireError("invalid", f"nak for a fragment beyond object {obj}")

    def _on_status(self, m: Member, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        assert isinstance(msg, wire.Status)
        if hdr.seq <= m.last_status_seq:
            raise WireError("stale_status")
        m.last_status_seq = hdr.seq
        if not m.active:
            return
        end = msg.span_end or 1 << 32
        reported = RangeSet(msg.missing).intersection(self._objects)
        m.missing.replace_span(msg.span_start, end, reported)
        m.last_status_time = now
        last_sent = (self._seq - 1) & 0xFFFFFFFF
        if unseen(msg.seen, m.seen) and not unseen(msg.seen, last_sent):
            m.seen = msg.seen  # how far into our stream it has read (§4.2)
            self._note_read(m, m.seen)
        m.lag = self._send_log.lag(m.seen, self._seq, now)
        m.loss = msg.loss
        m.blocks_done = min(msg.blocks_done, m.blocks_total)
        m.bytes_done = msg.bytes_done
        m.write_bps = msg.write_bps
        m.rx_bps = msg.rx_bps
        m.backlog = msg.backlog
        self._events.append(
            ReceiverProgress(
                m.receiver_id,
                m.blocks_done,
                m.blocks_total,
                m.bytes_done,
                m.loss,
                m.naks,
                m.write_bps,
                m.backlog,
            )
        )

    def _on_done(self, m: Member, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        assert isinstance(msg, wire.Done)
        if m.state is MemberState.EVICTED:
            if m.evict is not None:
                m.evict.next = now  # tell it again
            return
        if m.active:
            m.state = MemberState.COMPLETED
            m.ended_at = now
            m.blocks_done = m.blocks_total
            m.bytes_done = msg.bytes_done
            m.missing = RangeSet()
            self._last_completion = now
            self._counts["completions"] += 1
            self._events.append(ReceiverCompleted(m.receiver_id))
        if m.state is MemberState.COMPLETED:
            body = wire.encode_targeted(m.receiver_id, m.instance)
            self._control.append(self._multicast(PacketType.DONE_ACK, body))
        self._check_end(now)

    def _on_leave(self, m: Member, hdr: wire.Header, msg: wire.Message, now: float) -> None:
        assert isinstance(msg, wire.Leave)
        if msg.code == wire.LeaveCode.EVICTED_ACK:
            m.evict = None
        elif m.active:
            failed = msg.code == wire.LeaveCode.FAILED
            m.state = MemberState.FAILED if failed else MemberState.LEFT
            m.reason = msg.text or ("failed" if failed else "left")
            m.ended_at = now
            event = ReceiverFailed if failed else ReceiverLeft
            self._events.append(event(m.receiver_id, m.reason))
        body = wire.encode_targeted(m.receiver_id, m.instance)
        self._control.append(self._multicast(PacketType.LEAVE_ACK, body))
        self._check_end(now)

    _HANDLERS: dict[int, Callable[[SenderSession, Member, wire.Header, wire.Message, float], None]]

    # -- sending ----------------------------------------------------------------------------

    def _next_seq(self, n: int = 1) -> int:
        seq = self._seq
        self._seq = (self._seq + n) & 0xFFFFFFFF
        self._send_log.numbered(n)
        return seq

    def _multicast(self, ptype: PacketType, body: bytes) -> Transmit:
        hdr = wire.Header(ptype, self._session_id, 0, self._instance, self._next_seq())
        data = wire.seal(self._key, hdr, body)
        return Transmit(data, len(data), None)

    def _announce(self) -> Transmit:
        m = self.manifest
        rate = self._pacer.rate_bps or 0
        body = wire.encode_announce(
            wire.Announce(
                digest=self._digest,
                manifest_size=len(self._manifest_bytes),
                block_count=m.block_count,
                data_blocks=len(self._data),
                block_size=m.block_size,
                payload_size=self._config.payload_size,
                state=_ANNOUNCE_STATE[self._state],
                flags=(wire.ANNOUNCE_ABORTED if self._outcome == "aborted" else 0)
                | (wire.ANNOUNCE_TAGGED_DATA if self._config.tag_data else 0)
                | (
                    wire.ANNOUNCE_IDLE
                    if self._idle and not self._low_held and not self._sched.pending
                    else 0
                ),
                rate_bps=rate,
                data_bytes=m.stored_bytes,
            )
        )
        self._counts["announces"] += 1
        return self._multicast(PacketType.ANNOUNCE, body)

    def _data_transmits(self, now: float) -> list[Transmit]:
        out: list[Transmit] = []
        self._blocked = False
        sched = self._sched
        if self._state not in (SenderState.WAITING, SenderState.TRANSFERRING):
            sched.pending.clear()
            sched.idle_until = None
            return out
        if (
            self._idle
            and not sched.pending
            and (sched.idle_until is None or now < sched.idle_until)
        ):
            return out  # nothing changed since the last look found nothing to send
        sched.idle_until = None
        sweeping = self._state is SenderState.TRANSFERRING
        # A receiver silent for a while (dead, or starved) is not served until it speaks
        # again; it is evicted at receiver_timeout (§7).
        quiet = now - self._config.suspect_after
        needs = [
            Need(m.missing, m.seen, m.outlier)
            for m in self._members.values()
            if m.active and m.last_heard >= quiet
        ]
        limit = None if self._pacer.paced else self._config.max_transmits_per_call
        while True:
            low_ok = self._low_pacer.ready(now)
            if not sched.pending and not sched.fill(now, sweeping, needs, low_ok):
                if not low_ok:
                    sched.note_wakeup(self._low_pacer.ready_at(now))
                self._low_held = not low_ok
                self._idle = True
                if out or self._data_since_announce:
                    # Out of work: an ANNOUNCE soon carries a later seq, so a receiver that
                    # lost our last datagrams learns that it read past them (its NAKs count
                    # only then, §4.2) without waiting for the next periodic one.
                    self._next_announce = min(self._next_announce, now + IDLE_ANNOUNCE)
                    self._data_since_announce = False
                return out
            self._idle = False
            if sched.low_bytes:
                self._low_pacer.consume(sched.low_bytes)
                sched.low_bytes = 0
            if not self._pacer.ready(now):
                self._blocked = True
                return out
            if limit is not None and len(out) >= limit:
                self._blocked = True
                return out
            t = sched.pop_transmit()
            self._data_since_announce = True
            self._pacer.consume(len(t.data))
            out.append(t)
            self._send_log.sent(now)

    def _pace_outliers(self, now: float) -> None:
        """What only outliers need goes at a little above the rate they receive at, not
        the group's: past their port it is dropped anyway, and the others would only read
        it as duplicates (§4.3). Unlimited when there is no outlier."""
        quiet = now - self._config.suspect_after
        outliers = [
            m for m in self._members.values() if m.active and m.outlier and m.last_heard >= quiet
        ]
        if not outliers:
            self._low_pacer.rate_bps = None
            return
        rx = max(m.rx_bps for m in outliers)
        group = self._pacer.rate_bps or self._config.initial_rate_bps
        rate = int(rx * 1.1) if rx else group // 10  # no STATUS yet: a tenth of ours
        rate = max(rate, self._config.min_rate_bps)
        if self._low_pacer.rate_bps is None:
            self._low_pacer = Pacer(replace(self._config, auto_rate=False, rate_bps=rate), now)
        else:
            self._low_pacer.set_rate(now, rate)

    def _summary(self, now: float) -> dict[str, Any]:
        states = Counter(m.state.value for m in self._members.values())
        return {
            "outcome": self._outcome,
            "duration": round(now - self._started_at, 3),
            "receivers": len(self._members),
            **{f"receivers_{k}": v for k, v in states.items()},
            "datagrams_sent": self._counts["datagrams_sent"],
            "bytes_sent": self._counts["bytes_sent"],
            "repair_datagrams": self._counts["repair_datagrams"],
            "resweep_datagrams": self._counts["resweep_datagrams"],
            "naks_received": self._counts["naks_received"],
            "passes": self._sched.passes,
            "per_receiver": {rid: m.summary() for rid, m in self._members.items()},
        }


SenderSession._HANDLERS = {
    PacketType.JOIN: SenderSession._on_join,
    PacketType.NAK: SenderSession._on_nak,
    PacketType.STATUS: SenderSession._on_status,
    PacketType.DONE: SenderSession._on_done,
    PacketType.LEAVE: SenderSession._on_leave,
}
