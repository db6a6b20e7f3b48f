"""Resume and delta re-imaging end to end: real processes, real multicast, private namespaces.

A receiver killed half-way and started again hashes its target, joins with what it holds,
and is sent only the rest; disks holding version 1 of an image get only the blocks version
2 changed; through the server, a restarted agent resumes with delta and an agent whose disk
writes too slowly is evicted and finishes by catch-up over HTTP. Targets must end
byte-identical to the image every time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fleethelp import MIB, BuiltImage, Fleet, build_image, file_sha256
from serverlab import ServerLab

from bench.lab import wait_until
from protocol.manifest import BlockKind, Manifest

pytestmark = pytest.mark.netns

RECEIVE_OK, SEND_OK, SEND_PARTIAL = 0, 0, 3
BLOCKS = 40  #: 1 MiB blocks: 36 data, 4 zero
#: Fragment payload per datagram at the default 1472-byte UDP payload, a lower bound.
FRAGMENT = 1400


def _disk(path: Path, rng: random.Random) -> None:
    """Half-random, half-text data blocks (zstd gets ~2x) and a zero block every tenth."""
    with open(path, "wb") as f:
        for i in range(BLOCKS):
            if i % 10 == 9:
                f.write(bytes(MIB))
            else:
                f.write(rng.randbytes(MIB // 2) + (b"block %04d " % i) * (MIB // 22))
                f.write(bytes(MIB - MIB // 2 - len(b"block 0000 ") * (MIB // 22)))


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuiltImage, BuiltImage, set[int]]:
    """Images v1 and v2 in one store; v2 differs from v1 in two data blocks (5%)."""
    root = tmp_path_factory.mktemp("versions")
    v1_disk, v2_disk = root / "v1.img", root / "v2.img"
    _disk(v1_disk, random.Random(91))
    changed = {4, 27}
    data = bytearray(v1_disk.read_bytes())
    for i in changed:
        data[i * MIB + 100 : i * MIB + 200] = random.Random(i).randbytes(100)
    v2_disk.write_bytes(data)
    v1 = build_image(root / "data", "lab-v1", v1_disk)
    v2 = build_image(root / "data", "lab-v2", v2_disk)
    return v1, v2, changed


def _manifest_file(image: BuiltImage) -> str:
    return str(image.data_dir / "images" / "manifests" / f"{image.name}.json")


def _fragments(m: Manifest, blocks: set[int] | list[int]) -> int:
    return sum(-(-m.stored_sizes[i] // FRAGMENT) for i in blocks)


def test_disks_holding_v1_are_sent_only_the_blocks_v2_changed(
    make_fleet: Callable[..., Fleet],
    versions: tuple[BuiltImage, BuiltImage, set[int]],
    tmp_path: Path,
) -> None:
    v1, v2, changed = versions
    fleet = make_fleet(v2, 2)
    targets = [tmp_path / f"r{i}.img" for i in range(2)]
    for t in targets:
        shutil.copyfile(v1.disk, t)
    manifest = ["--delta", "auto", "--manifest", _manifest_file(v2)]
    receivers = [
        fleet.receive(n, t, *manifest) for n, t in zip(fleet.lab.receivers, targets, strict=True)
    ]
    stats = tmp_path / "sender.json"
    sender = fleet.send("--min-receivers", "2", "--max-wait", "20", "--stats-json", str(stats))
    assert fleet.wait(sender, "sender", 60) == SEND_OK, fleet.log("sender")
    m = v2.manifest
    data_blocks = m.count(BlockKind.DATA)
    for node, proc, target in zip(fleet.lab.receivers, receivers, targets, strict=True):
        assert fleet.wait(proc, node.name, 20) == RECEIVE_OK, fleet.log(node.name)
        assert file_sha256(target) == v2.sha256  # byte-identical to version 2
        s = fleet.stats(node)
        assert s["held_blocks"] == data_blocks - len(changed)
        assert s["session"]["blocks_received"] == len(changed)
        assert s["verified_blocks"] == data_blocks
        assert s["target"]["bytes_written"] == len(changed) * MIB  # nothing else rewritten
        assert s["target"]["bytes_zeroed"] == 0  # its zero blocks were zeros already
    sent = _sender_session(stats)
    wanted = sum(m.stored_sizes[i] for i in changed)
    full = m.stored_bytes
    # the changed blocks (plus the manifest, announces and a few repairs), not the image
    assert wanted <= sent["bytes_sent"] < wanted + full // 10, (sent["bytes_sent"], wanted, full)


@pytest.mark.slow
def test_a_receiver_killed_half_way_resumes_with_only_the_missing_blocks(
    make_fleet: Callable[..., Fleet],
    versions: tuple[BuiltImage, BuiltImage, set[int]],
    tmp_path: Path,
) -> None:
    _, image, _ = versions
    m = image.manifest
    fleet = make_fleet(image, 1)
    node = fleet.lab.receivers[0]
    target = tmp_path / "target.img"
    sender = fleet.send("--rate", "48M", "--max-wait", "20")
    first = fleet.receive(node, target)
    half = m.data_bytes() // 2
    assert wait_until(lambda: target.exists() and target.stat().st_blocks * 512 >= half, 30), (
        fleet.log(node.name)
    )
    fleet.lab.kill(first, signal.SIGKILL)  # power lost: no LEAVE, nothing flushed
    again = fleet.receive(node, target, "--delta", "auto", "--manifest", _manifest_file(image))
    assert fleet.wait(again, node.name, 60) == RECEIVE_OK, fleet.log(node.name)
    assert file_sha256(target) == image.sha256
    s = fleet.stats(node)
    held, received = s["held_blocks"], s["session"]["blocks_received"]
    data_blocks = m.count(BlockKind.DATA)
    assert held >= data_blocks // 3, s  # it kept what it had written and verified
    assert held + received == data_blocks  # and was handed only the rest
    # fragments of held blocks arriving anyway (what the dead instance still lacked, in
    # flight) stay a small share of what resending the held blocks would be
    data = [i for i in range(m.block_count) if m.kinds[i] == BlockKind.DATA]
    assert s["session"]["duplicates"] < _fragments(m, data) * held // data_blocks // 3, s
    # the killed instance goes silent and is evicted; the session still ends
    assert fleet.wait(sender, "sender", 60) in (SEND_OK, SEND_PARTIAL), fleet.log("sender")


def _sender_session(path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    data: dict[str, Any] = json.loads(path.read_text())["session"]
    return data


# -- through the server: agents, eviction and catch-up ---------------------------------------


def _session(api: Any, image: str, machine_ids: list[int], **extra: Any) -> int:
    r = api.post(
        "/api/sessions",
        json={
            "image": image,
            "machine_ids": machine_ids,
            "start_policy": {"max_wait": 60},
            **extra,
        },
    )
    assert r.status_code == 201, r.text
    sid: int = r.json()["id"]
    return sid


def _row(api: Any, sid: int, machine_id: int) -> dict[str, Any]:
    d = api.get(f"/api/sessions/{sid}").json()
    row: dict[str, Any] = next(m for m in d["machines"] if m["machine_id"] == machine_id)
    return {**row, "session_state": d["state"]}


@pytest.mark.slow
def test_agents_re_imaging_v1_disks_with_v2_are_spared_the_blocks_they_hold(
    make_lab: Callable[..., Any],
    versions: tuple[BuiltImage, BuiltImage, set[int]],
    tmp_path: Path,
) -> None:
    v1, v2, changed = versions
    sl = ServerLab(make_lab(2), v2.data_dir, tmp_path)
    try:
        api = sl.start()
        nodes = sl.lab.receivers
        targets = {n.name: tmp_path / f"{n.name}.img" for n in nodes}
        for t in targets.values():
            shutil.copyfile(v1.disk, t)
        procs = {n.name: sl.agent(n, targets[n.name]) for n in nodes}
        ids = [m["id"] for m in sl.wait_for_machines(2)]
        sid = _session(api, v2.name, ids, delta="always")
        for n in nodes:
            assert sl.lab.wait(procs[n.name], 90) == 0, sl.log(n.name)
        m = v2.manifest
        data_blocks = m.count(BlockKind.DATA)
        for mid in ids:
            row = _row(api, sid, mid)
            assert row["state"] == "succeeded" and row["via"] == "multicast", row
            assert row["held_blocks"] == data_blocks - len(changed), row
            assert row["held_bytes"] == m.data_bytes() - len(changed) * MIB, row
        for t in targets.values():
            assert file_sha256(t) == v2.sha256
    finally:
        sl.close()


@pytest.mark.slow
def test_an_agent_restarted_mid_deployment_finishes_with_what_its_disk_kept(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    sl = server_lab
    api = sl.start()
    node, other = sl.lab.receivers
    targets = {n.name: tmp_path / f"{n.name}.img" for n in (node, other)}
    procs = {n.name: sl.agent(n, targets[n.name]) for n in (node, other)}
    ids = {m["address"]: m["id"] for m in sl.wait_for_machines(2)}
    mid = ids[node.address]
    sid = _session(api, small_image.name, list(ids.values()), rate_bps=2_000_000)
    sl.wait_for(
        "half the image on the disk",
        lambda: _row(api, sid, mid)["bytes_done"] >= small_image.manifest.data_bytes() // 3,
        60,
    )
    assert sl.lab.kill(procs[node.name]) == -9  # power lost: the agent never reports
    again = sl.agent(node, targets[node.name])  # rebooted: same machine, same disk
    final = sl.wait_for(
        "the session to end",
        lambda: (r := _row(api, sid, mid))["session_state"] not in ("pending", "running") and r,
        120,
    )
    assert sl.lab.wait(again, 30) == 0, sl.log(node.name)
    assert sl.lab.wait(procs[other.name], 30) == 0, sl.log(other.name)
    assert final["state"] == "succeeded", final
    assert final["held_blocks"] > 0, final  # the server asked for delta; the disk kept blocks
    assert file_sha256(targets[node.name]) == small_image.sha256


@pytest.mark.slow
def test_an_agent_whose_disk_writes_are_throttled_is_evicted_and_catches_up(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: the throttled disk is a FUSE mount")
    from bench.slowdisk import SlowDisk

    sl = server_lab
    sl.settings["FLEETCAST_STRAGGLER_GRACE"] = "2"  # evict 2 s after the other completed
    api = sl.start()
    slow, fast = sl.lab.receivers
    with SlowDisk(tmp_path / "slowdisk", rate=1_500_000) as mount:  # a 1.5 MB/s disk
        targets = {slow.name: mount / "slow.img", fast.name: tmp_path / "fast.img"}
        procs = {n.name: sl.agent(n, targets[n.name]) for n in (slow, fast)}
        ids = {m["address"]: m["id"] for m in sl.wait_for_machines(2)}
        sid = _session(api, small_image.name, list(ids.values()))
        final = sl.wait_for(
            "the session to end",
            lambda: (
                (r := _row(api, sid, ids[slow.address]))["session_state"]
                not in ("pending", "running")
                and r
            ),
            120,
        )
        assert sl.lab.wait(procs[slow.name], 30) == 0, sl.log(slow.name)
        assert sl.lab.wait(procs[fast.name], 30) == 0, sl.log(fast.name)
        assert final["state"] == "succeeded" and final["via"] == "catchup", final
        assert final["catchup_blocks"] > 0, final
        assert final["session_state"] == "succeeded", final
        assert file_sha256(targets[slow.name]) == small_image.sha256
        assert file_sha256(targets[fast.name]) == small_image.sha256
    log = sl.log(slow.name)
    assert "evicted (straggler" in log and "catch-up fetched" in log, log
