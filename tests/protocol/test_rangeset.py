"""RangeSet behaves like a set of integers, held as merged ranges."""

from __future__ import annotations

import random

import pytest

from protocol.rangeset import RangeSet


@pytest.mark.parametrize("seed", range(30))
def test_random_operations_match_a_python_set(seed: int) -> None:
    rng = random.Random(seed)
    rs, ref = RangeSet(), set[int]()
    for _ in range(300):
        a = rng.randrange(200)
        b = a + rng.randrange(1, 20)
        op = rng.random()
        if op < 0.45:
            rs.add(a, b)
            ref |= set(range(a, b))
        elif op < 0.8:
            rs.discard(a, b)
            ref -= set(range(a, b))
        else:
            keep = [(s, s + rng.randrange(1, 5)) for s in sorted(rng.sample(range(a, b + 10), 3))]
            merged = RangeSet(keep)
            rs.replace_span(a, b, merged)
            ref = (ref - set(range(a, b))) | {
                v for s, e in merged for v in range(s, e) if a <= v < b
            }
        assert len(rs) == len(ref)
        assert {v for s, e in rs for v in range(s, e)} == ref
        starts = [s for s, _ in rs]
        ends = [e for _, e in rs]
        assert all(e < s for e, s in zip(ends, starts[1:], strict=False)), "ranges must not touch"
        probe = rng.randrange(230)
        assert (probe in rs) == (probe in ref)
        assert rs.next_at_or_after(probe) == min((v for v in ref if v >= probe), default=None)


def test_intersection_difference_and_from_values() -> None:
    a = RangeSet.from_values([1, 2, 3, 7, 8, 20])
    b = RangeSet([(2, 8), (19, 30)])
    assert list(a) == [(1, 4), (7, 9), (20, 21)]
    assert list(a.intersection(b)) == [(2, 4), (7, 8), (20, 21)]
    assert list(a.difference(b)) == [(1, 2), (8, 9)]
    assert a.ranges_from(3) == [(3, 4), (7, 9), (20, 21)]
    assert len(RangeSet()) == 0 and not RangeSet() and RangeSet([(5, 6)])
