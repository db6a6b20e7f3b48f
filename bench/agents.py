"""Benchmark: N simulated agents reporting progress every second to the server on SQLite.

Starts ``fleetcast server`` on a loopback port with a fresh data directory, enrolls N
machines through the agent API, creates a session to all of them and marks it running (no
sender: this measures the control plane only), then has every simulated agent POST one
progress report per second (staggered, as real agents are) for ``--seconds``. Prints the
progress endpoint's p50/p90/p99/max latency, the achieved request rate, errors, and the
server process's CPU use (from /proc, user+system, in cores).

    .venv/bin/python bench/agents.py --agents 500 --seconds 30

The load generator shares the machine's cores with the server: read CPU as the server's own.
Only loopback traffic; the server is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.config import Settings  # noqa: E402
from server.db import db_session, make_engine  # noqa: E402
from server.models import Session  # noqa: E402
from server.services import sessions as svc  # noqa: E402

ENROLL = "bench-" + secrets.token_hex(8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fleetcast(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "fleetcast", *args],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout.strip()


def _image(data: Path, env: dict[str, str]) -> str:
    disk = data.parent / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    _fleetcast(env, "image", "capture", "--name", "bench", "--level", "1", str(disk))
    return "bench"


async def _enroll(client: httpx.AsyncClient, n: int) -> list[tuple[int, str]]:
    out = []
    for i in range(n):
        mac = f"02:fc:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        r = await client.post(
            "/api/agent/register",
            json={"macs": [mac]},
            headers={"Authorization": f"Bearer {ENROLL}"},
        )
        r.raise_for_status()
        out.append((r.json()["machine_id"], r.json()["credential"]))
    return out


class RawPool:
    """Keep-alive HTTP/1.1 connections written by hand: a load generator far cheaper per
    request than a full client, so the server, not the generator, is what is measured."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.size = size

    async def open(self) -> None:
        for _ in range(self.size):
            self.free.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def post(self, path: str, token: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = await self.free.get()
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            return status, await reader.readexactly(length)
        except BaseException:
            writer.close()
            reader, writer = await asyncio.open_connection(self.host, self.port)
            raise
        finally:
            self.free.put_nowait((reader, writer))

    async def close(self) -> None:
        while not self.free.empty():
            _, writer = self.free.get_nowait()
            writer.close()


async def _agent(
    pool: RawPool,
    cred: str,
    sid: int,
    start: float,
    end: float,
    offset: float,
    lat: list[float],
    errors: list[str],
) -> None:
    total, done, tick = 1 << 30, 0, 0
    while True:
        at = start + offset + tick
        behind = time.time() - at
        if behind > 0:  # a late agent skips the ticks it missed, as a real one would
            tick += int(behind) + 1 if behind >= 1 else 0
            at = start + offset + tick
        if at >= end:
            return
        await asyncio.sleep(max(0.0, at - time.time()))
        done = min(total, done + (8 << 20))
        body = (
            f'{{"session_id":{sid},"samples":[{{"bytes_done":{done},"bytes_total":{total},'
            f'"rate_bps":64e6,"loss":0.001,"naks":{tick}}}]}}'
        ).encode()
        t0 = time.monotonic()
        try:
            status, reply = await pool.post("/api/agent/progress", cred, body)
            if status != 200 or b'"cancel":true' in reply:
                errors.append(f"HTTP {status} {reply[:100]!r}")
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(repr(exc))
        lat.append(time.monotonic() - t0)
        tick += 1


def _load(
    url: str,
    creds: list[tuple[int, str]],
    sid: int,
    start: float,
    seconds: float,
    index: int,
    agents: int,
) -> tuple[list[float], list[str], float]:
    """One load-generating process: its share of the agents; (latencies, errors, CPU s)."""

    async def run() -> tuple[list[float], list[str]]:
        lat: list[float] = []
        errors: list[str] = []
        parsed = httpx.URL(url)
        pool = RawPool(parsed.host, parsed.port or 80, size=64)
        await pool.open()
        try:
            await asyncio.gather(
                *(
                    _agent(
                        pool,
                        cred,
                        sid,
                        start,
                        start + seconds,
                        ((index + j * len(creds)) % agents) / agents,
                        lat,
                        errors,
                    )
                    for j, (_, cred) in enumerate(creds)
                )
            )
        finally:
            await pool.close()
        return lat, errors

    lat, errors = asyncio.run(run())
    return lat, errors, _cpu_seconds(os.getpid())


async def _run(
    url: str,
    settings: Settings,
    token: str,
    agents: int,
    seconds: float,
    server_pid: int,
    procs: int,
) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        t = time.monotonic()
        creds = await _enroll(client, agents)
        print(f"enrolled {agents} machines in {time.monotonic() - t:.1f} s", flush=True)
        r = await client.post(
            "/api/sessions",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "image": "bench",
                "machine_ids": [m for m, _ in creds],
                "start_policy": {"start": "manual"},
            },
        )
        r.raise_for_status()
        sid = r.json()["id"]
        print(f"session {sid} created", flush=True)
        engine = make_engine(settings.db_url)
        with db_session(engine) as db:  # running without a sender: the control plane alone
            s = db.get(Session, sid)
            assert s is not None
            svc.mark_running(db, None, s, "bench")
        engine.dispose()
        start = time.time() + 2.0
        cpu0, t0 = _cpu_seconds(server_pid), time.monotonic()
        chunks = [creds[i::procs] for i in range(procs)]
        with ProcessPoolExecutor(procs) as pool:
            futures = [
                pool.submit(_load, url, chunk, sid, start, seconds, i, agents)
                for i, chunk in enumerate(chunks)
            ]
            results = [f.result() for f in futures]
        cpu = (_cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0)
        own = sum(r[2] for r in results) / (time.monotonic() - t0)
    lat = [x for r in results for x in r[0]]
    errors = [e for r in results for e in r[1]]
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    print(
        f"agents {agents}, {seconds:g} s, {len(lat)} progress reports "
        f"({len(lat) / seconds:.0f}/s, expected {agents}/s), {len(errors)} errors"
    )
    print(
        f"latency ms: p50 {q[49] * 1e3:.1f}  p90 {q[89] * 1e3:.1f}  p99 {q[98] * 1e3:.1f}  "
        f"max {lat[-1] * 1e3:.1f}"
    )
    per = cpu * seconds / max(len(lat), 1) * 1e3
    print(
        f"server CPU: {cpu:.2f} cores (user+system), {per:.2f} ms per report; "
        f"load generator {own:.2f} cores; load average {os.getloadavg()[0]:.1f}"
    )
    if errors:
        print("first errors:", *errors[:5], sep="\n  ")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=500)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--procs", type=int, default=2, help="load-generating processes")
    args = p.parse_args()
    # A SIGTERM (e.g. from timeout) still runs the finally below, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with tempfile.TemporaryDirectory(prefix="fc-bench-agents-") as tmp:
        data = Path(tmp) / "data"
        port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FLEETCAST_DATA": str(data),
            "FLEETCAST_ENROLLMENT_TOKEN": ENROLL,
            "FLEETCAST_ADMIN_PASSWORD": "bench-password",
        }
        _image(data, env)
        _fleetcast(env, "admin", "create-user", "bench")
        token = _fleetcast(env, "admin", "token", "bench")
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleetcast",
                "server",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            asyncio.run(
                _run(
                    url,
                    Settings(FLEETCAST_DATA=data),
                    token,
                    args.agents,
                    args.seconds,
                    server.pid,
                    args.procs,
                )
            )
        finally:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
            log.close()
            if os.environ.get("BENCH_SERVER_LOG"):
                print((Path(tmp) / "server.log").read_text()[-4000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
