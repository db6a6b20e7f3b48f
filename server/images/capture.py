"""Capture: read a raw disk (file or block device) into the store as a new image.

One reader thread (the caller's) walks the disk block by block in order: blocks no
filesystem uses are not read at all (``unused``), holes and all-zero blocks become
``zero``, and what is left is masked (unused filesystem blocks inside it read as zeros)
and handed to a small thread pool that hashes, compresses and stores it. A semaphore
bounds the blocks in flight, so memory stays flat whatever the disk size. The reader also
feeds the whole-image SHA-256 in order. The manifest is added last (docs/FORMAT.md §5).
The walk itself (partition table, used-block maps, zero detection) is imaging/walk.py,
shared with the client's network capture (client/capture.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaging.usedmap import UsedRanges, partition_device
from imaging.walk import BlockWalker, ShortRead, analyse, new_manifest
from protocol.codec import DEFAULT_LEVEL, MAX_LEVEL, MIN_LEVEL, block_digest, compress_block
from protocol.manifest import DEFAULT_BLOCK_SIZE, Manifest, ManifestError
from server.images.progress import Progress
from server.images.source import Source, SourceError, open_source
from server.images.store import (
    ImageExists,
    ImageStore,
    StoreError,
    check_name,
    is_disk_full,
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
    created: str = ""  #: the manifest's ``created`` stamp ("" = now)


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
    return new_manifest(src, opts.level, opts.block_size, opts.source_info, opts.created)


def _analyse(src: Source, manifest: Manifest, used_only: bool, warn: Warn) -> UsedRanges:
    """Fill in the partition table and filesystems; return the ranges worth keeping."""
    # partition_device is looked up here, at call time, so tests can replace it
    return analyse(src, manifest, used_only, warn, partition_device)


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

    def run(self) -> bytes:
        """Process every block; return the whole-image SHA-256. Raises the first error."""
        walker = BlockWalker(self.src, self.manifest, self.used)
        try:
            self._walk(walker)
        except ShortRead as exc:
            self.progress.abort()
            raise CaptureError(str(exc)) from None
        except BaseException:
            self.progress.abort()
            raise
        if self.errors:
            self.progress.abort()
            raise self.errors[0]
        self.progress.finish()
        return walker.image_sha256()

    def _walk(self, walker: BlockWalker) -> None:
        """Walk every block in order; hand data blocks to the pool."""
        with ThreadPoolExecutor(self.threads, thread_name_prefix="capture") as pool:
            for i, buf in walker:
                if self.errors:
                    break
                if buf is not None:
                    self.slots.acquire()
                    pool.submit(self._store_block, i, buf)
                self.progress.update(walker.position)

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
