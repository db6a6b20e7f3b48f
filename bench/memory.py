"""Peak memory of ``fleetcast receive`` and ``fleetcast send`` for a large image (issue 3).

Run as root: ``python -m bench.memory --size 10G`` builds a realistic sample disk of that
size (GPT + ext4 about half full), captures it into a scratch store, multicasts it to one
receiver in a private namespace lab (bench/lab.py) writing a sparse file, and prints each
receiver's peak RSS (its own VmHWM, from ``--stats-json``), both processes' CPU seconds and
the wall time, and whether the target hashes to the image. A benchmark, not a test: the
issue's bound is receiver RSS <= 100 MiB at 10 GiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.disks import make_realistic_disk, parse_size
from bench.lab import Lab

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def _fleetcast(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "fleetcast", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode:
        raise SystemExit(f"fleetcast {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def _store_mib(work: Path) -> float:
    """Bytes the scratch store's blocks take, in MiB."""
    blocks = work / "data"
    return sum(f.stat().st_size for f in blocks.rglob("*") if f.is_file()) / MIB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="10G", help="image size (default 10G)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        env = {**os.environ, "FLEETCAST_DATA": str(work / "data"), "PYTHONPATH": str(ROOT)}
        disk = work / "disk.img"
        t0 = time.monotonic()
        make_realistic_disk(disk, size)
        print(f"built {args.size} sample disk in {time.monotonic() - t0:.0f} s", flush=True)
        _fleetcast(env, "image", "capture", str(disk), "--name", "big")
        disk.unlink()
        info = json.loads(_fleetcast(env, "image", "info", "big", "--json"))
        _fleetcast(env, "keygen", str(work / "key"))
        session = [
            "--group",
            "239.192.88.1",
            "--port",
            str(20000 + secrets.randbelow(10000)),
            "--iface",
            "lab0",
            "--key-file",
            str(work / "key"),
        ]
        target = work / "target.img"
        with Lab(receivers=1, sender_rate="1gbit") as lab:
            recv = lab.popen(
                lab.receivers[0],
                [
                    sys.executable,
                    "-m",
                    "fleetcast",
                    "receive",
                    "--target",
                    str(target),
                    *session,
                    "--timeout",
                    "1800",
                    "--stats-json",
                    str(work / "stats.json"),
                ],
                env=env,
                cwd=str(ROOT),
                stdout=subprocess.DEVNULL,
            )
            t0 = time.monotonic()
            send = lab.popen(
                lab.sender,
                [sys.executable, "-m", "fleetcast", "send", "big", *session, "--max-wait", "60"],
                env=env,
                cwd=str(ROOT),
                stdout=subprocess.DEVNULL,
            )
            s_code, s_use = lab.wait_usage(send, timeout=1800)
            r_code, r_use = lab.wait_usage(recv, timeout=120)
            wall = time.monotonic() - t0
        same = _sha256(target) == info["image_sha256"]
        print(
            f"image {size / MIB:.0f} MiB raw, {_store_mib(work):.0f} MiB stored; "
            f"deployed in {wall:.1f} s; target equals the image: {same}"
        )
        peak = json.loads((work / "stats.json").read_text())["peak_rss_mib"]
        print(f"receiver peak RSS (VmHWM): {peak:.0f} MiB")
        print("| process | exit | CPU s |\n|---|---|---|")
        for name, code, use in (("send", s_code, s_use), ("receive", r_code, r_use)):
            print(f"| {name} | {code} | {use.ru_utime + use.ru_stime:.1f} |")
        return 0 if same and s_code == 0 and r_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
