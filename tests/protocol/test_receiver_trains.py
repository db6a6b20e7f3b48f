"""A GRO train handed over in one call is the same as its datagrams one by one (§2.2)."""

from __future__ import annotations

import random

from simnet import KEY, make_image, make_sender

from protocol import events as ev
from protocol import wire
from protocol.config import EngineConfig
from protocol.receiver import ReceiverSession

SENDER = ("10.0.0.1", 9000)


def _split(data: bytes, seg: int) -> list[bytes]:
    return [data[i : i + seg] for i in range(0, len(data), seg)]


def test_a_train_and_its_datagrams_one_by_one_end_alike_forged_ones_included() -> None:
    image = make_image(random.Random(41), blocks=8)
    config = EngineConfig(auto_rate=False)
    sender = make_sender(image, config, min_receivers=2)
    by_train = ReceiverSession(key=KEY, config=config, now=0.0, rng=random.Random(2))
    one_by_one = ReceiverSession(key=KEY, config=config, now=0.0, rng=random.Random(3))
    got: dict[str, list[int]] = {"train": [], "single": []}
    now = 0.0
    for _ in range(400):
        now += 0.001
        for t in sender.datagrams_to_send(now):
            data = bytearray(t.data)
            if t.count > 2:
                # a damaged datagram inside the train: it claims a tag it does not have
                data[t.segment_size + 30] ^= wire.FLAG_TAGGED
            by_train.receive_datagrams(memoryview(bytes(data)), t.segment_size, SENDER, now)
            for d in _split(bytes(data), t.segment_size):
                one_by_one.receive_datagram(d, SENDER, now)
        for name, r in (("train", by_train), ("single", one_by_one)):
            for t in r.datagrams_to_send(now):
                sender.receive_datagram(t.data, (name, 9000), now)
            r.handle_timer(now)
            while (e := r.next_event()) is not None:
                if isinstance(e, ev.BlockReceived):
                    got[name].append(e.index)
                    r.block_verified(e.index, now)
                elif isinstance(e, ev.AllBlocksVerified):
                    r.blocks_durable(now)
        sender.handle_timer(now)
        if by_train.finished and one_by_one.finished:
            break
    assert by_train.outcome == one_by_one.outcome == "completed"
    assert sorted(got["train"]) == sorted(got["single"]) == sorted(image.stored)
    a, b = by_train.stats, one_by_one.stats
    assert a["dropped"]["bad_tag"] == b["dropped"]["bad_tag"] > 0
    # (the other drop reasons differ only by which of the two closed first)
    for key in ("datagrams", "accepted", "fragments", "duplicates"):
        assert a[key] == b[key], key


def test_a_handed_out_payload_stays_intact_until_settled_then_its_buffer_is_reused() -> None:
    image = make_image(random.Random(42), blocks=8)
    config = EngineConfig(auto_rate=False)
    sender = make_sender(image, config)
    r = ReceiverSession(key=KEY, config=config, now=0.0, rng=random.Random(2))
    held: list[ev.BlockReceived] = []
    now = 0.0
    for _ in range(400):
        now += 0.001
        for t in sender.datagrams_to_send(now):
            r.receive_datagrams(memoryview(t.data), t.segment_size, SENDER, now)
        for t in r.datagrams_to_send(now):
            sender.receive_datagram(t.data, ("10.0.0.2", 9000), now)
        r.handle_timer(now)
        sender.handle_timer(now)
        while (e := r.next_event()) is not None:
            if isinstance(e, ev.BlockReceived):
                held.append(e)
        if len(held) == len(image.stored):
            break
    # nothing settled yet: every payload is still exactly its block, whatever came after
    assert sorted(e.index for e in held) == sorted(image.stored)
    for e in held:
        assert bytes(e.payload) == image.stored[e.index]
    first = held[0]
    r.block_verified(first.index, now)  # settled: its buffer may now back a new partial
    spare = r._objs._spare
    assert spare and spare[-1] is first.payload.obj  # type: ignore[union-attr]
