"""Which bytes of a disk its filesystems use (docs/FORMAT.md §4); shared by server and client.

For each partition whose filesystem partclone supports, partclone's domain map
(``partclone.<fs> -D -s DEV -o MAP --offset_domain=START``) lists the used ranges; a swap
partition uses only its header page. Everything else (the partition table, gaps between
partitions, unknown filesystems, anything partclone fails on) counts as used, so a failure
here only costs space, never data. A partition inside an image file is handed to partclone
through a read-only loop device (needs root); a partition of a block device through the
kernel's own partition device.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: filesystem (as protocol.partitions detects it) -> partclone program.
PARTCLONE_TOOLS = {
    "ext2": "partclone.extfs",
    "ext3": "partclone.extfs",
    "ext4": "partclone.extfs",
    "ntfs": "partclone.ntfs",
    "vfat": "partclone.fat",
    "exfat": "partclone.exfat",
    "xfs": "partclone.xfs",
    "btrfs": "partclone.btrfs",
}
SWAP_HEADER_BYTES = 4096
#: Always kept at both ends of a mapped partition: boot sectors and superblocks outside the
#: filesystem's cluster map (NTFS keeps its backup boot sector in the partition's last sector).
EDGE_BYTES = 64 << 10
PARTCLONE_TIMEOUT = 600.0


class UsedMapUnavailable(Exception):
    """The used-block map of one partition could not be taken (the reason says why)."""


@dataclass
class UsedRanges:
    """Sorted, disjoint ``[start, end)`` byte ranges of a disk that hold data worth keeping."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    @classmethod
    def whole(cls, size: int) -> UsedRanges:
        return cls([0], [size])

    def replace(self, start: int, end: int, used: list[tuple[int, int]]) -> None:
        """Within ``[start, end)`` keep only ``used`` (absolute, sorted ranges)."""
        pairs = [(s, e) for s, e in zip(self.starts, self.ends, strict=True)]
        out: list[tuple[int, int]] = []
        for s, e in pairs:  # cut [start, end) out of every range
            if e <= start or s >= end:
                out.append((s, e))
                continue
            if s < start:
                out.append((s, start))
            if e > end:
                out.append((end, e))
        out += [(max(s, start), min(e, end)) for s, e in used if min(e, end) > max(s, start)]
        out.sort()
        merged: list[tuple[int, int]] = []
        for s, e in out:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        """The used ranges clipped to ``[start, end)``, relative to ``start``."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        out = []
        while i < len(self.starts) and self.starts[i] < end:
            s, e = max(self.starts[i], start), min(self.ends[i], end)
            if e > s:
                out.append((s - start, e - start))
            i += 1
        return out

    def total(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))


def parse_domain_map(text: str) -> list[tuple[int, int]]:
    """The used (``+``) ranges of a ddrescue-style domain map, as ``(start, end)`` pairs."""
    used = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or line.startswith("#"):
            continue
        try:
            pos, size = int(parts[0], 16), int(parts[1], 16)
        except ValueError:
            continue
        if parts[2] == "+" and size > 0:
            used.append((pos, pos + size))
    return used


def partition_used(fs: str, device: Path, start: int) -> tuple[list[tuple[int, int]], str]:
    """Used ranges (absolute, offset by ``start``) of the filesystem on ``device``.

    Returns the ranges and the method ("partclone" or "swap-header"); raises
    UsedMapUnavailable if the filesystem is not supported or partclone fails.
    """
    if fs == "swap":
        return [(start, start + SWAP_HEADER_BYTES)], "swap-header"
    tool = PARTCLONE_TOOLS.get(fs)
    if tool is None:
        raise UsedMapUnavailable(f"no used-block map for filesystem {fs or 'unknown'!r}")
    if shutil.which(tool) is None:
        raise UsedMapUnavailable(f"{tool} is not installed (Debian package partclone)")
    with tempfile.TemporaryDirectory(prefix="fleetcast-map-") as tmp:
        out = Path(tmp) / "domain.map"
        log_file = Path(tmp) / "partclone.log"  # not /var/log: the boot image has none
        cmd = [tool, "-D", "-q", "-s", str(device), "-o", str(out), "-L", str(log_file)]
        cmd.append(f"--offset_domain={start}")
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=PARTCLONE_TIMEOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired as exc:
            raise UsedMapUnavailable(f"{tool} took over {PARTCLONE_TIMEOUT:.0f} s") from exc
        text = out.read_text() if out.exists() else ""
        if proc.returncode != 0 or not text:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise UsedMapUnavailable(f"{tool} failed: {msg[-1] if msg else proc.returncode}")
    used = parse_domain_map(text)
    if not used:
        raise UsedMapUnavailable(f"{tool} reported no used blocks")
    return used, "partclone"


def with_edges(used: list[tuple[int, int]], start: int, size: int) -> list[tuple[int, int]]:
    """``used`` plus the first and last EDGE_BYTES of the partition, sorted."""
    edge = min(EDGE_BYTES, size)
    return sorted([*used, (start, start + edge), (start + size - edge, start + size)])


@contextlib.contextmanager
def partition_device(source: Path, start: int, size: int) -> Iterator[Path]:
    """A read-only device holding exactly the partition at ``[start, start + size)``.

    A block device's own partition device when the kernel has one, else a read-only loop
    device (root only), detached afterwards. Raises UsedMapUnavailable if neither works.
    """
    if stat.S_ISBLK(os.stat(source).st_mode):
        if start == 0 and size == _device_size(source):
            yield source  # a filesystem on the whole disk: no partition device needed
            return
        part = _kernel_partition(source, start, size)
        if part is not None:
            yield part
            return
    if shutil.which("losetup") is None:
        raise UsedMapUnavailable("losetup is not installed (Debian package mount)")
    proc = subprocess.run(
        [
            "losetup",
            "--find",
            "--show",
            "--read-only",
            "--offset",
            str(start),
            "--sizelimit",
            str(size),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1:] or ["failed"]
        raise UsedMapUnavailable(f"cannot attach a loop device (needs root): {reason[0]}")
    loop = Path(proc.stdout.strip())
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", str(loop)], capture_output=True, timeout=60)


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _kernel_partition(disk: Path, start: int, size: int) -> Path | None:
    """The kernel's partition device of ``disk`` starting at ``start``, if it has one."""
    rdev = os.stat(disk).st_rdev
    sys_dir = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    with contextlib.suppress(OSError, ValueError):
        for sub in sys_dir.iterdir():
            start_file, size_file = sub / "start", sub / "size"
            if not start_file.exists():
                continue
            if (int(start_file.read_text()) * 512, int(size_file.read_text()) * 512) == (
                start,
                size,
            ):
                dev = Path("/dev") / sub.name
                if dev.exists():
                    return dev
    return None
