"""Capture benchmark: fleetcast's capture against ``zstd -T0 -3`` and partclone | zstd.

Builds a realistic disk (bench/disks.py: GPT + ext4 about half full of real files, some
deleted), reads it once so every contender starts from the page cache, then times:

- ``fleetcast image capture`` (used blocks only, the default; and ``--all-blocks``; levels 3 and 1)
- ``zstd -T0 -3`` of the whole raw file
- ``partclone.ext4 -c`` of the partition piped to ``zstd -T0 -3`` (needs root for a loop device)
- ``fleetcast image import`` of the same disk as qcow2: streamed through a FUSE raw view
  (the default), and through a temporary raw file (the no-FUSE fallback, forced)

and a block-size study (256 KiB .. 4 MiB): capture speed, stored/raw ratio, and dedupe: how
many new bytes a second image of the same disk with a few files changed adds to the store.
Each command runs as its own process; its peak RSS comes from wait4.

Usage: ``python -m bench.capture [--size 2G] [--disk PATH] [--work DIR]``
Prints Markdown and writes it to bench/results/capture.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.disks import PART_START, make_realistic_disk, parse_size

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


@dataclass
class Run:
    label: str
    seconds: float
    out_bytes: int
    rss_kib: int
    note: str = ""


def timed(cmd: str, env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run a shell command; return wall seconds and the peak RSS (KiB) of its processes."""
    start = time.monotonic()
    proc = subprocess.Popen(["sh", "-c", cmd], env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed with status {proc.returncode}")
    return time.monotonic() - start, usage.ru_maxrss


def store_bytes(data: Path) -> int:
    blocks = data / "images" / "blocks"
    return sum(p.stat().st_size for p in blocks.glob("*/*"))


def fleetcast_capture(disk: Path, data: Path, name: str, args: str) -> tuple[float, int, int]:
    """Capture into the store at ``data``; return seconds, peak RSS, bytes the store grew by."""
    before = store_bytes(data) if data.exists() else 0
    env = {**os.environ, "FLEETCAST_DATA": str(data)}
    py = sys.executable
    secs, rss = timed(f"{py} -m fleetcast image capture {disk} --name {name} {args} >/dev/null",
                      env)  # fmt: skip
    return secs, rss, store_bytes(data) - before


#: Runs the CLI with the streamed import switched off, as on a machine without /dev/fuse.
_NO_FUSE = (
    "import sys; from server.images import importer; "
    "importer.fuse_unavailable = lambda: 'bench: forced'; "
    "from fleetcast.cli import main; sys.exit(main(sys.argv[1:]))"
)


def import_runs(disk: Path, work: Path) -> list[Run]:
    """Import the disk as qcow2, streamed and through a temp raw file (zstd 3, used blocks)."""
    if shutil.which("qemu-img") is None:
        return []
    qcow = work / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(qcow)], check=True)
    timed(f"cat {qcow} > /dev/null")
    runs = []
    py = sys.executable
    for label, cli in [
        ("fleetcast import qcow2 (streamed, FUSE view)", f"{py} -m fleetcast"),
        ("fleetcast import qcow2 (temp raw file)", f'{py} -c "{_NO_FUSE}"'),
    ]:
        data = work / "store-import"
        env = {**os.environ, "FLEETCAST_DATA": str(data)}
        secs, rss = timed(f"{cli} image import {qcow} --name bench --level 3 "
                          ">/dev/null 2>&1", env)  # fmt: skip
        runs.append(Run(label, secs, store_bytes(data), rss))
        shutil.rmtree(data)
    qcow.unlink()
    return runs


def partclone_run(disk: Path, part_size: int, work: Path) -> Run | None:
    if os.geteuid() != 0 or shutil.which("partclone.ext4") is None:
        return None
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", "--offset", str(PART_START),
         "--sizelimit", str(part_size), str(disk)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    out = work / "partclone.zst"
    try:
        secs, rss = timed(f"partclone.ext4 -q -c -s {loop} -o - 2>/dev/null | "
                          f"zstd -T0 -3 -q -c > {out}")  # fmt: skip
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    return Run("`partclone.ext4 -c` \\| `zstd -T0 -3`", secs, out.stat().st_size, rss,
               "partition only, its own image format")  # fmt: skip


def changed_copy(disk: Path, out: Path, part_size: int, work: Path) -> None:
    """A copy of ``disk`` with 16 files added and 16 removed (what a small update does)."""
    subprocess.run(["cp", "--sparse=always", str(disk), str(out)], check=True)
    part = work / "part.img"
    dd = ["dd", f"if={out}", f"of={part}", "bs=1M", f"skip={PART_START // MIB}"]
    subprocess.run([*dd, f"count={part_size // MIB}", "conv=sparse", "status=none"], check=True)
    libdir = "/usr/lib/x86_64-linux-gnu"
    listing = subprocess.run(["debugfs", "-R", f"ls -p {libdir}", str(part)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    names = listing.split("\n")
    entries = [
        ln.split("/")[5] for ln in names if ln.count("/") >= 6 and ln.split("/")[2][:3] == "100"
    ]
    rng = random.Random(7)
    cmds = []
    for i in range(16):
        f = work / f"new{i}.bin"
        f.write_bytes(rng.randbytes(256 << 10))
        cmds.append(f"write {f} /new{i}.bin\n")
    cmds += [f"rm {libdir}/{n}\n" for n in entries[:16]]
    subprocess.run(["debugfs", "-w", "-f", "-", str(part)], input="".join(cmds).encode(),
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["dd", f"if={part}", f"of={out}", "bs=1M", f"seek={PART_START // MIB}",
                    "conv=notrunc,sparse", "status=none"], check=True)  # fmt: skip
    part.unlink()


def table(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(rows[0]) + " |\n|" + "|".join("---" for _ in rows[0]) + "|\n"
    return head + "".join("| " + " | ".join(r) + " |\n" for r in rows[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capture")
    p.add_argument("--size", type=parse_size, default=2 << 30)
    p.add_argument("--disk", type=Path, help="use this realistic disk instead of building one")
    p.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    p.add_argument("--block-sizes", default="256K,1M,2M,4M")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "capture.md")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetcast-bench-", dir=a.work) as tmp:
        work = Path(tmp)
        disk = a.disk or work / "disk.img"
        if a.disk is None:
            t0 = time.monotonic()
            make_realistic_disk(disk, a.size, seed=0)
            print(f"built {disk} ({a.size >> 20} MiB) in {time.monotonic() - t0:.1f} s",
                  file=sys.stderr)  # fmt: skip
        size = disk.stat().st_size
        part_size = (size - PART_START - 34 * 512) // MIB * MIB
        timed(f"cat {disk} > /dev/null")  # everyone starts from the page cache
        runs: list[Run] = []
        for label, args in [
            ("fleetcast capture (used blocks, zstd 3)", "--level 3"),
            ("fleetcast capture (used blocks, zstd 1)", "--level 1"),
            ("fleetcast capture --all-blocks (zstd 3)", "--all-blocks --level 3"),
        ]:
            data = work / f"store-{len(runs)}"
            secs, rss, grew = fleetcast_capture(disk, data, "bench", args)
            runs.append(Run(label, secs, grew, rss))
            shutil.rmtree(data)
        zout = work / "raw.zst"
        secs, rss = timed(f"zstd -T0 -3 -q -c {disk} > {zout}")
        runs.append(Run("`zstd -T0 -3` of the raw file", secs, zout.stat().st_size, rss))
        zout.unlink()
        pc = partclone_run(disk, part_size, work)
        if pc:
            runs.append(pc)
        runs += import_runs(disk, work)
        rows = [["method", "seconds", "MB/s (raw)", "stored MiB", "stored/raw", "peak RSS MiB"]]
        for r in runs:
            rows.append([r.label, f"{r.seconds:.2f}", f"{size / r.seconds / 1e6:.0f}",
                         f"{r.out_bytes / MIB:.1f}", f"{r.out_bytes / size:.3f}",
                         f"{r.rss_kib / 1024:.0f}"])  # fmt: skip
        changed = work / "changed.img"
        changed_copy(disk, changed, part_size, work)
        timed(f"cat {changed} > /dev/null")
        brows = [["block size", "capture s", "MB/s", "stored/raw", "2nd image adds MiB"]]
        for bs_text in a.block_sizes.split(","):
            data = work / f"store-bs-{bs_text}"
            secs, _, grew = fleetcast_capture(disk, data, "a", f"--block-size {bs_text}")
            _, _, grew2 = fleetcast_capture(changed, data, "b", f"--block-size {bs_text}")
            brows.append([bs_text, f"{secs:.2f}", f"{size / secs / 1e6:.0f}",
                          f"{grew / size:.4f}", f"{grew2 / MIB:.1f}"])  # fmt: skip
            shutil.rmtree(data)
    text = (
        f"## Capture of a {size >> 20} MiB realistic disk (GPT + ext4 ~half full, some files "
        f"deleted), {os.cpu_count()} CPUs, from page cache\n\n" + table(rows) +
        "\n### Block size (used-blocks capture, zstd 3; the 2nd image is the same disk with "
        "16 files of 256 KiB added and 16 removed)\n\n" + table(brows)
    )  # fmt: skip
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
