"""Captures that die or fail half-way leave the store as it was (docs/FORMAT.md §5).

Real processes: a capture killed with SIGKILL, a capture into a full filesystem (a small
tmpfs mounted in a private mount namespace), and a block device mounted read-write.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.images.store import ImageNotFound, ImageStore

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare for a private mount namespace",
)


def fleetcast(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETCAST_DATA": str(data)}
    return subprocess.run([sys.executable, "-m", "fleetcast", "image", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip


def wordy_disk(path: Path, size: int, seed: int = 0) -> Path:
    """Compressible but slow to compress at high levels: random words."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randrange(2, 9)))
             for _ in range(5000)]  # fmt: skip
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(b" ".join(rng.choices(words, k=200_000))[:MIB])
    return path


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_kill_9_mid_capture_leaves_no_image_and_the_next_capture_cleans_up(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = wordy_disk(tmp_path / "big.img", 48 * MIB)
    env = {**os.environ, "FLEETCAST_DATA": str(data)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetcast", "image", "capture", str(src), "--name", "victim",
         "--level", "19", "--all-blocks"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    blocks = data / "images" / "blocks"
    try:
        deadline = time.monotonic() + 60
        while len(list(blocks.glob("*/*"))) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "capture finished before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = ImageStore(data / "images")
    assert store.list_images() == []
    with pytest.raises(ImageNotFound):
        store.load_manifest("victim")
    listing = fleetcast(data, "list")
    assert listing.returncode == 0 and "no images" in listing.stdout
    assert list(blocks.glob("*/*"))  # orphans of the dead capture are still there...

    small = wordy_disk(tmp_path / "small.img", 2 * MIB, seed=5)
    assert fleetcast(data, "capture", str(small), "--name", "next").returncode == 0
    # ...and the next capture removed them and the dead process's temp files.
    [info] = store.list_images()
    assert {p.name for p in blocks.glob("*/*")} == {d.hex() for d in info.manifest.unique_digests()}
    assert list((data / "images" / "tmp").iterdir()) == []


@needs_root
def test_disk_full_fails_with_one_line_and_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    small = wordy_disk(tmp_path / "small.img", MIB, seed=1)
    big = tmp_path / "big.img"
    big.write_bytes(random.Random(2).randbytes(24 * MIB))  # stored raw: needs 24 MiB
    py = f"cd {ROOT} && FLEETCAST_DATA={data} {sys.executable} -m fleetcast image"
    script = f"""
set -e
mount -t tmpfs -o size=8m fleetcast-test {data}
{py} capture {small} --name small >/dev/null
find {data} -type f | sort > {tmp_path}/before.txt
set +e
{py} capture {big} --name big >/dev/null 2> {tmp_path}/err.txt
echo $? > {tmp_path}/rc.txt
set -e
find {data} -type f | sort > {tmp_path}/after.txt
{py} verify small > {tmp_path}/verify.txt
"""
    subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                   check=True, timeout=120)  # fmt: skip
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "1"
    assert err.count("\n") == 1 and "disk full" in err, err
    assert (tmp_path / "after.txt").read_text() == (tmp_path / "before.txt").read_text()
    assert "OK" in (tmp_path / "verify.txt").read_text()
    assert not any(data.iterdir())  # the tmpfs went away with the namespace


@needs_root
@pytest.mark.tools
def test_a_block_device_mounted_read_write_is_refused(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("needs e2fsprogs and losetup")
    fs = tmp_path / "fs.img"
    with open(fs, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(fs)], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    mnt, data = tmp_path / "mnt", tmp_path / "data"
    mnt.mkdir()
    py = f"cd {ROOT} && FLEETCAST_DATA={data} {sys.executable} -m fleetcast image"
    script = f"""
mount {loop} {mnt} || exit 99
{py} capture {loop} --name rw 2> {tmp_path}/rw.err; echo $? > {tmp_path}/rw.rc
mount -o remount,ro {mnt}
{py} capture {loop} --name ro > {tmp_path}/ro.out 2>&1; echo $? > {tmp_path}/ro.rc
umount {mnt}
"""
    try:
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       check=True, timeout=120)  # fmt: skip
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    assert (tmp_path / "rw.rc").read_text().strip() == "1"
    err = (tmp_path / "rw.err").read_text()
    assert f"{loop} is mounted read-write at {mnt}" in err and "unmount" in err
    assert (tmp_path / "ro.rc").read_text().strip() == "0", (tmp_path / "ro.out").read_text()
    [info] = ImageStore(data / "images").list_images()
    assert info.name == "ro" and info.manifest.source["kind"] == "block device"
    assert info.manifest.partitions[0].fs == "ext4"


@pytest.mark.slow
def test_ctrl_c_mid_capture_removes_what_it_added(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = wordy_disk(tmp_path / "big.img", 48 * MIB, seed=3)
    env = {**os.environ, "FLEETCAST_DATA": str(data)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetcast", "image", "capture", str(src), "--name", "x",
         "--level", "19"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # as from a terminal: a shell's background job (a CI step) inherits SIGINT ignored
        preexec_fn=_sigint_default,
    )  # fmt: skip
    blocks = data / "images" / "blocks"
    try:
        deadline = time.monotonic() + 60
        while len(list(blocks.glob("*/*"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "capture finished before it could be interrupted"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130 and err == "fleetcast: interrupted\n"
    assert list(blocks.glob("*/*")) == []
    assert ImageStore(data / "images").list_images() == []
