"""Reading an image back out of the store: ``verify`` and ``export``.

Both walk the blocks in order with a bounded window of decodes running in a thread pool
(zstd and SHA-256 release the GIL), and both recompute the whole-image SHA-256 as they go
(``unused`` blocks count as zeros, docs/FORMAT.md §2).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from protocol.codec import BlockError, decode_block
from protocol.manifest import BlockKind, Manifest
from server.images.progress import Progress
from server.images.store import ImageStore, StoreError

#: Decodes in flight at once (each holds one payload and one raw block).
WINDOW = 8


class ExportError(StoreError):
    """The image could not be written out; the message says why."""


@dataclass(frozen=True)
class BlockProblem:
    index: int
    offset: int
    message: str


@dataclass(frozen=True)
class VerifyReport:
    name: str
    blocks_checked: int
    problems: list[BlockProblem]
    image_hash_ok: bool

    @property
    def ok(self) -> bool:
        return not self.problems and self.image_hash_ok


def _decode(store: ImageStore, m: Manifest, index: int) -> bytes:
    """Read, size-check and decode data block ``index``; BlockError on any damage."""
    digest = m.digest_of(index)
    try:
        payload = store.read_block(digest)
    except FileNotFoundError:
        raise BlockError(f"block file {store.block_path(digest)} is missing") from None
    except OSError as exc:
        raise BlockError(f"cannot read {store.block_path(digest)}: {exc.strerror}") from None
    if len(payload) != m.stored_sizes[index]:
        raise BlockError(
            f"block file {store.block_path(digest)} has {len(payload)} bytes, "
            f"the manifest says {m.stored_sizes[index]}"
        )
    try:
        return decode_block(payload, m.block_length(index), digest)
    except BlockError as exc:
        raise BlockError(f"block file {store.block_path(digest)}: {exc}") from None


def _blocks(
    store: ImageStore, m: Manifest, pool: ThreadPoolExecutor
) -> Iterator[tuple[int, bytes | BlockError | None]]:
    """Yield ``(index, raw)`` in order: raw bytes for data, None otherwise, or the error."""
    pending: deque[tuple[int, Future[bytes] | None]] = deque()
    i, n = 0, m.block_count
    while i < n or pending:
        while i < n and len(pending) < WINDOW:
            kind = m.kinds[i]
            pending.append(
                (i, pool.submit(_decode, store, m, i) if kind == BlockKind.DATA else None)
            )
            i += 1
        index, fut = pending.popleft()
        if fut is None:
            yield index, None
            continue
        try:
            yield index, fut.result()
        except BlockError as exc:
            yield index, exc


def verify_image(store: ImageStore, name: str, progress: bool | None = None) -> VerifyReport:
    """Re-hash every block of image ``name`` and the whole image; report what is wrong."""
    with store.reading(name, "fleetcast image verify"):  # a delete now is not corruption
        return _verify(store, name, progress)


def _verify(store: ImageStore, name: str, progress: bool | None) -> VerifyReport:
    _, m = store.load_manifest(name)
    image_hash, problems = hashlib.sha256(), []
    zeros = memoryview(bytes(m.block_size))
    bar = Progress(f"verify {name}", m.image_size, enabled=progress)
    with ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="verify") as pool:
        for index, raw in _blocks(store, m, pool):
            length = m.block_length(index)
            if isinstance(raw, BlockError):
                problems.append(BlockProblem(index, index * m.block_size, str(raw)))
                image_hash.update(zeros[:length])
            else:
                image_hash.update(zeros[:length] if raw is None else raw)
            bar.update(index * m.block_size + length)
    bar.finish()
    ok = image_hash.digest() == m.image_sha256
    return VerifyReport(name, m.count(BlockKind.DATA), problems, ok)


@dataclass(frozen=True)
class ExportResult:
    written_bytes: int
    skipped_unused: int  #: blocks left untouched on the target
    image_hash_ok: bool | None  #: None when the target kept old bytes in unused blocks


def export_image(
    store: ImageStore,
    name: str,
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ExportResult:
    """Write image ``name`` to the raw file or block device ``out``.

    Data blocks are written, zero blocks written as zeros (skipped only where the target
    is known to be zero already), unused blocks not written at all. Refuses an existing
    non-empty target unless ``overwrite``. Raises ExportError.
    """
    with store.reading(name, "fleetcast image export"):  # delete waits for us
        _, m = store.load_manifest(name)
        with _open_target(out, m.image_size, overwrite) as (fd, fresh_from):
            bar = Progress(f"export {name}", m.image_size, enabled=progress)
            return _write(store, m, fd, fresh_from, bar)


@contextlib.contextmanager
def _open_target(out: Path, size: int, overwrite: bool) -> Iterator[tuple[int, int]]:
    """Open the target; yield (fd, offset from which it is known to hold zeros)."""
    existed = out.exists()
    st = out.stat() if existed else None
    is_block = st is not None and stat.S_ISBLK(st.st_mode)
    if existed and not overwrite and (is_block or (st is not None and st.st_size > 0)):
        raise ExportError(
            f"{out} already exists; pass --overwrite to write the image over "
            "it (blocks the image marks unused keep their old content)"
        )
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ExportError(f"cannot open {out} for writing: {exc.strerror}") from None
    try:
        if is_block:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < size:
                raise ExportError(f"{out} holds {dev_size} bytes, the image needs {size}")
            fresh_from = dev_size + 1  # never assume a device reads as zeros
        else:
            old = os.fstat(fd).st_size
            if old < size:
                os.ftruncate(fd, size)
            fresh_from = old
        yield fd, fresh_from
        os.fsync(fd)
    except BaseException as exc:
        if not existed:  # a half-written new file would pass for an export: remove it
            with contextlib.suppress(OSError):
                out.unlink()
        if isinstance(exc, OSError):
            raise ExportError(f"writing {out} failed: {exc.strerror}") from None
        raise
    finally:
        os.close(fd)


def _write(store: ImageStore, m: Manifest, fd: int, fresh_from: int, bar: Progress) -> ExportResult:
    image_hash: hashlib._Hash | None = hashlib.sha256()
    zeros = memoryview(bytes(m.block_size))
    written = skipped = 0
    write_zeros: Callable[[int, int], None] = lambda off, n: _pwrite_all(fd, zeros[:n], off)  # noqa: E731
    with ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="export") as pool:
        for index, raw in _blocks(store, m, pool):
            offset, length = index * m.block_size, m.block_length(index)
            kind = m.kinds[index]
            if isinstance(raw, BlockError):
                raise ExportError(
                    f"image block {index} (offset {offset}) is damaged: {raw}; "
                    "run 'fleetcast image verify'"
                )
            if raw is not None:
                _pwrite_all(fd, raw, offset)
                written += length
            elif kind == BlockKind.ZERO and offset < fresh_from:
                write_zeros(offset, length)
                written += length
            elif kind == BlockKind.UNUSED:
                skipped += 1
                if offset < fresh_from:
                    image_hash = None  # the target keeps whatever it held there
            if image_hash is not None:
                image_hash.update(zeros[:length] if raw is None else raw)
            bar.update(offset + length)
    bar.finish()
    ok = None if image_hash is None else image_hash.digest() == m.image_sha256
    if ok is False:
        raise ExportError("the exported image's SHA-256 does not match its manifest")
    return ExportResult(written, skipped, ok)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
