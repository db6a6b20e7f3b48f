"""§4.3: a fragment only one receiver asked for is repaired to it alone.

On a 2-core lab every multicast datagram costs every receiver (and the bridge) a copy; a
repair that only one receiver needs should cost only that one. Datagrams sent to one
receiver are numbered in a seq space of its own, so the others' loss figures see no gap.
"""

from __future__ import annotations

import random

from simnet import Link, SimNet, make_image

from protocol.config import EngineConfig


def test_a_fragment_only_one_receiver_lost_goes_to_it_alone() -> None:
    config = EngineConfig(auto_rate=False, rate_bps=20_000_000)  # repairs while all are in
    net = SimNet(1, make_image(random.Random(1), blocks=24), config, min_receivers=4)
    lossy = net.add_receiver("lossy", link=Link(drop=0.05))
    clean = [net.add_receiver(f"r{i}") for i in range(3)]
    net.run()
    for r in (lossy, *clean):
        assert net.outcome(r) == "completed"
        net.check_disk(r)
    sent = net.sender.stats
    # (once the others completed, a lone receiver's repairs go to the group: no one to spare)
    assert sent["unicast_repair_datagrams"] > sent["repair_datagrams"] / 2
    for r in clean:
        st = r.session.stats
        assert st["duplicates"] == 0, st  # none of the lossy one's repairs reached it
        assert st["loss_total"] == 0.0  # and the unicast seq space is no gap of its own
    assert 0.02 < lossy.session.stats["loss_total"] < 0.1


def test_a_fragment_several_receivers_lost_goes_to_the_group_once() -> None:
    net = SimNet(2, make_image(random.Random(2), blocks=12), min_receivers=2)
    rs = [net.add_receiver(f"r{i}", link=Link(drop=0.15)) for i in range(2)]
    net.run()
    for r in rs:
        assert net.outcome(r) == "completed"
        net.check_disk(r)
    sent = net.sender.stats
    group = sent["repair_datagrams"] - sent["unicast_repair_datagrams"]
    assert group > 0  # those both lacked
    assert sent["unicast_repair_datagrams"] > group  # most were lost by one of them only


def test_a_lone_receiver_gets_its_repairs_by_multicast() -> None:
    net = SimNet(3, make_image(random.Random(3), blocks=8), min_receivers=1)
    r = net.add_receiver("r", link=Link(drop=0.05))
    net.run()
    assert net.outcome(r) == "completed"
    net.check_disk(r)
    assert net.sender.stats["repair_datagrams"] > 0
    assert net.sender.stats.get("unicast_repair_datagrams", 0) == 0
