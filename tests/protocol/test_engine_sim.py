"""The engine over a simulated network: every receiver ends identical, or evicted with a reason.

Pure and deterministic: a fake clock and seeded links (tests/protocol/simnet.py).
"""

from __future__ import annotations

import random

import pytest
from simnet import KEY, SESSION_ID, Link, SimNet, make_image, make_sender

from protocol import events as ev
from protocol import wire
from protocol.config import EngineConfig
from protocol.receiver import ReceiverSession
from protocol.sender import SenderState


def _no_internal_errors(net: SimNet) -> None:
    assert "internal_error" not in net.sender.stats["dropped"]
    for r in net.receivers.values():
        assert "internal_error" not in r.session.stats["dropped"]


def _sender_events(net: SimNet, kind: type) -> list:
    return [e for e in net.sender_events if isinstance(e, kind)]


def _ended(net: SimNet) -> ev.SessionEnded:
    (end,) = _sender_events(net, ev.SessionEnded)
    return end


def _slow_config(**kw: object) -> EngineConfig:
    """A rate low enough that a 20-block image takes about a second."""
    return EngineConfig(auto_rate=False, rate_bps=3_500_000, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(200))
def test_every_receiver_ends_identical_under_random_link_faults(seed: int) -> None:
    rng = random.Random(seed)
    image = make_image(rng, blocks=rng.randint(1, 8), last_short=rng.random() < 0.5)
    link = Link(
        drop=rng.uniform(0, 0.1),
        dup=rng.uniform(0, 0.05),
        reorder=rng.uniform(0, 0.1),
        corrupt=rng.uniform(0, 0.02),
    )
    n = rng.randint(1, 5)
    config = EngineConfig(
        payload_size=rng.choice([512, 1472, 4000, 9000]), auto_rate=False, rate_bps=100_000_000
    )
    net = SimNet(seed, image, config, min_receivers=n, down=link, up=link)
    receivers = [net.add_receiver(f"r{i}") for i in range(n)]
    net.run(limit=60)
    for r in receivers:
        assert net.outcome(r) == "completed", (r.name, r.session.stats)
        net.check_disk(r)
    assert _ended(net).outcome == "completed"
    assert net.sender.finished
    _no_internal_errors(net)


def test_a_clean_network_sends_each_datagram_once_and_asks_for_nothing() -> None:
    image = make_image(random.Random(1), blocks=8)
    net = SimNet(1, image, min_receivers=3)
    receivers = [net.add_receiver(f"r{i}") for i in range(3)]
    net.run()
    stats = net.sender.stats
    assert stats.get("naks_received", 0) == 0
    assert stats.get("repair_datagrams", 0) == 0
    assert stats.get("resweep_datagrams", 0) == 0
    for r in receivers:
        assert net.outcome(r) == "completed"
        assert r.session.stats.get("duplicates", 0) == 0


def test_a_receiver_joining_late_gets_the_rest_then_what_it_missed() -> None:
    image = make_image(random.Random(2), blocks=20)
    net = SimNet(2, image, _slow_config(), min_receivers=1)
    early = net.add_receiver("early")
    late = net.add_receiver("late", at=0.4)
    net.run()
    assert net.outcome(early) == "completed" and net.outcome(late) == "completed"
    net.check_disk(early)
    net.check_disk(late)
    started = _sender_events(net, ev.TransferStarted)
    assert started == [ev.TransferStarted(1)]
    assert len(_sender_events(net, ev.ReceiverJoined)) == 2
    assert late.finished_at is not None and early.finished_at is not None
    assert late.finished_at > early.finished_at
    assert _ended(net).outcome == "completed"


def _baseline_finish(seed: int, image_blocks: int, config: EngineConfig) -> float:
    net = SimNet(
        seed, make_image(random.Random(seed), blocks=image_blocks), config, min_receivers=2
    )
    a, b = net.add_receiver("a"), net.add_receiver("b")
    net.run()
    assert a.finished_at is not None and b.finished_at is not None
    return max(a.finished_at, b.finished_at)


def test_a_receiver_killed_mid_stream_costs_the_others_nothing_and_is_evicted_silent() -> None:
    config = _slow_config()
    baseline = _baseline_finish(3, 20, config)
    net = SimNet(3, make_image(random.Random(3), blocks=20), config, min_receivers=3)
    a, b = net.add_receiver("a"), net.add_receiver("b")
    dead = net.add_receiver("dead")
    net.kill("dead", 0.5)
    net.run()
    for r in (a, b):
        assert net.outcome(r) == "completed"
        net.check_disk(r)
        assert r.finished_at is not None and r.finished_at <= baseline * 1.05
    (evicted,) = _sender_events(net, ev.ReceiverEvicted)
    assert evicted.receiver_id == dead.session.receiver_id
    assert evicted.reason.startswith("silent")
    assert _ended(net).outcome == "partial"
    # Nothing was sent again for the dead one while it waited for its eviction.
    assert net.sender.stats.get("resweep_datagrams", 0) == 0
    # The sender gives up on the dead one within the timeout, not after hundreds of rounds.
    assert net.now < 0.5 + config.receiver_timeout + config.linger + 1.0


@pytest.mark.parametrize("port_bps", [20_000_000, 100_000_000])
def test_a_receiver_behind_a_slow_port_costs_the_others_under_5_percent(port_bps: int) -> None:
    config = EngineConfig(auto_rate=True)
    image = make_image(random.Random(4), blocks=300)  # ~6.8 MB on the wire
    net = SimNet(4, image, config, min_receivers=3)
    alone = [net.add_receiver(f"f{i}") for i in range(3)]
    net.run()
    baseline = max(r.finished_at or 0.0 for r in alone)
    net = SimNet(4, image, config, min_receivers=4)
    fast = [net.add_receiver(f"f{i}") for i in range(3)]
    slow = net.add_receiver("slow", link=Link(capacity_bps=port_bps, buffer_bytes=256 << 10))
    net.run(limit=120)
    for r in fast:
        assert net.outcome(r) == "completed"
        net.check_disk(r)
        assert r.finished_at is not None and r.finished_at <= baseline * 1.05
    # The slow one finishes on its own time afterwards, or is told why it was dropped.
    outcome = net.outcome(slow)
    assert outcome == "completed" or outcome.startswith("evicted: "), outcome
    if outcome == "completed":
        net.check_disk(slow)


def test_a_shell_that_cannot_keep_up_is_evicted_with_a_reason() -> None:
    config = _slow_config(receiver_timeout=2.0)
    net = SimNet(5, make_image(random.Random(5), blocks=12), config, min_receivers=2)
    ok = net.add_receiver("ok")
    stuck = net.add_receiver("stuck", verify_delay=1000.0)  # its disk never finishes a write
    net.run(limit=200)
    assert net.outcome(ok) == "completed"
    assert net.outcome(stuck).startswith("evicted: straggler"), net.outcome(stuck)
    assert not any(isinstance(e, ev.Completed) for e in stuck.events)


def test_a_block_that_fails_verification_is_requested_again_and_never_written_bad() -> None:
    image = make_image(random.Random(6), blocks=6)
    net = SimNet(6, image, min_receivers=1)
    first = min(image.raw)
    r = net.add_receiver("r", corrupt_blocks={first})
    net.run()
    assert net.outcome(r) == "completed"
    net.check_disk(r)
    assert r.session.stats["blocks_failed"] == 1
    received = [e.index for e in r.events if isinstance(e, ev.BlockReceived)]
    assert received.count(first) == 2


def test_a_block_that_never_verifies_fails_the_receiver_loudly() -> None:
    image = make_image(random.Random(7), blocks=4)
    net = SimNet(7, image, min_receivers=1)
    first = min(image.raw)
    r = net.add_receiver("r")
    original = net._verify

    def always_bad(rr, e):  # type: ignore[no-untyped-def]
        if e.index == first:
            rr.corrupt_blocks.add(first)
        original(rr, e)

    net._verify = always_bad  # type: ignore[method-assign]
    net.run()
    assert r.session.outcome == "failed"
    assert "failed verification 5 times" in r.session.fail_reason
    (failed,) = _sender_events(net, ev.ReceiverFailed)
    assert "failed verification" in failed.reason
    assert _ended(net).outcome == "partial"


def test_min_receivers_holds_the_start_until_enough_have_joined() -> None:
    net = SimNet(8, make_image(random.Random(8), blocks=3), min_receivers=3)
    for i, at in enumerate((0.0, 0.2, 0.7)):
        net.add_receiver(f"r{i}", at=at)
    starts: list[float] = []
    net.run(limit=30)
    for e in net.sender_events:
        if isinstance(e, ev.TransferStarted):
            starts.append(e.receivers)
    assert starts == [3]
    assert all(net.outcome(r) == "completed" for r in net.receivers.values())


def test_max_wait_starts_with_whoever_joined() -> None:
    net = SimNet(9, make_image(random.Random(9), blocks=3), min_receivers=5, max_wait=1.0)
    a, b = net.add_receiver("a"), net.add_receiver("b")
    net.run(limit=30)
    assert _sender_events(net, ev.TransferStarted) == [ev.TransferStarted(2)]
    assert a.finished_at is not None and a.finished_at >= 1.0
    assert net.outcome(a) == net.outcome(b) == "completed"


def test_start_transfer_lets_a_controller_start_with_whoever_joined() -> None:
    net = SimNet(12, make_image(random.Random(12), blocks=3), min_receivers=1 << 30)
    a, b = net.add_receiver("a"), net.add_receiver("b")
    assert not net.sender.start_transfer(0.0)  # nobody has joined yet: nothing changes
    net.at(0.8, lambda: net.sender.start_transfer(0.8))
    net.run(limit=30)
    assert _sender_events(net, ev.TransferStarted) == [ev.TransferStarted(2)]
    assert net.outcome(a) == net.outcome(b) == "completed"
    assert not net.sender.start_transfer(net.now)  # no longer waiting


def test_max_wait_with_nobody_ends_the_session_with_no_receivers() -> None:
    net = SimNet(10, make_image(random.Random(10), blocks=3), max_wait=0.5)
    net.run(limit=30)
    assert _ended(net).outcome == "no-receivers"
    assert net.sender.finished


def test_abort_tells_every_receiver_why_and_ends_the_session() -> None:
    net = SimNet(11, make_image(random.Random(11), blocks=20), _slow_config(), min_receivers=2)
    a, b = net.add_receiver("a"), net.add_receiver("b")
    net.at(0.3, lambda: net.sender.close(net.now, "operator pressed stop"))
    net.run(limit=30)
    for r in (a, b):
        aborted = [e for e in r.events if isinstance(e, ev.SessionAborted)]
        assert aborted and "operator pressed stop" in aborted[0].reason
        assert r.session.finished and r.session.outcome == "aborted"
        assert not any(isinstance(e, ev.Completed) for e in r.events)
    assert _ended(net).outcome == "aborted"


def test_a_failing_receiver_is_reported_and_the_others_complete() -> None:
    net = SimNet(12, make_image(random.Random(12), blocks=12), _slow_config(), min_receivers=2)
    a, bad = net.add_receiver("a"), net.add_receiver("bad")
    net.at(0.2, lambda: bad.session.fail(net.now, "target is read-only"))
    net.run(limit=30)
    assert net.outcome(a) == "completed"
    (failed,) = _sender_events(net, ev.ReceiverFailed)
    assert failed.reason == "target is read-only"
    assert bad.session.finished and bad.session.outcome == "failed"
    assert _ended(net).outcome == "partial"


def test_a_dead_sender_makes_receivers_give_up_with_a_reason() -> None:
    config = _slow_config(sender_timeout=3.0)
    net = SimNet(13, make_image(random.Random(13), blocks=20), config, min_receivers=1)
    r = net.add_receiver("r")

    def sender_dies() -> None:
        net.sender.close = None  # type: ignore[assignment,method-assign]
        net.sender.finished  # noqa: B018
        net._from_sender = lambda t: None  # type: ignore[method-assign]

    net.at(0.3, sender_dies)
    net.run(limit=20)
    assert net.outcome(r).startswith("aborted: nothing heard from the sender")


def test_join_is_refused_beyond_max_receivers() -> None:
    config = EngineConfig(auto_rate=False, rate_bps=50_000_000, max_receivers=2)
    net = SimNet(14, make_image(random.Random(14), blocks=3), config, min_receivers=2)
    rs = [net.add_receiver(f"r{i}") for i in range(3)]
    net.run(limit=30)
    outcomes = sorted(net.outcome(r) for r in rs)
    assert outcomes == [
        "aborted: the sender refused this receiver: the session is full (2 receivers)",
        "completed",
        "completed",
    ]


def test_declared_blocks_are_not_needed() -> None:
    image = make_image(random.Random(15), blocks=12)
    net = SimNet(15, image, min_receivers=1)
    r = net.add_receiver("r")
    held = sorted(image.raw)[: len(image.raw) // 2]
    r.session.declare_have(held, 0.0)
    for i in held:
        r.disk[i] = image.raw[i]
    net.run()
    assert net.outcome(r) == "completed"
    net.check_disk(r)
    received = {e.index for e in r.events if isinstance(e, ev.BlockReceived)}
    assert received == set(image.raw) - set(held)


def test_a_restarted_receiver_rejoins_and_its_old_instance_is_ignored() -> None:
    image = make_image(random.Random(16), blocks=20)
    net = SimNet(16, image, _slow_config(), min_receivers=1)
    first = net.add_receiver("first")
    rid = first.session.receiver_id
    captured: list[bytes] = []
    orig = net._to_sender

    def capture(r, d):  # type: ignore[no-untyped-def]
        if r is first:
            captured.append(d)
        orig(r, d)

    net._to_sender = capture  # type: ignore[method-assign]

    def restart() -> None:
        first.dead_at = net.now
        again = net.add_receiver("again")
        again.session = ReceiverSession(
            key=KEY, config=net.config, now=net.now, rng=random.Random(99), receiver_id=rid
        )

    net.at(0.3, restart)
    net.run(limit=30)
    again = net.receivers["again"]
    assert net.outcome(again) == "completed"
    net.check_disk(again)
    assert len(_sender_events(net, ev.ReceiverJoined)) == 2
    before = net.sender.stats["dropped"].get("replayed", 0)
    for d in captured:
        net.sender.receive_datagram(d, first.addr, net.now)
    assert net.sender.stats["dropped"]["replayed"] - before == len(captured)


def test_forged_foreign_and_replayed_datagrams_are_counted_and_change_nothing() -> None:
    image = make_image(random.Random(17), blocks=6)
    # Slow enough that the session is still receiving at every injection (5 ms).
    config = EngineConfig(initial_rate_bps=50_000_000)
    net = SimNet(17, image, config, min_receivers=1)
    r = net.add_receiver("r")
    first = min(image.raw)
    garbage = bytes(len(image.stored[first]))
    fp = net.config.fragment_payload
    frags = list(range(-(-len(garbage) // fp)))
    captured: list[bytes] = []
    orig = net._to_sender

    def capture(rr, d):  # type: ignore[no-untyped-def]
        captured.append(d)
        orig(rr, d)

    net._to_sender = capture  # type: ignore[method-assign]

    def inject() -> None:
        instance = net.sender._instance
        tagged = wire.FLAG_TAGGED
        for key, session in ((bytes(32), SESSION_ID), (KEY, SESSION_ID + 1)):
            data = wire.pack_fragments(
                key, (session, 0, instance, 0), 1 << 20, first, garbage, frags, fp, tagged
            )
            seg = wire.data_segment(fp, tagged)
            for i in range(0, len(data), seg):
                r.session.receive_datagram(data[i : i + seg], ("6.6.6.6", 1), net.now)
        for d in captured:
            net.sender.receive_datagram(d, r.addr, net.now)

    for k in range(1, 6):
        net.at(0.001 * k, inject)
    net.run()
    assert net.outcome(r) == "completed"
    net.check_disk(r)
    dropped = r.session.stats["dropped"]
    assert dropped["bad_tag"] >= 5 * len(frags)
    assert dropped["foreign_session"] >= 5 * len(frags)
    assert net.sender.stats["dropped"]["replayed"] >= 1
    _no_internal_errors(net)


@pytest.mark.parametrize("seed", range(20))
def test_the_start_survives_heavy_loss_of_control_datagrams(seed: int) -> None:
    lossy = Link(drop=0.3, dup=0.05, reorder=0.1)
    net = SimNet(
        seed,
        make_image(random.Random(seed), blocks=3),
        min_receivers=6,
        up=lossy,
        down=Link(drop=0.1),
    )
    rs = [net.add_receiver(f"r{i}") for i in range(6)]
    net.run(limit=60)
    assert [net.outcome(r) for r in rs] == ["completed"] * 6
    assert _sender_events(net, ev.TransferStarted) == [ev.TransferStarted(6)]


def test_a_done_never_acknowledged_is_not_reported_as_success() -> None:
    config = EngineConfig(auto_rate=False, rate_bps=50_000_000, control_timeout=2.0)
    net = SimNet(23, make_image(random.Random(23), blocks=3), config, min_receivers=1)
    r = net.add_receiver("r")
    orig = net._to_receiver

    def no_acks(rr, d):  # type: ignore[no-untyped-def]
        if d[3] != wire.PacketType.DONE_ACK:
            orig(rr, d)

    net._to_receiver = no_acks  # type: ignore[method-assign]
    net.run(limit=30)
    assert any(isinstance(e, ev.AllBlocksVerified) for e in r.events)
    assert not any(isinstance(e, ev.Completed) for e in r.events)
    assert r.session.outcome == "unacknowledged"
    assert "never acknowledged DONE" in net.outcome(r)


def test_a_receiver_never_completes_before_the_shell_made_blocks_durable() -> None:
    net = SimNet(24, make_image(random.Random(24), blocks=4), min_receivers=1)
    r = net.add_receiver("r", fsync_delay=3.0)
    net.run(limit=30)
    verified_at = r.events.index(next(e for e in r.events if isinstance(e, ev.AllBlocksVerified)))
    assert isinstance(r.events[-1], ev.Completed) and len(r.events) - 1 > verified_at
    assert r.finished_at is not None and r.finished_at >= 3.0
    with pytest.raises(ValueError, match="before AllBlocksVerified"):
        fresh = ReceiverSession(key=KEY, config=net.config, now=0.0, rng=random.Random(1))
        fresh.blocks_durable(0.0)


def test_memory_bounds_drop_work_but_never_correctness() -> None:
    config = EngineConfig(
        auto_rate=False,
        rate_bps=50_000_000,
        max_partial_bytes=3 * (64 << 10),
        max_unverified_blocks=2,
        max_unverified_bytes=1 << 20,
    )
    link = Link(drop=0.05, reorder=0.3)
    net = SimNet(25, make_image(random.Random(25), blocks=24), config, min_receivers=2, down=link)
    rs = [net.add_receiver(f"r{i}", verify_delay=0.004) for i in range(2)]
    net.run(limit=60)
    for r in rs:
        assert net.outcome(r) == "completed"
        net.check_disk(r)
    stats = [r.session.stats for r in rs]
    # the partial bound was hit: partials held as fragments alone, or dropped
    assert sum(s["partials_dropped"] + s["partials_compacted"] for s in stats) > 0
    assert sum(s.get("backlog_drops", 0) for s in stats) > 0


def test_a_receiver_that_joined_and_failed_still_counts_toward_min_receivers() -> None:
    net = SimNet(26, make_image(random.Random(26), blocks=4), min_receivers=3)
    rs = [net.add_receiver("r0"), net.add_receiver("r1", at=0.3), net.add_receiver("r2")]
    net.at(0.05, lambda: rs[2].session.fail(net.now, "target too small"))  # before the start
    net.run(limit=30)
    assert _sender_events(net, ev.TransferStarted) == [ev.TransferStarted(2)]
    assert net.sender.finished
    assert [net.outcome(r) for r in rs[:2]] == ["completed", "completed"]
    assert _ended(net).outcome == "partial"


@pytest.mark.parametrize("lag", [0.05, 0.8, 2.0])
def test_receivers_reading_late_get_no_duplicates(lag: float) -> None:
    """A receiver whose STATUS lags (a busy CPU, a deep socket buffer) is not sent again
    what it simply has not read yet: STATUS and NAK say how far it has read (§4.2)."""
    config = EngineConfig(auto_rate=False, rate_bps=20_000_000, receiver_timeout=10.0)
    net = SimNet(27, make_image(random.Random(27), blocks=40), config, min_receivers=3)
    late = Link(delay=lag)
    rs = [net.add_receiver(f"r{i}", link=late) for i in range(3)]
    net.run(limit=60)
    for r in rs:
        assert net.outcome(r) == "completed"
        assert r.session.stats["duplicates"] == 0
    assert net.sender.stats.get("resweep_datagrams", 0) == 0


def test_the_transfer_starts_on_the_join_that_completes_the_group_not_a_poll_later() -> None:
    image = make_image(random.Random(31), blocks=4)
    config = EngineConfig()
    sender = make_sender(image, config, min_receivers=1)
    receiver = ReceiverSession(key=KEY, config=config, now=0.0, rng=random.Random(2))
    for t in sender.datagrams_to_send(0.0):  # the first ANNOUNCE
        receiver.receive_datagram(t.data, ("10.0.0.1", 9000), 0.0)
    (join,) = receiver.datagrams_to_send(0.001)
    sender.receive_datagram(join.data, ("10.0.0.2", 9000), 0.001)  # before the next poll
    assert sender.state is SenderState.TRANSFERRING
    events = []
    while (e := sender.next_event()) is not None:
        events.append(e)
    assert ev.TransferStarted(1) in events


def test_when_the_sweep_runs_dry_an_announce_follows_at_once() -> None:
    # A receiver that lost our last datagrams only learns it read past them from a later
    # seq; the periodic ANNOUNCE (0.5 s) would make every tail loss cost that long.
    image = make_image(random.Random(32), blocks=3)
    config = EngineConfig(auto_rate=False)
    sender = make_sender(image, config)
    receiver = ReceiverSession(key=KEY, config=config, now=0.0, rng=random.Random(2))
    for t in sender.datagrams_to_send(0.0):
        receiver.receive_datagram(t.data, ("10.0.0.1", 9000), 0.0)
    (join,) = receiver.datagrams_to_send(0.0)
    sender.receive_datagram(join.data, ("10.0.0.2", 9000), 0.0)
    now = 0.001
    while any(t.count > 1 for t in sender.datagrams_to_send(now)):
        now += 0.001
    timer = sender.get_timer()
    assert timer is not None and timer <= now + 0.011
    types = [t.data[3] for t in sender.datagrams_to_send(timer)]
    assert wire.PacketType.ANNOUNCE in types
