"""Hostile input: random and mutated datagrams never raise, and every one is accounted for.

Mutations of real datagrams are fed both as they are (the tag then fails) and re-tagged
with the session key, so they pass authentication and reach every body decoder.
"""

from __future__ import annotations

import copy
import random
import struct

from simnet import KEY, SimNet, make_image

from protocol import wire
from protocol.receiver import ReceiverSession
from protocol.sender import SenderSession

TOTAL = 100_000


def _capture(seed: int) -> tuple[SimNet, list[bytes], list[bytes], SenderSession, ReceiverSession]:
    """Run a lossy session part way; return datagrams seen each way and snapshots."""
    from simnet import Link

    image = make_image(random.Random(seed), blocks=6)
    link = Link(drop=0.05)
    net = SimNet(seed, image, min_receivers=2, down=link, up=link)
    net.add_receiver("a")
    net.add_receiver("b")
    down: list[bytes] = []
    up: list[bytes] = []
    to_r, to_s = net._to_receiver, net._to_sender
    net._to_receiver = lambda r, d: (down.append(d), to_r(r, d))[1]  # type: ignore[method-assign]
    net._to_sender = lambda r, d: (up.append(d), to_s(r, d))[1]  # type: ignore[method-assign]
    net.run(limit=0.004)  # mid-transfer: both joined, blocks partly received
    sender = copy.deepcopy(net.sender)
    receiver = copy.deepcopy(net.receivers["a"].session)
    net.run(limit=30)  # the rest: DONE, acks, ENDING announces
    return net, down, up, sender, receiver


def _retag(body: bytes) -> bytes:
    return body + wire.tag(KEY, body)


def _mutate(rng: random.Random, d: bytes) -> bytes:
    core = bytearray(d[: -wire.TAG_SIZE])
    choice = rng.randrange(7)
    if choice == 0 and core:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            core[rng.randrange(len(core))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # truncate
        core = core[: rng.randrange(len(core) + 1)]
    elif choice == 2:  # extend
        core += rng.randbytes(rng.randint(1, 64))
    elif choice == 3 and len(core) >= 4:  # change the type
        core[3] = rng.randrange(256) if rng.random() < 0.3 else rng.randint(1, 12)
    elif choice == 4 and len(core) > wire.HEADER.size + 8:  # set a body field to an extreme
        off = rng.randrange(wire.HEADER.size, len(core) - 4)
        core[off : off + 4] = struct.pack("!I", rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
    elif choice == 5 and len(core) > wire.HEADER.size + 2:  # counts and lengths
        off = rng.randrange(wire.HEADER.size, len(core) - 2)
        core[off : off + 2] = struct.pack("!H", rng.choice([0, 1, 0xFFFF, 255]))
    elif len(core) >= 20:  # header fields: seq, instance, session
        off = rng.choice([4, 8, 12, 16])
        core[off : off + 4] = struct.pack("!I", rng.randrange(1 << 32))
    if rng.random() < 0.7:
        return _retag(bytes(core))
    return bytes(core) + d[-wire.TAG_SIZE :]


def _random(rng: random.Random) -> bytes:
    n = rng.randint(0, 1600)
    d = bytearray(rng.randbytes(n))
    if n >= 4 and rng.random() < 0.5:
        d[0:3] = wire.MAGIC + bytes([wire.VERSION])
        d[3] = rng.randint(1, 12)
    if rng.random() < 0.5 and n > 16:
        return _retag(bytes(d[:-16]))
    return bytes(d)


def _accounted(stats: dict, total_key: str) -> None:
    dropped = stats["dropped"]
    assert "internal_error" not in dropped, dropped
    assert stats.get(total_key, 0) == stats.get("accepted", 0) + sum(dropped.values())


def _machines(
    net: SimNet, sender0: SenderSession, receiver0: ReceiverSession
) -> list[SenderSession | ReceiverSession]:
    """Fresh copies: a sender and a receiver mid-transfer, a waiting sender, a listener."""
    fresh_sender = SenderSession(
        session_id=sender0._session_id,
        key=KEY,
        manifest_bytes=net.image.manifest_bytes,
        read_block=net.image.stored.__getitem__,
        config=net.config,
        now=0.0,
        rng=random.Random(5),
    )
    listener = ReceiverSession(key=KEY, config=net.config, now=0.0, rng=random.Random(6))
    return [copy.deepcopy(sender0), copy.deepcopy(receiver0), fresh_sender, listener]


def _total(m: SenderSession | ReceiverSession) -> int:
    stats = m.stats
    key = "datagrams_received" if isinstance(m, SenderSession) else "datagrams"
    _accounted(stats, key)
    return int(stats.get(key, 0))


def test_100k_random_and_mutated_datagrams_never_raise_and_are_all_counted() -> None:
    rng = random.Random(2024)
    net, down, up, sender0, receiver0 = _capture(3)
    assert len(down) > 50 and len(up) > 5
    corpus = down + up
    machines = _machines(net, sender0, receiver0)
    bases = [_total(m) for m in machines]
    fed = 0
    now = 0.01
    reasons: set[str] = set()
    for i in range(TOTAL):
        if i % 2500 == 0 and i:
            fed += sum(_total(m) - b for m, b in zip(machines, bases, strict=True))
            for m in machines:
                reasons |= set(m.stats["dropped"])
            machines = _machines(net, sender0, receiver0)
            now = 0.01
        r = rng.random()
        if r < 0.15:
            d = _random(rng)
        elif r < 0.9:
            d = _mutate(rng, rng.choice(corpus))
        else:
            d = rng.choice(corpus)
        rng.choice(machines).receive_datagram(d, ("10.0.1.1", 9000), now)
        if i % 50 == 0:
            now += 0.003
            for m in machines:
                m.handle_timer(now)
                m.datagrams_to_send(now)
                while m.next_event() is not None:
                    pass
    fed += sum(_total(m) - b for m, b in zip(machines, bases, strict=True))
    assert fed == TOTAL
    # The decoders were reached, not just the tag check.
    assert {"bad_tag", "malformed", "invalid", "short", "replayed"} <= reasons, reasons


def test_body_decoders_refuse_random_bodies_only_with_wire_error() -> None:
    rng = random.Random(7)
    for ptype, decode in wire.DECODERS.items():
        refused = 0
        for _ in range(3000):
            body = memoryview(rng.randbytes(rng.randint(0, 300)))
            try:
                decode(body)
            except wire.WireError:  # anything else fails the test
                refused += 1
        if ptype != wire.PacketType.ABORT:  # any short text is a valid ABORT
            assert refused > 0, ptype
