"""Used-blocks capture of real filesystems (docs/FORMAT.md §4).

A GPT disk with a vfat, an ext4 and an NTFS partition, each built over random garbage with
files written and some deleted. The used-only capture must store about what the
filesystems use, not the garbage; exported over a target full of other data, every
filesystem must check clean and every file must match byte for byte.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from protocol.manifest import BlockKind
from server.images.capture import CaptureOptions, capture_image
from server.images.export import export_image, verify_image
from server.images.store import ImageStore

MIB = 1 << 20
TOOLS = ("mkfs.ext4", "debugfs", "fsck.ext4", "mkfs.vfat", "mcopy", "mdel", "fsck.fat",
         "mkntfs", "ntfscp", "ntfscat", "sfdisk", "losetup", "partclone.extfs",
         "partclone.fat", "partclone.ntfs")  # fmt: skip
pytestmark = [
    pytest.mark.tools,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for read-only loop devices"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in TOOLS),
        reason="needs partclone, e2fsprogs, "
        "dosfstools, mtools, ntfs-3g and fdisk (scripts/setup installs them)",
    ),
]

# (name, start MiB, size MiB)
LAYOUT = [("vfat", 1, 16), ("ext4", 17, 24), ("ntfs", 41, 16)]
DISK_SIZE = 60 * MIB


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, check=True, timeout=120)


def random_files(rng: random.Random, count: int) -> dict[str, bytes]:
    files = {}
    for i in range(count):
        n = rng.randrange(1, 300_000)
        if i % 2:
            files[f"f{i:03d}.bin"] = rng.randbytes(n)
        else:
            files[f"f{i:03d}.txt"] = (f"line {i} of a text file\n" * (n // 20 + 1)).encode()[:n]
    return files


def build_partition(
    fs: str, path: Path, size: int, files: dict[str, bytes], work: Path
) -> list[str]:
    """Make the filesystem over garbage, write files, delete a third; return the kept names."""
    path.write_bytes(random.Random(fs).randbytes(size))
    for name, data in files.items():
        (work / name).write_bytes(data)
    doomed = sorted(files)[::3]
    if fs == "ext4":
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", "root", str(path))
        cmds = "".join(f"write {work / n} {n}\n" for n in files)
        cmds += "".join(f"rm {n}\n" for n in doomed)
        run("debugfs", "-w", "-f", "-", str(path), stdin=cmds.encode())
    elif fs == "vfat":
        run("mkfs.vfat", "-n", "ESP", str(path))
        run("mcopy", "-i", str(path), *(str(work / n) for n in files), "::/")
        run("mdel", "-i", str(path), *(f"::/{n}" for n in doomed))
    else:  # NTFS: ntfs-3g has no offline delete, so nothing is deleted; free space is garbage
        run("mkntfs", "-F", "-f", "-q", "-L", "win", str(path))
        for n in files:
            run("ntfscp", str(path), str(work / n), f"/{n}")
        doomed = []
    return [n for n in files if n not in doomed]


def read_file(fs: str, part: Path, name: str) -> bytes:
    if fs == "ext4":
        return run("debugfs", "-R", f"cat /{name}", str(part)).stdout
    if fs == "vfat":
        return run("mcopy", "-i", str(part), f"::/{name}", "-").stdout
    return run("ntfscat", str(part), f"/{name}").stdout


def check_clean(fs: str, part: Path) -> None:
    if fs == "ext4":
        run("fsck.ext4", "-fn", str(part))
    elif fs == "vfat":
        run("fsck.fat", "-n", str(part))
    else:
        run("ntfsfix", "--no-action", str(part))


def test_used_only_capture_skips_garbage_and_exports_clean_filesystems(tmp_path: Path) -> None:
    rng = random.Random(42)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    script = "label: gpt\n" + "".join(
        f"start={s * 2048}, size={n * 2048}, type={'U' if fs == 'vfat' else 'L'}\n"
        for fs, s, n in LAYOUT
    )
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk), stdin=script.encode())
    kept: dict[str, dict[str, bytes]] = {}
    for fs, start, size in LAYOUT:
        work = tmp_path / f"files-{fs}"
        work.mkdir()
        files = random_files(rng, 24)
        part = tmp_path / f"{fs}.part"
        names = build_partition(fs, part, size * MIB, files, work)
        kept[fs] = {n: files[n] for n in names}
        with open(disk, "r+b") as f:
            f.seek(start * MIB)
            f.write(part.read_bytes())

    store = ImageStore(tmp_path / "images")
    m = capture_image(store, "multi", disk, CaptureOptions(block_size=256 << 10)).manifest
    assert [(p.fs, p.used_map) for p in m.partitions] == [
        ("vfat", "partclone"),
        ("ext4", "partclone"),
        ("ntfs", "partclone"),
    ]
    assert m.count(BlockKind.UNUSED) > 0
    used = sum(p.used_bytes or 0 for p in m.partitions)
    random_bytes = sum(len(d) for fs in kept for n, d in kept[fs].items() if n.endswith(".bin"))
    # The garbage under free space is random: had it been stored, it would show.
    assert m.stored_bytes < random_bytes + (used - random_bytes) // 2 + 4 * MIB
    full = capture_image(
        store, "multi-all", disk, CaptureOptions(used_only=False, block_size=256 << 10)
    )
    assert full.manifest.stored_bytes > m.stored_bytes + 20 * MIB
    assert verify_image(store, "multi").ok

    target = tmp_path / "target.img"
    target.write_bytes(random.Random("target").randbytes(DISK_SIZE))
    export_image(store, "multi", target, overwrite=True)
    with open(target, "rb") as f:
        assert f.read(MIB) == disk.read_bytes()[:MIB]  # the partition table area is kept
    for fs, start, size in LAYOUT:
        part = tmp_path / f"{fs}.out"
        with open(target, "rb") as f:
            f.seek(start * MIB)
            part.write_bytes(f.read(size * MIB))
        check_clean(fs, part)
        for name, data in kept[fs].items():
            assert read_file(fs, part, name) == data, f"{fs}:{name}"
