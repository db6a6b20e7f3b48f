"""Used-blocks capture of XFS, btrfs and exFAT (docs/FORMAT.md §4).

Each filesystem is built in the test over seeded random garbage inside a GPT partition,
with files written offline where the tools allow it (``mkfs.xfs -p protofile``,
``mkfs.btrfs --rootdir``; exfatprogs has no offline writer, so the exFAT volume is empty).
The used-only capture must not store the garbage; exported over a target full of other
data, the filesystem's own checker (no-modify mode) must find it clean and every file must
read back byte for byte without mounting (``xfs_db`` extent maps, ``btrfs restore``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from protocol.manifest import BlockKind
from server.images.capture import CaptureOptions, capture_image
from server.images.export import export_image, verify_image
from server.images.store import ImageStore

MIB = 1 << 20
PART_START = 1 * MIB
#: filesystem -> (partition size, tools it needs). XFS refuses to make less than 300 MiB.
FILESYSTEMS = {
    "xfs": (320 * MIB, ("mkfs.xfs", "xfs_repair", "xfs_db", "partclone.xfs")),
    "btrfs": (128 * MIB, ("mkfs.btrfs", "btrfs", "partclone.btrfs")),
    "exfat": (32 * MIB, ("mkfs.exfat", "fsck.exfat", "partclone.exfat")),
}
pytestmark = [
    pytest.mark.tools,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for read-only loop devices"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("sfdisk", "losetup")), reason="needs fdisk, mount"
    ),
]


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, check=True, timeout=300)


def fill_random(path: Path, size: int, seed: str) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // (4 * MIB)):
            f.write(rng.randbytes(4 * MIB))


def copy_range(src: Path, src_off: int, dst: Path, dst_off: int, size: int) -> None:
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        done = 0
        while done < size:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done,
                                   src_off + done, dst_off + done)  # fmt: skip
            assert n > 0
            done += n


def make_files(rng: random.Random, work: Path) -> dict[str, bytes]:
    files = {}
    for i in range(12):
        n = rng.randrange(1, 400_000)
        if i % 2:
            name, data = f"f{i:02d}.bin", rng.randbytes(n)
        else:
            name, data = (
                f"f{i:02d}.txt",
                (f"line {i} of a text file\n" * (n // 20 + 1)).encode()[:n],
            )
        files[name] = data
        (work / name).write_bytes(data)
    return files


def build(fs: str, part: Path, work: Path) -> dict[str, bytes]:
    """Make ``fs`` on ``part`` (already full of garbage); return the files written into it."""
    if fs == "exfat":
        run("mkfs.exfat", "-L", "shared", str(part))
        return {}
    files = make_files(random.Random(fs), work)
    if fs == "xfs":
        proto = work.parent / "proto"
        lines = ["fleetcast", "0 0", "d--755 0 0"]
        lines += [f"{n} ---644 0 0 {work / n}" for n in files] + ["$", ""]
        proto.write_text("\n".join(lines))
        run("mkfs.xfs", "-q", "-f", "-K", "-L", "data", "-p", str(proto), str(part))
    else:
        run("mkfs.btrfs", "-q", "-f", "-K", "-L", "data", "--rootdir", str(work), str(part))
    return files


def check_clean(fs: str, part: Path) -> None:
    if fs == "xfs":
        run("xfs_repair", "-n", "-f", str(part))
    elif fs == "btrfs":
        run("btrfs", "check", "--readonly", str(part))
    else:
        out = run("fsck.exfat", "-n", str(part)).stdout.decode()
        assert "clean" in out, out


_EXTENT = re.compile(r"data offset (\d+) startblock (\d+) \(\d+/\d+\) count (\d+) flag (\d)")


def xfs_cat(part: Path, name: str) -> bytes:
    """A file's bytes from its extent map, read with xfs_db (no mount)."""
    out = run("xfs_db", "-r", "-c", f"path /{name}", "-c", "bmap", "-c", "p core.size",
              "-c", "sb 0", "-c", "p blocksize", str(part)).stdout.decode()  # fmt: skip
    size = int(re.search(r"core.size = (\d+)", out).group(1))  # type: ignore[union-attr]
    bs = int(re.search(r"blocksize = (\d+)", out).group(1))  # type: ignore[union-attr]
    data = bytearray(size)
    with open(part, "rb") as f:
        for off, start, count, flag in (map(int, m) for m in _EXTENT.findall(out)):
            conv = run("xfs_db", "-r", "-c", f"convert fsb {start} byte", str(part)).stdout
            byte = int(conv.split()[0], 16)
            f.seek(byte)
            chunk = f.read(count * bs) if flag == 0 else bytes(count * bs)
            data[off * bs : off * bs + len(chunk)] = chunk[: max(0, size - off * bs)]
    return bytes(data[:size])


def read_files(fs: str, part: Path, names: list[str], out: Path) -> dict[str, bytes]:
    if fs == "xfs":
        return {n: xfs_cat(part, n) for n in names}
    if fs == "btrfs":
        out.mkdir()
        run("btrfs", "restore", str(part), str(out))
        return {n: (out / n).read_bytes() for n in names}
    return {}


@pytest.mark.parametrize("fs", sorted(FILESYSTEMS))
def test_used_only_capture_of(fs: str, tmp_path: Path) -> None:
    size, tools = FILESYSTEMS[fs]
    if not all(shutil.which(t) for t in tools):
        pytest.skip(f"needs {', '.join(tools)} (scripts/setup installs them)")
    part, work = tmp_path / "part.img", tmp_path / "files"
    work.mkdir()
    fill_random(part, size, f"garbage-{fs}")
    files = build(fs, part, work)
    disk_size = PART_START + size + MIB
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(disk_size)
    script = f"label: gpt\nstart={PART_START // 512}, size={size // 512}, type=L\n"
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk), stdin=script.encode())
    copy_range(part, 0, disk, PART_START, size)

    store = ImageStore(tmp_path / "images")
    m = capture_image(store, fs, disk, CaptureOptions(block_size=256 << 10)).manifest
    assert [(p.fs, p.used_map) for p in m.partitions] == [(fs, "partclone")]
    assert m.count(BlockKind.UNUSED) > 0
    used = m.partitions[0].used_bytes or 0
    assert used < size // 2
    # The garbage is random: had free space been stored, stored_bytes would be near `size`.
    assert m.stored_bytes < used + 2 * MIB
    assert m.stored_bytes >= sum(len(d) for n, d in files.items() if n.endswith(".bin"))
    assert verify_image(store, fs).ok

    target = tmp_path / "target.img"
    fill_random(target, disk_size, "other data")
    export_image(store, fs, target, overwrite=True)
    out = tmp_path / "out.part"
    out.touch()
    copy_range(target, PART_START, out, 0, size)
    check_clean(fs, out)
    assert read_files(fs, out, sorted(files), tmp_path / "restored") == files
