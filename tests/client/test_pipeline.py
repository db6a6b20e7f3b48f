"""The block pipeline: decode + verify + write in threads, zero runs, back-pressure."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from client.disk import DiskError, Target
from client.pipeline import BlockPipeline, zero_runs
from protocol.codec import encode_block
from protocol.manifest import BlockKind, Manifest

BS = 64 << 10


def _image() -> tuple[Manifest, list[bytes | None], dict[int, bytes]]:
    """A 6-block image: data, zero, data (random), unused, zero, data (short tail)."""
    size = 5 * BS + 1000
    m = Manifest.empty(size, BS)
    raws: list[bytes | None] = [
        b"hello " * (BS // 6) + b"hell",
        None,
        os.urandom(BS),
        None,
        None,
        b"t" * 1000,
    ]
    payloads = {}
    for i, raw in enumerate(raws):
        if raw is None:
            continue
        digest, payload = encode_block(raw)
        m.set_data(i, digest, len(payload))
        payloads[i] = payload
    m.set_kind(1, BlockKind.ZERO)
    m.set_kind(4, BlockKind.ZERO)
    return m, raws, payloads


async def _run(
    target: Target, m: Manifest, feed: dict[int, bytes], **kw: int
) -> dict[int, str | None]:
    results: dict[int, str | None] = {}
    errors: list[DiskError] = []
    pipe = BlockPipeline(
        target,
        m,
        loop=asyncio.get_running_loop(),
        on_result=results.__setitem__,
        on_disk_error=errors.append,
        **kw,
    )
    pipe.start_zeroing()
    for index, payload in feed.items():
        pipe.submit(index, payload)
    await pipe.finish()
    pipe.close()
    assert not errors
    return results


async def test_blocks_are_verified_written_zeroed_and_unused_left_alone(tmp_path: Path) -> None:
    m, raws, payloads = _image()
    path = tmp_path / "t.img"
    old = os.urandom(m.image_size)
    path.write_bytes(old)
    results = await _run(Target.open(path, m.image_size), m, payloads)
    assert results == {0: None, 2: None, 5: None}
    data = path.read_bytes()
    for i, raw in enumerate(raws):
        chunk = data[i * BS : (i + 1) * BS]
        if raw is not None:
            assert chunk == raw
        elif m.kinds[i] == BlockKind.ZERO:
            assert chunk == bytes(BS)
        else:
            assert chunk == old[i * BS : (i + 1) * BS]  # UNUSED: untouched


async def test_a_corrupt_payload_is_refused_and_never_written(tmp_path: Path) -> None:
    m, _, payloads = _image()
    path = tmp_path / "t.img"
    bad = bytearray(payloads[2])
    bad[100] ^= 0xFF  # block 2 is random, stored raw: the hash catches it
    results = await _run(Target.open(path, m.image_size), m, {2: bytes(bad), 0: payloads[0]})
    assert results[0] is None
    assert "mismatch" in str(results[2])
    assert path.read_bytes()[2 * BS : 3 * BS] == bytes(BS)


async def test_a_full_queue_asks_the_reader_to_pause_then_resumes_it(tmp_path: Path) -> None:
    m, _, payloads = _image()
    spaces: list[int] = []
    fulls: list[bool] = []
    results: dict[int, str | None] = {}
    pipe = BlockPipeline(
        Target.open(tmp_path / "t.img", m.image_size),
        m,
        loop=asyncio.get_running_loop(),
        on_result=results.__setitem__,
        on_disk_error=pytest.fail,
        on_space=lambda: spaces.append(1),
        max_pending=1,
    )
    for index, payload in payloads.items():
        pipe.submit(index, payload)
        fulls.append(pipe.full)
    await pipe.finish()
    pipe.close()
    assert all(fulls) and spaces and not pipe.full
    assert len(results) == 3


def test_zero_runs_coalesce_adjacent_blocks_and_clip_the_tail() -> None:
    m = Manifest.empty(4 * BS + 10, BS)
    for i in (1, 2, 4):
        m.set_kind(i, BlockKind.ZERO)
    assert list(zero_runs(m)) == [(BS, 2 * BS), (4 * BS, 10)]


async def test_many_small_blocks_pause_the_reader_by_count_not_only_by_bytes(
    tmp_path: Path,
) -> None:
    # Well-compressed blocks are small: the session's unverified-block limit (a count)
    # would drop blocks long before the byte bound fills, so the pipeline counts too.
    m, _, payloads = _image()
    fulls: list[bool] = []
    results: dict[int, str | None] = {}
    pipe = BlockPipeline(
        Target.open(tmp_path / "t.img", m.image_size),
        m,
        loop=asyncio.get_running_loop(),
        on_result=results.__setitem__,
        on_disk_error=pytest.fail,
        max_blocks=2,
    )
    for index, payload in payloads.items():
        pipe.submit(index, payload)
        fulls.append(pipe.full)
    assert fulls == [False, True, True]
    await pipe.finish()
    pipe.close()
    assert not pipe.full and results == {0: None, 2: None, 5: None}
