"""§4.3: loss in whole GSO trains at every receiver (the lab's nftables rule drops a GSO
skb before it is cut into datagrams) is the group's loss: it makes no receiver an outlier,
and an object lost whole at the end of a pass is asked for and repaired at once.

Times here are the simulation's (SimNet), not the wall clock.
"""

from __future__ import annotations

import random

from simnet import Link, SimNet, make_image

from protocol import wire
from protocol.config import EngineConfig


def _watch_outliers(net: SimNet, every: float = 0.002) -> dict[int, float]:
    """Every receiver id the sender flags as an outlier at some moment of the run, and
    when it first did."""
    first: dict[int, float] = {}

    def look() -> None:
        for m in net.sender._members.values():
            if m.outlier:
                first.setdefault(m.receiver_id, net.now)
        if not net.sender.finished:
            net.at(net.now + every, look)

    net.at(0.0, look)
    return first


def test_trains_lost_at_every_receiver_make_none_of_them_an_outlier() -> None:
    # Before: the share of its NAKed objects' fragments it lacked (a lost train is most of
    # a small object) flagged every receiver, and the whole sweep went at an outlier's pace.
    image = make_image(random.Random(5), blocks=240)  # ~13 MB stored
    net = SimNet(3, image, EngineConfig(), min_receivers=4)
    rs = [net.add_receiver(f"r{i}", link=Link(train_drop=0.03)) for i in range(4)]
    flagged = _watch_outliers(net)
    net.run()
    for r in rs:
        assert net.outcome(r) == "completed"
        net.check_disk(r)
        assert r.session.stats["naks_sent"] > 0  # each lost trains and asked for them
    assert flagged == {}


def test_a_receiver_whose_naks_name_most_objects_is_an_outlier_before_its_first_status() -> None:
    image = make_image(random.Random(6), blocks=120, block_size=256 << 10)
    net = SimNet(6, image, EngineConfig(), min_receivers=3)
    fast = [net.add_receiver(f"f{i}") for i in range(2)]
    slow = net.add_receiver("slow", link=Link(drop=0.3))  # part of every object lost
    flagged = _watch_outliers(net)
    net.run()
    assert set(flagged) == {slow.session.receiver_id}
    assert flagged[slow.session.receiver_id] < net.config.status_interval  # before any STATUS
    for r in (*fast, slow):
        assert net.outcome(r) == "completed"


def test_an_object_lost_whole_at_the_end_is_asked_for_and_repaired_at_once() -> None:
    image = make_image(random.Random(7), blocks=60)
    net = SimNet(7, image, EngineConfig(), min_receivers=2)
    unlucky, other = net.add_receiver("unlucky"), net.add_receiver("other")
    last = max(image.stored)  # the sweep's last object
    send = net._from_sender

    def lose_last_sweep_for_unlucky(t: wire.Transmit) -> None:
        head = wire.DATA_HEADER.unpack_from(t.data)
        obj, flags = head[7], head[10]
        sweep = t.data[3] == wire.PacketType.DATA and not flags & wire.FLAG_REPAIR
        if sweep and obj == last and net.sender.stats["passes"] == 0:
            unlucky.dead_at = net.now  # deaf for this Transmit only
            send(t)
            unlucky.dead_at = None
            return
        send(t)

    net._from_sender = lose_last_sweep_for_unlucky  # type: ignore[method-assign]
    net.run()
    for r in (unlucky, other):
        assert net.outcome(r) == "completed"
        net.check_disk(r)
    assert unlucky.session.stats["whole_naked"] >= 1
    assert other.session.stats.get("whole_naked", 0) == 0
    # a NAK on the sender's IDLE ANNOUNCE and a repair: round trips, not a STATUS period
    assert unlucky.finished_at is not None and other.finished_at is not None
    assert unlucky.finished_at - other.finished_at < 0.02, (
        unlucky.finished_at,
        other.finished_at,
    )
