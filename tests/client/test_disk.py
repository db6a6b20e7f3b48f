"""The receiver's disk target: what it refuses before writing, and how it writes and zeros."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.disk import DiskError, Target, TargetError, device_in_use, parse_mountinfo

MIB = 1 << 20
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None,
    reason="needs root, loop devices and mount",
)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_missing_file_is_created_at_the_image_size_and_sparse(tmp_path: Path) -> None:
    t = Target.open(tmp_path / "disk.img", 8 * MIB)
    t.write(MIB, b"\x01" * MIB)
    t.sync()
    t.close()
    data = (tmp_path / "disk.img").read_bytes()
    assert len(data) == 8 * MIB
    assert data == bytes(MIB) + b"\x01" * MIB + bytes(6 * MIB)
    assert _allocated(tmp_path / "disk.img") < 3 * MIB


def test_a_short_file_is_grown_and_a_longer_one_kept(tmp_path: Path) -> None:
    short, long = tmp_path / "short", tmp_path / "long"
    short.write_bytes(b"x" * 100)
    long.write_bytes(b"y" * (3 * MIB))
    Target.open(short, 2 * MIB).close()
    Target.open(long, 2 * MIB).close()
    assert short.stat().st_size == 2 * MIB
    assert long.stat().st_size == 3 * MIB


def test_zero_blocks_of_an_existing_file_become_holes_of_zeros(tmp_path: Path) -> None:
    path = tmp_path / "used.img"
    path.write_bytes(os.urandom(4 * MIB))
    t = Target.open(path, 4 * MIB)
    t.zero(MIB, 2 * MIB)
    t.sync()
    t.close()
    data = path.read_bytes()
    assert data[MIB : 3 * MIB] == bytes(2 * MIB)
    assert data[:MIB] != bytes(MIB) and data[3 * MIB :] != bytes(MIB)
    assert t.stats.zero_method == "punch-hole"
    assert t.stats.bytes_zeroed == 2 * MIB
    assert _allocated(path) <= 2 * MIB + 64 * 1024


def test_assume_blank_leaves_zero_blocks_alone(tmp_path: Path) -> None:
    path = tmp_path / "used.img"
    content = os.urandom(2 * MIB)
    path.write_bytes(content)
    t = Target.open(path, 2 * MIB, assume_blank=True)
    t.zero(0, 2 * MIB)
    t.close()
    assert path.read_bytes() == content
    assert t.stats.bytes_zeroed == 0


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="neither a regular file nor a block device"):
        Target.open(tmp_path, MIB)


def test_a_file_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="does not exist"):
        Target.open(tmp_path / "nope" / "disk.img", MIB)


def test_mountinfo_is_parsed_by_device_number() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw\n"
        "37 35 8:1 / /boot rw - vfat /dev/sda1 rw\n"
    )
    assert parse_mountinfo(text) == {"98:0": ["/mnt2"], "8:1": ["/boot"]}


def test_a_device_with_a_mounted_partition_is_in_use(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    disk = sysfs / "devices" / "sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "sda1" / "partition").write_text("1\n")
    (disk / "sda1" / "dev").write_text("8:1\n")
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "dev" / "block" / "8:0").symlink_to(disk)
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("37 35 8:1 / /boot rw - vfat /dev/sda1 rw\n")
    (proc / "swaps").write_text("Filename Type Size Used Priority\n")
    why = device_in_use("8:0", sys_root=str(sysfs), proc_root=str(proc))
    assert why == "sda1 is mounted on /boot"
    (proc / "self" / "mountinfo").write_text("")
    assert device_in_use("8:0", sys_root=str(sysfs), proc_root=str(proc)) == ""


# -- real devices and filesystems (root) ---------------------------------------------------


@contextlib.contextmanager
def loop_device(tmp_path: Path, size: int, *, readonly: bool = False) -> Iterator[str]:
    backing = tmp_path / f"loop-{size}.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    args = ["losetup", "-f", "--show", *(["-r"] if readonly else []), str(backing)]
    dev = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    where = tmp_path / "mnt"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@needs_root
def test_a_device_smaller_than_the_image_is_refused(tmp_path: Path) -> None:
    with (
        loop_device(tmp_path, 4 * MIB) as dev,
        pytest.raises(TargetError, match="holds 4194304 bytes but the image needs"),
    ):
        Target.open(dev, 8 * MIB)


@needs_root
def test_a_read_only_device_is_refused(tmp_path: Path) -> None:
    with (
        loop_device(tmp_path, 4 * MIB, readonly=True) as dev,
        pytest.raises(TargetError, match="read-only"),
    ):
        Target.open(dev, 4 * MIB)


@needs_root
def test_a_mounted_device_is_refused_and_left_untouched(tmp_path: Path) -> None:
    with loop_device(tmp_path, 16 * MIB) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
        mnt = tmp_path / "ext4"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "ro,noload", dev, str(mnt)], check=True)
        try:
            before = hashlib.sha256(Path(dev).read_bytes()).digest()
            with pytest.raises(TargetError, match="is mounted on"):
                Target.open(dev, 8 * MIB)
            assert hashlib.sha256(Path(dev).read_bytes()).digest() == before
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


@needs_root
def test_a_file_backing_a_loop_device_is_refused(tmp_path: Path) -> None:
    with loop_device(tmp_path, 4 * MIB) as dev:
        with pytest.raises(TargetError) as err:
            Target.open(tmp_path / f"loop-{4 * MIB}.img", 4 * MIB)
        assert f"backs loop device {dev}" in str(err.value)


@needs_root
def test_a_device_is_written_and_zeroed(tmp_path: Path) -> None:
    with loop_device(tmp_path, 4 * MIB) as dev:
        with open(dev, "r+b") as f:
            f.write(b"\xff" * 4 * MIB)
        t = Target.open(dev, 4 * MIB)
        t.write(0, b"\x07" * MIB)
        t.zero(MIB, 3 * MIB)
        t.sync()
        t.close()
        assert Path(dev).read_bytes() == b"\x07" * MIB + bytes(3 * MIB)
        assert t.stats.zero_method in ("blkzeroout", "write")


@needs_root
def test_a_file_on_a_read_only_filesystem_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path, "4m") as mnt:
        (mnt / "disk.img").write_bytes(b"keep")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(TargetError, match="read-only filesystem"):
            Target.open(mnt / "disk.img", MIB)
        with pytest.raises(TargetError, match="read-only filesystem"):
            Target.open(mnt / "new.img", MIB)
        assert (mnt / "disk.img").read_bytes() == b"keep"


@needs_root
def test_a_full_filesystem_is_a_clear_disk_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path, "1m") as mnt:
        t = Target.open(mnt / "disk.img", 8 * MIB)
        with pytest.raises(DiskError, match="filesystem holding the target is full") as err:
            for i in range(8):
                t.write(i * MIB, b"\x01" * MIB)
        assert err.value.errno == 28
        t.close()


def test_an_io_error_is_a_clear_disk_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Target.open(tmp_path / "disk.img", MIB)

    def failing_pwrite(fd: int, data: object, offset: int) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(DiskError, match="reported an I/O error") as err:
        t.write(4096, b"x" * 4096)
    assert err.value.errno == 5
    assert "at offset 4096" in str(err.value)
    t.close()
