"""One receiver behind a port much slower than the others' (PROTOCOL.md §4.3, §5).

The others must not wait for it, and it must finish about when its port allows: every
fragment it gets is kept (a slow port gets a few fragments of every object while the others
run), the rate follows its port once it is alone, and its repairs keep the port busy.
Simulated time (tests/protocol/simnet.py): no wall-clock assertion.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from functools import cache

import pytest
from simnet import KEY, Image, Link, SimNet, SimReceiver, make_image

from protocol import wire
from protocol.config import FRAGMENT_OVERHEAD, EngineConfig
from protocol.pacing import Pacer
from protocol.reassembly import Reassembly

FAST_BPS = 400_000_000  #: the others' links, and the sender's own port
SLOW_BPS = 50_000_000  #: 8x slower, a small queue in front of it (a switch port)


@cache
def _image(seed: int) -> Image:
    return make_image(random.Random(seed), blocks=120, block_size=256 << 10)  # ~10 MB stored


def _config(image: Image) -> EngineConfig:
    # Memory for half the image's partial objects, as a 48 MiB bound is for a large image.
    return EngineConfig(
        auto_rate=True, rate_bps=FAST_BPS, max_partial_bytes=image.stored_bytes // 2
    )


def _run(
    seed: int, slow_port: bool, prepare: Callable[[SimNet], None] | None = None
) -> tuple[SimNet, list[SimReceiver], list[tuple[float, ...]]]:
    """Three receivers on fast links (and one behind the slow port); the sender's rate, its
    queue drops and datagrams sent, sampled every 50 ms. ``prepare`` sees the net first."""
    image = _image(seed)
    net = SimNet(seed, image, _config(image), min_receivers=4 if slow_port else 3)
    fast = Link(capacity_bps=FAST_BPS, buffer_bytes=1 << 20)
    rs = [net.add_receiver(f"f{i}", link=fast) for i in range(3)]
    if slow_port:
        rs.append(
            net.add_receiver("slow", link=Link(capacity_bps=SLOW_BPS, buffer_bytes=640 << 10))
        )
    samples: list[tuple[float, ...]] = []

    def sample() -> None:
        rate = net.sender.rate_bps or 0
        samples.append((net.now, rate, net.queue_drops, net.sent_to_group))
        if net.now < 30:
            net.at(net.now + 0.05, sample)

    net.at(0.0, sample)
    if prepare is not None:
        prepare(net)
    net.run(limit=60)
    return net, rs, samples


def _port_time(net: SimNet) -> float:
    """Seconds the slow port takes for one copy of the image as it goes on the wire."""
    datagrams = net.sender.stats["data_datagrams"]
    return (net.image.stored_bytes + datagrams * FRAGMENT_OVERHEAD) * 8 / SLOW_BPS


@pytest.mark.parametrize("seed", [4, 5])
def test_the_slow_one_gets_every_fragment_once_and_finishes_near_its_port_time(seed: int) -> None:
    net, (*fast, slow), _ = _run(seed, slow_port=True)
    for r in (*fast, slow):
        assert net.outcome(r) == "completed", (r.name, net.outcome(r))
        net.check_disk(r)
    stats = slow.session.stats
    # Nothing it received was thrown away and asked for again: no partial dropped for
    # memory, no block dropped for want of the manifest, one copy of every fragment.
    assert stats["partials_dropped"] == 0
    assert stats.get("backlog_drops", 0) == 0
    assert stats["fragments"] == net.sender.stats["data_datagrams"]
    assert stats["duplicates"] <= 0.02 * stats["fragments"]
    assert slow.finished_at is not None
    assert slow.finished_at <= 1.1 * _port_time(net)


@pytest.mark.parametrize("seed", [4, 5])
def test_the_others_finish_as_fast_as_without_the_slow_one(seed: int) -> None:
    _, alone, _ = _run(seed, slow_port=False)
    _, (*fast, _slow), _ = _run(seed, slow_port=True)
    before = max(r.finished_at or 0.0 for r in alone)
    assert max(r.finished_at or 1e9 for r in fast) <= 1.05 * before


@pytest.mark.parametrize("seed", [4, 5])
def test_the_others_read_few_of_the_slow_ones_repairs_while_they_finish(seed: int) -> None:
    """Its repairs and sweeps go at about the rate its port takes, not the group's: the
    others, reading 0.1 s late (a busy CPU, a deep socket buffer), still get them."""
    image = _image(seed)
    net = SimNet(seed, image, _config(image), min_receivers=4)
    late = Link(capacity_bps=FAST_BPS, buffer_bytes=1 << 20, delay=0.1)
    others = [net.add_receiver(f"f{i}", link=late) for i in range(3)]
    slow = net.add_receiver("slow", link=Link(capacity_bps=SLOW_BPS, buffer_bytes=640 << 10))
    net.run(limit=60)
    for r in (*others, slow):
        assert net.outcome(r) == "completed"
    for r in others:
        assert r.session.stats["duplicates"] <= 0.1 * r.session.stats["fragments"]
    assert slow.finished_at is not None and slow.finished_at <= 1.1 * _port_time(net)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_no_idle_announce_while_the_slow_ones_work_waits_for_its_pacer(seed: int) -> None:
    """IDLE says nothing is held back (§3.1): the slow one would take what it lacks for
    lost, and NAK as whole objects what is merely waiting for its pace."""
    idle_while_held: list[float] = []

    def spy_on_announces(net: SimNet) -> None:
        send = net._from_sender

        def spy(t: wire.Transmit) -> None:
            if t.data[3] == wire.PacketType.ANNOUNCE:
                _, body = wire.open_datagram(KEY, t.data)
                idle = wire.decode_announce(body).flags & wire.ANNOUNCE_IDLE
                members = net.sender._members.values()
                if idle and any(m.active and m.outlier and m.missing for m in members):
                    idle_while_held.append(net.now)
            send(t)

        net._from_sender = spy  # type: ignore[method-assign]

    net, rs, _ = _run(seed, slow_port=True, prepare=spy_on_announces)
    assert idle_while_held == []
    for r in rs:
        assert net.outcome(r) == "completed"


def test_once_alone_the_rate_follows_its_port_and_loss_at_the_port_stays_low() -> None:
    _, (*fast, slow), samples = _run(4, slow_port=True)
    others_done = max(r.finished_at or 0.0 for r in fast)
    assert slow.finished_at is not None
    alone = [s for s in samples if others_done + 0.5 <= s[0] <= slow.finished_at]
    assert len(alone) >= 10
    rates = [s[1] for s in alone]
    assert 0.8 * SLOW_BPS <= statistics.median(rates) <= 1.2 * SLOW_BPS
    assert max(rates) <= 1.5 * SLOW_BPS
    dropped = alone[-1][2] - alone[0][2]
    sent = alone[-1][3] - alone[0][3]
    assert dropped <= 0.05 * sent


def test_the_first_report_of_one_lossy_receiver_is_not_the_groups_rate() -> None:
    config = EngineConfig(auto_rate=True, initial_rate_bps=1_000_000_000)
    p = Pacer(config, 0.0)
    # One of four receiving members has reported so far: it is behind a slow port.
    p.adjust(0.1, [(0.85, 95_000_000, 0.05)], group=4)
    assert p.rate_bps is not None and p.rate_bps >= 1_000_000_000
    # Alone, its report is the group's: the rate goes to a little below what it got.
    p.adjust(0.2, [(0.85, 95_000_000, 0.05)], group=1)
    assert p.rate_bps is not None and 80_000_000 <= p.rate_bps <= 100_000_000


def _sprinkle(fp: int, sizes: list[int], share: float, rng: random.Random) -> list[tuple[int, int]]:
    return [
        (obj, f)
        for obj, size in enumerate(sizes)
        for f in range(-(-size // fp))
        if rng.random() < share
    ]


def test_partials_beyond_half_the_memory_bound_keep_their_fragments_not_a_buffer() -> None:
    """A quarter of the fragments of objects worth four times the bound: all are kept, the
    bound holds, and each object comes out byte for byte once its other fragments come."""
    config = EngineConfig(max_partial_bytes=1 << 20)
    objs = Reassembly(config)
    rng = random.Random(7)
    sizes = [rng.randint(100_000, 300_000) for _ in range(20)]
    contents = [rng.randbytes(n) for n in sizes]
    announce = wire.Announce(
        digest=bytes(32),
        manifest_size=100,
        block_count=len(sizes),
        data_blocks=len(sizes),
        block_size=1 << 20,
        payload_size=config.payload_size,
        state=wire.AnnounceState.TRANSFERRING,
        flags=0,
        rate_bps=0,
        data_bytes=sum(sizes),
    )
    objs.start(announce)
    fp = config.fragment_payload
    first = _sprinkle(fp, sizes, 0.25, rng)
    done: dict[int, bytes] = {}

    def feed(obj: int, f: int) -> None:
        data = memoryview(contents[obj])[f * fp : (f + 1) * fp]
        p = objs.fragment(obj, sizes[obj], f, data, 0.0)
        if p is not None:
            done[obj] = bytes(p.buf)
            objs.set_state(obj, 2)  # RECEIVED: what the receiver does with a complete one
        assert objs.partial_bytes <= config.max_partial_bytes

    for obj, f in first:
        feed(obj, f)
    assert objs.partials_dropped == 0 and len(objs.partials) == len(sizes)
    assert objs.fragments == len(first)
    for obj in range(len(sizes)):
        for f in objs.partials[obj].missing():
            feed(obj, f)
    assert objs.partials_dropped == 0 and not objs.partials
    assert done == dict(enumerate(contents))


def test_a_cpu_hiccup_of_the_slow_one_alone_costs_its_port_a_moment_not_seconds() -> None:
    p = Pacer(EngineConfig(auto_rate=True, initial_rate_bps=1_000_000_000), 0.0)
    p.adjust(0.3, [(0.85, 95_000_000, 0.0)])  # alone behind its port: cut to what it got
    known = p.rate_bps
    assert known is not None and 80_000_000 <= known <= 90_000_000
    p.adjust(1.0, [(0.0, 26_000_000, 0.4)])  # its CPU was busy: it read 26 Mbit, 0.4 s late
    assert p.rate_bps is not None and p.rate_bps < 30_000_000
    for i in range(3):  # it caught up: back to what its port took within a few steps
        p.adjust(1.5 + 0.1 * i, [(0.0, p.rate_bps, 0.0)])
    assert p.rate_bps >= known
    # past that, it probes gently (+2.5% per rate_interval), as after any loss cut
    before = p.rate_bps
    p.adjust(1.8, [(0.0, before, 0.0)])
    assert before < p.rate_bps <= before * 1.03


def test_a_mild_loss_of_the_little_we_sent_is_no_measure_of_its_port() -> None:
    p = Pacer(EngineConfig(auto_rate=True, initial_rate_bps=1_000_000_000), 0.0)
    # The group just shrank to it and we sent little: it got all of that but 7%.
    p.adjust(0.3, [(0.07, 72_000_000, 0.0)])
    assert p.rate_bps is not None and p.rate_bps >= 850_000_000
    # At our rate it loses most: what it got is what its port takes.
    p.adjust(0.9, [(0.8, 97_000_000, 0.0)])
    assert p.rate_bps is not None and 85_000_000 <= p.rate_bps <= 90_000_000
