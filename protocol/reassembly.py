"""Receiver-side object bookkeeping and reassembly (docs/PROTOCOL.md §1.2, §4.3).

Which objects (data blocks, manifest chunks) a receiver lacks, holds partly or has, and the
buffers of the partly received ones. The data path lands here once per DATA datagram: a
memoryview slice copied into a preallocated buffer and one byte set in a fragment map.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from protocol import wire
from protocol.config import EngineConfig
from protocol.manifest import Manifest, ManifestError
from protocol.rangeset import RangeSet
from protocol.wire import MANIFEST_BASE, MANIFEST_CHUNK, WireError

#: Settled buffers kept for reuse (each up to a block).
SPARE_BUFFERS = 8
#: The buffer of a compacted partial (it has none until it is complete).
_EMPTY = memoryview(b"")
#: Object states held in the per-block / per-chunk bytearrays.
NEEDED, PARTIAL, RECEIVED, VERIFIED, SKIP = 0, 1, 2, 3, 4


class Partial:
    """A partly received object: its buffer (or, compacted, its fragments) and which arrived.

    A dense partial holds a buffer of the object's size; a compacted one (``parts`` not
    None, ``buf`` empty until it is complete) holds only the fragments it got: what a
    receiver behind a slow port keeps of the many objects it gets a few fragments of,
    within the same memory bound.
    """

    __slots__ = (
        "answered",
        "buf",
        "cost",
        "count",
        "fragments",
        "got",
        "last_rx",
        "naked_at",
        "parts",
        "passed",
        "size",
    )

    def __init__(self, size: int, fragments: int, now: float, buf: memoryview | None) -> None:
        """``buf`` None starts it compacted."""
        self.size = size
        self.fragments = fragments
        #: ``size`` bytes, a view of a (maybe recycled, not zeroed) buffer: every byte is
        #: written by some fragment before the object is complete; empty while compacted
        self.buf = _EMPTY if buf is None else buf
        #: compacted: fragment index -> its bytes; None while dense
        self.parts: dict[int, bytes] | None = None if buf is not None else {}
        #: bytes this partial counts against max_partial_bytes
        self.cost = size if buf is not None else 0
        self.got = bytearray(fragments)
        self.count = 0
        self.last_rx = now
        #: a datagram of another object arrived after our last fragment (§4.3)
        self.passed = False
        self.naked_at = -1e9
        #: a repair came since our last NAK of it (its wait was measured, §4.3)
        self.answered = True

    def missing(self) -> list[int]:
        """Indices of the fragments not received, ascending."""
        got = self.got
        out: list[int] = []
        start = got.find(0)
        while start != -1:
            out.append(start)
            start = got.find(0, start + 1)
        return out


class Reassembly:
    """Object states, the objects still needed (for STATUS), and partial buffers."""

    def __init__(self, config: EngineConfig) -> None:
        self._max_partial = config.max_partial_objects
        self._max_bytes = config.max_partial_bytes
        self.partial_bytes = 0
        self.blocks = bytearray()  #: state per block
        self.chunk_states = bytearray()  #: state per manifest chunk
        self.chunk_data: dict[int, bytes] = {}
        #: objects in state NEEDED: what STATUS reports missing
        self.needed = RangeSet()
        self.partials: OrderedDict[int, Partial] = OrderedDict()
        #: buffers of settled objects, reused for new partials (a fresh megabyte costs a
        #: page fault per 4 KiB: big buffers are mmapped)
        self._spare: list[bytearray] = []
        self._current = -1
        self._fp = config.fragment_payload
        self._manifest_size = 0
        self._block_size = 0
        self._stored_sizes: array[int] | None = None
        self.fragments = self.duplicates = self.partials_dropped = 0
        #: partials held as their fragments alone (started so, or compacted): memory bound
        self.partials_compacted = 0
        #: fragments thrown away since the last STATUS (reported as loss)
        self.dropped_frags = 0

    def start(self, a: wire.Announce) -> None:
        """Size everything from the session's ANNOUNCE: every object is needed."""
        chunks = -(-a.manifest_size // MANIFEST_CHUNK)
        self.blocks = bytearray(a.block_count)
        self.chunk_states = bytearray(chunks)
        self.needed = RangeSet([(0, a.block_count), (MANIFEST_BASE, MANIFEST_BASE + chunks)])
        self._fp = a.payload_size - wire.DATA_OVERHEAD
        self._manifest_size = a.manifest_size
        self._block_size = a.block_size

    def apply_manifest(self, manifest: Manifest, data: RangeSet) -> None:
        """Only DATA blocks are sent: the others are SKIP and never needed."""
        self._stored_sizes = manifest.stored_sizes
        for obj in [o for o, p in self.partials.items() if o < MANIFEST_BASE]:
            if self.partials[obj].size != manifest.stored_sizes[obj]:
                # begun before the manifest by a datagram with a wrong size (forged, §6.1)
                self.drop_partial(obj)
                self.set_state(obj, NEEDED)
        for i, kind in enumerate(manifest.kinds):
            if kind:
                self.blocks[i] = SKIP
        self.needed = self.needed.intersection(data)

    def fragment(
        self, obj: int, size: int, frag: int, payload: memoryview, now: float
    ) -> Partial | None:
        """Store one fragment; return the object's Partial once it is complete (and removed).

        Raises WireError("invalid") for an object, size or length that cannot be right.
        """
        if obj < MANIFEST_BASE:
            if obj >= len(self.blocks):
                raise WireError("invalid", f"block {obj} beyond the image")
            states, index = self.blocks, obj
        else:
            index = obj - MANIFEST_BASE
            if index >= len(self.chunk_states):
                raise WireError("invalid", f"manifest chunk {index} beyond the manifest")
            states = self.chunk_states
        if obj != self._current:
            prev = self.partials.get(self._current)
            if prev is not None:
                prev.passed = True
            self._current = obj
        if states[index] >= RECEIVED:
            self.duplicates += 1
            return None
        fp = self._fp
        p = self.partials.get(obj)
        if p is None:
            self._check_size(obj, size)
            p = self._new_partial(obj, size, states, index, now)
        elif size != p.size:
            raise WireError("invalid", f"object {obj} size changed")
        n = len(payload)
        if frag >= p.fragments or not n or n != min(fp, size - frag * fp):
            raise WireError("invalid", f"fragment {frag} of object {obj} has a bad length")
        got = p.got
        if got[frag]:
            self.duplicates += 1
        else:
            parts = p.parts
            if parts is None:
                off = frag * fp
                p.buf[off : off + n] = payload
            else:
                self._keep_part(obj, p, parts, frag, payload)
            got[frag] = 1
            p.count += 1
            self.fragments += 1
        p.last_rx = now
        p.passed = False
        if p.count < p.fragments:
            return None
        del self.partials[obj]
        self.partial_bytes -= p.cost
        if p.parts is not None:
            p.buf = self._assemble(p, p.parts)
        return p

    def _check_size(self, obj: int, size: int) -> None:
        if obj >= MANIFEST_BASE:
            k = obj - MANIFEST_BASE
            if size != min(MANIFEST_CHUNK, self._manifest_size - k * MANIFEST_CHUNK):
                raise WireError("invalid", f"manifest chunk {k} of {size} bytes")
        elif self._stored_sizes is not None:
            if size != self._stored_sizes[obj]:
                raise WireError("invalid", f"block {obj} of {size} bytes disagrees with manifest")
        elif not 0 < size <= self._block_size:
            raise WireError("invalid", f"block {obj} of {size} bytes")

    def _new_partial(
        self, obj: int, size: int, states: bytearray, index: int, now: float
    ) -> Partial:
        while len(self.partials) >= self._max_partial:
            self._drop_least()
        # Whole-object buffers take at most half the bound; past it a partial keeps only the
        # fragments that arrive: a receiver behind a slow port gets a few of every object,
        # and throwing them away to make room would only have them sent again (§4.3).
        dense = self.partial_bytes + size <= self._max_bytes // 2
        p = Partial(size, -(-size // self._fp), now, self._buffer(size) if dense else None)
        if not dense:
            self.partials_compacted += 1
        self.partials[obj] = p
        self.partial_bytes += p.cost
        states[index] = PARTIAL
        self.needed.discard(obj, obj + 1)
        return p

    def _drop_least(self, keep: int = -1) -> bool:
        """Forget the partial we invested least in (not ``keep``); False when there is none."""
        victim = min(
            (o for o in self.partials if o != keep),
            key=lambda o: self.partials[o].count,
            default=None,
        )
        if victim is None:
            return False
        self.dropped_frags += self.partials[victim].count
        self.partials_dropped += 1
        self.forget(victim)
        return True

    def _compact(self, want: int) -> None:
        """Compact dense partials, those holding least first, until ``want`` bytes are free."""
        dense = [
            (p.count * self._fp - p.size, o) for o, p in self.partials.items() if p.parts is None
        ]
        dense.sort()
        freed = 0
        fp = self._fp
        for saving, obj in dense:
            if freed >= want or saving >= 0:
                return
            p = self.partials[obj]
            buf, got = p.buf, p.got
            parts = {i: bytes(buf[i * fp : (i + 1) * fp]) for i in range(len(got)) if got[i]}
            cost = sum(len(b) for b in parts.values())
            p.parts, p.buf = parts, _EMPTY
            self.recycle(buf)
            self.partial_bytes += cost - p.cost
            freed += p.cost - cost
            p.cost = cost
            self.partials_compacted += 1

    def _keep_part(
        self, obj: int, p: Partial, parts: dict[int, bytes], frag: int, payload: memoryview
    ) -> None:
        """A fragment of a compacted partial: kept on its own, within the memory bound."""
        n = len(payload)
        if self.partial_bytes + n > self._max_bytes:
            self._compact(self.partial_bytes + n - self._max_bytes)
        while self.partial_bytes + n > self._max_bytes and self._drop_least(keep=obj):
            pass
        parts[frag] = bytes(payload)
        p.cost += n
        self.partial_bytes += n

    def _assemble(self, p: Partial, parts: dict[int, bytes]) -> memoryview:
        """The object of a complete compacted partial, in one buffer."""
        buf = self._buffer(p.size)
        fp = self._fp
        for i, part in parts.items():
            buf[i * fp : i * fp + len(part)] = part
        p.parts = None
        return buf

    def state(self, obj: int) -> int:
        if obj >= MANIFEST_BASE:
            return self.chunk_states[obj - MANIFEST_BASE]
        return self.blocks[obj]

    def set_state(self, obj: int, state: int) -> None:
        """Set an object's state; NEEDED puts it back in ``needed``, others take it out."""
        if obj >= MANIFEST_BASE:
            self.chunk_states[obj - MANIFEST_BASE] = state
        else:
            self.blocks[obj] = state
        if state == NEEDED:
            self.needed.add(obj, obj + 1)
        else:
            self.needed.discard(obj, obj + 1)

    def forget(self, obj: int) -> None:
        """Drop whatever we had of ``obj``: it is needed again."""
        self.drop_partial(obj)
        self.set_state(obj, NEEDED)

    def drop_partial(self, obj: int) -> None:
        p = self.partials.pop(obj, None)
        if p is not None:
            self.partial_bytes -= p.cost
            if p.parts is None:
                self.recycle(p.buf)

    def _buffer(self, size: int) -> memoryview:
        """A spare buffer that holds ``size`` bytes (the smallest such), else a new one."""
        spare = self._spare
        best = -1
        for i, buf in enumerate(spare):
            if len(buf) >= size and (best < 0 or len(buf) < len(spare[best])):
                best = i
        if best >= 0:
            return memoryview(spare.pop(best))[:size]
        return memoryview(bytearray(size))

    def recycle(self, buf: bytes | bytearray | memoryview) -> None:
        """``buf`` (a Partial's, once nobody uses it any more) may back a new partial; the
        largest SPARE_BUFFERS are kept."""
        base = buf.obj if isinstance(buf, memoryview) else buf
        if not isinstance(base, bytearray):
            return
        spare = self._spare
        if len(spare) < SPARE_BUFFERS:
            spare.append(base)
            return
        smallest = min(range(len(spare)), key=lambda i: len(spare[i]))
        if len(spare[smallest]) < len(base):
            spare[smallest] = base

    def due_naks(self, now: float, idle: float, repeat: float) -> list[tuple[int, Partial]]:
        """Partial objects to NAK now (§4.3), by object."""
        due = [
            (obj, p)
            for obj, p in self.partials.items()
            if (p.passed or now - p.last_rx >= idle) and now - p.naked_at >= repeat
        ]
        due.sort(key=lambda item: item[0])
        return due

    def clear(self) -> None:
        self.partials.clear()
        self._spare.clear()
        self.partial_bytes = 0
        self.chunk_data.clear()


def nak_bodies(
    seen: int,
    due: Sequence[tuple[int, Partial]],
    capacity: int,
    runs: Sequence[tuple[int, int]] = (),
) -> list[bytes]:
    """NAK bodies for the missing fragments of ``due`` (object, Partial) pairs, by object,
    and for ``runs`` of objects lacked entirely."""
    return wire.encode_nak_bodies(seen, runs, [(obj, p.missing()) for obj, p in due], capacity)


#: Most an untagged datagram may move a receiver's highest seen seq (~0.8 s at 1 Gbit/s).
UNTAGGED_SEQ_STEP = 1 << 16


class Meter:
    """What a receiver measures between two STATUS reports (§4.4): loss, rates."""

    __slots__ = (
        "_base",
        "_last",
        "_rx",
        "_rx_bytes",
        "_ubase",
        "_written",
        "expected_total",
        "last_loss",
        "lost_total",
        "max_seq",
        "max_useq",
    )

    def __init__(self, seq: int, now: float) -> None:
        self.max_seq = self._base = seq
        #: the highest seq of datagrams sent to us alone (FLAG_UNICAST: their own space,
        #: starting at 0 when we join)
        self.max_useq = self._ubase = 0
        self._rx = self._rx_bytes = self._written = 0
        self._last = now
        #: the loss fraction of the last report, and the sums over every report so far
        self.last_loss = 0.0
        self.lost_total = self.expected_total = 0

    def seen(self, seq: int, size: int) -> None:
        """One sender datagram of ``size`` bytes with sequence number ``seq`` arrived."""
        self._rx += 1
        self._rx_bytes += size
        if 0 < (seq - self.max_seq) & 0xFFFFFFFF < 0x80000000:
            self.max_seq = seq

    def seen_near(self, seq: int, size: int) -> None:
        """``seen`` for an untagged datagram (§6.1): its seq may be forged, so it moves the
        highest seq at most UNTAGGED_SEQ_STEP ahead (a tagged ANNOUNCE resyncs the rest)."""
        self._rx += 1
        self._rx_bytes += size
        if 0 < (seq - self.max_seq) & 0xFFFFFFFF < UNTAGGED_SEQ_STEP:
            self.max_seq = seq

    def seen_unicast(self, seq: int, size: int, tagged: bool) -> None:
        """``seen`` for a datagram sent to us alone (FLAG_UNICAST): its own seq space."""
        self._rx += 1
        self._rx_bytes += size
        step = 0x80000000 if tagged else UNTAGGED_SEQ_STEP
        if 0 < (seq - self.max_useq) & 0xFFFFFFFF < step:
            self.max_useq = seq

    @property
    def total_loss(self) -> float:
        """Datagrams lost / expected over every report so far (0.0 before the first)."""
        return self.lost_total / self.expected_total if self.expected_total else 0.0

    def written(self, nbytes: int) -> None:
        """The shell verified and wrote ``nbytes`` of raw block content."""
        self._written += nbytes

    def report(self, now: float, dropped: int) -> tuple[float, int, int]:
        """(loss fraction, received bit/s, written bytes/s) since the last report; restart.

        ``dropped`` counts fragments we received but had to throw away (memory bounds),
        which count as lost. ``last_loss``, ``lost_total`` and ``expected_total`` keep the
        figures for the receiver's stats.
        """
        expected = (self.max_seq - self._base) & 0xFFFFFFFF
        expected += (self.max_useq - self._ubase) & 0xFFFFFFFF
        lost = max(0, expected - self._rx) + dropped
        loss = min(1.0, lost / expected) if expected else 0.0
        self.last_loss = loss
        self.lost_total += min(lost, expected)
        self.expected_total += expected
        elapsed = max(now - self._last, 1e-6)
        rates = int(self._rx_bytes * 8 / elapsed), int(self._written / elapsed)
        self._base, self._ubase, self._last = self.max_seq, self.max_useq, now
        self._rx = self._rx_bytes = self._written = 0
        return loss, *rates


def check_manifest(data: bytes, a: wire.Announce) -> tuple[Manifest, RangeSet]:
    """Parse the manifest carried in the session; ValueError says why it cannot be used."""
    if hashlib.sha256(data).digest() != a.digest:
        raise ValueError("the manifest received does not match the announced digest")
    try:
        manifest = Manifest.from_bytes(data)
    except ManifestError as exc:
        raise ValueError(f"the sender's manifest is not valid: {exc}") from exc
    data_blocks = RangeSet.from_values(i for i, k in enumerate(manifest.kinds) if k == 0)
    shape = (manifest.block_count, manifest.block_size, len(data_blocks))
    if shape != (a.block_count, a.block_size, a.data_blocks):
        raise ValueError("the manifest disagrees with the session announcement")
    return manifest, data_blocks
