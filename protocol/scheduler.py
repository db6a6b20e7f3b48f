"""What the sender sends next, and the Transmits for it (docs/PROTOCOL.md §4.2).

Order: NAK repairs, manifest chunks someone lacks, the sweep over the objects some active
receiver lacks, then the repairs outliers asked for. Each object goes as one burst of
GSO Transmits of at most ``segments_per_transmit`` datagrams.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from protocol import wire
from protocol.config import EngineConfig
from protocol.manifest import Manifest
from protocol.rangeset import RangeSet
from protocol.wire import MANIFEST_BASE, MANIFEST_CHUNK, Transmit

POLL_INTERVAL = 0.05
SWEEP_SCAN_LIMIT = 4096


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
        self.pending: deque[Transmit] = deque()
        #: object -> fragment mask to repair; outliers' repairs wait in low_repairs (§4.3)
        self.repairs: dict[int, int] = {}
        self.low_repairs: dict[int, int] = {}
        #: object -> (time, mask) of its last repair, for repair_holdoff
        self.recent_repairs: dict[int, tuple[float, int]] = {}
        #: object -> when it was last sent, by repair or sweep
        self.last_sent: dict[int, float] = {}
        self._swept: dict[int, float] = {}
        self._ever_sent: set[int] = set()
        self._cursor = 0
        self.passes = 0
        #: when a held-off object may be swept again (the sender's timer), or None
        self.idle_until: float | None = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def add_repair(self, obj: int, mask: int, now: float, low: bool) -> None:
        """Merge a NAK's fragment mask for ``obj``, minus what was repaired just now."""
        recent = self.recent_repairs.get(obj)
        if recent is not None and now - recent[0] < self._config.repair_holdoff:
            mask &= ~recent[1]
        if mask:
            queue = self.low_repairs if low else self.repairs
            queue[obj] = queue.get(obj, 0) | mask

    def fill(self, now: float, sweeping: bool, needs: list[RangeSet]) -> bool:
        """Queue the next object's Transmits (§4.2 order); False when there is nothing.

        ``needs`` are the missing sets of the active receivers; ``sweeping`` is False while
        the session waits for receivers (only manifest chunks and repairs go then).
        """
        if self.repairs:
            self._queue_repair(self.repairs, now)
            return True
        obj = self._next_manifest_chunk(now, needs)
        if obj is None and sweeping:
            obj = self._next_sweep_object(now, needs)
        if obj is None:
            if self.low_repairs:  # outliers' repairs: only when nothing else waits
                self._queue_repair(self.low_repairs, now)
                return True
            return False
        self._swept[obj] = self.last_sent[obj] = now
        self._queue_object(obj, range(self.fragments(obj)), 0)
        return True

    def _queue_repair(self, queue: dict[int, int], now: float) -> None:
        obj = min(queue)
        mask = queue.pop(obj)
        other = self.low_repairs if queue is self.repairs else self.repairs
        if obj in other:
            mask |= other.pop(obj)
        self.recent_repairs[obj] = (now, mask)
        self.last_sent[obj] = now
        self._queue_object(obj, mask_to_list(mask), wire.FLAG_REPAIR)

    def _next_manifest_chunk(self, now: float, needs: list[RangeSet]) -> int | None:
        holdoff = self._config.sweep_holdoff
        for k in range(self.chunks):
            obj = MANIFEST_BASE + k
            sent = self._swept.get(obj)
            if sent is not None and now < sent + holdoff:
                self.note_wakeup(sent + holdoff)
                continue
            if any(obj in missing for missing in needs):
                return obj
        return None

    def _next_sweep_object(self, now: float, needs: list[RangeSet]) -> int | None:
        holdoff = self._config.sweep_holdoff
        active = needs
        cursor = self._cursor
        wrapped = False
        for _ in range(SWEEP_SCAN_LIMIT):
            candidates = [n for n in (s.next_at_or_after(cursor) for s in active) if n is not None]
            best = min((n for n in candidates if n < MANIFEST_BASE), default=None)
            if best is None:
                if wrapped or cursor == 0:
                    return None
                cursor, wrapped = 0, True
                continue
            sent = self._swept.get(best)
            if sent is not None and now < sent + holdoff:
                self.note_wakeup(sent + holdoff)
                cursor = best + 1
                continue
            if wrapped:
                self.passes += 1
            self._cursor = best + 1
            return best
        self.note_wakeup(now + POLL_INTERVAL)
        return None

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

    def _queue_object(self, obj: int, frags: range | list[int], flags: int) -> None:
        payload = self._payload(obj)
        per = self._config.segments_per_transmit
        seg = self._config.payload_size
        hdr = self._header
        repeat = obj in self._ever_sent and not flags
        self._ever_sent.add(obj)
        for i in range(0, len(frags), per):
            chunk = frags[i : i + per]
            seq = self._next_seq(len(chunk))
            data = wire.pack_fragments(self._key, hdr, seq, obj, payload, chunk, self._fp, flags)
            self.pending.append(Transmit(data, seg if len(chunk) > 1 else len(data), None))
            key = (
                "repair_datagrams" if flags else "resweep_datagrams" if repeat else "data_datagrams"
            )
            self._counts[key] += len(chunk)
