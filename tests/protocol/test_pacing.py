"""The pacer: a rate cap holds, and auto mode finds what the path takes (PROTOCOL.md §5)."""

from __future__ import annotations

import random

import pytest
from simnet import Link, SimNet, make_image

from protocol.config import EngineConfig
from protocol.pacing import Pacer


def _drain(p: Pacer, now: float, size: int) -> int:
    sent = 0
    while p.ready(now):
        p.consume(size)
        sent += size
    return sent


def test_the_bucket_releases_the_rate_and_no_more() -> None:
    config = EngineConfig(auto_rate=False, rate_bps=80_000_000, burst_bytes=64 << 10)
    p = Pacer(config, 0.0)
    sent = _drain(p, 0.0, 1472)
    now = 0.0
    while now < 1.0:
        now = p.ready_at(now)
        sent += _drain(p, now, 1472)
    # 10 MB/s for one second, plus at most one burst and one datagram of debt.
    assert 10_000_000 - 1472 <= sent <= 10_000_000 + (64 << 10) + 1472


def test_unpaced_means_always_ready() -> None:
    p = Pacer(EngineConfig(auto_rate=False, rate_bps=None), 0.0)
    assert not p.paced and p.ready(0.0) and p.ready_at(5.0) == 5.0


def test_auto_rate_grows_without_loss_and_never_passes_the_cap() -> None:
    config = EngineConfig(auto_rate=True, initial_rate_bps=100_000_000, rate_bps=400_000_000)
    p = Pacer(config, 0.0)
    for i in range(1, 40):
        p.adjust(i * 0.1, [(0.0, 0, 0.0)])
    assert p.rate_bps == 400_000_000


def test_auto_rate_cuts_to_what_got_through_and_ignores_one_lossy_receiver() -> None:
    config = EngineConfig(auto_rate=True, initial_rate_bps=500_000_000)
    p = Pacer(config, 0.0)
    p.adjust(0.1, [(0.0, 0, 0.0), (0.01, 0, 0.0), (0.02, 0, 0.0), (0.9, 50_000_000, 2.0)])
    assert p.rate_bps is not None and p.rate_bps > 500_000_000  # the outlier is ignored
    p.adjust(0.2, [(0.6, 200_000_000, 0.0)] * 4)
    assert p.rate_bps == pytest.approx(180_000_000, rel=0.01)
    p.adjust(0.3, [(0.6, 100_000_000, 0.0)] * 4)  # too soon: reports of the old rate
    assert p.rate_bps == pytest.approx(180_000_000, rel=0.01)


def test_background_loss_below_the_threshold_does_not_slow_the_session() -> None:
    config = EngineConfig(auto_rate=True, initial_rate_bps=100_000_000)
    p = Pacer(config, 0.0)
    for i in range(1, 20):
        p.adjust(i * 0.1, [(0.02, 0, 0.01)] * 8)
    assert p.rate_bps is not None and p.rate_bps > 100_000_000 and p.decreases == 0


def test_a_rate_cap_holds_over_a_whole_session() -> None:
    config = EngineConfig(auto_rate=False, rate_bps=20_000_000)
    image = make_image(random.Random(21), blocks=40)
    net = SimNet(21, image, config, min_receivers=2)
    rs = [net.add_receiver(f"r{i}") for i in range(2)]
    sent: list[tuple[float, int]] = []
    orig = net._from_sender

    def record(t):  # type: ignore[no-untyped-def]
        sent.append((net.now, len(t.data)))
        orig(t)

    net._from_sender = record  # type: ignore[method-assign]
    net.run()
    assert all(net.outcome(r) == "completed" for r in rs)
    for start in (0.1, 0.3, 0.5):
        window = sum(n for t, n in sent if start <= t < start + 0.2)
        assert window * 8 / 0.2 <= 20_000_000 * 1.05 + 8 * (64 << 10) / 0.2


@pytest.mark.parametrize("capacity", [40_000_000, 150_000_000])
def test_auto_rate_settles_near_a_bottleneck_and_everyone_finishes(capacity: int) -> None:
    image = make_image(random.Random(22), blocks=400)
    bottleneck = Link(capacity_bps=capacity, buffer_bytes=256 << 10)
    net = SimNet(22, image, EngineConfig(auto_rate=True), min_receivers=3, down=bottleneck)
    rs = [net.add_receiver(f"r{i}") for i in range(3)]
    net.run(limit=120)
    for r in rs:
        assert net.outcome(r) == "completed"
        net.check_disk(r)
    rate = net.sender.rate_bps
    assert rate is not None and 0.5 * capacity <= rate <= 1.5 * capacity
    ideal = image.stored_bytes * 8 / capacity
    finished = max(r.finished_at or 0.0 for r in rs)
    assert finished < 2.0 * ideal + 0.5


def test_receivers_reading_late_stop_the_growth_then_slow_the_rate() -> None:
    config = EngineConfig(auto_rate=True, initial_rate_bps=300_000_000, max_lag=0.15)
    p = Pacer(config, 0.0)
    p.adjust(0.1, [(0.0, 0, 0.2)] * 3)  # behind, but not much: hold
    assert p.rate_bps == 300_000_000
    p.adjust(0.2, [(0.0, 0, 0.5)] * 3)  # far behind: slow down
    assert p.rate_bps is not None and p.rate_bps < 300_000_000
    slowed = p.rate_bps
    p.adjust(0.3, [(0.0, 0, 0.5)] * 3)  # reports of the old rate: wait for fresh ones
    assert p.rate_bps == slowed
    p.adjust(0.9, [(0.0, 0, 0.01)] * 3)  # caught up: grow again
    assert p.rate_bps > slowed


def test_auto_rate_starts_at_a_gigabit_port_not_a_slow_ramp() -> None:
    p = Pacer(EngineConfig(auto_rate=True), 0.0)
    assert p.rate_bps == 1_000_000_000
    # a cap below that is where it starts
    assert Pacer(EngineConfig(auto_rate=True, rate_bps=300_000_000), 0.0).rate_bps == 300_000_000


def test_receivers_far_behind_cut_the_rate_to_what_they_read_at_once() -> None:
    config = EngineConfig(auto_rate=True, initial_rate_bps=1_000_000_000, max_lag=0.15)
    p = Pacer(config, 0.0)
    # CPU-bound receivers read 300 Mbit/s of a 1 Gbit/s stream and fall 0.4 s behind
    p.adjust(0.3, [(0.0, 300_000_000, 0.4)] * 4)
    assert p.rate_bps == pytest.approx(270_000_000, rel=0.01)
    # one cut per pair of STATUS intervals, then growth once the backlog is gone
    p.adjust(0.4, [(0.0, 100_000_000, 0.5)] * 4)
    assert p.rate_bps == pytest.approx(270_000_000, rel=0.01)
    p.adjust(1.0, [(0.0, 270_000_000, 0.0)] * 4)
    assert p.rate_bps is not None and p.rate_bps > 270_000_000


def test_a_lag_report_without_a_read_rate_still_slows_by_a_step() -> None:
    p = Pacer(EngineConfig(auto_rate=True, initial_rate_bps=400_000_000), 0.0)
    p.adjust(0.3, [(0.0, 0, 0.5)])
    assert p.rate_bps == 340_000_000


def test_after_a_lag_cut_the_rate_grows_back_fast_but_after_a_loss_cut_slowly() -> None:
    config = EngineConfig(auto_rate=True, initial_rate_bps=1_000_000_000)
    lagged, lossy = Pacer(config, 0.0), Pacer(config, 0.0)
    lagged.adjust(0.3, [(0.0, 300_000_000, 0.5)])
    lossy.adjust(0.3, [(0.5, 300_000_000, 0.0)])
    assert lagged.rate_bps == lossy.rate_bps == 270_000_000
    for i in range(1, 6):
        lagged.adjust(0.3 + i * 0.1, [(0.0, 270_000_000, 0.0)])
        lossy.adjust(0.3 + i * 0.1, [(0.0, 270_000_000, 0.0)])
    assert lagged.rate_bps is not None and lossy.rate_bps is not None
    assert lagged.rate_bps > 2 * 270_000_000 > lossy.rate_bps
