"""Catch-up's data path measured: GET /api/agent/sessions/{sid}/blocks/{index} (issue 9).

    .venv/bin/python -m bench.blocks_http [--seconds 5] [--clients 1 2 4] [--blocks 128]

A real ``fleetcast server`` process on a loopback port, an image of ``--blocks`` 1 MiB
blocks (every other one random, stored raw; the others half text, half random, stored as
~0.5 MiB zstd frames), one machine credential, and clients in other processes each looping
over the image's blocks on one keep-alive ``http.client`` connection, as the agent does
(client/catchup.py). Prints requests/s and MB/s of stored payload per client count, and the
server process's CPU time per request (load-independent: the figure to compare). Nothing
leaves loopback.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
TOKEN = "bench-enroll-" + "x" * 20


def setup(root: Path, blocks: int) -> tuple[int, str, list[int]]:
    """The image, a machine with a credential and a session of it; (session id, credential,
    DATA block indexes)."""
    from protocol.manifest import BlockKind
    from server.config import Settings
    from server.db import db_session, make_engine, migrate
    from server.images.capture import CaptureOptions, capture_image
    from server.images.store import ImageStore
    from server.models import ApiToken, Machine, SessionCreate, StartPolicy
    from server.security import MACHINE_PREFIX, new_token
    from server.services import images, sessions

    settings = Settings(FLEETCAST_DATA=root, enrollment_token=TOKEN)
    store = ImageStore(settings.image_root)
    rnd, disk = random.Random(1), root / "disk.img"
    with open(disk, "wb") as f:
        for i in range(blocks):
            text = (f"block {i} " * (MIB // 8)).encode()[: MIB // 2]
            f.write(rnd.randbytes(MIB) if i % 2 else text + rnd.randbytes(MIB // 2))
    capture_image(store, "bench", disk, CaptureOptions(level=1, used_only=False, progress=False))
    disk.unlink()
    engine = make_engine(settings.db_url)
    migrate(engine)
    with db_session(engine) as db:
        images.register_existing(db, store, "bench")
        m = Machine(mac="52:54:00:00:00:01")
        db.add(m)
        db.flush()
        req = SessionCreate(
            image="bench", machine_ids=[m.id or 0], start_policy=StartPolicy(start="manual")
        )
        sid = sessions.create_session(db, None, settings, req, "bench").id or 0
        token, digest = new_token(MACHINE_PREFIX)
        db.add(ApiToken(token_hash=digest, kind="machine", name="bench", machine_id=m.id))
    engine.dispose()
    _, manifest = store.load_manifest("bench")
    return sid, token, [i for i, k in enumerate(manifest.kinds) if k == BlockKind.DATA]


def client(port: int, sid: int, token: str, indexes: list[int], seconds: float, q: Any) -> None:
    """Fetch blocks in a loop for ``seconds``; puts (requests, payload bytes) on ``q``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"}
    n = nbytes = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.request("GET", f"/api/agent/sessions/{sid}/blocks/{indexes[n % len(indexes)]}",
                     headers=headers)  # fmt: skip
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {body[:200]!r}")
        n, nbytes = n + 1, nbytes + len(body)
    q.put((n, nbytes))


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--blocks", type=int, default=128)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fc-blocks-") as tmp:
        root = Path(tmp)
        sid, token, indexes = setup(root, args.blocks)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "FLEETCAST_DATA": str(root), "FLEETCAST_ENROLLMENT_TOKEN": TOKEN}
        cmd = [sys.executable, "-m", "fleetcast", "server", "--host", "127.0.0.1"]
        server = subprocess.Popen([*cmd, "--port", str(port), "--log-level", "warning"], env=env)
        try:
            _wait_up(port)
            print(f"{'clients':>7} {'req/s':>7} {'MB/s':>6} {'kB/req':>7} {'server CPU/req':>15}")
            for n in args.clients:
                q: Any = mp.Queue()
                procs = [
                    mp.Process(target=client, args=(port, sid, token, indexes, args.seconds, q))
                    for _ in range(n)
                ]
                cpu0 = cpu_seconds(server.pid)
                for proc in procs:
                    proc.start()
                res = [q.get(timeout=args.seconds + 60) for _ in procs]
                for proc in procs:
                    proc.join(30)
                cpu = cpu_seconds(server.pid) - cpu0
                reqs, nbytes = sum(r[0] for r in res), sum(r[1] for r in res)
                print(
                    f"{n:>7} {reqs / args.seconds:>7.0f} {nbytes / args.seconds / 1e6:>6.0f} "
                    f"{nbytes / reqs / 1e3:>7.0f} {cpu / reqs * 1e6:>12.0f} us"
                )
        finally:
            server.terminate()
            server.wait(30)
    return 0


def _wait_up(port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            c.getresponse().read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up within 60 s") from None
            time.sleep(0.2)


if __name__ == "__main__":
    raise SystemExit(main())
