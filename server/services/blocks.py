"""Catch-up's data path: one stored block of a session's image over HTTP (issue 9).

``GET /api/agent/sessions/{sid}/blocks/{index}`` hands a machine the block's payload exactly
as the store keeps it (a zstd frame, or the raw bytes iff its length is the block's raw
length, docs/FORMAT.md), with ``X-Fleetcast-Digest`` (hex SHA-256 of the raw content, which
the agent verifies like a multicast block) and ``Range`` support so a dropped download
resumes. Only DATA blocks are stored: a ZERO or UNUSED block, or an index past the end, is
a clear 404.

The hot path per request: the caller's machine id and row come from the AgentCache, the
parsed manifest from ``BlockReader``'s small cache (checked against the manifest file's
inode and mtime, so a re-created image is never served from a stale manifest), a reader
lease (store.reading) only while the block file is opened — the open descriptor keeps the
file readable even if the image is deleted a moment later — and one ``pread`` into the
response body (the GIL is released during the read; no further copy until the socket).

The route first reads with ``nowait`` in the event loop: when RWF_NOWAIT probes find the
range's first and last bytes in the page cache (a catch-up of a session just sent mostly
is), one ``pread`` there; otherwise (WouldBlock) the read goes to a worker thread, so a cold
disk never stalls the loop. Measured over HTTP (docs/SERVER.md), the worker-thread path
costs the server ~1.4-1.6 ms of CPU per ~0.8 MB request and the cached path ~1.1-1.3 ms
(GIL hand-offs between the loop and the thread).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session as DbSession

from protocol.manifest import BlockKind, Manifest
from server.images.store import ImageNotFound, ImageStore, StoreError
from server.services.errors import Conflict, NotFound, ServiceError
from server.services.sessions import own_row

#: Parsed manifests kept per BlockReader (a catch-up serves a handful of images at once).
MANIFEST_CACHE = 16
#: A machine's right to a session's blocks is trusted this long (seconds) between looks
#: at the database, like the AgentCache's rows; at most GRANTS are kept.
GRANT_TTL = 30.0
GRANTS = 4096

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class WouldBlock(Exception):
    """The bytes are not (all) in the page cache: read them in a worker thread instead."""


class RangeNotSatisfiable(ServiceError):
    """A Range the block cannot satisfy (416); ``size`` goes into ``Content-Range: */size``."""

    status = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


@dataclass(frozen=True)
class BlockBody:
    """What the route sends: ``data`` is bytes ``start..end`` (inclusive) of a payload of
    ``size`` bytes; ``partial`` when a Range asked for it (206)."""

    data: bytes | memoryview
    digest_hex: str
    start: int
    end: int
    size: int
    partial: bool

    def headers(self) -> dict[str, str]:
        """Content-Type, X-Fleetcast-Digest, Accept-Ranges and, for a 206, Content-Range."""
        out = {
            "Content-Type": "application/octet-stream",
            "X-Fleetcast-Digest": self.digest_hex,
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-store",
        }
        if self.partial:
            out["Content-Range"] = f"bytes {self.start}-{self.end}/{self.size}"
        return out


def parse_range(header: str | None, size: int) -> tuple[int, int, bool]:
    """``(start, end, partial)`` for a ``Range`` header over ``size`` bytes (end inclusive).

    No header: the whole payload, not partial. ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n``
    (the last n bytes); ``b`` past the end is clipped (RFC 9110 §14.1.2). Raises
    RangeNotSatisfiable for a malformed range, several ranges, or a start past the end.
    """
    if header is None or not header.strip():
        return 0, size - 1, False
    m = _RANGE_RE.match(header)
    if m is None:
        raise RangeNotSatisfiable(
            f"Range {header[:80]!r} is not a single byte range: send bytes=START-END or "
            "bytes=START-",
            size,
        )
    first, last = m.group(1), m.group(2)
    if not first and not last:
        raise RangeNotSatisfiable("Range bytes=- names no byte: give a start or a length", size)
    if not first:  # a suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"Range {header!r} asks for no bytes of {size}", size)
        return max(0, size - n), size - 1, True
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(
            f"Range {header!r} is outside the block's {size} stored bytes "
            f"(valid: bytes=0-{size - 1})",
            size,
        )
    return start, min(end, size - 1), True


class BlockReader:
    """Reads blocks of the store's images for catch-up; thread-safe."""

    def __init__(self, store: ImageStore, cache_size: int = MANIFEST_CACHE) -> None:
        self.store = store
        self.cache_size = cache_size
        self._lock = threading.Lock()
        #: image name -> ((st_ino, st_mtime_ns, st_size), Manifest)
        self._manifests: OrderedDict[str, tuple[tuple[int, int, int], Manifest]] = OrderedDict()
        #: (session id, machine id) -> (image name, expiry on the monotonic clock)
        self._grants: dict[tuple[int, int], tuple[str, float]] = {}

    def granted(self, session_id: int, machine_id: int) -> str | None:
        """The image name of ``session_id`` if ``machine_id`` was recently found a target."""
        hit = self._grants.get((session_id, machine_id))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def grant(self, db: DbSession, session_id: int, machine_id: int) -> str:
        """Check in the database that ``machine_id`` is a target of ``session_id`` (Forbidden
        if not, NotFound without such a session) and remember it; returns the image name."""
        s, _row = own_row(db, machine_id, session_id)
        with self._lock:
            if len(self._grants) >= GRANTS:
                self._grants.clear()
            self._grants[(session_id, machine_id)] = (s.image_name, time.monotonic() + GRANT_TTL)
        return s.image_name

    def manifest(self, name: str) -> Manifest:
        """The parsed manifest of image ``name``; NotFound when the store has no such image,
        Conflict when its manifest is damaged."""
        try:
            st = os.stat(self.store.manifest_path(name))
        except FileNotFoundError:
            raise NotFound(f"image {name!r} is no longer in the store") from None
        except StoreError as exc:
            raise NotFound(str(exc)) from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._manifests.get(name)
            if hit is not None and hit[0] == key:
                self._manifests.move_to_end(name)
                return hit[1]
        try:
            _, manifest = self.store.load_manifest(name)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except StoreError as exc:
            raise Conflict(str(exc)) from None
        with self._lock:
            self._manifests[name] = (key, manifest)
            while len(self._manifests) > self.cache_size:
                self._manifests.popitem(last=False)
        return manifest

    def read(
        self, image_name: str, index: int, range_header: str | None = None, nowait: bool = False
    ) -> BlockBody:
        """Block ``index`` of ``image_name`` (its stored payload, or the asked range of it).

        Raises NotFound (no such image, index out of range, a ZERO/UNUSED block, a block
        missing from the store), RangeNotSatisfiable, Conflict (a damaged manifest), and
        with ``nowait`` WouldBlock when the bytes are not all in the page cache.
        """
        manifest = self.manifest(image_name)
        n = manifest.block_count
        if not 0 <= index < n:
            raise NotFound(
                f"block {index} is out of range: image {image_name!r} has {n} blocks (0..{n - 1})"
            )
        kind = manifest.kinds[index]
        if kind != BlockKind.DATA:
            what = "zero" if kind == BlockKind.ZERO else "unused"
            raise NotFound(
                f"block {index} of image {image_name!r} is a {what} block: nothing is stored "
                f"or sent for it ({'write zeros' if what == 'zero' else 'leave it as it is'})"
            )
        digest = manifest.digest_of(index)
        fd = self._open(image_name, index, digest)
        try:
            size = os.fstat(fd).st_size
            start, end, partial = parse_range(range_header, size)
            data = _pread_cached(fd, end - start + 1, start) if nowait else None
            if data is None and nowait:
                raise WouldBlock(f"block {index} of image {image_name!r} is not cached")
            if data is None:
                data = os.pread(fd, end - start + 1, start)
        finally:
            os.close(fd)
        if len(data) != end - start + 1:  # blocks are written whole and renamed: never short
            raise Conflict(f"block {index} of image {image_name!r} is shorter than its file")
        return BlockBody(data, digest.hex(), start, end, size, partial)

    def _open(self, image_name: str, index: int, digest: bytes) -> int:
        """Open the block's file under a reader lease; the descriptor outlives the lease."""
        try:
            with self.store.reading(image_name, holder="catch-up"):
                return os.open(self.store.block_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except FileNotFoundError:
            raise NotFound(
                f"block {index} of image {image_name!r} ({digest.hex()[:16]}...) is missing "
                "from the store: run 'fleetcast image verify' on the server"
            ) from None
        except StoreError as exc:  # a delete in progress held the lease too long
            raise Conflict(str(exc)) from None


def _pread_cached(fd: int, n: int, offset: int) -> bytes | None:
    """``n`` bytes at ``offset`` if the page cache holds them, else None, without waiting
    for the disk: the range's first and last bytes are probed with RWF_NOWAIT (a block
    file is written, and read ahead, whole), then read into a bytes object (None too
    where the filesystem does not support RWF_NOWAIT)."""
    probe = bytearray(1)
    try:
        for at in (offset, offset + n - 1):
            if os.preadv(fd, [probe], at, os.RWF_NOWAIT) != 1:
                return None
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP/EINVAL: no RWF_NOWAIT here
        return None
    return os.pread(fd, n, offset)


def reader_for(state: Any) -> BlockReader:
    """The app's BlockReader, made on first use (``state``: the app's state, with ``store``)."""
    reader = getattr(state, "block_reader", None)
    if not isinstance(reader, BlockReader):
        reader = state.block_reader = BlockReader(state.store)
    return reader
