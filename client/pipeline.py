"""Decode, verify and write blocks off the event loop, with bounded memory.

The receiver's event loop hands each reassembled block payload to ``BlockPipeline.submit``;
worker threads decode it (zstandard releases the GIL), check it against the manifest's
SHA-256 (hashlib releases the GIL) and ``pwrite`` it (a system call, GIL released). The
outcome comes back on the loop through ``on_result(index, error)`` — ``error`` is None for a
verified, written block, else why it was refused (it was not written). A disk failure is
fatal and goes to ``on_disk_error``. Payloads waiting or in work are bounded by
``max_pending`` bytes: when ``full`` the caller stops reading the socket (the kernel's
receive buffer holds the rest) until ``on_space`` fires.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from client.disk import DiskError, Target
from protocol.codec import BlockError, decode_block_into
from protocol.manifest import BlockKind, Manifest

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
#: Stored payload bytes queued or in work; with decode buffers this bounds RSS well
#: under the receiver's 100 MiB budget whatever the image size.
DEFAULT_MAX_PENDING = 16 << 20
#: Blocks queued or in work: reading pauses at this many too. Below the session's
#: EngineConfig.max_unverified_blocks (64), which drops further blocks as lost: small
#: (well-compressed) blocks reach that count long before max_pending bytes.
DEFAULT_MAX_BLOCKS = 48
#: Zero ranges are handed to the target in runs of at most this many bytes.
ZERO_RUN_MAX = 256 << 20


class BlockPipeline:
    """Worker threads between the receiver core and the target."""

    def __init__(
        self,
        target: Target,
        manifest: Manifest,
        *,
        loop: asyncio.AbstractEventLoop,
        on_result: Callable[[int, str | None], None],
        on_disk_error: Callable[[DiskError], None],
        on_space: Callable[[], None] = lambda: None,
        workers: int = DEFAULT_WORKERS,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        self.target = target
        self.manifest = manifest
        self._loop = loop
        self._on_result = on_result
        self._on_disk_error = on_disk_error
        self._on_space = on_space
        self._max_pending = max_pending
        self._max_blocks = max_blocks
        self._pending_bytes = 0
        self._pending_blocks = 0
        self._jobs: set[asyncio.Future[Any]] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="fleetcast-write"
        )
        self._failed = False
        self._local = threading.local()
        self.blocks_written = 0
        self.blocks_refused = 0

    @property
    def full(self) -> bool:
        """True when no more payloads should be read until ``on_space`` fires."""
        return self._pending_bytes >= self._max_pending or self._pending_blocks >= self._max_blocks

    @property
    def idle(self) -> bool:
        """True when no block or zeroing job is queued or running."""
        return not self._jobs

    def submit(self, index: int, payload: bytes | bytearray | memoryview) -> None:
        """Queue data block ``index``'s stored ``payload`` for decode, verify and write."""
        if self._failed:
            return
        size = len(payload)
        self._pending_bytes += size
        self._pending_blocks += 1
        fut = self._loop.run_in_executor(self._pool, self._work, index, payload)
        self._track(fut, lambda f: self._block_done(index, size, f))

    def start_zeroing(self) -> None:
        """Queue the image's ZERO blocks to be made zeros (UNUSED blocks are left alone)."""
        runs = list(zero_runs(self.manifest))
        if runs and not self.target.assume_blank:
            fut = self._loop.run_in_executor(self._pool, self._zero, runs)
            self._track(fut, self._zeroing_done)

    async def finish(self) -> None:
        """Wait for every queued job, then fsync the target in a thread.

        Raises DiskError when the sync fails.
        """
        while self._jobs:
            await asyncio.wait(set(self._jobs))
        await self._loop.run_in_executor(self._pool, self.target.sync)

    def close(self) -> None:
        """Stop the workers (queued jobs are abandoned) and close the target."""
        self._failed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.target.close()

    # -- worker side (threads) ----------------------------------------------------------

    def _work(self, index: int, payload: bytes | bytearray | memoryview) -> str | None:
        m = self.manifest
        out: bytearray | None = getattr(self._local, "buf", None)
        if out is None:  # one reused decode buffer per worker thread (no page faults)
            out = self._local.buf = bytearray(m.block_size)
        try:
            raw = decode_block_into(payload, m.block_length(index), m.digest_of(index), out)
        except BlockError as exc:
            return str(exc)
        self.target.write(index * m.block_size, raw)
        return None

    def _zero(self, runs: list[tuple[int, int]]) -> None:
        for offset, length in runs:
            self.target.zero(offset, length)

    # -- loop side ----------------------------------------------------------------------

    def _track(self, fut: asyncio.Future[Any], done: Callable[[asyncio.Future[Any]], None]) -> None:
        self._jobs.add(fut)
        fut.add_done_callback(self._jobs.discard)
        fut.add_done_callback(done)

    def _block_done(self, index: int, size: int, fut: asyncio.Future[Any]) -> None:
        was_full = self.full
        self._pending_bytes -= size
        self._pending_blocks -= 1
        if self._check_disk(fut):
            error = fut.result()
            assert error is None or isinstance(error, str)
            if error is None:
                self.blocks_written += 1
            else:
                self.blocks_refused += 1
                log.warning("block %d refused: %s", index, error)
            self._on_result(index, error)
        if was_full and not self.full:
            self._on_space()

    def _zeroing_done(self, fut: asyncio.Future[Any]) -> None:
        self._check_disk(fut)

    def _check_disk(self, fut: asyncio.Future[Any]) -> bool:
        """True if the job ended normally; a disk failure is reported once, then ignored."""
        if fut.cancelled():
            return False
        exc = fut.exception()
        if exc is None:
            return True
        if self._failed:
            return False
        self._failed = True
        if isinstance(exc, DiskError):
            self._on_disk_error(exc)
        else:
            self._on_disk_error(DiskError(f"writing the target failed unexpectedly: {exc!r}"))
        return False


def zero_runs(manifest: Manifest) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of ZERO blocks, at most ZERO_RUN_MAX bytes each."""
    kinds = manifest.kinds
    n = len(kinds)
    zero = BlockKind.ZERO
    i = 0
    while i < n:
        if kinds[i] != zero:
            i += 1
            continue
        j = i
        while j < n and kinds[j] == zero:
            j += 1
        start = i * manifest.block_size
        end = min(j * manifest.block_size, manifest.image_size)
        while start < end:
            length = min(ZERO_RUN_MAX, end - start)
            yield start, length
            start += length
        i = j
