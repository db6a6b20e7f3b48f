"""Used-range bookkeeping and partclone domain maps (docs/FORMAT.md §4)."""

from __future__ import annotations

from server.images.usedmap import EDGE_BYTES, UsedRanges, parse_domain_map, with_edges

MAP = """# Domain logfile created by unset_name v0.3.23
# Source: /dev/loop0
# Offset: 0x00100000
# current_pos  current_status
0x03F00000     ?
#      pos        size  status
0x00100000  0x007FE000  +
0x008FE000  0x00001000  ?
0x008FF000  0x00010000  +
garbage line
0x0090F000  0x0002C000  ?
"""


def test_domain_map_keeps_only_finished_ranges() -> None:
    assert parse_domain_map(MAP) == [(0x100000, 0x8FE000), (0x8FF000, 0x90F000)]


def test_replace_cuts_a_partition_down_to_its_used_ranges() -> None:
    r = UsedRanges.whole(100)
    r.replace(20, 80, [(25, 30), (50, 60), (79, 90)])
    assert list(zip(r.starts, r.ends, strict=True)) == [(0, 20), (25, 30), (50, 60), (79, 100)]
    assert r.total() == 20 + 5 + 10 + 21
    assert r.within(0, 10) == [(0, 10)]
    assert r.within(20, 40) == [(5, 10)]
    assert r.within(30, 50) == []
    assert r.within(55, 85) == [(0, 5), (24, 30)]


def test_edges_of_a_partition_are_always_kept() -> None:
    start, size = 1 << 20, 8 << 20
    ranges = with_edges([(start + (2 << 20), start + (3 << 20))], start, size)
    r = UsedRanges.whole(16 << 20)
    r.replace(start, start + size, ranges)
    assert r.within(start, start + EDGE_BYTES) == [(0, EDGE_BYTES)]
    end = start + size
    assert r.within(end - EDGE_BYTES, end) == [(0, EDGE_BYTES)]
    assert r.within(start + EDGE_BYTES, start + (2 << 20)) == []
