"""A receiver's stats carry the loss it measures for its STATUS reports (§4.4).

One sender, two receivers on the simulated network: one behind a link that drops 5 % of
the sender's datagrams by a seeded rule, one behind a clean link. The lossy one reports a
loss near 5 % (last interval and over the whole session), the clean one reports 0, and
both still end with every block.
"""

from __future__ import annotations

import random

import pytest
from simnet import Link, SimNet, make_image

from protocol import events as ev
from protocol.config import EngineConfig

DROP = 0.05


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_a_receiver_behind_a_lossy_link_reports_its_loss(seed: int) -> None:
    # 48 blocks: ~600 datagrams, so a seeded 5 % drop lands well inside the bounds below
    image = make_image(random.Random(seed), blocks=48)
    # 10 Mbit/s: the transfer spans several STATUS intervals (0.25 s)
    config = EngineConfig(auto_rate=False, rate_bps=10_000_000)
    net = SimNet(seed, image, config, min_receivers=2, max_wait=2.0)
    lossy = net.add_receiver("lossy", link=Link(drop=DROP))
    clean = net.add_receiver("clean")
    before = lossy.session.stats
    assert (before["loss"], before["loss_total"]) == (0.0, 0.0)

    net.run(limit=60.0)

    for r in (lossy, clean):
        assert net.outcome(r) == "completed", net.outcome(r)
        net.check_disk(r)
    st = lossy.session.stats
    assert st["expected_datagrams"] > 200
    assert DROP / 2 < st["loss_total"] < DROP * 2, st
    assert st["loss_total"] == st["lost_datagrams"] / st["expected_datagrams"]
    assert 0.0 <= st["loss"] <= 1.0
    ok = clean.session.stats
    assert (ok["loss_total"], ok["lost_datagrams"]) == (0.0, 0), ok
    assert ok["expected_datagrams"] > 100
    # the sender heard the same figure in the lossy receiver's STATUS reports
    heard = [
        e.loss
        for e in net.sender_events
        if isinstance(e, ev.ReceiverProgress) and e.receiver_id == lossy.session.receiver_id
    ]
    assert heard and max(heard) > 0.0
