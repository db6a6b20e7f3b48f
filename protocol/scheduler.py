"""What the sender sends next, and the Transmits for it (docs/PROTOCOL.md §4.2).

Order: NAK repairs, manifest chunks someone lacks, the sweep over the objects some active
receiver lacks, then the repairs outliers asked for. Each object goes as one burst of
GSO Transmits of at most ``segments_per_transmit`` datagrams.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence

from protocol import wire
from protocol.config import EngineConfig
from protocol.manifest import Manifest
from protocol.members import Member
from protocol.rangeset import RangeSet
from protocol.wire import MANIFEST_BASE, MANIFEST_CHUNK, Transmit

POLL_INTERVAL = 0.05
#: Objects skipped per receiver per look (those it has not read yet): past this, wait for
#: its next STATUS rather than burn CPU on every call.
SWEEP_SCAN_LIMIT = 64
SEQ_MASK = 0xFFFFFFFF


def unseen(sent: int, seen: int) -> bool:
    """True when datagram ``sent`` is later than ``seen``, the highest sender seq a receiver
    has processed: the receiver cannot have seen it yet (§4.2). Serial-number arithmetic."""
    return 0 < (sent - seen) & SEQ_MASK < 0x80000000


class Need:
    """What one active receiver lacks, and how far into our stream it has read."""

    __slots__ = ("missing", "outlier", "seen")

    def __init__(self, missing: RangeSet, seen: int, outlier: bool = False) -> None:
        self.missing = missing
        self.seen = seen
        self.outlier = outlier  #: served only when no one else needs anything (§4.3)


def mask_to_list(mask: int) -> list[int]:
    """The set bits of ``mask``, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class Scheduler:
    """The sender's send queue: repairs, manifest chunks, the sweep (§4.2)."""

    def __init__(
        self,
        *,
        key: bytes,
        header: tuple[int, int, int, int],
        manifest: Manifest,
        manifest_bytes: bytes,
        read_block: Callable[[int], bytes],
        config: EngineConfig,
        next_seq: Callable[[int], int],
        counts: Counter[str],
    ) -> None:
        self._key = key
        self._header = header
        self.manifest = manifest
        self._manifest_bytes = manifest_bytes
        self._read_block = read_block
        self._config = config
        self._next_seq = next_seq
        self._counts = counts
        self._fp = config.fragment_payload
        self.chunks = max(1, -(-len(manifest_bytes) // MANIFEST_CHUNK))
        #: bursts queued but not packed yet: (object, fragments, flags, last of its burst,
        #: the one receiver it goes to or None for the group). Packing (seq numbers, tags)
        #: happens as each goes out, so seq order is send order.
        self.pending: deque[tuple[int, Sequence[int], int, bool, Member | None]] = deque()
        #: object -> fragment mask to repair; outliers' repairs wait in low_repairs (§4.3)
        self.repairs: dict[int, int] = {}
        self.low_repairs: dict[int, int] = {}
        #: object -> receiver id -> (receiver, the fragments it asked for): a fragment only
        #: one receiver asked for goes to it alone (§4.3)
        self.askers: dict[int, dict[int, tuple[Member, int]]] = {}
        #: whether fragments one receiver alone asked for go to it alone (the sender decides)
        self.solo_repairs = False
        #: object -> (time, mask, seq of its last datagram; None while still queued)
        self.recent_repairs: dict[int, tuple[float, int, int | None]] = {}
        #: object -> when it was last sent, by repair or sweep
        self.last_sent: dict[int, float] = {}
        #: object -> seq of the last datagram of its last sweep
        self._swept_seq: dict[int, int] = {}
        self._ever_sent: set[int] = set()
        #: the seq of each object's first sweep's last datagram, in order, and the fragments
        #: of every object swept up to and including it
        self._first_sweep_ends: list[int] = []
        self._first_sweep_frags: list[int] = []
        #: the object whose sweep bursts are queued and not all packed yet
        self._sweeping: int | None = None
        self._cursor = 0
        self.passes = 0
        #: when a held-off object may be swept again (the sender's timer), or None
        self.idle_until: float | None = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        #: bytes of outlier-only work the last fill() queued (0: none)
        self.low_bytes = 0
        #: objects whose datagrams are tagged: a receiver's untagged copy failed (§6.1)
        self.tagged: set[int] = set()

    def add_repair(
        self, obj: int, mask: int, now: float, low: bool, seen: int, who: Member | None = None
    ) -> None:
        """Merge a NAK's fragment mask for ``obj``, minus what its sender has not yet seen
        us repair (the repair is in its socket buffer or on the way) or we repaired just now;
        nothing when it has not yet read to the end of the object's last sweep (§4.2).
        """
        swept = self._swept_seq.get(obj)
        if obj == self._sweeping or (swept is not None and unseen(swept, seen)):
            # It has not read to the end of the object's last sweep yet (a busy receiver's
            # socket buffer, or reading paused): what it lacks is still on its way.
            self._counts["naks_early"] += 1
            return
        recent = self.recent_repairs.get(obj)
        if recent is not None and (
            recent[2] is None  # still queued
            or unseen(recent[2], seen)  # the NAK crossed the repair
        ):
            mask &= ~recent[1]
        if mask:
            queue = self.low_repairs if low else self.repairs
            queue[obj] = queue.get(obj, 0) | mask
            if who is not None:
                askers = self.askers.setdefault(obj, {})
                had = askers.get(who.receiver_id)
                askers[who.receiver_id] = (who, mask | (had[1] if had else 0))

    def fill(self, now: float, sweeping: bool, needs: list[Need], low_ok: bool = True) -> bool:
        """Queue the next object's Transmits (§4.2 order); False when there is nothing.

        ``needs`` describe the active receivers; ``sweeping`` is False while the session
        waits for receivers (only manifest chunks and repairs go then). ``low_ok`` False
        holds back what only outliers need (their own pace is spent, §4.3); ``low_bytes``
        then tells how many bytes of such work this call queued.
        """
        self.low_bytes = 0
        if self.repairs:
            self._queue_repair(self.repairs, now)
            return True
        obj = self._next_manifest_chunk(now, needs)
        if obj is None and sweeping:
            obj = self._next_sweep_object(now, [n for n in needs if not n.outlier])
        if obj is None and not low_ok:
            return False
        if obj is None and self.low_repairs:  # outliers: only when nothing else waits
            self.low_bytes = self._queue_repair(self.low_repairs, now)
            return True
        if obj is None and sweeping:
            obj = self._next_sweep_object(now, [n for n in needs if n.outlier])
            self.low_bytes = self._object_size(obj) if obj is not None else 0
        if obj is None:
            return False
        self.last_sent[obj] = now
        self._swept_seq.pop(obj, None)  # set when its last datagram is packed
        self._sweeping = obj  # until then, a NAK for it is early too
        self._queue_object(obj, range(self.fragments(obj)), 0)
        return True

    def _queue_repair(self, queue: dict[int, int], now: float) -> int:
        """Queue the next repair of ``queue``; return the object bytes it carries.
        Fragments only one receiver asked for go to it alone (unicast), the rest to the
        group (§4.3).

        Manifest chunks first (nothing can be handed on without the manifest), then
        objects in the order first asked for: a receiver behind a slow port NAKs a stream
        of low block numbers, and by lowest first another one's repair of a higher block
        waited behind all of them (4 s in the lab).
        """
        obj = max(queue)
        if obj < MANIFEST_BASE:
            obj = next(iter(queue))
        mask = queue.pop(obj)
        other = self.low_repairs if queue is self.repairs else self.repairs
        if obj in other:
            mask |= other.pop(obj)
        self.last_sent[obj] = now
        askers = self.askers.pop(obj, None)
        nbytes = 0
        if askers and self.solo_repairs:
            once = twice = 0
            for _, asked in askers.values():
                twice |= once & asked
                once |= asked
            for who, asked in askers.values():
                solo = asked & ~twice & mask
                if solo and who.active:
                    frags = mask_to_list(solo)
                    self._queue_object(obj, frags, wire.FLAG_REPAIR, who)
                    nbytes += len(frags) * self._fp
                    mask &= ~solo
        if mask:
            self.recent_repairs[obj] = (now, mask, None)
            frags = mask_to_list(mask)
            self._queue_object(obj, frags, wire.FLAG_REPAIR)
            nbytes += len(frags) * self._fp
        return nbytes

    def _next_manifest_chunk(self, now: float, needs: list[Need]) -> int | None:
        first = MANIFEST_BASE
        end = MANIFEST_BASE + self.chunks
        found = [self._next_for(now, n, first, end) for n in needs]
        return min((o for o in found if o is not None), default=None)

    def _next_sweep_object(self, now: float, needs: list[Need]) -> int | None:
        for wrapped in (False, True):
            cursor = 0 if wrapped else self._cursor
            found = [self._next_for(now, n, cursor, MANIFEST_BASE) for n in needs]
            best = min((o for o in found if o is not None), default=None)
            if best is not None:
                self.passes += wrapped
                self._cursor = best + 1
                return best
            if cursor == 0:
                break
        return None

    def _next_for(self, now: float, need: Need, cursor: int, end: int) -> int | None:
        """The first object in [cursor, end) this receiver lacks and could have seen us send.

        An object swept after the last datagram the receiver reported processing is still
        on its way (or in its socket buffer): sending it again would only duplicate it.
        """
        holdoff = self._config.sweep_holdoff
        missing = need.missing
        for _ in range(SWEEP_SCAN_LIMIT):
            obj = missing.next_at_or_after(cursor)
            if obj is None or obj >= end:
                return None
            sent = self._swept_seq.get(obj)
            if sent is None:
                return obj
            if not unseen(sent, need.seen):
                at = self.last_sent[obj]  # its last sweep, or a repair of it since
                if now >= at + holdoff:
                    return obj
                self.note_wakeup(at + holdoff)
            cursor = obj + 1
        self.note_wakeup(now + POLL_INTERVAL)
        return None

    def passed(self, seen: int) -> tuple[int, int]:
        """How many objects, and fragments in them, a receiver that has processed up to seq
        ``seen`` saw us finish sweeping for the first time (first sweeps end in seq order)."""
        ends = self._first_sweep_ends
        lo, hi = 0, len(ends)
        while lo < hi:
            mid = (lo + hi) // 2
            if unseen(ends[mid], seen):
                hi = mid
            else:
                lo = mid + 1
        return lo, self._first_sweep_frags[lo - 1] if lo else 0

    def note_wakeup(self, t: float) -> None:
        if self.idle_until is None or t < self.idle_until:
            self.idle_until = t

    def fragments(self, obj: int) -> int:
        """How many fragments object ``obj`` has."""
        return -(-self._object_size(obj) // self._fp)

    def _object_size(self, obj: int) -> int:
        if obj >= MANIFEST_BASE:
            k = obj - MANIFEST_BASE
            return min(MANIFEST_CHUNK, len(self._manifest_bytes) - k * MANIFEST_CHUNK)
        return int(self.manifest.stored_sizes[obj])

    def _payload(self, obj: int) -> bytes:
        if obj >= MANIFEST_BASE:
            k = obj - MANIFEST_BASE
            return self._manifest_bytes[k * MANIFEST_CHUNK : (k + 1) * MANIFEST_CHUNK]
        cached = self._cache.get(obj)
        if cached is not None:
            self._cache.move_to_end(obj)
            return cached
        payload = self._read_block(obj)
        expected = self.manifest.stored_sizes[obj]
        if len(payload) != expected:
            raise ValueError(
                f"the image store returned {len(payload)} bytes for block {obj}, the manifest "
                f"says {expected}: the stored image is damaged; re-import it"
            )
        self._cache[obj] = payload
        if len(self._cache) > self._config.block_cache:
            self._cache.popitem(last=False)
        return payload

    def _queue_object(
        self, obj: int, frags: range | list[int], flags: int, to: Member | None = None
    ) -> None:
        """Queue ``frags`` of ``obj`` as bursts of at most segments_per_transmit datagrams."""
        per = self._config.segments_per_transmit
        n = len(frags)
        for i in range(0, n, per):
            self.pending.append((obj, frags[i : i + per], flags, i + per >= n, to))

    def pop_transmit(self) -> Transmit:
        """Pack the next queued burst: header, seq, payload slice and tag per datagram."""
        obj, chunk, flags, last, to = self.pending.popleft()
        payload = self._payload(obj)
        if to is None:
            seq = self._next_seq(len(chunk))
        else:  # its own seq space: the others see no gap (§4.3)
            seq = (to.useq + 1) & SEQ_MASK
            to.useq = (to.useq + len(chunk)) & SEQ_MASK
            flags |= wire.FLAG_UNICAST
            self._counts["unicast_repair_datagrams"] += len(chunk)
        if self._config.tag_data or obj >= MANIFEST_BASE or obj in self.tagged:
            flags |= wire.FLAG_TAGGED
        data = wire.pack_fragments(
            self._key, self._header, seq, obj, payload, chunk, self._fp, flags
        )
        end = (seq + len(chunk) - 1) & SEQ_MASK
        if flags & wire.FLAG_REPAIR:
            key = "repair_datagrams"
            if last and to is None and obj in self.recent_repairs:
                at, mask, _ = self.recent_repairs[obj]
                self.recent_repairs[obj] = (at, mask, end)
        else:
            key = "resweep_datagrams" if obj in self._ever_sent else "data_datagrams"
            if last:
                self._swept_seq[obj] = end
                if obj not in self._ever_sent:
                    self._ever_sent.add(obj)
                    self._first_sweep_ends.append(end)
                    total = self._first_sweep_frags[-1] if self._first_sweep_frags else 0
                    self._first_sweep_frags.append(total + self.fragments(obj))
                if self._sweeping == obj:
                    self._sweeping = None
        self._counts[key] += len(chunk)
        seg = wire.data_segment(self._fp, flags)
        addr = None if to is None else to.addr
        return Transmit(data, seg if len(chunk) > 1 else len(data), addr)
