"""The same real ext4 disk captured locally (server/images/capture.py) and over the network
(client/capture.py) gives the same manifest, byte for byte, hence the same digest."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # apitest
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/

from apitest import *  # noqa: F403
from test_capture_client_fixtures import *  # noqa: F403
from test_capture_client_fixtures import Served

from bench.disks import make_realistic_disk
from client.capture import Capturer
from protocol.manifest import BlockKind
from server.images.capture import CaptureOptions, capture_image
from server.images.store import ImageStore

MIB = 1 << 20
CREATED = "2026-11-26T03:00:00Z"
pytestmark = [
    pytest.mark.tools,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for read-only loop devices"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "sfdisk", "partclone.extfs")),
        reason="needs e2fsprogs, fdisk and partclone (scripts/setup installs them)",
    ),
]


def test_local_and_network_capture_of_one_ext4_disk_give_the_same_manifest(
    served: Served, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    make_realistic_disk(disk, 24 * MIB, seed=4)  # GPT + ext4, files written, some deleted
    local = capture_image(
        ImageStore(tmp_path / "local"),
        "golden",
        disk,
        CaptureOptions(level=1, progress=False, created=CREATED),
    ).manifest
    session_id, token = served.capture_session("pc/golden")
    api = served.capture_api(session_id, token)
    c = Capturer(api, served.job(session_id, "pc/golden"), disk, created=CREATED)
    remote, reply = c.run()
    assert local.partitions[0].used_map == "partclone" and local.count(BlockKind.UNUSED) > 0
    assert remote.to_bytes() == local.to_bytes()
    assert reply["digest"] == local.digest().hex()
    assert c.stats.uploaded_blocks == len(local.unique_digests())
