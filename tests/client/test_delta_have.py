"""The have list a resuming receiver joins with holds until the manifest arrives.

protocol/receiver.py: blocks declared before joining go out in the JOIN; a STATUS sent
before the manifest is complete must not report them missing again (the sender would then
resend every held block).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))

from simnet import SimNet, make_image

from protocol import events as ev
from protocol.receiver import ReceiverState
from protocol.wire import DATA_HEADER, PacketType


def test_declared_blocks_stay_held_while_the_manifest_is_late() -> None:
    image = make_image(random.Random(21), blocks=16)
    net = SimNet(21, image, min_receivers=1)
    r = net.add_receiver("r")
    held = sorted(image.raw)[::2]
    r.session.declare_have(held, 0.0)
    for i in held:
        r.disk[i] = image.raw[i]
    deliver = net._to_receiver
    dropped_while_joined: list[float] = []
    held_sent: list[int] = []

    def late_data(rcv, data):  # type: ignore[no-untyped-def]
        if data[3] != PacketType.DATA:  # byte 3: the packet type
            deliver(rcv, data)
            return
        obj = DATA_HEADER.unpack_from(data)[7]
        if obj in held:
            held_sent.append(obj)
        if net.now < 1.0:
            if r.session.state is ReceiverState.RECEIVING:
                dropped_while_joined.append(net.now)
            return  # every DATA datagram (manifest chunks included) lost for a second
        deliver(rcv, data)

    net._to_receiver = late_data  # type: ignore[method-assign]
    net.run(limit=30)
    assert dropped_while_joined  # joined, manifest-less, for a while
    assert r.session.stats["status_sent"] >= 2  # and reporting what it lacks meanwhile
    assert net.outcome(r) == "completed"
    net.check_disk(r)
    assert held_sent == []  # not one datagram of a held block was multicast
    received = {e.index for e in r.events if isinstance(e, ev.BlockReceived)}
    assert received == set(image.raw) - set(held)
