"""Capture over the network in a namespace lab: the real server, the real agent in capture mode.

A machine's disk (MBR + ext4 built over garbage, files written and some deleted) is read
by the agent, which uploads only the blocks the server lacks; the stored image exports to a
filesystem whose files match byte for byte. A second capture after changing a few files
uploads exactly the blocks that changed; a capture whose agent is killed half-way resumes
in a new agent and completes, uploading only the rest; a corrupted block is refused.
"""

from __future__ import annotations

import random
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverlab import ENROLL, ServerLab

from bench.lab import Node
from protocol.codec import block_digest, compress_block
from protocol.manifest import BlockKind, Manifest
from server.images.export import export_image
from server.images.store import ImageStore

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.tools,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "sfdisk", "partclone.extfs")),
        reason="needs e2fsprogs, fdisk and partclone (scripts/setup installs them)",
    ),
]
AGENTS = 1
MIB = 1 << 20
PART_START = MIB


def _run(*argv: str, stdin: bytes | None = None) -> bytes:
    r = subprocess.run(argv, input=stdin, capture_output=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr.decode(errors='replace')}"
    return r.stdout


class Ext4Disk:
    """A raw disk: an MBR and one ext4 partition made over random garbage; files are
    written and removed with debugfs on the partition, then copied into the disk."""

    def __init__(self, path: Path, mib: int, seed: int) -> None:
        self.path, self.work = path, path.parent / f"{path.stem}-work"
        self.work.mkdir()
        self.part = self.work / "part.img"
        self.part_size = (mib - 2) * MIB
        self.rng = random.Random(seed)
        self.files: dict[str, bytes] = {}
        self.part.write_bytes(self.rng.randbytes(self.part_size))
        _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", "root", str(self.part))
        with open(path, "wb") as f:
            f.truncate(mib * MIB)
        _run("sfdisk", "--quiet", str(path), stdin=b"label: dos\nstart=2048, type=83\n")

    def write(self, count: int, *, random_share: float = 0.5, most: int = 400_000) -> None:
        """Add ``count`` files (random or text bytes)."""
        cmds = []
        for _ in range(count):
            name = f"f{len(self.files):04d}.{secrets.token_hex(2)}"
            n = self.rng.randrange(1000, most)
            if self.rng.random() < random_share:
                data = self.rng.randbytes(n)
            else:
                line = f"{name}: a line of a golden image's text file\n".encode()
                data = (line * (n // len(line) + 1))[:n]
            (self.work / name).write_bytes(data)
            self.files[name] = data
            cmds.append(f"write {self.work / name} {name}")
        self._debugfs(cmds)

    def remove(self, count: int) -> list[str]:
        gone = sorted(self.files)[:count]
        self._debugfs([f"rm {n}" for n in gone])
        for n in gone:
            del self.files[n]
        return gone

    def _debugfs(self, cmds: list[str]) -> None:
        _run("debugfs", "-w", "-f", "-", str(self.part), stdin="\n".join(cmds).encode() + b"\n")
        with open(self.part, "rb") as src, open(self.path, "r+b") as dst:
            dst.seek(PART_START)
            shutil.copyfileobj(src, dst, 4 * MIB)


def files_of(disk: Path, part_size: int, names: list[str], work: Path) -> dict[str, bytes]:
    """The content of ``names`` in the ext4 partition of raw ``disk``, read with debugfs."""
    part = work / f"{disk.stem}-part.img"
    with open(disk, "rb") as f:
        f.seek(PART_START)
        part.write_bytes(f.read(part_size))
    r = subprocess.run(["fsck.ext4", "-fn", str(part)], capture_output=True, timeout=120)
    assert r.returncode == 0, f"the exported filesystem does not check clean: {r.stdout!r}"
    return {n: _run("debugfs", "-R", f"cat {n}", str(part)) for n in names}


def start_agent(sl: ServerLab, node: Node, target: Path, name: str) -> subprocess.Popen[bytes]:
    argv = ["agent", "--server", sl.url, "--token", ENROLL, "--target", str(target),
            "--wait", "120", "--poll", "0.3", "--loop"]  # fmt: skip
    return sl._spawn(node, name, argv)


def capture(sl: ServerLab, machine_id: int, image: str, timeout: float = 120) -> dict[str, Any]:
    """Start a capture of ``machine_id`` as ``image``; wait for the session to end; its
    /api/captures record."""
    assert sl.api is not None
    r = sl.api.post(
        "/api/captures", json={"machine_id": machine_id, "target_image": image, "level": 1}
    )
    assert r.status_code == 201, r.text
    session_id = r.json()["id"]
    return wait_capture(sl, session_id, timeout)


def wait_capture(sl: ServerLab, session_id: int, timeout: float) -> dict[str, Any]:
    assert sl.api is not None
    api = sl.api

    def ended() -> dict[str, Any] | None:
        s = api.get(f"/api/sessions/{session_id}").json()
        return s if s["state"] not in ("pending", "running") else None

    detail = sl.wait_for(f"capture session {session_id} to end", ended, timeout)
    assert detail["state"] == "succeeded", detail
    rows = api.get("/api/captures").json()
    record: dict[str, Any] = next(c for c in rows if c["session_id"] == session_id)
    return record


def manifest_of(sl: ServerLab, image: str) -> Manifest:
    return ImageStore(sl.data_dir / "images").load_manifest(image)[1]


def new_digests(m: Manifest, before: Manifest) -> set[bytes]:
    return m.unique_digests() - before.unique_digests()


def test_capture_uploads_an_ext4_disk_then_only_what_changed(
    server_lab: ServerLab, tmp_path: Path
) -> None:
    sl = server_lab
    api = sl.start()
    disk = Ext4Disk(tmp_path / "pc.img", 32, seed=11)
    disk.write(40)
    deleted = disk.remove(8)
    start_agent(sl, sl.lab.receivers[0], disk.path, "agent")
    (machine,) = sl.wait_for_machines(1)

    started = time.monotonic()
    first = capture(sl, machine["id"], "pc/first")
    seconds = time.monotonic() - started
    m1 = manifest_of(sl, "pc/first")
    assert m1.partitions[0].fs == "ext4" and m1.partitions[0].used_map == "partclone"
    assert m1.count(BlockKind.UNUSED) > 0  # free space (garbage) was neither read nor sent
    assert first["uploaded_blocks"] == len(m1.unique_digests())
    assert "pc/first" in [i["name"] for i in api.get("/api/images").json()]

    out = tmp_path / "exported.img"
    export_image(ImageStore(sl.data_dir / "images"), "pc/first", out)
    assert files_of(out, disk.part_size, list(disk.files), tmp_path) == disk.files
    gone = subprocess.run(
        ["debugfs", "-R", f"stat {deleted[0]}", str(tmp_path / "exported-part.img")],
        capture_output=True,
        text=True,
    )
    assert "File not found" in gone.stderr

    # a few files change: the second capture sends exactly the blocks that changed
    disk.write(2, random_share=1.0, most=200_000)
    disk.remove(1)
    second = capture(sl, machine["id"], "pc/second")
    m2 = manifest_of(sl, "pc/second")
    changed = new_digests(m2, m1)
    assert second["uploaded_blocks"] == len(changed)
    assert 0 < len(changed) <= 8 < len(m1.unique_digests())
    assert second["uploaded_bytes"] < first["uploaded_bytes"] / 2
    assert second["reused_blocks"] >= m2.count(BlockKind.DATA) - len(changed)
    out2 = tmp_path / "exported2.img"
    export_image(ImageStore(sl.data_dir / "images"), "pc/second", out2)
    assert files_of(out2, disk.part_size, list(disk.files), tmp_path) == disk.files
    print(
        f"\ncapture: {m1.count(BlockKind.DATA)} data blocks; first run uploaded "
        f"{first['uploaded_blocks']} blocks / {first['uploaded_bytes'] / MIB:.1f} MiB "
        f"({seconds:.1f} s from the API call), second run {second['uploaded_blocks']} blocks / "
        f"{second['uploaded_bytes'] / MIB:.2f} MiB"
    )


def test_a_capture_killed_half_way_resumes_in_a_new_agent_and_completes(
    server_lab: ServerLab, tmp_path: Path
) -> None:
    sl = server_lab
    sl.start()
    node = sl.lab.receivers[0]
    disk = Ext4Disk(tmp_path / "pc.img", 40, seed=12)
    disk.write(60, random_share=1.0, most=500_000)  # incompressible: ~15 MiB to send
    sl.lab.shape(node, "40mbit", burst="64kb", latency="400ms")  # ~4 s of uploading
    first = start_agent(sl, node, disk.path, "agent-1")
    (machine,) = sl.wait_for_machines(1)
    assert sl.api is not None
    r = sl.api.post(
        "/api/captures", json={"machine_id": machine["id"], "target_image": "pc/k", "level": 1}
    )
    assert r.status_code == 201, r.text
    session_id = r.json()["id"]

    def uploaded_some() -> int:
        found = re.findall(r"(\d+) blocks uploaded", sl.log("agent-1"))
        return int(found[-1]) if found and int(found[-1]) >= 3 else 0

    before_kill = sl.wait_for("the first agent to upload some blocks", uploaded_some, 60)
    assert sl.lab.kill(first) is not None  # SIGKILL by its PID, mid-upload
    start_agent(sl, node, disk.path, "agent-2")
    record = wait_capture(sl, session_id, 120)
    m = manifest_of(sl, "pc/k")
    total = len(m.unique_digests())
    assert before_kill < total
    assert record["uploaded_blocks"] == total  # by both agents, each block stored once
    assert sl.api is not None
    agent2 = sl.api.get(f"/api/sessions/{session_id}").json()["stats"]["agent"]
    assert 0 < agent2["uploaded_blocks"] <= total - before_kill  # only what was missing
    assert agent2["reused_blocks"] >= before_kill
    out = tmp_path / "exported.img"
    export_image(ImageStore(sl.data_dir / "images"), "pc/k", out)
    assert files_of(out, disk.part_size, list(disk.files), tmp_path) == disk.files


def test_a_corrupted_block_is_refused_with_its_digest(server_lab: ServerLab) -> None:
    sl = server_lab
    api = sl.start()
    sock = str(sl.work / "api.sock")
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://f") as raw:
        r = raw.post(
            "/api/agent/register",
            headers={"Authorization": f"Bearer {ENROLL}"},
            json={"macs": ["52:54:00:aa:bb:cc"], "hostname": "pc", "inventory": {}},
        )
        assert r.status_code == 200, r.text
        machine_id, credential = r.json()["machine_id"], r.json()["credential"]
        c = api.post("/api/captures", json={"machine_id": machine_id, "target_image": "x"})
        assert c.status_code == 201, c.text
        url = f"/api/agent/captures/{c.json()['id']}/blocks"
        block = b"golden image block " * 50_000
        digest = block_digest(block).hex()
        payload = bytearray(compress_block(block, 1))
        payload[len(payload) // 2] ^= 0x40  # one bit flipped in transit
        headers = {
            "Authorization": f"Bearer {credential}",
            "X-Fleetcast-Raw-Length": str(len(block)),
        }
        bad = raw.put(f"{url}/{digest}", content=bytes(payload), headers=headers)
        assert bad.status_code == 422 and digest in bad.text
        good = raw.put(f"{url}/{digest}", content=compress_block(block, 1), headers=headers)
        assert good.status_code == 201, good.text
