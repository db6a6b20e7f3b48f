"""§3.1, §4.3: losses at the end of a transfer cost round trips, not timer periods.

Times here are the simulation's (SimNet), not the wall clock: they say how many waits of
which timer a lossy ending takes.
"""

from __future__ import annotations

import random
import statistics

from simnet import KEY, Link, SimNet, make_image, make_sender

from protocol import wire
from protocol.config import EngineConfig
from protocol.receiver import ReceiverSession, ReceiverState

SENDER = ("10.0.0.1", 9000)


def _finish(drop: float, receivers: int, seed: int) -> float:
    image = make_image(random.Random(5), blocks=240)  # ~13 MB stored: 0.04 s at 1 Gbit/s
    net = SimNet(seed, image, EngineConfig(), min_receivers=receivers)
    rs = [net.add_receiver(f"r{i}", link=Link(drop=drop)) for i in range(receivers)]
    net.run()
    assert all(net.outcome(r) == "completed" for r in rs)
    return max(r.finished_at or 0.0 for r in rs)


def test_two_percent_loss_ends_a_few_round_trips_after_a_lossless_session() -> None:
    clean = _finish(0.0, 1, 0)
    lossy = statistics.median(_finish(0.02, 1, seed) for seed in range(5))
    # an IDLE announce 2 ms after the last burst, NAKs at once, repairs measured in ms:
    # not nak_interval (50 ms) or nak_repeat (150 ms) per round
    assert lossy - clean < 0.03, (clean, lossy)


def test_data_flowing_while_joining_sends_the_join_again_at_once() -> None:
    image = make_image(random.Random(8), blocks=12)
    config = EngineConfig(initial_rate_bps=50_000_000)
    sender = make_sender(image, config, min_receivers=1)
    r = ReceiverSession(key=KEY, config=config, now=0.0, rng=random.Random(2))
    for t in sender.datagrams_to_send(0.0):  # the ANNOUNCE
        r.receive_datagram(t.data, SENDER, 0.0)
    (join,) = r.datagrams_to_send(0.001)
    sender.receive_datagram(join.data, ("10.0.0.2", 9000), 0.001)  # the transfer starts
    now, joins = 0.001, 0
    for _ in range(20):  # every datagram is lost but DATA: its JOIN_ACK never comes
        now += 0.001
        for t in sender.datagrams_to_send(now):
            for i in range(0, len(t.data), t.segment_size):
                d = t.data[i : i + t.segment_size]
                if d[3] == wire.PacketType.DATA:
                    r.receive_datagram(d, SENDER, now)
        timer = r.get_timer()
        if timer is not None and timer <= now:
            r.handle_timer(now)
        joins += sum(1 for t in r.datagrams_to_send(now) if t.data[3] == wire.PacketType.JOIN)
    assert r.state is ReceiverState.JOINING
    assert r.stats["dropped"]["not_joined"] > 0
    # the back-off alone would have sent none in these 20 ms (first retry after 100 ms)
    assert joins >= 1
    assert r.stats["joins_sent"] <= 1 + 20 // 10 + 1  # at most one per 10 ms
