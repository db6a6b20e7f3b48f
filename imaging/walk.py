"""Walking a disk into manifest blocks: the part of a capture both sides share.

``new_manifest`` starts the manifest of a source, ``analyse`` fills in its partition table
and filesystems and returns the byte ranges worth keeping (imaging/usedmap.py), and
``BlockWalker`` reads the disk in order, block by block: blocks no filesystem uses are not
read at all (``unused``), holes and all-zero blocks become ``zero``, and what is left is
masked (unused filesystem bytes inside it read as zeros) and handed to the caller, who
hashes, compresses and stores or uploads it. The walker also feeds the whole-image SHA-256.
The server's capture (server/images/capture.py) and the client's (client/capture.py) both
use exactly this, so the same disk gives the same manifest on either side.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from imaging.usedmap import (
    UsedMapUnavailable,
    UsedRanges,
    partition_device,
    partition_used,
    with_edges,
)
from protocol.codec import is_zero
from protocol.manifest import BlockKind, Manifest, Partition
from protocol.partitions import FS_PROBE_BYTES, detect_filesystem, parse_partition_table

Warn = Callable[[str], None]
OpenPartition = Callable[[Path, int, int], AbstractContextManager[Path]]


class DiskSource(Protocol):
    """An open, read-only disk: a raw image file or a block device."""

    @property
    def path(self) -> Path: ...
    @property
    def fd(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def is_block(self) -> bool: ...
    def read_at(self, offset: int, length: int) -> bytes: ...
    def describe(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class DiskFile:
    """A DiskSource over an open descriptor. Both captures describe their source with it, so
    the same disk gives the same manifest on either side (``describe`` is in the manifest)."""

    path: Path
    fd: int
    size: int
    is_block: bool

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def describe(self) -> dict[str, object]:
        return {
            "path": str(self.path.resolve()),
            "kind": "block device" if self.is_block else "raw file",
            "size": self.size,
        }


class ShortRead(Exception):
    """The disk returned fewer bytes than it has: it shrank, or a read failed quietly."""


def now_utc() -> str:
    """The ``created`` stamp of a manifest made now (ISO 8601 UTC, seconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_manifest(
    src: DiskSource,
    level: int,
    block_size: int,
    source_info: dict[str, Any] | None = None,
    created: str = "",
) -> Manifest:
    """An all-unused manifest of ``src`` with its metadata (``created`` defaults to now)."""
    m = Manifest.empty(src.size, block_size)
    m.created = created or now_utc()
    m.source = {**src.describe(), **(source_info or {})}
    m.compression = {"algo": "zstd", "level": level}
    return m


def analyse(
    src: DiskSource,
    manifest: Manifest,
    used_only: bool,
    warn: Warn,
    open_partition: OpenPartition = partition_device,
) -> UsedRanges:
    """Fill in the partition table and filesystems; return the ranges worth keeping.

    ``used_only`` False keeps every byte. A partition whose map cannot be taken is kept
    whole, with one ``warn`` line saying why (it costs space, never data).
    """
    table = parse_partition_table(src.read_at, src.size)
    manifest.partition_table = table.kind
    spans = [(p.number, p.start, p.size, p.type) for p in table.partitions]
    if table.kind == "none":
        spans = [(0, 0, src.size, "")]
    used = UsedRanges.whole(src.size)
    parts = []
    for number, start, size, ptype in spans:
        info = detect_filesystem(src.read_at(start, FS_PROBE_BYTES))
        if table.kind == "none" and not info.fs:
            break  # a disk with neither table nor filesystem: no partitions to list
        method, used_bytes = "all", info.used_bytes
        if used_only and info.fs:
            try:
                with open_partition(src.path, start, size) as dev:
                    ranges, method = partition_used(info.fs, dev, start)
                used.replace(start, start + size, with_edges(ranges, start, size))
                used_bytes = sum(min(e, start + size) - s for s, e in ranges)
            except UsedMapUnavailable as exc:
                warn(f"partition {number} ({info.fs}): keeping every block: {exc}")
        parts.append(
            Partition(
                number=number,
                start=start,
                size=size,
                type=ptype,
                fs=info.fs,
                label=info.label,
                uuid=info.uuid,
                used_map=method,
                used_bytes=used_bytes,
            )
        )
    manifest.partitions = parts
    return used


class BlockWalker:
    """Reads ``src`` block by block in order; marks zero/unused blocks in the manifest.

    Iterating yields ``(index, data)`` for every block: ``data`` is the block's masked raw
    bytes (a fresh bytearray the caller owns) for a data block, None for a block already
    marked ZERO or UNUSED. The caller records data blocks with ``manifest.set_data``.
    After the walk, ``image_sha256()`` is the whole-image hash the manifest carries.
    """

    def __init__(self, src: DiskSource, manifest: Manifest, used: UsedRanges) -> None:
        self.src, self.manifest, self.used = src, manifest, used
        self.position = 0  #: bytes of the disk walked so far
        self.read_bytes = 0  #: bytes actually read from the disk (used blocks, not holes)
        self.done_bytes = 0  #: bytes of the blocks walked so far that hold used bytes
        self._hash = hashlib.sha256()
        self._zeros = memoryview(bytes(manifest.block_size))
        self._next_data = 0  # regular files: where the next non-hole data starts

    def to_read(self) -> int:
        """Raw bytes of the blocks the walk will read (any used byte in them)."""
        m = self.manifest
        return sum(
            m.block_length(i)
            for i in range(m.block_count)
            if self.used.within(i * m.block_size, i * m.block_size + m.block_length(i))
        )

    def image_sha256(self) -> bytes:
        return self._hash.digest()

    def __iter__(self) -> Iterator[tuple[int, bytearray | None]]:
        m = self.manifest
        for i in range(m.block_count):
            offset, length = i * m.block_size, m.block_length(i)
            buf = self._read(offset, length)
            self.position = offset + length
            data: bytearray | None = None
            if buf is None:
                m.set_kind(i, BlockKind.UNUSED)
                self._hash.update(self._zeros[:length])
            elif buf is self._zeros or is_zero(buf):
                m.set_kind(i, BlockKind.ZERO)
                self._hash.update(self._zeros[:length])
            else:
                self._hash.update(buf)
                data = buf if isinstance(buf, bytearray) else bytearray(buf)
            yield i, data

    def _read(self, offset: int, length: int) -> bytearray | memoryview | None:
        """The block with unused ranges zeroed; None if wholly unused; _zeros for a hole."""
        ranges = self.used.within(offset, offset + length)
        if not ranges:
            return None
        self.done_bytes += length
        if not self.src.is_block and self._is_hole(offset, length):
            return self._zeros
        buf = bytearray(length)
        got = os.preadv(self.src.fd, [buf], offset)
        if got != length:
            raise ShortRead(
                f"{self.src.path}: short read at offset {offset} "
                f"({got} of {length} bytes): did the source shrink?"
            )
        self.read_bytes += length
        pos = 0
        for s, e in [*ranges, (length, length)]:
            if s > pos:
                buf[pos:s] = self._zeros[: s - pos]
            pos = e
        return buf

    def _is_hole(self, offset: int, length: int) -> bool:
        if self._next_data >= offset + length:
            return True
        if self._next_data > offset:
            return False
        try:
            self._next_data = os.lseek(self.src.fd, offset, os.SEEK_DATA)
        except OSError:
            self._next_data = self.src.size  # ENXIO: only holes from here on
        return self._next_data >= offset + length
