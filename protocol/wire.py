"""Every byte layout of the multicast protocol (docs/PROTOCOL.md §2).

Encoders return complete, tagged datagrams. Decoders take bytes that passed
``open_datagram`` (magic, version, tag) and raise WireError with a counter name
(``malformed``, ``bad_type`` ...) for anything that is not exactly right.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol

from protocol import messages

# The decoded bodies, re-exported: callers write wire.Announce and friends.
Abort = messages.Abort
Announce = messages.Announce
Done = messages.Done
Join = messages.Join
JoinAck = messages.JoinAck
Leave = messages.Leave
Message = messages.Message
Nak = messages.Nak
Status = messages.Status
Targeted = messages.Targeted

MAGIC = b"FC"
VERSION = 2
TAG_SIZE = 16
MAX_TEXT = 200
#: Object ids at or above this are manifest chunks (§1.2).
MANIFEST_BASE = 0x80000000
MANIFEST_CHUNK = 1 << 20
MAX_OBJECT_SIZE = 16 << 20

# §2.1 common header: magic 2, version 1, type 1, session 4, source 4, instance 4, seq 4
HEADER = struct.Struct("!2sBBIIII")
# §2.3 DATA: header, then object 4, object_size 4, fragment 2, flags 1, reserved 1
DATA_HEADER = struct.Struct("!2sBBIIIIIIHBx")
DATA_BODY = struct.Struct("!IIHBx")
# §2.3 ANNOUNCE body: digest 32, manifest_size, block_count, data_blocks, block_size,
# payload_size 2, state 1, flags 1, rate_bps 8, data_bytes 8
ANNOUNCE = struct.Struct("!32sIIIIHBBQQ")
JOIN = struct.Struct("!BB")
TARGET = struct.Struct("!II")
JOIN_ACK = struct.Struct("!IIB")
# §2.3 STATUS fixed part: blocks_done, blocks_total, bytes_done 8, loss 2, write_kib_s 4,
# rx_kib_s 4, seen 4 (highest sender seq processed),
# backlog 2, flags 1, reserved 1, span_start 4, span_end 4
STATUS = struct.Struct("!IIQHIIHBxIII")
DONE = struct.Struct("!IQ")
LEAVE = struct.Struct("!B")
COUNT = struct.Struct("!H")
RANGE = struct.Struct("!II")
# §2.5 NAK entry head: object 4, form 1; then RUN length 4 / LIST n 2 / BITMAP first 2, nbytes 2
# / AUTH length 4
NAK_ENTRY = struct.Struct("!IB")
U32 = struct.Struct("!I")
U16 = struct.Struct("!H")
BITMAP_HEAD = struct.Struct("!HH")

#: The most a DATA datagram adds to its fragment: header, data header and tag (§1.2).
DATA_OVERHEAD = DATA_HEADER.size + TAG_SIZE
FLAG_REPAIR = 0x01
#: DATA flags: the datagram ends with a tag. Without it, the block hash in the manifest is
#: what authenticates the content (§6.1).
FLAG_TAGGED = 0x02
#: DATA flags: sent to one receiver's unicast address, numbered in that receiver's own seq
#: space (a repair only it asked for, §4.3): others never see it, so it is no gap of theirs.
FLAG_UNICAST = 0x04
ANNOUNCE_ABORTED = 0x01  #: ANNOUNCE flags: the session was aborted (state ENDING)
#: ANNOUNCE flags: every DATA datagram is tagged; a receiver drops untagged ones (§6.1).
ANNOUNCE_TAGGED_DATA = 0x02
#: ANNOUNCE flags: the sender's queue ran dry: every burst sent before this one is complete,
#: so whatever a receiver still lacks of them is lost, not on its way (§4.3).
ANNOUNCE_IDLE = 0x04
JOIN_NEED_MANIFEST = 0x01


class PacketType(IntEnum):
    """§2.3 datagram types."""

    ANNOUNCE = 1
    DATA = 2
    JOIN = 3
    JOIN_ACK = 4
    NAK = 5
    STATUS = 6
    DONE = 7
    DONE_ACK = 8
    LEAVE = 9
    LEAVE_ACK = 10
    EVICT = 11
    ABORT = 12


SENDER_TYPES = frozenset(
    {
        PacketType.ANNOUNCE,
        PacketType.DATA,
        PacketType.JOIN_ACK,
        PacketType.DONE_ACK,
        PacketType.LEAVE_ACK,
        PacketType.EVICT,
        PacketType.ABORT,
    }
)
RECEIVER_TYPES = frozenset(
    {PacketType.JOIN, PacketType.NAK, PacketType.STATUS, PacketType.DONE, PacketType.LEAVE}
)


class AnnounceState(IntEnum):
    """ANNOUNCE state field (§2.3)."""

    WAITING = 0
    TRANSFERRING = 1
    ENDING = 2


class LeaveCode(IntEnum):
    """LEAVE code field (§2.3)."""

    FAILED = 1
    EVICTED_ACK = 2
    ABORTED_ACK = 3
    USER = 4


class WireError(ValueError):
    """A datagram is not acceptable; ``reason`` is the drop counter to bump."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Transmit:
    """Bytes to send: one datagram, or several of ``segment_size`` bytes for UDP GSO."""

    data: bytes
    """One datagram, or several of segment_size bytes concatenated (the last may be shorter)."""
    segment_size: int
    """Size of each datagram in data; == len(data) for a single datagram."""
    addr: tuple[str, int] | None
    """None = the session's multicast group; else a unicast address."""

    @property
    def count(self) -> int:
        """Number of datagrams in data."""
        return (len(self.data) + self.segment_size - 1) // self.segment_size


class Header(NamedTuple):
    """§2.1 common header, as decoded."""

    type: int
    session: int
    source: int
    instance: int
    seq: int


# -- authentication (§6.1) ----------------------------------------------------------------


class Mac(Protocol):
    """A keyed HMAC-SHA256 state: what ``_mac`` returns (hmac.HMAC or OpenSSL's own)."""

    def copy(self) -> Mac: ...

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


_MACS: dict[bytes, Mac] = {}


def _mac(key: bytes) -> Mac:
    """An HMAC-SHA256 keyed with ``key`` and nothing hashed yet, to copy per datagram.

    Copying saves re-deriving the key pads for every datagram (~0.4 µs of ~2). Where
    hmac.HMAC wraps OpenSSL's HMAC object, that object is used directly: the same tag
    without three Python-level calls per datagram (1.4 µs instead of 2.2 here).
    """
    mac = _MACS.get(key)
    if mac is None:
        if len(_MACS) >= 64:
            _MACS.clear()
        proto = hmac.new(key, digestmod=hashlib.sha256)
        fast = getattr(proto, "_hmac", None)
        mac = _MACS[key] = fast if fast is not None else proto
    return mac


def tag(key: bytes, message: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte tag of ``message`` (every byte before the tag): HMAC-SHA256, truncated."""
    mac = _mac(key).copy()
    mac.update(message)
    return mac.digest()[:TAG_SIZE]


def seal(key: bytes, header: Header, body: bytes) -> bytes:
    """A complete datagram: header, body and tag."""
    msg = HEADER.pack(MAGIC, VERSION, *header) + body
    return msg + tag(key, msg)


def open_datagram(key: bytes, data: bytes | bytearray | memoryview) -> tuple[Header, memoryview]:
    """Check length, magic, version and tag (§2.2 rules 1-2); return the header and body."""
    view = memoryview(data)
    n = len(view)
    if n < HEADER.size + TAG_SIZE:
        raise WireError("short", f"{n} bytes")
    magic, version, ptype, session, source, instance, seq = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise WireError("bad_magic")
    if version != VERSION:
        raise WireError("bad_version", f"version {version}")
    if not hmac.compare_digest(tag(key, view[: n - TAG_SIZE]), view[n - TAG_SIZE :]):
        raise WireError("bad_tag")
    return Header(ptype, session, source, instance, seq), view[HEADER.size : n - TAG_SIZE]


# -- messages: decoded bodies live in protocol/messages.py -------------------------------


def _text(text: str) -> bytes:
    raw = text.encode("utf-8", "replace")[:MAX_TEXT]
    return raw.decode("utf-8", "ignore").encode()


def _read_text(body: memoryview) -> str:
    if len(body) > MAX_TEXT:
        raise WireError("malformed", "text too long")
    return bytes(body).decode("utf-8", "replace")


def encode_announce(a: Announce) -> bytes:
    return ANNOUNCE.pack(
        a.digest,
        a.manifest_size,
        a.block_count,
        a.data_blocks,
        a.block_size,
        a.payload_size,
        a.state,
        a.flags,
        a.rate_bps,
        a.data_bytes,
    )


def decode_announce(body: memoryview) -> Announce:
    if len(body) != ANNOUNCE.size:
        raise WireError("malformed", "announce length")
    a = Announce(*ANNOUNCE.unpack(body))
    if a.state not in (0, 1, 2) or a.payload_size < 512 or a.block_size == 0:
        raise WireError("invalid", "announce fields")
    return a


def encode_join(flags: int, have_ranges: bytes) -> bytes:
    return JOIN.pack(flags, 0) + have_ranges


def decode_join(body: memoryview) -> Join:
    if len(body) < JOIN.size:
        raise WireError("malformed", "join length")
    flags, _ = JOIN.unpack_from(body)
    have, end = decode_ranges(body, JOIN.size)
    if end != len(body):
        raise WireError("malformed", "join trailing bytes")
    return Join(flags, have)


def encode_join_ack(target_id: int, target_instance: int, refused: bool, text: str) -> bytes:
    return JOIN_ACK.pack(target_id, target_instance, int(refused)) + _text(text)


def decode_join_ack(body: memoryview) -> JoinAck:
    if len(body) < JOIN_ACK.size:
        raise WireError("malformed", "join_ack length")
    tid, tinst, result = JOIN_ACK.unpack_from(body)
    if result > 1:
        raise WireError("invalid", "join_ack result")
    return JoinAck(tid, tinst, bool(result), _read_text(body[JOIN_ACK.size :]))


def encode_targeted(target_id: int, target_instance: int, text: str = "") -> bytes:
    return TARGET.pack(target_id, target_instance) + _text(text)


def decode_targeted(body: memoryview) -> Targeted:
    if len(body) < TARGET.size:
        raise WireError("malformed", "target length")
    tid, tinst = TARGET.unpack_from(body)
    return Targeted(tid, tinst, _read_text(body[TARGET.size :]))


def encode_status(s: Status, ranges: bytes) -> bytes:
    loss = max(0, min(10000, round(s.loss * 10000)))
    kib = max(0, min(0xFFFFFFFF, s.write_bps // 1024))
    rx_kib = max(0, min(0xFFFFFFFF, s.rx_bps // 1024))
    return (
        STATUS.pack(
            s.blocks_done,
            s.blocks_total,
            s.bytes_done,
            loss,
            kib,
            rx_kib,
            min(s.backlog, 0xFFFF),
            s.flags,
            s.seen,
            s.span_start,
            s.span_end,
        )
        + ranges
    )


def decode_status(body: memoryview) -> Status:
    if len(body) < STATUS.size:
        raise WireError("malformed", "status length")
    done, total, nbytes, loss, kib, rx_kib, backlog, flags, seen, s0, s1 = STATUS.unpack_from(body)
    missing, end = decode_ranges(body, STATUS.size)
    if end != len(body):
        raise WireError("malformed", "status trailing bytes")
    if loss > 10000 or done > total or (s1 < s0 and s1 != 0):
        raise WireError("invalid", "status fields")
    if missing and (missing[0][0] < s0 or (s1 and missing[-1][1] > s1)):
        raise WireError("invalid", "status ranges outside the span")
    return Status(
        done,
        total,
        nbytes,
        loss / 10000,
        kib * 1024,
        rx_kib * 1024,
        backlog,
        flags,
        seen,
        s0,
        s1,
        missing,
    )


def encode_done(blocks_done: int, bytes_done: int) -> bytes:
    return DONE.pack(blocks_done, bytes_done)


def decode_done(body: memoryview) -> Done:
    if len(body) != DONE.size:
        raise WireError("malformed", "done length")
    return Done(*DONE.unpack(body))


def encode_leave(code: LeaveCode, text: str) -> bytes:
    return LEAVE.pack(code) + _text(text)


def decode_leave(body: memoryview) -> Leave:
    if len(body) < LEAVE.size:
        raise WireError("malformed", "leave length")
    (code,) = LEAVE.unpack_from(body)
    if code not in (1, 2, 3, 4):
        raise WireError("invalid", "leave code")
    return Leave(code, _read_text(body[LEAVE.size :]))


def encode_abort(text: str) -> bytes:
    return _text(text)


def decode_abort(body: memoryview) -> Abort:
    return Abort(_read_text(body))


# -- range lists (§2.4) ---------------------------------------------------------------------


def encode_ranges(ranges: Sequence[tuple[int, int]], capacity: int) -> tuple[bytes, int]:
    """Encode as many (start, end) ranges as fit in ``capacity`` bytes; return (bytes, used)."""
    n = max(0, min(len(ranges), (capacity - COUNT.size) // RANGE.size, 0xFFFF))
    parts = [COUNT.pack(n)]
    parts.extend(RANGE.pack(start, end - start) for start, end in ranges[:n])
    return b"".join(parts), n


def decode_ranges(body: memoryview, offset: int) -> tuple[list[tuple[int, int]], int]:
    """Decode a range list at ``offset``; return ((start, end) list, end offset)."""
    if len(body) < offset + COUNT.size:
        raise WireError("malformed", "range count missing")
    (n,) = COUNT.unpack_from(body, offset)
    offset += COUNT.size
    if len(body) < offset + n * RANGE.size:
        raise WireError("malformed", "range list truncated")
    out: list[tuple[int, int]] = []
    last = -1
    for start, length in RANGE.iter_unpack(body[offset : offset + n * RANGE.size]):
        if length == 0 or start <= last or start + length > 1 << 32:
            raise WireError("invalid", "ranges not ascending and non-empty")
        out.append((start, start + length))
        last = start + length - 1
    return out, offset + n * RANGE.size


# -- NAK entries (§2.5) ---------------------------------------------------------------------

NAK_RUN, NAK_LIST, NAK_BITMAP, NAK_AUTH = 0, 1, 2, 3


def _frag_entry(obj: int, frags: Sequence[int], space: int) -> tuple[bytes, int]:
    """Encode a prefix of sorted ``frags`` of ``obj`` in at most ``space`` bytes.

    Returns (bytes, how many fragments it covers); (b"", 0) when none fit.
    """
    room = space - NAK_ENTRY.size
    first = frags[0]
    # LIST: 2 + 2n bytes; BITMAP: 4 + ceil(span / 8) bytes.
    n_list = min(len(frags), max(0, (room - U16.size) // 2))
    max_span = max(0, (room - BITMAP_HEAD.size) * 8)
    n_bitmap = 0
    if max_span:
        n_bitmap = bisect.bisect_left(frags, first + max_span)
    if n_list == 0 and n_bitmap == 0:
        return b"", 0
    list_cost = U16.size + 2 * n_list
    bitmap_cost = BITMAP_HEAD.size + (frags[n_bitmap - 1] - first) // 8 + 1 if n_bitmap else 0
    if n_bitmap > n_list or (n_bitmap == n_list and bitmap_cost < list_cost):
        mask = 0
        for f in frags[:n_bitmap]:
            mask |= 1 << (f - first)
        nbytes = (frags[n_bitmap - 1] - first) // 8 + 1
        body = BITMAP_HEAD.pack(first, nbytes) + mask.to_bytes(nbytes, "little")
        return NAK_ENTRY.pack(obj, NAK_BITMAP) + body, n_bitmap
    body = U16.pack(n_list) + struct.pack(f"!{n_list}H", *frags[:n_list])
    return NAK_ENTRY.pack(obj, NAK_LIST) + body, n_list


def encode_nak_bodies(
    seen: int,
    runs: Sequence[tuple[int, int]],
    partial: Sequence[tuple[int, Sequence[int]]],
    capacity: int,
    auth: Sequence[tuple[int, int]] = (),
) -> list[bytes]:
    """NAK bodies of at most ``capacity`` bytes for whole-object runs and missing fragments.

    ``seen`` is the highest sender seq the receiver has processed; ``runs`` holds (start,
    end) object ranges; ``partial`` holds (object, sorted missing fragments); ``auth`` holds
    (start, end) object ranges to send again with tagged datagrams only (§6.1). Entries are
    split across bodies when they do not fit one.
    """
    bodies: list[bytes] = []
    parts: list[bytes] = []
    head = U32.size + COUNT.size
    used = head

    def flush() -> None:
        nonlocal parts, used
        if parts:
            bodies.append(U32.pack(seen) + COUNT.pack(len(parts)) + b"".join(parts))
        parts, used = [], head

    for form, ranges in ((NAK_RUN, runs), (NAK_AUTH, auth)):
        for start, end in ranges:
            if used + NAK_ENTRY.size + U32.size > capacity or len(parts) == 0xFFFF:
                flush()
            parts.append(NAK_ENTRY.pack(start, form) + U32.pack(end - start))
            used += NAK_ENTRY.size + U32.size
    for obj, frags in partial:
        rest = list(frags)
        while rest:
            entry, n = _frag_entry(obj, rest, capacity - used)
            if n == 0 or len(parts) == 0xFFFF:
                if not parts:
                    raise ValueError(f"NAK capacity {capacity} cannot hold one entry")
                flush()
                continue
            parts.append(entry)
            used += len(entry)
            rest = rest[n:]
    flush()
    return bodies


def decode_nak(body: memoryview) -> Nak:
    """Decode NAK entries into (object, run_length, fragment mask) triples, and AUTH entries
    into (start, end) object ranges."""
    if len(body) < U32.size + COUNT.size:
        raise WireError("malformed", "nak count missing")
    (seen,) = U32.unpack_from(body)
    (n,) = COUNT.unpack_from(body, U32.size)
    off = U32.size + COUNT.size
    entries: list[tuple[int, int, int]] = []
    auth: list[tuple[int, int]] = []
    size = len(body)
    for _ in range(n):
        if off + NAK_ENTRY.size > size:
            raise WireError("malformed", "nak entry truncated")
        obj, form = NAK_ENTRY.unpack_from(body, off)
        off += NAK_ENTRY.size
        if form == NAK_AUTH:
            (obj, run, _), off = _nak_run(obj, body, off)
            auth.append((obj, obj + run))
            continue
        entry, off = _NAK_FORMS.get(form, _bad_form)(obj, body, off)
        entries.append(entry)
    if off != size:
        raise WireError("malformed", "nak trailing bytes")
    return Nak(seen, entries, auth)


def _nak_run(obj: int, body: memoryview, off: int) -> tuple[tuple[int, int, int], int]:
    if off + U32.size > len(body):
        raise WireError("malformed", "nak run truncated")
    (length,) = U32.unpack_from(body, off)
    if length == 0 or obj + length > 1 << 32:
        raise WireError("invalid", "nak run length")
    return (obj, length, 0), off + U32.size


def _nak_list(obj: int, body: memoryview, off: int) -> tuple[tuple[int, int, int], int]:
    if off + U16.size > len(body):
        raise WireError("malformed", "nak list truncated")
    (n,) = U16.unpack_from(body, off)
    off += U16.size
    if n == 0 or off + 2 * n > len(body):
        raise WireError("malformed", "nak list length")
    mask = 0
    for f in struct.unpack_from(f"!{n}H", body, off):
        mask |= 1 << f
    return (obj, 0, mask), off + 2 * n


def _nak_bitmap(obj: int, body: memoryview, off: int) -> tuple[tuple[int, int, int], int]:
    if off + BITMAP_HEAD.size > len(body):
        raise WireError("malformed", "nak bitmap truncated")
    first, nbytes = BITMAP_HEAD.unpack_from(body, off)
    off += BITMAP_HEAD.size
    if nbytes == 0 or off + nbytes > len(body):
        raise WireError("malformed", "nak bitmap length")
    mask = int.from_bytes(body[off : off + nbytes], "little") << first
    if mask == 0:
        raise WireError("invalid", "empty nak bitmap")
    return (obj, 0, mask), off + nbytes


def _bad_form(obj: int, body: memoryview, off: int) -> tuple[tuple[int, int, int], int]:
    raise WireError("invalid", "unknown nak form")


_NAK_FORMS: dict[int, Callable[[int, memoryview, int], tuple[tuple[int, int, int], int]]] = {
    NAK_RUN: _nak_run,
    NAK_LIST: _nak_list,
    NAK_BITMAP: _nak_bitmap,
}

#: Body decoder per control type; DATA is decoded on the hot path by the receiver.
DECODERS: dict[int, Callable[[memoryview], Message]] = {
    PacketType.ANNOUNCE: decode_announce,
    PacketType.JOIN: decode_join,
    PacketType.JOIN_ACK: decode_join_ack,
    PacketType.NAK: decode_nak,
    PacketType.STATUS: decode_status,
    PacketType.DONE: decode_done,
    PacketType.DONE_ACK: decode_targeted,
    PacketType.LEAVE: decode_leave,
    PacketType.LEAVE_ACK: decode_targeted,
    PacketType.EVICT: decode_targeted,
    PacketType.ABORT: decode_abort,
}


# -- DATA fragments (hot path, §2.3) --------------------------------------------------------


def pack_fragments(
    key: bytes,
    header: tuple[int, int, int, int],
    seq: int,
    obj: int,
    payload: bytes,
    frags: Sequence[int],
    fragment_payload: int,
    flags: int,
) -> bytes:
    """DATA datagrams for ``frags`` of ``obj``, concatenated for GSO.

    ``header`` is (session, source, instance, unused); datagram ``i`` gets ``seq + i``.
    With FLAG_TAGGED in ``flags`` each datagram ends with its tag; without, it ends with the
    fragment (§6.1). Every datagram but the one of the object's last fragment is full size,
    so the concatenation is valid for UDP GSO with segment size ``data_segment(...)``.
    """
    session, source, instance, _ = header
    tagged = flags & FLAG_TAGGED
    tag_size = TAG_SIZE if tagged else 0
    seg = fragment_payload + DATA_HEADER.size + tag_size
    size = len(payload)
    last = (size - 1) // fragment_payload
    total = seg * len(frags)
    if frags and frags[-1] == last:
        total -= fragment_payload - (size - last * fragment_payload)
    buf = bytearray(total)
    view = memoryview(buf)
    pack_into = DATA_HEADER.pack_into
    proto = _mac(key)
    pos = 0
    hsize = DATA_HEADER.size
    for i, f in enumerate(frags):
        start = f * fragment_payload
        chunk = payload[start : start + fragment_payload]
        n = len(chunk)
        pack_into(
            buf, pos, MAGIC, VERSION, 2, session, source, instance, (seq + i) & 0xFFFFFFFF,
            obj, size, f, flags,
        )  # fmt: skip
        end = pos + hsize + n
        buf[pos + hsize : end] = chunk
        if tagged:
            mac = proto.copy()
            mac.update(view[pos:end])
            buf[end : end + TAG_SIZE] = mac.digest()[:TAG_SIZE]
        pos = end + tag_size
    return bytes(buf)


def data_segment(fragment_payload: int, flags: int) -> int:
    """The size of a full DATA datagram with these ``flags`` (the GSO segment size)."""
    return fragment_payload + DATA_HEADER.size + (TAG_SIZE if flags & FLAG_TAGGED else 0)
