"""Capture: read a raw disk (file or block device) into the store as a new image.

One reader thread (the caller's) walks the disk block by block in order: blocks no
filesystem uses are not read at all (``unused``), holes and all-zero blocks become
``zero``, and what is left is masked (unused filesystem blocks inside it read as zeros)
and handed to a small thread pool that hashes, compresses and stores it. A semaphore
bounds the blocks in flight, so memory stays flat whatever the disk size. The reader also
feeds the whole-image SHA-256 in order. The manifest is added last (docs/FORMAT.md §5).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol.codec import (
    DEFAULT_LEVEL,
    MAX_LEVEL,
    MIN_LEVEL,
    block_digest,
    compress_block,
    is_zero,
)
from protocol.manifest import DEFAULT_BLOCK_SIZE, BlockKind, Manifest, ManifestError, Partition
from protocol.partitions import FS_PROBE_BYTES, detect_filesystem, parse_partition_table
from server.images.progress import Progress
from server.images.source import Source, SourceError, open_source
from server.images.store import (
    ImageExists,
    ImageStore,
    StoreError,
    check_name,
    is_disk_full,
)
from server.images.usedmap import (
    UsedMapUnavailable,
    UsedRanges,
    partition_device,
    partition_used,
    with_edges,
)

log = logging.getLogger(__name__)
Warn = Callable[[str], None]


class CaptureError(StoreError):
    """The capture failed; the store is as it was before it started."""


@dataclass
class CaptureOptions:
    level: int = DEFAULT_LEVEL
    #: True/None: skip what filesystems do not use wherever the map can be taken;
    #: False: keep every block (``--all-blocks``).
    used_only: bool | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    threads: int = 0  #: 0: one per CPU plus two (to overlap each block file's fsync)
    progress: bool | None = None  #: None: only when stderr is a terminal
    source_info: dict[str, Any] = field(default_factory=dict)  #: merged into manifest.source
    label: str = ""  #: what the progress bar calls the source (default: its file name)


@dataclass(frozen=True)
class CaptureResult:
    name: str
    digest: bytes
    manifest: Manifest
    new_blocks: int  #: blocks this capture added to the store (the rest were deduplicated)
    new_bytes: int
    seconds: float


def capture_image(
    store: ImageStore,
    name: str,
    source: Path,
    options: CaptureOptions | None = None,
    warn: Warn = log.warning,
) -> CaptureResult:
    """Capture ``source`` as image ``name``; raise a StoreError subclass on any failure."""
    opts = options or CaptureOptions()
    check_name(name)
    if not MIN_LEVEL <= opts.level <= MAX_LEVEL:
        raise CaptureError(f"compression level {opts.level} must be {MIN_LEVEL}..{MAX_LEVEL}")
    if store.exists(name):
        raise ImageExists(
            f"an image named {name!r} already exists; pick another name or delete it first"
        )
    started = time.monotonic()
    try:
        with open_source(source) as src:
            manifest = _new_manifest(src, opts)
            used = _analyse(src, manifest, opts.used_only is not False, warn)
            pipe = _Pipeline(store, src, manifest, used, opts)
            failure: BaseException | None = None
            with store.writing():
                try:
                    manifest.image_sha256 = pipe.run()
                    digest = store.add_image(name, manifest)
                except BaseException as exc:
                    failure = exc
            if failure is not None:  # roll back once our own shared lock is released
                if not store.discard_blocks(pipe.new_digests):
                    warn("store busy: blocks of the failed capture are left for 'image gc'")
                err = _as_capture_error(failure, store)
                if err is failure:
                    raise failure
                raise err from None
    except SourceError as exc:
        raise CaptureError(str(exc)) from None
    except ManifestError as exc:
        raise CaptureError(f"{source}: {exc}") from None
    return CaptureResult(
        name, digest, manifest, len(pipe.new_digests), pipe.new_bytes, time.monotonic() - started
    )


def _as_capture_error(exc: BaseException, store: ImageStore) -> BaseException:
    if is_disk_full(exc):
        return CaptureError(
            f"disk full while writing to the image store {store.root}: "
            "free some space (or delete images) and capture again"
        )
    if isinstance(exc, OSError) and not isinstance(exc, StoreError):
        where = f" ({exc.filename})" if exc.filename else ""
        return CaptureError(f"capture failed: {exc.strerror or exc}{where}")
    return exc


def _new_manifest(src: Source, opts: CaptureOptions) -> Manifest:
    m = Manifest.empty(src.size, opts.block_size)
    m.created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    m.source = {**src.describe(), **opts.source_info}
    m.compression = {"algo": "zstd", "level": opts.level}
    return m


def _analyse(src: Source, manifest: Manifest, used_only: bool, warn: Warn) -> UsedRanges:
    """Fill in the partition table and filesystems; return the ranges worth keeping."""
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
                with partition_device(src.path, start, size) as dev:
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


class _Pipeline:
    """Reads blocks in order on the caller's thread; hashes/compresses/stores in a pool."""

    def __init__(
        self,
        store: ImageStore,
        src: Source,
        manifest: Manifest,
        used: UsedRanges,
        opts: CaptureOptions,
    ) -> None:
        self.store, self.src, self.manifest, self.used = store, src, manifest, used
        self.level = opts.level
        self.threads = opts.threads or (os.cpu_count() or 2) + 2
        self.slots = threading.BoundedSemaphore(2 * self.threads + 2)
        label = opts.label or src.path.name
        self.progress = Progress(f"capture {label}", src.size, enabled=opts.progress)
        self.new_digests: set[bytes] = set()
        self.new_bytes = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._zeros = memoryview(bytes(manifest.block_size))
        self._next_data = 0  # regular files: where the next non-hole data starts

    def run(self) -> bytes:
        """Process every block; return the whole-image SHA-256. Raises the first error."""
        image_hash = hashlib.sha256()
        try:
            self._walk(image_hash)
        except BaseException:
            self.progress.abort()
            raise
        if self.errors:
            self.progress.abort()
            raise self.errors[0]
        self.progress.finish()
        return image_hash.digest()

    def _walk(self, image_hash: hashlib._Hash) -> None:
        """Read every block in order, feed the image hash, hand data blocks to the pool."""
        m = self.manifest
        with ThreadPoolExecutor(self.threads, thread_name_prefix="capture") as pool:
            for i in range(m.block_count):
                if self.errors:
                    break
                offset, length = i * m.block_size, m.block_length(i)
                buf = self._read(offset, length)
                if buf is None:
                    m.set_kind(i, BlockKind.UNUSED)
                    image_hash.update(self._zeros[:length])
                elif buf is self._zeros or is_zero(buf):
                    m.set_kind(i, BlockKind.ZERO)
                    image_hash.update(self._zeros[:length])
                else:
                    image_hash.update(buf)
                    self.slots.acquire()
                    pool.submit(self._store_block, i, buf)
                self.progress.update(offset + length)

    def _read(self, offset: int, length: int) -> bytearray | memoryview | None:
        """The block with unused ranges zeroed; None if wholly unused; _zeros for a hole."""
        ranges = self.used.within(offset, offset + length)
        if not ranges:
            return None
        if not self.src.is_block and self._is_hole(offset, length):
            return self._zeros
        buf = bytearray(length)
        got = os.preadv(self.src.fd, [buf], offset)
        if got != length:
            raise CaptureError(
                f"{self.src.path}: short read at offset {offset} "
                f"({got} of {length} bytes): did the source shrink?"
            )
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

    def _store_block(self, index: int, buf: bytearray | memoryview) -> None:
        try:
            digest = block_digest(buf)
            stored = self.store.stored_size(digest)
            if stored is None:  # not in the store yet: compress and write it
                payload = compress_block(buf, self.level)
                stored = len(payload)
                if self.store.put_block(digest, payload):
                    with self._lock:
                        self.new_digests.add(digest)
                        self.new_bytes += stored
            self.manifest.set_data(index, digest, stored)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.slots.release()
