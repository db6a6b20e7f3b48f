"""fleetcast send / receive end to end: real processes, real multicast, private namespaces.

Every test builds its own lab (bench/lab.py): a bridge, a sender namespace and one
namespace per receiver, torn down whatever happens. Targets are files; success means the
file hashes to the image's SHA-256 (unused blocks read as zeros on a fresh file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fleethelp import ROOT, BuiltImage, Fleet, build_image, file_sha256

from bench.lab import wait_until

pytestmark = pytest.mark.netns

RECEIVE_OK, RECEIVE_FAILED, RECEIVE_EVICTED, RECEIVE_ABORTED, RECEIVE_REFUSED = 0, 1, 3, 4, 5
SEND_OK, SEND_ERROR, SEND_PARTIAL, SEND_NONE = 0, 1, 3, 4


def test_two_receivers_get_identical_copies(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    fleet = make_fleet(small_image, 2)
    targets = [tmp_path / f"r{i}.img" for i in range(2)]
    receivers = [fleet.receive(n, t) for n, t in zip(fleet.lab.receivers, targets, strict=True)]
    sender = fleet.send("--min-receivers", "2", "--max-wait", "20")
    assert fleet.wait(sender, "sender", 60) == SEND_OK, fleet.log("sender")
    for node, proc, target in zip(fleet.lab.receivers, receivers, targets, strict=True):
        assert fleet.wait(proc, node.name, 20) == RECEIVE_OK, fleet.log(node.name)
        assert file_sha256(target) == small_image.sha256
        assert "VERIFIED" in fleet.log(node.name)
    assert "2 completed, 0 evicted, 0 failed" in fleet.log("sender")


def test_a_target_too_small_is_refused_before_writing(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    backing = tmp_path / "small-disk"
    backing.write_bytes(b"\x5a" * (4 << 20))  # 4 MiB, the image needs 9 MiB
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        fleet = make_fleet(small_image, 1)
        node = fleet.lab.receivers[0]
        receiver = fleet.receive(node, dev)
        sender = fleet.send("--max-wait", "3")
        assert fleet.wait(receiver, node.name, 40) == RECEIVE_REFUSED, fleet.log(node.name)
        assert "the image needs" in fleet.log(node.name)
        assert fleet.wait(sender, "sender", 40) == SEND_NONE, fleet.log("sender")
        assert "failed" in fleet.log("sender")
        with open(dev, "rb") as f:
            assert f.read() == b"\x5a" * (4 << 20)  # not one byte written
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_receiver_with_the_wrong_key_never_writes(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    fleet = make_fleet(small_image, 2)
    good, bad = fleet.lab.receivers
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text(os.urandom(32).hex())
    bad_target = tmp_path / "bad.img"
    bad_proc = fleet.receive(bad, bad_target, "--timeout", "4", key_file=wrong_key)
    good_proc = fleet.receive(good, tmp_path / "good.img")
    sender = fleet.send("--max-wait", "20")
    assert fleet.wait(good_proc, good.name, 40) == RECEIVE_OK, fleet.log(good.name)
    assert fleet.wait(sender, "sender", 40) == SEND_OK, fleet.log("sender")
    assert fleet.wait(bad_proc, bad.name, 20) == RECEIVE_ABORTED, fleet.log(bad.name)
    assert not bad_target.exists()
    dropped = fleet.stats(bad)["session"]["dropped"]
    assert dropped.get("bad_tag", 0) > 0
    assert "1 completed" in fleet.log("sender")


@pytest.mark.slow
def test_forged_datagrams_are_dropped_and_never_written(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    fleet = make_fleet(small_image, 3)
    r0, r1, forger_node = fleet.lab.receivers
    targets = [tmp_path / "r0.img", tmp_path / "r1.img"]
    procs = [fleet.receive(r0, targets[0]), fleet.receive(r1, targets[1])]
    forger = fleet.lab.popen(
        forger_node,
        [
            sys.executable,
            str(ROOT / "tests/e2e/forge.py"),
            fleet.group,
            str(fleet.port),
            "lab0",
            "6",
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    # A slow paced session, so forged and genuine datagrams are interleaved for seconds.
    sender = fleet.send("--min-receivers", "2", "--max-wait", "20", "--rate", "8M")
    out, _ = forger.communicate(timeout=60)
    assert b"forging session" in out and b"sent " in out, out
    for node, proc, target in zip((r0, r1), procs, targets, strict=True):
        assert fleet.wait(proc, node.name, 60) == RECEIVE_OK, fleet.log(node.name)
        assert file_sha256(target) == small_image.sha256
        assert fleet.stats(node)["session"]["dropped"].get("bad_tag", 0) > 100
    # untagged garbage spoiled some blocks' copies: caught by the hash, sent again tagged
    spoiled = [fleet.stats(node)["session"].get("untagged_blocks_failed", 0) for node in (r0, r1)]
    assert sum(spoiled) > 0, spoiled
    assert fleet.wait(sender, "sender", 30) == SEND_OK, fleet.log("sender")


@pytest.mark.slow
def test_eight_receivers_with_loss_a_late_joiner_and_a_killed_one(
    make_fleet: Callable[..., Fleet], realistic_image: BuiltImage, tmp_path: Path
) -> None:
    fleet = make_fleet(realistic_image, 9, sender_rate="1gbit")
    nodes = fleet.lab.receivers
    for node in nodes:
        fleet.lab.set_loss(node, 2)
    late, victim = nodes[-1], nodes[0]
    targets = {n.name: tmp_path / f"{n.name}.img" for n in nodes}
    started = time.monotonic()
    procs = {n.name: fleet.receive(n, targets[n.name]) for n in nodes[:-1]}
    # Paced well below the link so the transfer lasts long enough to join late and kill.
    sender = fleet.send("--min-receivers", "8", "--max-wait", "20", "--rate", "30M")

    def written(name: str) -> int:
        path = targets[name]
        return path.stat().st_blocks * 512 if path.exists() else 0

    assert wait_until(lambda: written(victim.name) > (1 << 20), 30), fleet.log("sender")
    assert fleet.lab.kill(procs.pop(victim.name)) == -9  # SIGKILL by PID, mid-transfer
    procs[late.name] = fleet.receive(late, targets[late.name])  # joins after the start
    for name, proc in procs.items():
        assert fleet.wait(proc, name, 60) == RECEIVE_OK, fleet.log(name)
        assert file_sha256(targets[name]) == realistic_image.manifest.image_sha256, name
    assert fleet.wait(sender, "sender", 30) == SEND_PARTIAL, fleet.log("sender")
    log = fleet.log("sender")
    assert "8 completed, 1 evicted" in log
    assert f"({victim.address}) evicted" in log
    assert time.monotonic() - started < 90
    # the 2% loss really dropped datagrams (somewhere: see the group check below)
    counters = [fleet.lab.nft_counters(n) for n in nodes[1:]]
    dropped = [int(m.group(1)) for c in counters for m in re.finditer(r"counter packets (\d+)", c)]
    assert len(dropped) == len(counters) and sum(dropped) > 0, counters
    # ... and the receivers measured it: --stats-json carries each one's loss since it joined
    # (not pinned near 2 %: the sender's UDP GSO batches cross the veths whole, so the rule
    # drops a few dozen datagrams at a time; tests/e2e/test_server_loss.py splits them and
    # pins it). Over the whole group: this image is ~107 trains, so one receiver loses none
    # of its trains ~11% of the time (seen in CI: loss_total 0.0 on r1, and a run where r1's
    # rule dropped nothing).
    sessions = [fleet.stats(n)["session"] for n in nodes[1:]]
    for session in sessions:
        assert 0.0 <= session["loss_total"] < 0.2, session
        assert 0.0 <= session["loss"] <= 1.0, session
    assert sum(s["lost_datagrams"] for s in sessions) > 0, sessions
    assert sum(s["loss_total"] > 0.0 for s in sessions) >= len(sessions) // 2, sessions


TWO_SESSIONS = """
import asyncio, json, sys
from pathlib import Path
from protocol.keys import parse_key
from server.images.store import ImageStore
from server.multicast.run import SendOptions, SessionRunner

async def main(specs):
    runners = []
    for data_dir, name, group, port, key_file in specs:
        store = ImageStore(Path(data_dir) / "images")
        manifest_bytes, manifest = store.load_manifest(name)
        opts = SendOptions(group=group, port=port, iface="lab0",
                           key=parse_key(Path(key_file).read_text()), max_wait=20)
        runners.append(SessionRunner(name, manifest_bytes, manifest, store.read_block, opts))
    reports = await asyncio.gather(*(r.run() for r in runners))
    print(json.dumps([[r.outcome, r.count("completed"), len(r.receivers)] for r in reports]))

asyncio.run(main(json.loads(sys.argv[1])))
"""


def test_two_sessions_in_one_event_loop_do_not_cross_talk(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    other_disk = tmp_path / "other.img"
    other_disk.write_bytes(os.urandom(3 << 20) + b"other" * 200_000)
    other = build_image(tmp_path / "other-data", "other-image", other_disk)
    fleet = make_fleet(small_image, 2)
    key_b = tmp_path / "b.key"
    key_b.write_text(os.urandom(32).hex())
    group_b = fleet.group.rsplit(".", 1)[0] + ".251"  # same port, another group and key
    r0, r1 = fleet.lab.receivers
    p0 = fleet.receive(r0, tmp_path / "a.img")
    p1 = fleet.lab.popen(
        r1,
        [
            sys.executable,
            "-m",
            "fleetcast",
            "receive",
            "--target",
            str(tmp_path / "b.img"),
            "--group",
            group_b,
            "--port",
            str(fleet.port),
            "--iface",
            "lab0",
            "--key-file",
            str(key_b),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
    )
    specs = [
        [str(small_image.data_dir), small_image.name, fleet.group, fleet.port, str(fleet.key_file)],
        [str(other.data_dir), other.name, group_b, fleet.port, str(key_b)],
    ]
    sender = fleet.lab.popen(
        fleet.lab.sender,
        [sys.executable, "-c", TWO_SESSIONS, json.dumps(specs)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=str(ROOT),
    )
    out, _ = sender.communicate(timeout=60)
    assert json.loads(out.splitlines()[-1]) == [["completed", 1, 1], ["completed", 1, 1]]
    assert fleet.wait(p0, r0.name, 20) == RECEIVE_OK, fleet.log(r0.name)
    assert p1.wait(timeout=20) == RECEIVE_OK
    assert file_sha256(tmp_path / "a.img") == small_image.sha256
    assert file_sha256(tmp_path / "b.img") == other.sha256
    # Each receiver heard only its own group: nothing of the other session reached it.
    assert not fleet.stats(r0)["session"]["dropped"].get("bad_tag")


def test_a_full_disk_fails_the_receiver_and_the_sender_is_told(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        fleet = make_fleet(small_image, 1)
        node = fleet.lab.receivers[0]
        receiver = fleet.receive(node, mnt / "disk.img")
        sender = fleet.send("--max-wait", "20")
        assert fleet.wait(receiver, node.name, 40) == RECEIVE_FAILED, fleet.log(node.name)
        assert "filesystem holding the target is full" in fleet.log(node.name)
        assert fleet.wait(sender, "sender", 40) == SEND_NONE, fleet.log("sender")
        assert "failed: writing" in fleet.log("sender")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_stopping_the_sender_aborts_receivers_and_says_so(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    fleet = make_fleet(small_image, 1)
    node = fleet.lab.receivers[0]
    target = tmp_path / "r0.img"
    receiver = fleet.receive(node, target)
    sender = fleet.send("--rate", "4M")  # ~6 s of data: stopped well before the end
    assert wait_until(lambda: target.exists() and target.stat().st_blocks > 0, 20)
    fleet.lab.kill(sender, signal.SIGTERM)
    assert sender.returncode == SEND_ERROR, fleet.log("sender")
    assert "aborted" in fleet.log("sender")
    assert fleet.wait(receiver, node.name, 30) == RECEIVE_ABORTED, fleet.log(node.name)
    assert "ABORTED" in fleet.log(node.name)


def test_a_used_block_device_ends_identical_to_the_image(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    size = small_image.manifest.image_size
    backing = tmp_path / "used-disk"
    backing.write_bytes(b"\xee" * (12 << 20))  # an old install: zero blocks must be zeroed
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        fleet = make_fleet(small_image, 1)
        node = fleet.lab.receivers[0]
        receiver = fleet.receive(node, dev)
        sender = fleet.send("--max-wait", "20")
        assert fleet.wait(receiver, node.name, 40) == RECEIVE_OK, fleet.log(node.name)
        assert fleet.wait(sender, "sender", 40) == SEND_OK, fleet.log("sender")
        with open(dev, "rb") as f:
            copy = f.read(size)
            rest = f.read()
        assert hashlib.sha256(copy).digest() == small_image.sha256
        assert rest == b"\xee" * (len(rest))  # beyond the image: untouched
        assert fleet.stats(node)["target"]["zero_method"] in ("blkzeroout", "write")
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_smaller_payload_size_is_followed_by_receivers(
    make_fleet: Callable[..., Fleet], small_image: BuiltImage, tmp_path: Path
) -> None:
    fleet = make_fleet(small_image, 1)
    node = fleet.lab.receivers[0]
    receiver = fleet.receive(node, tmp_path / "r0.img")
    sender = fleet.send("--payload-size", "1000", "--max-wait", "20")
    assert fleet.wait(receiver, node.name, 40) == RECEIVE_OK, fleet.log(node.name)
    assert fleet.wait(sender, "sender", 40) == SEND_OK, fleet.log("sender")
    assert file_sha256(tmp_path / "r0.img") == small_image.sha256
    stats = fleet.stats(node)["socket"]
    assert stats["bytes_in"] / stats["datagrams_in"] <= 1000
