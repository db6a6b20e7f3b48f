"""What the target already holds: hash its blocks against the manifest, at disk speed.

Delta re-imaging and resume both start here (docs/TRANSFER.md "Resume, delta, catch-up"):
``scan_disk(path, manifest)`` reads every DATA and ZERO block of the image's extent on the
target and returns a ``DiskHolding``: a DATA block is held when the SHA-256 of its raw
content equals the manifest's digest; a ZERO block is held when it already reads as zeros
(it need not be zeroed again). UNUSED blocks are never read. A block counts as held only
after that check, so a half-written or stale block is always transferred again.

Speed: one reader reads the extents of interesting blocks (runs of up to ``chunk_bytes``)
in disk order with large ``os.preadv`` calls into ``threads + 1`` buffers allocated once,
and ``threads`` hashers check them in place (``os.preadv`` and ``hashlib`` release the GIL,
so reading and hashing overlap). Memory is ``(threads + 1) * chunk_bytes`` whatever the
disk size. After reading, the pages are dropped from the page cache (the boot image runs
from RAM).

Blocking: run ``scan_disk`` off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from protocol.manifest import HASH_SIZE, BlockKind, Manifest, ManifestError

#: Bytes per read (4 blocks of 1 MiB); one reader, ``threads + 1`` buffers in flight.
DEFAULT_CHUNK = 4 << 20
#: Hashing threads: SHA-256 runs at ~1.8 GB/s per core here, so two outrun most disks.
DEFAULT_THREADS = min(4, os.cpu_count() or 2)
#: How often (bytes scanned) the progress callback is called at most.
PROGRESS_STEP = 64 << 20

_DATA, _ZERO = int(BlockKind.DATA), int(BlockKind.ZERO)


class ScanError(Exception):
    """The target could not be read for the delta scan; the message says why."""


@dataclass
class DiskHolding:
    """Which of an image's blocks a target already holds, verified by content.

    ``held[i]`` is 1 when block ``i`` is a DATA block whose content hashes to the
    manifest's digest, or a ZERO block that already reads as zeros; else 0.
    """

    manifest: Manifest
    held: bytearray
    digest: bytes = b""  #: the manifest's digest: the holding is only valid for that image
    data_blocks: int = 0  #: DATA blocks held
    data_bytes: int = 0  #: raw bytes of the DATA blocks held
    zero_blocks: int = 0  #: ZERO blocks already zero
    scanned_bytes: int = 0  #: bytes read from the target
    seconds: float = 0.0  #: wall time of the scan

    @classmethod
    def nothing(cls, manifest: Manifest) -> DiskHolding:
        """A blank holding: every block is to be transferred or zeroed."""
        return cls(manifest, bytearray(manifest.block_count), manifest.digest())

    def have_data(self) -> list[int]:
        """The DATA blocks held, ascending: what to declare to the sender."""
        kinds, held = self.manifest.kinds, self.held
        return [i for i in range(len(kinds)) if held[i] and kinds[i] == _DATA]

    def missing_data(self) -> list[int]:
        """The DATA blocks not held, ascending: what must still come."""
        kinds, held = self.manifest.kinds, self.held
        return [i for i in range(len(kinds)) if not held[i] and kinds[i] == _DATA]

    def writing_manifest(self) -> Manifest:
        """The manifest with every held ZERO block turned UNUSED (nothing to write there).

        For the write pipeline only: it zeroes the ZERO blocks it finds, so a ZERO block
        that already reads as zeros is not zeroed again. Shares the digest and size arrays.
        """
        kinds = bytearray(self.manifest.kinds)
        for i in range(len(kinds)):
            if kinds[i] == _ZERO and self.held[i]:
                kinds[i] = BlockKind.UNUSED
        return dataclasses.replace(self.manifest, kinds=kinds)

    def mismatch(self, manifest_bytes: bytes) -> str:
        """Why a session announcing ``manifest_bytes`` cannot use this holding, or ""."""
        if hashlib.sha256(manifest_bytes).digest() == self.digest:
            return ""
        return (
            "the session's image is not the one the target was checked against (its manifest "
            "digest differs); run again without delta, or with the session's manifest"
        )

    def summary(self) -> dict[str, float | int]:
        """Counters for the receiver's stats and the agent's reports."""
        rate = self.scanned_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return {
            "held_blocks": self.data_blocks,
            "held_bytes": self.data_bytes,
            "held_zero_blocks": self.zero_blocks,
            "scanned_bytes": self.scanned_bytes,
            "scan_seconds": round(self.seconds, 3),
            "scan_mb_s": round(rate, 1),
        }


def scan_disk(
    path: str | os.PathLike[str],
    manifest: Manifest,
    *,
    threads: int = DEFAULT_THREADS,
    chunk_bytes: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> DiskHolding:
    """Hash what ``path`` holds against ``manifest``; see the module docstring.

    A missing target holds nothing. ``progress(bytes_scanned)`` is called from the scanning
    threads now and then. Raises ScanError when the target exists but cannot be read.
    """
    started = time.monotonic()
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return DiskHolding.nothing(manifest)
    except OSError as exc:
        raise ScanError(f"cannot read target {path} to find held blocks: {exc.strerror}") from None
    try:
        scan = _Scan(fd, manifest, max(chunk_bytes, manifest.block_size), progress)
        _fadvise(fd, 0, 0, _SEQUENTIAL)
        scan.run(max(1, threads))
    finally:
        os.close(fd)
    if scan.error is not None:
        raise ScanError(f"reading target {path} failed: {scan.error}")
    holding = scan.holding
    holding.seconds = time.monotonic() - started
    return holding


class _Scan:
    """The shared state of one scan: the result and the first error."""

    def __init__(
        self,
        fd: int,
        manifest: Manifest,
        chunk_bytes: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.fd = fd
        self.manifest = manifest
        self.holding = DiskHolding.nothing(manifest)
        self.error: str | None = None
        self._per_read = max(1, chunk_bytes // manifest.block_size)
        self._extents = _extents(manifest, self._per_read)
        self._lock = threading.Lock()  # guards the counters and ``error``
        self._progress = progress
        self._reported = 0
        bs = manifest.block_size
        self._zeros = {bs: bytes(bs)}
        last = manifest.block_length(manifest.block_count - 1)
        self._zeros.setdefault(last, bytes(last))

    def run(self, threads: int) -> None:
        """One reader (this thread) reads the extents in order into ``threads + 1`` buffers;
        ``threads`` hashers check them. One sequential stream keeps the kernel's readahead
        working (interleaved reads of several threads on one descriptor defeat it)."""
        size = self._per_read * self.manifest.block_size
        free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(threads + 1):
            free.put(bytearray(size))
        work: queue.Queue[tuple[bytearray, int, int, int] | None] = queue.Queue()
        hashers = [
            threading.Thread(target=self._hasher, args=(work, free), name=f"fleetcast-scan-{k}")
            for k in range(threads)
        ]
        for h in hashers:
            h.start()
        try:
            for first, count in self._extents:
                buf = free.get()
                if self.error is not None:
                    break
                work.put((buf, first, count, self._read(memoryview(buf), first, count)))
        except OSError as exc:
            self._fail(str(exc.strerror or exc))
        finally:
            for _ in hashers:
                work.put(None)
            for h in hashers:
                h.join()

    def _hasher(
        self,
        work: queue.Queue[tuple[bytearray, int, int, int] | None],
        free: queue.Queue[bytearray],
    ) -> None:
        while (item := work.get()) is not None:
            buf, first, count, got = item
            try:
                self._check(buf, memoryview(buf), first, count, got)
            except Exception as exc:  # a bug must end the scan with a reason, not hang it
                self._fail(f"internal error while hashing: {exc!r}")
            free.put(buf)

    def _fail(self, why: str) -> None:
        with self._lock:
            self.error = self.error or why

    def _read(self, view: memoryview, first: int, count: int) -> int:
        """Read blocks [first, first+count) into ``view``; returns the bytes read (EOF short)."""
        m = self.manifest
        offset = first * m.block_size
        want = min(count * m.block_size, m.image_size - offset)
        done = 0
        while done < want:
            n = os.preadv(self.fd, [view[done:want]], offset + done)
            if n == 0:
                break  # a target shorter than the image: the rest is not held
            done += n
        _fadvise(self.fd, offset, want, _DONTNEED)
        return done

    def _check(self, buf: bytearray, view: memoryview, first: int, count: int, got: int) -> None:
        m = self.manifest
        bs, kinds, digests = m.block_size, m.kinds, m.digests
        held = self.holding.held
        data_blocks = data_bytes = zero_blocks = 0
        for k in range(count):
            i = first + k
            start = k * bs
            length = m.block_length(i)
            if start + length > got:
                break
            kind = kinds[i]
            if kind == _DATA:
                d = hashlib.sha256(view[start : start + length]).digest()
                if d == digests[i * HASH_SIZE : (i + 1) * HASH_SIZE]:
                    held[i] = 1
                    data_blocks += 1
                    data_bytes += length
            elif kind == _ZERO and buf.startswith(self._zeros[length], start):
                held[i] = 1  # bytearray.startswith is a memcmp: ~70 GB/s, hashing is ~2
                zero_blocks += 1
        with self._lock:
            h = self.holding
            h.data_blocks += data_blocks
            h.data_bytes += data_bytes
            h.zero_blocks += zero_blocks
            h.scanned_bytes += got
            report = h.scanned_bytes - self._reported >= PROGRESS_STEP
            if report:
                self._reported = h.scanned_bytes
        if report and self._progress is not None:
            self._progress(self._reported)


def _extents(manifest: Manifest, per_read: int) -> Iterator[tuple[int, int]]:
    """(first block, count) runs of consecutive DATA/ZERO blocks, at most ``per_read`` long."""
    kinds = manifest.kinds
    n = len(kinds)
    i = 0
    while i < n:
        if kinds[i] not in (_DATA, _ZERO):
            i += 1
            continue
        j = i
        while j < n and j - i < per_read and kinds[j] in (_DATA, _ZERO):
            j += 1
        yield i, j - i
        i = j


# -- page cache hints ---------------------------------------------------------------------

_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def _fadvise(fd: int, offset: int, length: int, advice: int | None) -> None:
    if advice is None:
        return
    with contextlib.suppress(OSError):  # a hint only
        os.posix_fadvise(fd, offset, length, advice)


# -- the receive command's use ----------------------------------------------------------------

DELTA_MODES = ("auto", "always", "never")


def load_manifest_file(path: str | os.PathLike[str]) -> Manifest:
    """The manifest in ``path`` (canonical JSON); raises ScanError saying what is wrong."""
    try:
        with open(path, "rb") as f:
            return Manifest.from_bytes(f.read())
    except OSError as exc:
        raise ScanError(f"cannot read manifest file {path}: {exc.strerror}") from None
    except ManifestError as exc:
        raise ScanError(f"{path} is not a fleetcast manifest: {exc}") from None


def wants_scan(target: str | os.PathLike[str], mode: str) -> bool:
    """Whether delta ``mode`` means hashing ``target``: "auto" scans a target holding data."""
    if mode not in DELTA_MODES:
        raise ValueError(f"delta mode {mode!r} is not one of {', '.join(DELTA_MODES)}")
    if mode != "auto":
        return mode == "always"
    try:
        st = os.stat(target)
    except OSError:
        return False  # nothing there yet: nothing to spare
    return stat.S_ISBLK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_blocks > 0)


def receive_holding(
    target: str,
    manifest_file: str | None,
    mode: str,
    *,
    say: Callable[[str], None] = lambda line: None,
) -> DiskHolding | None:
    """``fleetcast receive --delta MODE --manifest FILE``: the target's holding, or None.

    The manifest must be known before joining (the JOIN carries the held blocks), so delta
    needs the image's manifest file; "auto" without one, or with a blank target, is a full
    receive. Raises ScanError for "always" without a manifest, or an unreadable file.
    """
    if mode == "never" or (manifest_file is None and mode == "auto"):
        return None
    if manifest_file is None:
        raise ScanError(
            "--delta always needs the image's manifest (--manifest FILE, e.g. "
            "$FLEETCAST_DATA/images/manifests/NAME.json on the server)"
        )
    manifest = load_manifest_file(manifest_file)
    if not wants_scan(target, mode):
        return None
    holding = scan_disk(target, manifest)
    s = holding.summary()
    say(
        f"target {target} holds {holding.data_blocks} of {manifest.count(BlockKind.DATA)} "
        f"data blocks ({holding.data_bytes / (1 << 20):.1f} MiB) and "
        f"{holding.zero_blocks} zero blocks; hashed {holding.scanned_bytes / (1 << 20):.0f} "
        f"MiB in {holding.seconds:.1f} s ({s['scan_mb_s']} MB/s)"
    )
    return holding
