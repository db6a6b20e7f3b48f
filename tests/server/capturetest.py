"""Helpers for the capture and backup API tests: a disk made of blocks, its manifest, and an
agent that speaks the upload API (docs/SERVER.md "Capture") the way the real client does."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from apitest import Api

from protocol.codec import encode_block, is_zero
from protocol.manifest import BlockKind, Manifest

BLOCK = 64 << 10  #: the tests' block size (the manifest format's minimum)


def disk(seed: int, blocks: int = 6, *, zero: tuple[int, ...] = (2,)) -> list[bytes]:
    """``blocks`` raw blocks: compressible text-like data, random data, zeros at ``zero``."""
    rng = random.Random(seed)
    out = []
    for i in range(blocks):
        if i in zero:
            out.append(bytes(BLOCK))
        elif i % 2:
            out.append(rng.randbytes(BLOCK))  # stored raw (zstd does not shrink it)
        else:
            words = [rng.choice([b"fleet", b"cast", b"disk", b"block"]) for _ in range(BLOCK // 4)]
            out.append(b" ".join(words)[:BLOCK])
    return out


@dataclass
class Image:
    """A disk's manifest and the payload of each of its data blocks, by digest."""

    manifest: Manifest
    payloads: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)  #: (payload, raw len)

    @property
    def data(self) -> bytes:
        return self.manifest.to_bytes()


def image_of(raw_blocks: list[bytes]) -> Image:
    m = Manifest.empty(len(raw_blocks) * BLOCK, BLOCK)
    m.created = "2026-11-26T03:00:00Z"
    img = Image(m)
    for i, raw in enumerate(raw_blocks):
        if is_zero(raw):
            m.set_kind(i, BlockKind.ZERO)
            continue
        digest, payload = encode_block(raw, 1)
        m.set_data(i, digest, len(payload))
        img.payloads[digest] = (payload, len(raw))
    return img


@dataclass
class Agent:
    """A machine's agent during one capture session."""

    api: Api
    headers: dict[str, str]
    machine_id: int
    session_id: int = 0

    def assignment(self) -> dict[str, Any]:
        r = self.api.client.get("/api/agent/assignment", headers=self.headers)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def have(self, digests: list[bytes]) -> Any:
        path = f"/api/agent/captures/{self.session_id}/have"
        return self.api.client.post(
            path, headers=self.headers, json={"digests": [d.hex() for d in digests]}
        )

    def put(self, digest: bytes | str, payload: bytes, raw_length: int) -> Any:
        hexd = digest if isinstance(digest, str) else digest.hex()
        return self.api.client.put(
            f"/api/agent/captures/{self.session_id}/blocks/{hexd}",
            headers={**self.headers, "X-Fleetcast-Raw-Length": str(raw_length)},
            content=payload,
        )

    def manifest(self, data: bytes) -> Any:
        return self.api.client.post(
            f"/api/agent/captures/{self.session_id}/manifest",
            headers={**self.headers, "Content-Type": "application/octet-stream"},
            content=data,
        )

    def result(self, result: str = "verified", **stats: int) -> Any:
        body = {"session_id": self.session_id, "result": result, "stats": stats}
        return self.api.client.post("/api/agent/result", headers=self.headers, json=body)

    def upload(self, img: Image, *, only: int | None = None) -> tuple[int, int]:
        """Ask ``have`` and PUT what is missing (at most ``only`` blocks); returns
        (blocks uploaded now, blocks the store had)."""
        r = self.have(list(img.payloads))
        assert r.status_code == 200, r.text
        missing = r.json()["missing"]
        for hexd in missing[:only]:
            payload, raw_length = img.payloads[bytes.fromhex(hexd)]
            assert self.put(hexd, payload, raw_length).status_code == 201
        return len(missing[:only]), len(r.json()["present"])


def enrolled(api: Api, mac: str, name: str = "") -> Agent:
    """An enrolled agent for machine ``mac`` (named ``name``)."""
    headers = api.enroll(mac)
    mid = next(m["id"] for m in api.get("/api/machines").json() if m["mac"] == mac)
    if name:
        assert api.patch(f"/api/machines/{mid}", json={"name": name}).status_code == 200
    return Agent(api, headers, mid)


def start_capture(api: Api, agent: Agent, target: str, **extra: Any) -> dict[str, Any]:
    r = api.post(
        "/api/captures", json={"machine_id": agent.machine_id, "target_image": target, **extra}
    )
    assert r.status_code == 201, r.text
    agent.session_id = r.json()["id"]
    return dict(r.json())


__all__ = ["BLOCK", "Agent", "Image", "disk", "enrolled", "image_of", "start_capture"]
