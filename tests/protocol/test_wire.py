"""Every byte layout round-trips, and every decoder refuses what is not exactly right."""

from __future__ import annotations

import random

import pytest

from protocol import wire
from protocol.wire import Header, PacketType, WireError

KEY = b"k" * 32


def _open(data: bytes) -> tuple[Header, memoryview]:
    return wire.open_datagram(KEY, data)


def _roundtrip(ptype: PacketType, body: bytes) -> wire.Message:
    data = wire.seal(KEY, Header(ptype, 7, 3, 9, 11), body)
    hdr, view = _open(data)
    assert hdr == Header(ptype, 7, 3, 9, 11)
    return wire.DECODERS[ptype](view)


def test_header_is_magic_version_then_fields_and_a_16_byte_tag() -> None:
    data = wire.seal(KEY, Header(PacketType.ABORT, 0xDEADBEEF, 0, 5, 6), b"bye")
    assert data[:3] == b"FC\x02" and data[3] == PacketType.ABORT
    assert len(data) == wire.HEADER.size + 3 + wire.TAG_SIZE
    assert data[-16:] == wire.tag(KEY, data[:-16])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:30], "short"),
        (lambda d: b"XX" + d[2:], "bad_magic"),
        (lambda d: d[:2] + b"\x01" + d[3:], "bad_version"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "bad_tag"),
        (lambda d: d[:25] + bytes([d[25] ^ 1]) + d[26:], "bad_tag"),
    ],
)
def test_open_refuses_with_a_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    data = wire.seal(KEY, Header(PacketType.ABORT, 1, 0, 1, 1), b"some reason text")
    with pytest.raises(WireError) as exc:
        _open(mutate(data))
    assert exc.value.reason == reason


def test_a_datagram_tagged_under_another_key_is_refused() -> None:
    data = wire.seal(b"x" * 32, Header(PacketType.ABORT, 1, 0, 1, 1), b"")
    with pytest.raises(WireError, match="bad_tag"):
        _open(data)


def test_announce_roundtrip_and_exact_length() -> None:
    a = wire.Announce(bytes(range(32)), 1234, 100, 60, 1 << 20, 1472, 1, 0, 900_000_000, 5 << 30)
    assert _roundtrip(PacketType.ANNOUNCE, wire.encode_announce(a)) == a
    with pytest.raises(WireError, match="malformed"):
        wire.decode_announce(memoryview(wire.encode_announce(a) + b"\0"))


def test_join_with_have_ranges() -> None:
    ranges, used = wire.encode_ranges([(0, 10), (20, 21)], 100)
    assert used == 2
    j = _roundtrip(PacketType.JOIN, wire.encode_join(wire.JOIN_NEED_MANIFEST, ranges))
    assert j == wire.Join(wire.JOIN_NEED_MANIFEST, [(0, 10), (20, 21)])


def test_ranges_must_ascend_and_be_non_empty() -> None:
    for bad in ([(5, 9), (3, 4)], [(5, 9), (8, 10)], [(5, 5)]):
        body = wire.COUNT.pack(len(bad)) + b"".join(wire.RANGE.pack(s, e - s) for s, e in bad)
        with pytest.raises(WireError, match="invalid"):
            wire.decode_ranges(memoryview(body), 0)
    with pytest.raises(WireError, match="malformed"):
        wire.decode_ranges(memoryview(wire.COUNT.pack(3) + wire.RANGE.pack(1, 1)), 0)


def test_encode_ranges_stops_at_capacity() -> None:
    ranges = [(i * 10, i * 10 + 1) for i in range(100)]
    encoded, used = wire.encode_ranges(ranges, 2 + 8 * 7 + 5)
    assert used == 7 and len(encoded) == 2 + 8 * 7


def test_status_roundtrip() -> None:
    ranges, _ = wire.encode_ranges([(5, 8)], 100)
    s = wire.Status(3, 10, 3 << 20, 0.0123, 50 << 20, 80 << 20, 2, 0, 77, 0, 0, [])
    got = _roundtrip(PacketType.STATUS, wire.encode_status(s, ranges))
    assert isinstance(got, wire.Status)
    assert (got.blocks_done, got.blocks_total, got.bytes_done, got.backlog) == (3, 10, 3 << 20, 2)
    assert got.loss == pytest.approx(0.0123, abs=1e-4)
    assert got.write_bps == (50 << 20) and got.missing == [(5, 8)] and got.seen == 77


def test_control_messages_roundtrip() -> None:
    assert _roundtrip(PacketType.JOIN_ACK, wire.encode_join_ack(1, 2, True, "full")) == (
        wire.JoinAck(1, 2, True, "full")
    )
    assert _roundtrip(PacketType.DONE, wire.encode_done(4, 5)) == wire.Done(4, 5)
    assert _roundtrip(PacketType.EVICT, wire.encode_targeted(1, 2, "silent")) == (
        wire.Targeted(1, 2, "silent")
    )
    leave = wire.encode_leave(wire.LeaveCode.FAILED, "disk full")
    assert _roundtrip(PacketType.LEAVE, leave) == wire.Leave(1, "disk full")
    assert _roundtrip(PacketType.ABORT, wire.encode_abort("é" * 300)) == wire.Abort("é" * 100)


@pytest.mark.parametrize("seed", range(20))
def test_nak_bodies_carry_every_missing_fragment_within_capacity(seed: int) -> None:
    rng = random.Random(seed)
    partial = []
    for obj in sorted(rng.sample(range(1000), rng.randint(1, 40))):
        n = rng.randint(1, 2000)
        frags = sorted(rng.sample(range(n), rng.randint(1, min(n, 300))))
        partial.append((obj, frags))
    runs = [(2000, 2010), (3000, 3001)]
    capacity = rng.choice([100, 476, 1436, 8000])
    bodies = wire.encode_nak_bodies(0xFFFFFFF0, runs, partial, capacity)
    got: dict[int, int] = {}
    got_runs = []
    for body in bodies:
        assert len(body) <= capacity
        nak = wire.decode_nak(memoryview(body))
        assert nak.seen == 0xFFFFFFF0
        for obj, run, mask in nak.entries:
            if run:
                got_runs.append((obj, obj + run))
            else:
                assert not got.get(obj, 0) & mask, "a fragment was sent twice"
                got[obj] = got.get(obj, 0) | mask
    assert got_runs == runs
    assert got == {obj: sum(1 << f for f in frags) for obj, frags in partial}


def test_nak_picks_a_bitmap_for_dense_losses_and_a_list_for_sparse_ones() -> None:
    (dense,) = wire.encode_nak_bodies(0, [], [(1, list(range(100)))], 1400)
    (sparse,) = wire.encode_nak_bodies(0, [], [(1, [3, 900])], 1400)
    head = 4 + 2  # seen, count
    assert dense[head + 4] == wire.NAK_BITMAP and len(dense) < head + 5 + 4 + 13 + 1
    assert sparse[head + 4] == wire.NAK_LIST and len(sparse) == head + 5 + 2 + 4


def test_nak_decoder_refuses_bad_entries() -> None:
    for tail in (
        wire.COUNT.pack(1) + wire.NAK_ENTRY.pack(1, 9),  # unknown form
        wire.COUNT.pack(1) + wire.NAK_ENTRY.pack(1, wire.NAK_RUN) + wire.U32.pack(0),
        wire.COUNT.pack(1)
        + wire.NAK_ENTRY.pack(1, wire.NAK_BITMAP)
        + wire.BITMAP_HEAD.pack(0, 1)
        + b"\0",
        wire.COUNT.pack(2) + wire.NAK_ENTRY.pack(1, wire.NAK_RUN) + wire.U32.pack(1),
    ):
        with pytest.raises(WireError):
            wire.decode_nak(memoryview(wire.U32.pack(0) + tail))


@pytest.mark.parametrize("payload_size", [512, 1472, 9000])
def test_pack_fragments_makes_tagged_gso_segments_that_each_open(payload_size: int) -> None:
    fp = payload_size - 48
    payload = random.Random(1).randbytes(fp * 5 + 17)
    frags = [0, 2, 5]
    flags = wire.FLAG_REPAIR | wire.FLAG_TAGGED
    data = wire.pack_fragments(KEY, (7, 0, 9, 0), 100, 42, payload, frags, fp, flags)
    seg = wire.data_segment(fp, flags)
    assert seg == payload_size
    assert len(data) == 2 * seg + (17 + 48)
    for i, f in enumerate(frags):
        d = data[i * seg : (i + 1) * seg]
        hdr, body = _open(d)
        assert hdr == Header(PacketType.DATA, 7, 0, 9, 100 + i)
        obj, size, frag, got_flags = wire.DATA_BODY.unpack_from(body)
        assert (obj, size, frag, got_flags) == (42, len(payload), f, flags)
        assert bytes(body[wire.DATA_BODY.size :]) == payload[f * fp : (f + 1) * fp]


@pytest.mark.parametrize("payload_size", [512, 1472, 9000])
def test_untagged_data_is_16_bytes_shorter_and_ends_with_the_fragment(payload_size: int) -> None:
    fp = payload_size - 48
    payload = random.Random(2).randbytes(fp * 3 + 5)
    frags = [1, 3]
    data = wire.pack_fragments(KEY, (7, 0, 9, 0), 100, 42, payload, frags, fp, 0)
    seg = wire.data_segment(fp, 0)
    assert seg == payload_size - wire.TAG_SIZE
    assert len(data) == seg + 5 + wire.DATA_HEADER.size
    for i, f in enumerate(frags):
        d = data[i * seg : (i + 1) * seg]
        fields = wire.DATA_HEADER.unpack_from(d)
        assert fields[:3] == (wire.MAGIC, wire.VERSION, PacketType.DATA)
        assert fields[6:] == (100 + i, 42, len(payload), f, 0)
        assert d[wire.DATA_HEADER.size :] == payload[f * fp : (f + 1) * fp]


def test_nak_auth_entries_roundtrip_next_to_runs_and_fragments() -> None:
    (body,) = wire.encode_nak_bodies(77, [(3, 5)], [(9, [0, 4])], 1400, auth=[(10, 12), (20, 21)])
    nak = wire.decode_nak(memoryview(body))
    assert nak.seen == 77
    assert nak.entries == [(3, 2, 0), (9, 0, 0b10001)]
    assert nak.auth == [(10, 12), (20, 21)]
    with pytest.raises(WireError, match="invalid"):
        bad = wire.U32.pack(0) + wire.COUNT.pack(1) + wire.NAK_ENTRY.pack(1, wire.NAK_AUTH)
        wire.decode_nak(memoryview(bad + wire.U32.pack(0)))


def test_transmit_counts_its_datagrams() -> None:
    assert wire.Transmit(b"x" * 2500, 1000, None).count == 3
    assert wire.Transmit(b"x" * 10, 10, ("10.0.0.1", 1)).count == 1
