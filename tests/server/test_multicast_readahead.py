"""The sender's read-ahead returns exactly what the store holds, in any access order."""

from __future__ import annotations

import random
import threading

from protocol.manifest import BlockKind, Manifest
from server.multicast.readahead import ReadAhead

BS = 64 << 10


def _manifest(n: int) -> tuple[Manifest, dict[bytes, bytes]]:
    m = Manifest.empty(n * BS, BS)
    store = {}
    for i in range(n):
        if i % 5 == 3:
            m.set_kind(i, BlockKind.ZERO)
            continue
        digest = i.to_bytes(32, "big")
        store[digest] = f"block {i}".encode()
        m.set_data(i, digest, len(store[digest]))
    return m, store


def test_a_sweep_is_served_from_reads_made_ahead_in_a_thread() -> None:
    m, store = _manifest(40)
    threads: set[str] = set()

    def read(digest: bytes) -> bytes:
        threads.add(threading.current_thread().name)
        return store[digest]

    ra = ReadAhead(m, read, window=4)
    for i in range(40):
        if m.kinds[i] == BlockKind.DATA:
            assert ra(i) == f"block {i}".encode()
    ra.close()
    assert ra.misses == 1 and ra.hits == 31  # only the first block was read on the spot
    assert any(t.startswith("fleetcast-readahead") for t in threads)


def test_random_access_still_returns_the_right_block() -> None:
    m, store = _manifest(50)
    ra = ReadAhead(m, store.__getitem__, window=3)
    rng = random.Random(1)
    data = [i for i in range(50) if m.kinds[i] == BlockKind.DATA]
    for _ in range(200):
        i = rng.choice(data)
        assert ra(i) == f"block {i}".encode()
    ra.close()


def test_a_repair_behind_the_sweep_keeps_the_sweeps_read_ahead() -> None:
    m, store = _manifest(40)
    ra = ReadAhead(m, store.__getitem__, window=4)
    ra(10)
    ra(11)
    assert ra(2) == b"block 2"  # a repair of an old block: read on the spot
    assert ra(12) == b"block 12"
    ra.close()
    assert (ra.hits, ra.misses) == (2, 2)
