"""The demo behind ``scripts/demo``: capture a sample disk, verify it, multicast it to a lab.

Everything happens under ``.demo/`` in the checkout and inside private network namespaces
that the demo creates and removes (bench/lab.py): nothing is sent on the machine's real
network. Run it as root through ``scripts/demo`` (which installs what it needs first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.disks import make_realistic_disk  # noqa: E402
from bench.lab import Lab, lab_unavailable_reason  # noqa: E402

MIB = 1 << 20


def fleetcast(*args: str, env: dict[str, str]) -> str:
    """Run a fleetcast command on the host (no network) and return what it printed."""
    out = subprocess.run(
        [sys.executable, "-m", "fleetcast", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"demo: 'fleetcast {' '.join(args)}' failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def deploy(work: Path, env: dict[str, str], name: str, machines: int) -> int:
    """Multicast image ``name`` to ``machines`` receivers, one per namespace; 0 if all verified."""
    key = work / "session.key"
    fleetcast("keygen", str(key), env=env)
    info = json.loads(fleetcast("image", "info", name, "--json", env=env))
    expected = info["image_sha256"]
    group, port = "239.192.77.1", 9000 + secrets.randbelow(1000)
    session = ["--group", group, "--port", str(port), "--iface", "lab0", "--key-file", str(key)]
    logs = work / "logs"
    logs.mkdir()
    print(
        f"\n[3/4] building a private lab: 1 sender + {machines} machines on a bridge, "
        "1 Gbit/s sender port, inside network namespaces"
    )
    with Lab(receivers=machines, sender_rate="1gbit") as lab:
        procs = {}
        for node in lab.receivers:
            target = work / f"{node.name}.disk"
            log = open(logs / f"{node.name}.log", "wb")  # noqa: SIM115
            procs[node.name] = (
                lab.popen(
                    node,
                    [
                        sys.executable,
                        "-m",
                        "fleetcast",
                        "receive",
                        "--target",
                        str(target),
                        *session,
                        "--timeout",
                        "300",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(ROOT),
                ),
                target,
            )
            log.close()
        print(f"      multicasting {name!r} to {machines} machines ...")
        started = time.monotonic()
        sender = lab.popen(
            lab.sender,
            [
                sys.executable,
                "-m",
                "fleetcast",
                "send",
                name,
                *session,
                "--min-receivers",
                str(machines),
                "--max-wait",
                "60",
            ],
            stdout=None,
            stderr=None,
            env=env,
            cwd=str(ROOT),
        )
        sender_status = lab.wait(sender, timeout=600)
        results = []
        for node_name, (proc, target) in procs.items():
            status = lab.wait(proc, timeout=120)
            same = target.exists() and file_sha256(target) == expected
            results.append((node_name, status, same))
        elapsed = time.monotonic() - started
    print("\n[4/4] result")
    print(f"      {'machine':<8} {'exit':>4}  disk equals the image")
    for node_name, status, same in results:
        print(f"      {node_name:<8} {status:>4}  {'yes' if same else 'NO'}")
    ok = sender_status == 0 and all(s == 0 and same for _, s, same in results)
    size = info["image_size"] / MIB
    print(
        f"\n      {machines} machines x {size:.0f} MiB deployed in {elapsed:.1f} s "
        f"(sender exit {sender_status}): {'every disk verified' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machines", type=int, default=4, help="lab size (default 4)")
    parser.add_argument("--size", type=int, default=256, help="sample disk size in MiB")
    args = parser.parse_args()
    print(
        "fleetcast demo: needs root for private network namespaces; "
        "sends nothing on this machine's real network."
    )
    reason = lab_unavailable_reason()
    if reason:
        print(f"demo: cannot build the lab: {reason}", file=sys.stderr)
        return 1
    work = ROOT / ".demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = {**os.environ, "FLEETCAST_DATA": str(work / "data"), "PYTHONPATH": str(ROOT)}
    disk = work / "golden.img"
    print(
        f"\n[1/4] building a sample disk: {args.size} MiB, GPT + ext4 half full of real files, "
        "some deleted"
    )
    make_realistic_disk(disk, args.size * MIB)
    print("\n[2/4] capturing it into the image store (used blocks only), then verifying")
    print(fleetcast("image", "capture", str(disk), "--name", "demo/golden", env=env).rstrip())
    print(fleetcast("image", "info", "demo/golden", env=env).rstrip())
    print(fleetcast("image", "verify", "demo/golden", env=env).rstrip())
    return deploy(work, env, "demo/golden", args.machines)


if __name__ == "__main__":
    raise SystemExit(main())
