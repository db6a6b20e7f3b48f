"""Which bytes of a disk its filesystems use: now in imaging/usedmap.py (shared with the
client's capture); the names stay importable from here for the server's code and tests."""

from __future__ import annotations

from imaging.usedmap import (
    EDGE_BYTES,
    PARTCLONE_TIMEOUT,
    PARTCLONE_TOOLS,
    SWAP_HEADER_BYTES,
    UsedMapUnavailable,
    UsedRanges,
    parse_domain_map,
    partition_device,
    partition_used,
    with_edges,
)

__all__ = [
    "EDGE_BYTES",
    "PARTCLONE_TIMEOUT",
    "PARTCLONE_TOOLS",
    "SWAP_HEADER_BYTES",
    "UsedMapUnavailable",
    "UsedRanges",
    "parse_domain_map",
    "partition_device",
    "partition_used",
    "with_edges",
]
