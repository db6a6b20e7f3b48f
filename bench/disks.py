"""Reproducible sample disks for tests and benchmarks.

``make_realistic_disk`` builds what a lab's golden image looks like: a GPT partition table
and one ext4 partition filled with real files copied from this machine (``/usr/share``,
``/usr/lib``), some of which are then deleted so that free space holds old data, the rest of
the disk never written (sparse zeros). It is built without mounting anything: ``mkfs.ext4``
on a file, ``debugfs -w`` to write the files and delete some (with a fixed clock, so inode
times do not depend on when it was built), ``sfdisk`` for the table, then a sparse copy into
place. A 64 MiB disk takes about a second, 1 GiB about five.
``make_random_disk`` writes incompressible bytes. Both are deterministic for a given seed as
far as practical (the realistic disk's content depends on which files the machine has).

Usage: ``python -m bench.disks realistic|random OUT SIZE [--seed N] [--fill F]``
(SIZE takes K/M/G suffixes, powers of 1024).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

MIB = 1 << 20
SECTOR = 512
#: Where the single partition starts (the usual 1 MiB alignment).
PART_START = MIB
#: Linux filesystem data partition type.
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
#: Files copied into the realistic disk come from here.
SOURCE_DIRS = ("/usr/share", "/usr/lib")
#: Fraction of copied bytes deleted again, so free space holds old data.
DELETE_FRACTION = 0.2
#: A fixed clock for mkfs/debugfs so metadata does not depend on when the disk was built.
FAKE_TIME = "1700000000"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+/-]+$")
_file_list_cache: list[tuple[str, int]] | None = None


def make_realistic_disk(path: Path | str, size: int, *, seed: int = 0, fill: float = 0.5) -> None:
    """Write a GPT disk of ``size`` bytes with one ext4 partition about ``fill`` full.

    Raises ValueError for a size under 8 MiB or a fill outside (0, 0.85], and
    subprocess.CalledProcessError if mkfs.ext4, debugfs or sfdisk fail.
    """
    if size < 8 * MIB:
        raise ValueError(f"disk size {size} too small: need at least 8 MiB")
    if not 0 < fill <= 0.85:
        raise ValueError(f"fill {fill} must be in (0, 0.85]")
    path = Path(path)
    rng = random.Random(seed)
    part_size = (size - PART_START - 34 * SECTOR) // MIB * MIB
    with tempfile.TemporaryDirectory(prefix="fleetcast-disk-") as tmp:
        fs_file = Path(tmp) / "fs.img"
        _make_ext4(fs_file, part_size, rng)
        overhead = _used_bytes(fs_file)  # journal, inode tables, bitmaps of an empty fs
        budget = int(max(0.0, part_size * fill - overhead) / (1 - DELETE_FRACTION))
        _fill_ext4(fs_file, _choose_files(budget, rng), rng)
        _write_gpt(path, size, part_size, rng)
        _sparse_copy(fs_file, path, PART_START)


def make_random_disk(path: Path | str, size: int, *, seed: int = 0) -> None:
    """Write ``size`` bytes of seeded pseudo-random (incompressible) data to ``path``."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(MIB, left)
            f.write(rng.randbytes(n))
            left -= n


def _candidate_files() -> list[tuple[str, int]]:
    """Regular, readable files under SOURCE_DIRS with shell-safe names, sorted by path."""
    global _file_list_cache
    if _file_list_cache is None:
        found: list[tuple[str, int]] = []
        for top in SOURCE_DIRS:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    if not _SAFE_NAME.match(full) or os.path.islink(full):
                        continue
                    try:
                        st = os.stat(full)
                    except OSError:
                        continue
                    if 0 < st.st_size <= 64 * MIB and os.access(full, os.R_OK):
                        found.append((full, st.st_size))
        _file_list_cache = found
    return _file_list_cache


def _choose_files(budget: int, rng: random.Random) -> list[tuple[str, int]]:
    """Seeded-random files whose on-disk cost totals about ``budget`` bytes."""
    files = list(_candidate_files())
    rng.shuffle(files)
    chosen: list[tuple[str, int]] = []
    dirs: set[str] = set()
    total = 0
    for src, n in files:
        new_dirs = [d for d in _parents(src) if d not in dirs]
        # What the file costs on disk: whole 4 KiB blocks, plus one per new directory.
        cost = -(-n // 4096) * 4096 + 4096 * len(new_dirs)
        if total + cost > budget:
            continue
        dirs.update(new_dirs)
        chosen.append((src, n))
        total += cost
        if total >= budget * 0.98:
            break
    return chosen


def _parents(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/a", "/a/b"]``."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _env() -> dict[str, str]:
    return {**os.environ, "E2FSPROGS_FAKE_TIME": FAKE_TIME}


def _make_ext4(fs_file: Path, size: int, rng: random.Random) -> None:
    fs_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    with open(fs_file, "wb") as f:
        f.truncate(size)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "fleetcast-root",
            "-U",
            fs_uuid,
            "-E",
            f"hash_seed={fs_uuid},lazy_itable_init=0,nodiscard",
            str(fs_file),
        ],
        check=True,
        env=_env(),
        stdout=subprocess.DEVNULL,
    )


def _used_bytes(fs_file: Path) -> int:
    """Bytes in use in an ext4 filesystem, from its superblock."""
    out = subprocess.run(
        ["dumpe2fs", "-h", str(fs_file)], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    count = int(fields["Block count"])
    free = int(fields["Free blocks"])
    return (count - free) * int(fields["Block size"])


def _fill_ext4(fs_file: Path, chosen: list[tuple[str, int]], rng: random.Random) -> None:
    """Write ``chosen`` files with debugfs, then delete about DELETE_FRACTION of their bytes.

    Deleting frees the blocks without clearing them, so free space holds old data. All
    writes come first, so no deleted file's blocks are reused.
    """
    cmds: list[str] = []
    dirs: set[str] = set()
    for src, _ in chosen:
        for d in _parents(src):
            if d not in dirs:
                dirs.add(d)
                cmds.append(f"mkdir {d}\n")
        cmds.append(f"write {src} {src}\n")
    victims = list(chosen)
    rng.shuffle(victims)
    budget = sum(n for _, n in chosen) * DELETE_FRACTION
    deleted = 0
    for name, n in victims:
        if deleted >= budget:
            break
        cmds.append(f"rm {name}\n")
        deleted += n
    subprocess.run(
        ["debugfs", "-w", "-f", "-", str(fs_file)],
        input="".join(cmds).encode(),
        check=True,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _write_gpt(path: Path, size: int, part_size: int, rng: random.Random) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    disk_id = uuid.UUID(int=rng.getrandbits(128), version=4)
    part_id = uuid.UUID(int=rng.getrandbits(128), version=4)
    script = (
        f"label: gpt\nlabel-id: {disk_id}\nunit: sectors\n"
        f"start={PART_START // SECTOR}, size={part_size // SECTOR}, type={LINUX_FS_GUID}, "
        f'uuid={part_id}, name="root"\n'
    )
    subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=script.encode(),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _sparse_copy(src: Path, dst: Path, offset: int) -> None:
    """Copy ``src`` into ``dst`` at ``offset``, skipping holes and all-zero chunks."""
    zero = bytes(MIB)
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        fd = fi.fileno()
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # no more data
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                chunk = os.pread(fd, min(MIB, hole - pos), pos)
                if chunk != zero[: len(chunk)]:
                    os.pwrite(fo.fileno(), chunk, offset + pos)
                pos += len(chunk)


def parse_size(text: str) -> int:
    """Parse ``64M``, ``2G``, ``512K`` or plain bytes (powers of 1024)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r}: use e.g. 64M, 2G or a byte count")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(m.group(1)) * mult[m.group(2).upper()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.disks", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["realistic", "random"])
    p.add_argument("out", type=Path)
    p.add_argument("size", type=parse_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fill", type=float, default=0.5)
    a = p.parse_args(argv)
    if a.kind == "realistic":
        make_realistic_disk(a.out, a.size, seed=a.seed, fill=a.fill)
    else:
        make_random_disk(a.out, a.size, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
