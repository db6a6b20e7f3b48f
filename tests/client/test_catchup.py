"""Catch-up over HTTP: every missing block fetched, verified and written, or a clear error.

A tiny HTTP/1.1 server on loopback plays the server's block route (contract9.md): stored
payloads, ``X-Fleetcast-Digest``, ``Range`` -> 206; it can cut a download short, corrupt
a block, or refuse.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from client.agent import Agent, AgentOptions, ProgressReporter, ServerApi
from client.catchup import BlockFetcher, CatchupError, catch_up
from client.disk import DiskError, Target
from client.resume import deploy
from protocol.codec import encode_block
from protocol.manifest import BlockKind, Manifest

BS = 64 << 10
TOKEN = "machine-credential"


@dataclass
class Image:
    manifest: Manifest
    raw: bytes
    payloads: dict[int, bytes]


def _image() -> Image:
    rng = random.Random(5)
    m = Manifest.empty(12 * BS + 777, BS)
    raw = bytearray()
    payloads = {}
    for i in range(m.block_count):
        length = m.block_length(i)
        if i in (3, 4, 9):
            m.set_kind(i, BlockKind.ZERO)
            raw += bytes(length)
            continue
        block = (b"text %d " % i) * (length // 8) if i % 2 else rng.randbytes(length // 2)
        block = block.ljust(length, b"\0")[:length]
        digest, payload = encode_block(block, 1)
        m.set_data(i, digest, len(payload))
        payloads[i] = payload
        raw += block
    return Image(m, bytes(raw), payloads)


@dataclass
class Faults:
    cut: dict[int, int] = field(default_factory=dict)  #: index -> bytes sent before a cut
    corrupt: Counter[int] = field(default_factory=Counter)  #: index -> bad answers left
    status: dict[int, int] = field(default_factory=dict)  #: index -> status to answer
    requests: list[tuple[int, str]] = field(default_factory=list)
    progress: list[dict[str, object]] = field(default_factory=list)
    connections: set[tuple[str, int]] = field(default_factory=set)


def _server(image: Image, faults: Faults) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            return None

        def do_GET(self) -> None:
            faults.connections.add(self.client_address)
            match = re.fullmatch(r"/api/agent/sessions/7/blocks/(\d+)", self.path)
            index = int(match[1]) if match else -1
            faults.requests.append((index, self.headers.get("Range", "")))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._json(401, "bad credential")
            if index in faults.status:
                return self._json(faults.status[index], f"status {faults.status[index]}")
            if index not in image.payloads:
                return self._json(404, f"block {index} is not a stored data block")
            payload = image.payloads[index]
            if faults.corrupt[index] > 0:
                faults.corrupt[index] -= 1
                payload = bytes([payload[0] ^ 1]) + payload[1:]
            start, status = 0, 200
            if rng := self.headers.get("Range"):
                start, status = int(rng.removeprefix("bytes=").rstrip("-")), 206
            body = payload[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Fleetcast-Digest", image.manifest.digest_of(index).hex())
            if status == 206:
                self.send_header(
                    "Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}"
                )
            self.end_headers()
            if index in faults.cut:
                self.wfile.write(body[: faults.cut.pop(index)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/api/agent/progress":
                faults.progress.append(body)
            self._json(200, "ok")

        def _json(self, status: int, detail: str) -> None:
            body = json.dumps({"detail": detail}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture
def image() -> Image:
    return _image()


@pytest.fixture
def served(image: Image) -> Iterator[tuple[str, Faults]]:
    faults = Faults()
    server = _server(image, faults)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _data(m: Manifest) -> list[int]:
    return [i for i in range(m.block_count) if m.kinds[i] == BlockKind.DATA]


def _fetcher(url: str, **kw: object) -> BlockFetcher:
    return BlockFetcher(url, TOKEN, 7, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


def test_every_missing_block_arrives_over_one_connection(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, faults = served
    m = image.manifest
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(len(image.raw)))  # garbage everywhere, zero blocks included
    target = Target.open(path, m.image_size)
    seen: list[tuple[int, int]] = []
    stats = catch_up(_fetcher(url), m, target, _data(m), progress=lambda b, n: seen.append((b, n)))
    target.close()
    assert path.read_bytes() == image.raw
    assert stats.blocks == len(_data(m)) and stats.raw_bytes == m.data_bytes()
    assert stats.wire_bytes == m.stored_bytes
    assert len(faults.connections) == 1 and stats.reconnects == 1
    assert seen[-1] == (stats.blocks, stats.raw_bytes)


def test_only_the_given_blocks_are_fetched_and_held_zeros_are_left_alone(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, faults = served
    m = image.manifest
    path = tmp_path / "disk"
    path.write_bytes(image.raw)
    held = bytearray([1]) * m.block_count
    held[4] = 0
    target = Target.open(path, m.image_size)
    stats = catch_up(_fetcher(url), m, target, [5, 11], held=held)
    target.close()
    assert [i for i, _ in faults.requests] == [5, 11]
    assert target.stats.bytes_zeroed == BS  # block 4 only
    assert stats.blocks == 2 and path.read_bytes() == image.raw


def test_a_dropped_download_resumes_with_a_range(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, faults = served
    m = image.manifest
    faults.cut[2] = 1000
    target = Target.open(tmp_path / "disk", m.image_size)
    stats = catch_up(_fetcher(url), m, target, _data(m))
    target.close()
    assert (tmp_path / "disk").read_bytes() == image.raw
    assert (2, "bytes=1000-") in faults.requests
    assert stats.resumed == 1 and stats.reconnects == 2
    assert stats.wire_bytes == m.stored_bytes  # the first 1000 bytes were not fetched twice


def test_a_block_that_does_not_verify_is_fetched_again(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, faults = served
    m = image.manifest
    faults.corrupt[6] = 2
    target = Target.open(tmp_path / "disk", m.image_size)
    stats = catch_up(_fetcher(url), m, target, _data(m))
    target.close()
    assert stats.refetched == 2
    assert (
        hashlib.sha256((tmp_path / "disk").read_bytes()).digest()
        == hashlib.sha256(image.raw).digest()
    )


def test_a_block_that_never_verifies_fails_clearly_and_is_not_written(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, faults = served
    m = image.manifest
    faults.corrupt[6] = 99
    target = Target.open(tmp_path / "disk", m.image_size)
    with pytest.raises(CatchupError, match="block 6 from the server failed verification 3"):
        catch_up(_fetcher(url), m, target, [6])
    target.close()
    assert target.stats.bytes_written == 0


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (403, r"refused block 5 \(HTTP 403\): status 403 — is this machine a target"),
        (404, r"HTTP 404\): status 404"),
    ],
)
def test_a_refusal_ends_the_catch_up_with_the_servers_reason(
    tmp_path: Path, image: Image, served: tuple[str, Faults], status: int, message: str
) -> None:
    url, faults = served
    faults.status[5] = status
    target = Target.open(tmp_path / "disk", image.manifest.image_size)
    with pytest.raises(CatchupError, match=message):
        catch_up(_fetcher(url), image.manifest, target, [0, 5, 6])
    target.close()
    assert [i for i, _ in faults.requests] == [0, 5]


def test_a_failing_server_is_retried_a_bounded_number_of_times(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, faults = served
    faults.status[5] = 503
    target = Target.open(tmp_path / "disk", image.manifest.image_size)
    with pytest.raises(CatchupError, match="block 5: the server failed 4 times"):
        catch_up(_fetcher(url, max_attempts=4), image.manifest, target, [5])
    target.close()
    assert len(faults.requests) == 4


def test_a_full_disk_is_a_disk_error(
    tmp_path: Path, image: Image, served: tuple[str, Faults], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = served
    target = Target.open(tmp_path / "disk", image.manifest.image_size)

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("client.disk.os.pwrite", full)
    with pytest.raises(DiskError, match="full"):
        catch_up(_fetcher(url), image.manifest, target, [0])
    target.close()


def test_a_wrong_credential_is_a_clear_refusal(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, _ = served
    target = Target.open(tmp_path / "disk", image.manifest.image_size)
    fetcher = BlockFetcher(url, "not-mine", 7)
    with pytest.raises(CatchupError, match="HTTP 401"):
        catch_up(fetcher, image.manifest, target, [0])
    target.close()


# -- the agent's catch-up (client/resume.py) ---------------------------------------------


def _agent(url: str, target: Path) -> Agent:
    agent = Agent(AgentOptions(server=url, token="enroll", target=str(target)))
    agent.api = ServerApi(url, TOKEN)
    agent.progress_interval = 0.0
    return agent


def _job(image: Image, **extra: object) -> tuple[dict[str, object], bytes]:
    raw = image.manifest.to_bytes()
    return {"session_id": 7, "mode": "catchup", "manifest": base64.b64encode(raw), **extra}, raw


async def test_a_late_machine_with_delta_fetches_only_what_its_disk_lacks(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, faults = served
    m = image.manifest
    disk = bytearray(image.raw)
    for i in (2, 7):
        disk[i * BS + 5] ^= 0xFF
    path = tmp_path / "disk"
    path.write_bytes(disk)
    job, raw = _job(image, delta=True)
    outcome, receiver = await deploy(_agent(url, path), job, raw, "", ProgressReporter())
    assert receiver is None
    assert outcome.result == "verified", outcome.reason
    assert path.read_bytes() == image.raw
    assert sorted(i for i, _ in faults.requests) == [2, 7]
    s = outcome.stats
    assert s["via"] == "catchup" and s["catchup_blocks"] == 2
    assert s["held_blocks"] == len(_data(m)) - 2
    assert s["verified_bytes"] == m.data_bytes()
    phases = [p["phase"] for p in faults.progress]
    assert phases[0] == "hashing" and phases[-1] == "catchup"
    assert faults.progress[-1]["held_blocks"] == len(_data(m)) - 2


async def test_a_catch_up_that_cannot_finish_reports_a_failure(
    tmp_path: Path, image: Image, served: tuple[str, Faults]
) -> None:
    url, faults = served
    faults.corrupt[6] = 99
    job, raw = _job(image)
    outcome, _ = await deploy(_agent(url, tmp_path / "disk"), job, raw, "", ProgressReporter())
    assert outcome.result == "failed"
    assert "catch-up failed: block 6 from the server failed verification" in outcome.reason
