"""Partition tables and filesystem signatures, read from real disks built with Debian tools."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.partitions import (
    FS_PROBE_BYTES,
    PartitionTable,
    detect_filesystem,
    parse_partition_table,
)

MIB = 1 << 20
needs = pytest.mark.tools


def reader(path: Path) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read_at


def table_of(path: Path) -> PartitionTable:
    return parse_partition_table(reader(path), path.stat().st_size)


def sfdisk(path: Path, size: int, script: str) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk not installed")
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
        input=script.encode(),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def mkfs(args: list[str]) -> None:
    if shutil.which(args[0]) is None:
        pytest.skip(f"{args[0]} not installed")
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@needs
def test_gpt_partitions_with_names_and_types(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.img"
    sfdisk(
        disk, 64 * MIB, "label: gpt\nsize=8MiB, type=U, name=esp\nsize=20MiB, name=root\ntype=S\n"
    )
    t = table_of(disk)
    assert t.kind == "gpt"
    assert [(p.number, p.start, p.size) for p in t.partitions][:2] == [
        (1, MIB, 8 * MIB),
        (2, 9 * MIB, 20 * MIB),
    ]
    assert t.partitions[0].type == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert t.partitions[0].name == "esp"
    assert t.partitions[2].type == "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
    assert t.partitions[2].start + t.partitions[2].size <= 64 * MIB - 33 * 512


@needs
def test_gpt_with_a_corrupted_header_is_not_trusted(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.img"
    sfdisk(disk, 16 * MIB, "label: gpt\nsize=4MiB\n")
    with open(disk, "r+b") as f:
        f.seek(512 + 40)
        f.write(b"\xff")
    assert table_of(disk).kind == "none"


@needs
def test_mbr_with_extended_and_logical_partitions(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.img"
    sfdisk(
        disk,
        64 * MIB,
        "label: dos\nstart=1MiB, size=10MiB, type=83\n"
        "start=11MiB, size=40MiB, type=5\nstart=12MiB, size=10MiB, type=83\n"
        "start=23MiB, size=12MiB, type=7\n",
    )
    t = table_of(disk)
    assert t.kind == "mbr"
    nums = [(p.number, p.type, p.size) for p in t.partitions]
    assert nums == [(1, "0x83", 10 * MIB), (5, "0x83", 10 * MIB), (6, "0x07", 12 * MIB)]
    assert t.partitions[1].start > 11 * MIB


@needs
def test_filesystems_are_recognised_with_labels(tmp_path: Path) -> None:
    cases = {
        "ext4": ["mkfs.ext4", "-q", "-F", "-L", "rootfs"],
        "vfat": ["mkfs.vfat", "-n", "ESP"],
        "ntfs": ["mkntfs", "-F", "-f", "-q", "-L", "win"],
        "swap": ["mkswap", "-L", "sw"],
    }
    for fs, cmd in cases.items():
        img = tmp_path / f"{fs}.img"
        with open(img, "wb") as f:
            f.truncate(32 * MIB)
        mkfs([*cmd, str(img)])
        info = detect_filesystem(img.read_bytes()[:FS_PROBE_BYTES])
        assert info.fs == fs, fs
        if fs != "ntfs":  # NTFS keeps its label in $Volume, not the boot sector
            assert info.label == {"ext4": "rootfs", "vfat": "ESP", "swap": "sw"}[fs]
        assert info.uuid
    ext = detect_filesystem((tmp_path / "ext4.img").read_bytes()[:FS_PROBE_BYTES])
    assert ext.used_bytes is not None and 0 < ext.used_bytes < 32 * MIB


@needs
def test_a_whole_disk_filesystem_is_not_mistaken_for_an_mbr(tmp_path: Path) -> None:
    img = tmp_path / "floppy.img"
    with open(img, "wb") as f:
        f.truncate(16 * MIB)
    mkfs(["mkfs.vfat", str(img)])
    assert table_of(img) == PartitionTable("none", ())


def test_garbage_and_empty_disks_have_no_table() -> None:
    junk = bytes(range(256)) * 4096
    assert parse_partition_table(lambda o, n: junk[o : o + n], len(junk)).kind == "none"
    zeros = bytes(MIB)
    assert parse_partition_table(lambda o, n: zeros[o : o + n], len(zeros)).kind == "none"
    assert detect_filesystem(b"").fs == ""


def test_mbr_entries_beyond_the_disk_are_dropped_and_ebr_loops_end() -> None:
    disk = bytearray(4 * MIB)
    # p1: inside the disk; p2: past its end; p3: extended whose EBR points at itself.
    struct.pack_into("<B3sB3sII", disk, 446, 0, b"", 0x83, b"", 2048, 2048)
    struct.pack_into("<B3sB3sII", disk, 462, 0, b"", 0x83, b"", 4096, 1 << 30)
    struct.pack_into("<B3sB3sII", disk, 478, 0, b"", 0x05, b"", 6144, 1024)
    disk[510:512] = b"\x55\xaa"
    ebr = 6144 * 512
    struct.pack_into("<B3sB3sII", disk, ebr + 446, 0, b"", 0x83, b"", 1, 100)
    struct.pack_into("<B3sB3sII", disk, ebr + 462, 0, b"", 0x05, b"", 0, 0)
    struct.pack_into("<B3sB3sII", disk, ebr + 462, 0, b"", 0x05, b"", 0, 0)
    disk[ebr + 510 : ebr + 512] = b"\x55\xaa"
    t = parse_partition_table(lambda o, n: bytes(disk[o : o + n]), len(disk))
    assert t.kind == "mbr"
    assert [(p.number, p.start) for p in t.partitions] == [(1, MIB), (5, (6144 + 1) * 512)]
