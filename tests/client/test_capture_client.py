"""The client's network capture (client/capture.py, client/upload.py) against the real server
app on loopback: only missing blocks cross, batches are bounded, a cut connection and a
restarted capture both resume, and a refused block is named."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # apitest

from apitest import *  # noqa: F403
from apitest import ENROLL
from test_capture_client_fixtures import *  # noqa: F403
from test_capture_client_fixtures import CuttingProxy, Served

import client.capture as capture_module
from client.agent import Agent, AgentOptions, local_macs
from client.capture import CaptureCancelled, CaptureFailed, Capturer, open_disk
from client.upload import BlockRefused, CaptureApi, Unreachable
from protocol.codec import block_digest, compress_block
from protocol.manifest import BlockKind
from server.images.export import export_image
from server.images.store import ImageStore

MIB = 1 << 20
BLOCKS = 12


def text_disk(path: Path, blocks: int = BLOCKS, seed: int = 1) -> Path:
    """A disk with no partition table and no filesystem (every byte counts as used):
    compressible text blocks, one random (stored raw), one all-zero, one repeated."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(blocks):
        if i == 3:
            out += rng.randbytes(MIB)
        elif i == 5:
            out += bytes(MIB)
        elif i == 7:
            out += out[:MIB]  # the same content as block 0: stored and sent once
        else:
            line = f"block {i} seed {seed} {rng.random()}: golden image text\n".encode()
            out += (line * (MIB // len(line) + 1))[:MIB]
    path.write_bytes(bytes(out))
    return path


def capture(s: Served, disk: Path, name: str, **kw: object) -> tuple[Capturer, dict[str, object]]:
    session_id, token = s.capture_session(name)
    c = Capturer(s.capture_api(session_id, token), s.job(session_id, name), disk, **kw)  # type: ignore[arg-type]
    _, reply = c.run()
    return c, reply


def test_a_capture_uploads_each_distinct_block_once_and_the_image_exports_identical(
    served: Served, tmp_path: Path
) -> None:
    disk = text_disk(tmp_path / "disk.img")
    c, reply = capture(served, disk, "lab/ref")
    m = c.manifest
    assert m is not None and reply["name"] == "lab/ref" and reply["digest"] == m.digest().hex()
    assert m.count(BlockKind.ZERO) == 1 and m.count(BlockKind.DATA) == BLOCKS - 1
    assert c.stats.uploaded_blocks == BLOCKS - 2  # zero block not sent, block 7 = block 0
    assert c.stats.reused_blocks == 1 and c.stats.read_bytes == BLOCKS * MIB
    assert m.block(3).is_raw  # random: zstd does not shrink it, stored raw
    assert c.stats.uploaded_bytes == m.stored_bytes - m.block(7).stored_size
    out = tmp_path / "out.img"
    export_image(ImageStore(served.api.settings.image_root), "lab/ref", out)
    assert out.read_bytes() == disk.read_bytes()
    names = [i["name"] for i in served.api.get("/api/images").json()]
    assert "lab/ref" in names


def test_a_second_capture_after_a_change_uploads_only_the_changed_blocks(
    served: Served, tmp_path: Path
) -> None:
    disk = text_disk(tmp_path / "disk.img")
    first, _ = capture(served, disk, "pc1/2026-01-01")
    with open(disk, "r+b") as f:  # change two blocks
        for index in (2, 9):
            f.seek(index * MIB + 4096)
            f.write(os.urandom(1000))
    second, _ = capture(served, disk, "pc1/2026-01-02")
    assert first.stats.uploaded_blocks == BLOCKS - 2
    assert second.stats.uploaded_blocks == 2
    assert second.stats.reused_blocks == BLOCKS - 1 - 2
    assert second.stats.uploaded_bytes < first.stats.uploaded_bytes / 4


def test_digests_go_to_have_in_batches_of_the_configured_size(
    served: Served, tmp_path: Path
) -> None:
    disk = text_disk(tmp_path / "disk.img")
    session_id, token = served.capture_session("batched")
    calls: list[int] = []

    class CountingApi(CaptureApi):
        def have(self, digests: list[bytes]) -> tuple[list[bytes], dict[bytes, int]]:
            calls.append(len(digests))
            return super().have(digests)

    api = CountingApi(served.url, token, session_id)
    Capturer(api, served.job(session_id, "batched"), disk, batch_blocks=4).run()
    # data blocks 0-4 and 6-11 in batches of 4: [0 1 2 3] [4 6 7 8] [9 10 11]; block 7
    # repeats block 0, whose stored size is known already, so it is not asked about
    assert calls == [4, 3, 3]


def test_a_connection_cut_mid_upload_is_retried_and_the_capture_completes(
    served: Served, tmp_path: Path
) -> None:
    disk = text_disk(tmp_path / "disk.img")
    session_id, token = served.capture_session("cut")
    proxy = CuttingProxy(served.url, cut_after=400_000)  # within the first blocks' uploads
    try:
        api = served.capture_api(session_id, token, url=proxy.url)
        c = Capturer(api, served.job(session_id, "cut"), disk, batch_blocks=4)
        c.run()
    finally:
        proxy.close()
    assert proxy.cuts == 1 and api.retries >= 1
    assert c.stats.uploaded_blocks == BLOCKS - 2  # each block stored once, none lost
    out = tmp_path / "out.img"
    export_image(ImageStore(served.api.settings.image_root), "cut", out)
    assert out.read_bytes() == disk.read_bytes()


def test_a_capture_started_again_uploads_only_what_the_first_run_did_not(
    served: Served, tmp_path: Path
) -> None:
    disk = text_disk(tmp_path / "disk.img", blocks=24, seed=5)
    session_id, token = served.capture_session("again")

    class PowerCut(CaptureApi):
        """The machine goes down right after its 8th block reached the server."""

        def put_block(self, digest: bytes, payload: bytes, raw_length: int) -> bool:
            stored = super().put_block(digest, payload, raw_length)
            if first.stats.uploaded_blocks + stored >= 8:
                first.cancel()
            return stored

    api = PowerCut(served.url, token, session_id)
    first = Capturer(api, served.job(session_id, "again"), disk, batch_blocks=2)
    with pytest.raises(CaptureCancelled):
        first.run()
    assert first.stats.uploaded_blocks == 8
    second = Capturer(served.capture_api(session_id, token), served.job(session_id, "again"),
                      disk)  # fmt: skip
    second.run()
    assert first.stats.uploaded_blocks + second.stats.uploaded_blocks == 22
    assert second.stats.reused_blocks == first.stats.uploaded_blocks + 1  # + the repeat


def test_a_corrupted_block_is_refused_and_the_error_names_it(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = text_disk(tmp_path / "disk.img")
    session_id, token = served.capture_session("bad")
    api = served.capture_api(session_id, token)
    good, other = b"a" * MIB, b"b" * MIB
    with pytest.raises(BlockRefused, match=block_digest(good).hex()) as err:
        api.put_block(block_digest(good), compress_block(other, 1), MIB)
    assert err.value.digest == block_digest(good)

    victim = block_digest(disk.read_bytes()[2 * MIB : 3 * MIB])

    def rotten(raw: bytes | bytearray | memoryview, level: int = 3) -> bytes:
        payload = compress_block(raw, level)
        if block_digest(raw) == victim:
            return payload[:-8] + bytes(8)  # a bit flipped on the way
        return payload

    monkeypatch.setattr(capture_module, "compress_block", rotten)
    c = Capturer(api, served.job(session_id, "bad"), disk)
    with pytest.raises(CaptureFailed, match=f"refused block {victim.hex()}"):
        c.run()
    names = [i["name"] for i in served.api.get("/api/images").json()]
    assert "bad" not in names


def test_an_unreachable_server_is_retried_with_growing_pauses_then_given_up() -> None:
    pauses: list[float] = []
    now = [0.0]

    def sleep(s: float) -> None:
        pauses.append(s)
        now[0] += s

    api = CaptureApi("http://127.0.0.1:9", "t", 1, retry_for=10, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(Unreachable, match="did not answer for 10 s"):
        api.have([bytes(32)])
    assert pauses == [0.5, 1.0, 2.0, 4.0]


def test_a_disk_that_is_not_one_is_refused(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(CaptureFailed, match="not a whole number of sectors"), open_disk(odd):
        pass
    with pytest.raises(CaptureFailed, match="cannot read the disk"), open_disk(tmp_path / "no"):
        pass


def test_the_agent_runs_a_capture_assignment_and_the_server_keeps_its_stats(
    served: Served, tmp_path: Path
) -> None:
    if not local_macs():
        pytest.skip("this machine has no network interface with a MAC address")
    disk = text_disk(tmp_path / "disk.img")
    agent = Agent(AgentOptions(server=served.url, token=ENROLL, target=str(disk), poll=0.1))
    machine_id = agent.register()
    session_id = served.capture_of(machine_id, "pc9/2026-11-26")
    verdict = asyncio.run(agent.run_once())  # the assignment's kind is "capture"
    assert verdict["kind"] == "capture" and verdict["result"] == "verified", verdict
    assert verdict["state"] == "succeeded"
    detail = served.api.get(f"/api/sessions/{session_id}").json()
    assert detail["state"] == "succeeded"
    kept = detail["stats"]["agent"]
    assert kept["uploaded_blocks"] == BLOCKS - 2 and kept["read_bytes"] == BLOCKS * MIB
