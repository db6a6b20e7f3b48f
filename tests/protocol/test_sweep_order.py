"""The sender's send queue (PROTOCOL.md §4.2): what a NAK does to it."""

from __future__ import annotations

import random
from collections import Counter

from simnet import KEY, make_image

from protocol.config import EngineConfig
from protocol.manifest import BlockKind
from protocol.rangeset import RangeSet
from protocol.scheduler import Need, Scheduler


def _swept_once() -> tuple[Scheduler, Counter[str], int]:
    """A scheduler that swept block 0 once; returns it, its counters and the last seq."""
    image = make_image(random.Random(51), blocks=3)
    numbered = [0]

    def next_seq(n: int) -> int:
        numbered[0] += n
        return numbered[0] - n

    counts: Counter[str] = Counter()
    sched = Scheduler(
        key=KEY,
        header=(1, 0, 2, 0),
        manifest=image.manifest,
        manifest_bytes=image.manifest_bytes,
        read_block=image.stored.__getitem__,
        config=EngineConfig(gso_max_segments=4),  # small bursts: objects span several
        next_seq=next_seq,
        counts=counts,
    )
    first = min(image.stored)
    assert first == 0
    sched._queue_object(first, range(sched.fragments(first)), 0)
    sched.last_sent[first] = 0.0
    while sched.pending:
        sched.pop_transmit()
    return sched, counts, numbered[0] - 1


def test_a_nak_from_a_receiver_that_has_not_read_the_whole_sweep_is_ignored() -> None:
    sched, counts, last = _swept_once()
    sched.add_repair(0, 0b101, now=0.01, low=False, seen=last - 3)
    assert sched.repairs == {} and counts["naks_early"] == 1


def test_a_nak_after_the_receiver_read_past_the_sweep_queues_the_repair() -> None:
    sched, counts, last = _swept_once()
    sched.add_repair(0, 0b101, now=0.01, low=False, seen=last)
    assert sched.repairs == {0: 0b101} and counts["naks_early"] == 0


def test_a_nak_for_the_object_being_swept_right_now_is_ignored() -> None:
    sched, counts, last = _swept_once()
    data = [i for i, k in enumerate(sched.manifest.kinds) if k == BlockKind.DATA]
    big = max(data, key=sched.fragments)
    assert sched.fragments(big) > sched._config.segments_per_transmit  # two bursts at least
    sched._queue_object(big, range(sched.fragments(big)), 0)
    sched._sweeping = big  # as fill() leaves it: bursts queued, not all packed
    sched.pop_transmit()
    sched.add_repair(big, 0b11, now=0.02, low=False, seen=last + 50)
    assert sched.repairs == {} and counts["naks_early"] == 1
    while sched.pending:
        sched.pop_transmit()
    assert sched._sweeping is None


def test_an_object_repaired_just_now_is_not_swept_again_within_the_holdoff() -> None:
    # A whole-object repair (a NAK run, §4.3) may still be on its way when a STATUS that
    # crossed it reports the object missing: no second copy to the group on its heels.
    sched, _counts, last = _swept_once()
    need = Need(RangeSet([(0, 1)]), seen=last)
    holdoff = sched._config.sweep_holdoff
    sched.add_repair(0, (1 << sched.fragments(0)) - 1, now=5.0, low=False, seen=last)
    assert sched.fill(5.0, True, [need])  # the repair
    while sched.pending:
        sched.pop_transmit()
    assert not sched.fill(5.0 + holdoff / 2, True, [need])
    assert sched.fill(5.0 + holdoff, True, [need])  # then the sweep may serve it again
