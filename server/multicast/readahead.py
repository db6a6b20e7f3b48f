"""Read-ahead of stored blocks for the sender, so disk reads overlap sending.

SenderSession calls ``read_block(index)`` from the event loop when it starts a block. The
sweep goes through the data blocks in ascending order, so while block ``i`` is sent the
next ``window`` data blocks are read in a worker thread; a later call for one of them
takes the finished (or finishing) read instead of blocking the loop on the disk. Repairs
and skips (blocks nobody needs) just read synchronously; stale read-aheads are dropped.
Memory: at most ``window`` stored payloads.
"""

from __future__ import annotations

import bisect
import concurrent.futures
from collections.abc import Callable

from protocol.manifest import BlockKind, Manifest

DEFAULT_WINDOW = 4


class ReadAhead:
    """A ``read_block(index) -> payload`` that reads the next data blocks in a thread."""

    def __init__(
        self,
        manifest: Manifest,
        read_payload: Callable[[bytes], bytes],
        *,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self._manifest = manifest
        self._read_payload = read_payload
        self._window = window
        self._data = [i for i, k in enumerate(manifest.kinds) if k == BlockKind.DATA]
        self._inflight: dict[int, concurrent.futures.Future[bytes]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fleetcast-readahead"
        )
        self._front = -1
        self.hits = 0
        self.misses = 0

    def __call__(self, index: int) -> bytes:
        """The stored payload of data block ``index``; raises what the store raises."""
        fut = self._inflight.pop(index, None)
        if fut is not None:
            self.hits += 1
            payload = fut.result()
        else:
            self.misses += 1
            payload = self._read(index)
        if index >= self._front:  # a repair behind the sweep keeps the sweep's read-ahead
            self._front = index
            self._schedule_after(index)
        return payload

    def close(self) -> None:
        """Drop pending read-aheads and stop the thread."""
        for fut in self._inflight.values():
            fut.cancel()
        self._inflight.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, index: int) -> bytes:
        return self._read_payload(self._manifest.digest_of(index))

    def _schedule_after(self, index: int) -> None:
        pos = bisect.bisect_right(self._data, index)
        wanted = self._data[pos : pos + self._window]
        for stale in [i for i in self._inflight if i not in wanted]:
            self._inflight.pop(stale).cancel()
        for i in wanted:
            if i not in self._inflight:
                self._inflight[i] = self._pool.submit(self._read, i)
