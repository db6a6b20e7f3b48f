"""The server-based demo: the fleetcast server deploys a sample disk to a simulated lab.

Run as root (``.venv/bin/python scripts/demo_server.py``, after ``scripts/setup``). It builds a
64 MiB sample disk, captures it, builds a private network-namespace lab (bench/lab.py) of
``--machines`` PCs, runs ``fleetcast server`` in the lab's server namespace and the real
``fleetcast agent`` in each machine's namespace writing to a file as its disk, creates a
deployment session through the API, shows each machine's progress, and ends with a summary
in which every disk is checked against the image's SHA-256. While it runs, the API and its
docs are reachable from this host at the printed http://127.0.0.1 address (a loopback
forwarder to the server's Unix socket). Nothing is sent on this machine's real network:
multicast and agent traffic stay inside the namespaces, which are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.disks import make_realistic_disk  # noqa: E402
from bench.lab import Lab, lab_unavailable_reason  # noqa: E402

MIB = 1 << 20
ENROLL = "demo-enrollment-token"
PORT = 8080


def run_fleetcast(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "fleetcast", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        sys.exit(f"demo: fleetcast {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout.strip()


def forward_loopback(uds: Path, port: int) -> None:
    """Serve 127.0.0.1:port by piping each connection to the server's Unix socket."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(uds))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()


_last_shown: list[str] = []


def show(detail: dict[str, Any], names: dict[int, str], first: bool) -> None:
    """Redraw one line per machine (on a terminal); elsewhere print only what changed."""
    lines = []
    for m in detail["machines"]:
        frac = m["bytes_done"] / m["bytes_total"] if m["bytes_total"] else 0.0
        bar = "#" * int(frac * 30)
        lines.append(
            f"  {names.get(m['machine_id'], '?'):6} [{bar:30}] {frac * 100:5.1f}% "
            f"{m['rate_bps'] / 8 / MIB:6.1f} MiB/s  {m['state']:10} {m['reason'][:40]}"
        )
    if sys.stdout.isatty():
        if not first:
            sys.stdout.write(f"\x1b[{len(lines)}F")
        print("\n".join(lines), flush=True)
        return
    changed = [line for line in lines if line not in _last_shown]
    _last_shown[:] = lines
    if changed:
        print("\n".join(changed), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machines", type=int, default=4, help="simulated PCs (default 4)")
    p.add_argument("--port", type=int, default=PORT, help="loopback port for the API")
    p.add_argument("--keep", action="store_true", help="keep running (API up) until Ctrl-C")
    p.add_argument("--size", type=int, default=256, help="sample disk size in MiB (default 256)")
    args = p.parse_args()
    reason = lab_unavailable_reason()
    if reason:
        sys.exit(f"demo: {reason} (run as root; the lab uses private network namespaces)")
    work = ROOT / ".demo" / "server"
    shutil.rmtree(work, ignore_errors=True)
    (work / "disks").mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLEETCAST_DATA": str(work / "data"),
        "FLEETCAST_ENROLLMENT_TOKEN": ENROLL,
        "FLEETCAST_MULTICAST_IFACE": "lab0",
        "FLEETCAST_ADMIN_PASSWORD": "demo-password",
        "FLEETCAST_PROGRESS_INTERVAL": "0.5",
    }
    print(
        f"demo: building a {args.size} MiB sample disk (GPT + ext4) and capturing it ...",
        flush=True,
    )
    make_realistic_disk(work / "sample.img", args.size * MIB, seed=1)
    run_fleetcast(
        env, "image", "capture", "--name", "sample", "--level", "1", str(work / "sample.img")
    )
    run_fleetcast(env, "admin", "create-user", "demo")
    token = run_fleetcast(env, "admin", "token", "demo")
    with Lab(args.machines, sender_rate="1gbit") as lab:
        return run_lab(lab, env, work, token, args)


def run_lab(lab: Lab, env: dict[str, str], work: Path, token: str, args: argparse.Namespace) -> int:
    uds = work / "api.sock"
    logs = {}

    def spawn(node: Any, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        logs[name] = open(work / f"{name}.log", "wb")  # noqa: SIM115
        return lab.popen(
            node,
            [sys.executable, "-m", "fleetcast", *argv],
            stdout=logs[name],
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
        )

    server = spawn(
        lab.sender,
        "server",
        ["server", "--host", "0.0.0.0", "--port", str(PORT), "--uds", str(uds)],
    )
    api = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(uds)),
        base_url="http://fleetcast",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    deadline = time.monotonic() + 60
    while not uds.exists() and time.monotonic() < deadline and server.poll() is None:
        time.sleep(0.2)
    forward_loopback(uds, args.port)
    print(
        f"demo: server up. Dashboard: http://127.0.0.1:{args.port}/ui  (user demo, password "
        f"{env['FLEETCAST_ADMIN_PASSWORD']}); API docs: http://127.0.0.1:{args.port}/docs  "
        f"(Authorize with the token {token}). --keep leaves them up after the deployment.",
        flush=True,
    )
    url = f"http://{lab.sender.address}:{PORT}"
    for node in lab.receivers:
        spawn(
            node,
            node.name,
            [
                "agent",
                "--server",
                url,
                "--token",
                ENROLL,
                "--target",
                str(work / "disks" / f"{node.name}.img"),
                "--wait",
                "120",
            ],
        )
    while len(machines := api.get("/api/machines").json()) < len(lab.receivers):
        if time.monotonic() > deadline + 60:
            sys.exit("demo: the agents did not enroll; see .demo/server/*.log")
        time.sleep(0.3)
    node_of = {n.address: n.name for n in lab.receivers}  # machine -> its namespace and disk
    names = {m["id"]: node_of.get(m["address"], "?") for m in machines}
    print(f"demo: {len(machines)} machines enrolled; creating a session ...", flush=True)
    started = time.monotonic()
    s = api.post(
        "/api/sessions", json={"image": "sample", "machine_ids": [m["id"] for m in machines]}
    ).json()
    first = True
    while (d := api.get(f"/api/sessions/{s['id']}").json())["state"] in ("pending", "running"):
        show(d, names, first)
        first = False
        time.sleep(0.5)
    show(d, names, first)
    return summary(api, d, names, work, time.monotonic() - started, args)


def summary(
    api: httpx.Client,
    d: dict[str, Any],
    names: dict[int, str],
    work: Path,
    elapsed: float,
    args: argparse.Namespace,
) -> int:
    image = api.get(f"/api/images/{d['image_id']}").json()
    from server.images.store import ImageStore

    _, manifest = ImageStore(work / "data" / "images").load_manifest("sample")
    print(
        f"\ndemo: session {d['id']} {d['state'].upper()} in {elapsed:.1f} s: image "
        f"{image['name']} ({image['image_size'] / MIB:.0f} MiB, "
        f"{image['stored_bytes'] / MIB:.1f} MiB stored) to {len(d['machines'])} machines"
    )
    ok = 0
    for m in d["machines"]:
        disk = work / "disks" / f"{names[m['machine_id']]}.img"
        digest = hashlib.sha256(disk.read_bytes()).digest() if disk.exists() else b""
        same = digest == manifest.image_sha256
        ok += same and m["state"] == "succeeded"
        print(
            f"  {names[m['machine_id']]}: {m['state']:10} disk SHA-256 "
            f"{'matches the image' if same else 'DIFFERS'} {m['reason']}"
        )
    kinds = [
        e["kind"]
        for e in api.get("/api/events", params={"session_id": d["id"], "limit": 1000}).json()
    ]
    print(
        f"  audit log: {len(kinds)} events for this session "
        f"({kinds.count('machine.succeeded')} machines succeeded)"
    )
    if args.keep:
        print(f"demo: still serving http://127.0.0.1:{args.port}/ui and /docs; Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
    return 0 if ok == len(d["machines"]) else 1


if __name__ == "__main__":
    sys.exit(main())
