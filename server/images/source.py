"""Opening what a capture reads: a raw image file or a block device, read-only.

A block device that is mounted read-write (itself or any of its partitions) is refused: its
filesystems change while we read, so the image would be inconsistent. Files in a format
qemu-img understands (qcow2, VMDK, VHD(X), VDI) are refused with a pointer to
``fleetcast image import``: read as raw bytes they would make a useless image.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from imaging.walk import DiskFile as Source

SECTOR = 512
_FORMAT_MAGIC = {b"QFI\xfb": "qcow2", b"KDMV": "vmdk", b"vhdxfile": "vhdx", b"conectix": "vhd"}


class SourceError(Exception):
    """The capture source cannot be used; the message says why and what to do."""


@contextlib.contextmanager
def open_source(path: Path) -> Iterator[Source]:
    """Open ``path`` read-only as a capture source; raises SourceError with the reason."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file or device") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot open for reading: {exc.strerror}") from None
    try:
        yield _check(path, fd)
    finally:
        os.close(fd)


def _check(path: Path, fd: int) -> Source:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        check_not_mounted_rw(st.st_rdev, path)
        size = os.lseek(fd, 0, os.SEEK_END)
        is_block = True
    elif stat.S_ISREG(st.st_mode):
        size, is_block = st.st_size, False
    else:
        raise SourceError(f"{path}: not a disk image (neither a regular file nor a block device)")
    if size == 0:
        raise SourceError(f"{path}: empty, not a disk image")
    if size % SECTOR:
        raise SourceError(
            f"{path}: not a raw disk image (its size {size} is not a multiple of "
            f"{SECTOR} bytes); for qcow2/VMDK/VHD use 'fleetcast image import'"
        )
    if not is_block:
        fmt = _foreign_format(fd, size)
        if fmt:
            raise SourceError(
                f"{path}: is a {fmt} image, not a raw disk; use 'fleetcast image import' for it"
            )
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return Source(path, fd, size, is_block)


def foreign_format(path: Path) -> str:
    """The non-raw format ``path`` is in ("qcow2", "vhd", ...), or "" for none known."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return _foreign_format(f.fileno(), size) if size >= 512 else ""


def _foreign_format(fd: int, size: int) -> str:
    head = os.pread(fd, 512, 0)
    tail = os.pread(fd, 8, size - 512)
    for magic, name in _FORMAT_MAGIC.items():
        if head.startswith(magic) or tail == magic:
            return name
    if head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    return ""


def block_family(rdev: int) -> set[tuple[int, int]]:
    """The (major, minor) numbers of a block device and all its partitions."""
    family = {(os.major(rdev), os.minor(rdev))}
    sys_dir = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    with contextlib.suppress(OSError):
        for sub in sys_dir.iterdir():
            dev_file = sub / "dev"
            if (sub / "partition").exists() and dev_file.exists():
                major, minor = dev_file.read_text().strip().split(":")
                family.add((int(major), int(minor)))
    return family


def rw_mounts(family: set[tuple[int, int]], mountinfo: str) -> list[str]:
    """Mount points in ``mountinfo`` text where one of ``family`` is mounted read-write."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 6 or ":" not in fields[2]:
            continue
        major, minor = fields[2].split(":")
        if (int(major), int(minor)) in family and "rw" in fields[5].split(","):
            found.append(fields[4])
    return found


def check_not_mounted_rw(rdev: int, path: Path) -> None:
    """Raise SourceError if the device or one of its partitions is mounted read-write."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    mounts = rw_mounts(block_family(rdev), mountinfo)
    if mounts:
        raise SourceError(
            f"{path} is mounted read-write at {', '.join(mounts)}: unmount it "
            "(or remount it read-only) before capturing"
        )
