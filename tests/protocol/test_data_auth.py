"""§6.1: DATA is authenticated by the manifest's block hashes, tags only where needed.

An untagged DATA datagram costs no HMAC at either end; a forged or damaged one can spoil a
block's copy but never the disk (the hash refuses it), and the block then comes again in
tagged datagrams only. ``tag_data`` tags every DATA datagram, for networks where forgers
are expected.
"""

from __future__ import annotations

import random

from simnet import KEY, SESSION_ID, Link, SimNet, SimReceiver, make_image

from protocol import wire
from protocol.config import EngineConfig
from protocol.reassembly import UNTAGGED_SEQ_STEP, Meter


def _forge_block(net: SimNet, index: int, flags: int = 0) -> list[bytes]:
    """Well-formed DATA datagrams of the session for block ``index``, holding garbage."""
    size = len(net.image.stored[index])
    fp = net.config.fragment_payload
    frags = list(range(-(-size // fp)))
    header = (SESSION_ID, 0, net.sender._instance, 0)
    data = wire.pack_fragments(KEY, header, 1 << 20, index, bytes(size), frags, fp, flags)
    seg = wire.data_segment(fp, flags)
    return [data[i : i + seg] for i in range(0, len(data), seg)]


def _forge_at(net: SimNet, r: SimReceiver, index: int, times: list[float]) -> None:
    """Hand ``r`` a forged copy of block ``index`` at each of ``times``."""

    def inject() -> None:
        for d in _forge_block(net, index):
            r.session.receive_datagram(d, ("6.6.6.6", 1), net.now)

    for t in times:
        net.at(t, inject)


def _sent_data_flags(net: SimNet) -> list[int]:
    flags: list[int] = []
    orig = net._from_sender

    def spy(t: wire.Transmit) -> None:
        for i in range(0, len(t.data), t.segment_size):
            d = t.data[i : i + t.segment_size]
            if d[3] == wire.PacketType.DATA:
                flags.append(d[wire.DATA_HEADER.size - 2])
        orig(t)

    net._from_sender = spy  # type: ignore[method-assign]
    return flags


def test_blocks_go_untagged_and_manifest_chunks_tagged_by_default() -> None:
    net = SimNet(1, make_image(random.Random(1), blocks=6), min_receivers=1)
    flags = _sent_data_flags(net)
    r = net.add_receiver("r")
    net.run()
    assert net.outcome(r) == "completed"
    net.check_disk(r)
    tagged = [f for f in flags if f & wire.FLAG_TAGGED]
    assert 0 < len(tagged) < len(flags)  # the manifest chunk's datagrams only
    assert net.sender.stats.get("objects_tagged", 0) == 0


def test_a_forged_untagged_copy_fails_its_hash_and_the_block_comes_again_tagged() -> None:
    image = make_image(random.Random(2), blocks=6)
    config = EngineConfig(initial_rate_bps=50_000_000)  # still receiving at every injection
    net = SimNet(2, image, config, min_receivers=1)
    r = net.add_receiver("r")
    # the block swept last: the forgery arrives first
    _forge_at(net, r, max(image.raw), [0.003])
    net.run()
    assert net.outcome(r) == "completed"
    net.check_disk(r)  # the genuine bytes, never the forged ones
    st = r.session.stats
    assert st["untagged_blocks_failed"] == 1
    assert st["blocks_failed"] == 1
    assert st["auth_naks_sent"] >= 1
    assert net.sender.stats["objects_tagged"] == 1


def test_once_a_block_failed_untagged_its_untagged_datagrams_are_dropped() -> None:
    image = make_image(random.Random(3), blocks=6)
    config = EngineConfig(initial_rate_bps=50_000_000)
    net = SimNet(3, image, config, min_receivers=1)
    r = net.add_receiver("r")
    _forge_at(net, r, max(image.raw), [0.003 * k for k in range(1, 40)])  # it keeps trying
    net.run()
    assert net.outcome(r) == "completed"
    net.check_disk(r)
    st = r.session.stats
    assert st["untagged_blocks_failed"] == 1  # it could spoil one untagged copy, no more
    assert st["dropped"]["untagged"] > 0


def test_a_link_that_flips_bits_still_delivers_the_exact_image() -> None:
    image = make_image(random.Random(4), blocks=10)
    net = SimNet(4, image, min_receivers=3, down=Link(corrupt=0.002))
    rs = [net.add_receiver(f"r{i}") for i in range(3)]
    net.run()
    for r in rs:
        assert net.outcome(r) == "completed"
        net.check_disk(r)
    failed = sum(r.session.stats.get("untagged_blocks_failed", 0) for r in rs)
    assert failed > 0  # corruption reached blocks, was caught by the hash, and repaired
    assert sum(r.session.stats.get("blocks_failed", 0) for r in rs) >= failed


def test_with_tag_data_every_datagram_is_tagged_and_untagged_ones_are_dropped() -> None:
    image = make_image(random.Random(5), blocks=6)
    config = EngineConfig(initial_rate_bps=50_000_000, tag_data=True)
    net = SimNet(5, image, config, min_receivers=1)
    flags = _sent_data_flags(net)
    r = net.add_receiver("r")
    _forge_at(net, r, max(image.raw), [0.003])
    net.run()
    assert net.outcome(r) == "completed"
    net.check_disk(r)
    assert flags and all(f & wire.FLAG_TAGGED for f in flags)
    st = r.session.stats
    assert st["dropped"]["untagged"] > 0
    assert st.get("untagged_blocks_failed", 0) == 0 and st.get("blocks_failed", 0) == 0


def test_untagged_datagrams_do_not_keep_a_receiver_of_a_dead_sender_waiting() -> None:
    image = make_image(random.Random(6), blocks=40)
    config = EngineConfig(auto_rate=False, rate_bps=5_000_000, sender_timeout=1.0)
    net = SimNet(6, image, config, min_receivers=1)
    r = net.add_receiver("r")
    forged = []

    def capture() -> None:
        forged.extend(_forge_block(net, max(image.raw)))

    def sender_dies() -> None:  # never runs or sends again
        net.sender.get_timer = lambda: None  # type: ignore[method-assign]
        net._from_sender = lambda t: None  # type: ignore[method-assign]

    def keep_forging() -> None:
        for d in forged:
            r.session.receive_datagram(d, ("6.6.6.6", 1), net.now)
        if net.now < 5.0:
            net.at(net.now + 0.05, keep_forging)

    net.at(0.01, capture)
    net.at(0.2, sender_dies)
    net.at(0.25, keep_forging)
    net.run(limit=10)
    assert net.outcome(r).startswith("aborted"), net.outcome(r)
    assert r.finished_at is not None and r.finished_at < 0.2 + 1.0 + 0.6


def test_an_untagged_seq_moves_the_loss_meter_a_bounded_step_only() -> None:
    meter = Meter(1000, 0.0)
    meter.seen_near(1000 + UNTAGGED_SEQ_STEP + 5, 1400)  # a forged leap: ignored
    assert meter.max_seq == 1000
    meter.seen_near(1010, 1400)
    assert meter.max_seq == 1010
    meter.seen(1010 + UNTAGGED_SEQ_STEP + 5, 1400)  # a tagged datagram may leap
    assert meter.max_seq == 1010 + UNTAGGED_SEQ_STEP + 5
