"""fleetcast through its server: the way an IT admin actually runs it (issue 8).

``fleetcast server`` runs in the lab's sender namespace on a store that already holds the
benchmark image; one ``fleetcast agent`` per receiver namespace enrolls and polls for work,
with the product's defaults (poll interval, progress interval). When all N have enrolled,
the harness creates a session to them through the REST API: ``t0`` is that request, so the
time includes what the server adds to a bare ``fleetcast send``/``receive`` pair — the
agents' next poll, the assignment, the sender's start, progress reports, the verdict.

The process the harness sees as the sender is ``python -m bench.viaserver serve``: it runs the
server as its child, exits when the session ends (0 iff the server's verdict is succeeded)
and prints the session's detail for ``reports``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.lab import Node, wait_until
from bench.peers import ROOT, Launched, PreparedImage, RunContext, Tool, _popen, _read

ENROLL = "bench-enrollment-token-0123456789"
PORT = 8080


@dataclass
class FleetcastServer(Tool):
    """``fleetcast server`` + one ``fleetcast agent`` per receiver, driven over the API.

    The "sender" process the harness watches is ``python -m bench.viaserver serve``: it runs
    the server as its child (so CPU and RSS count the server), waits for the session to end
    and exits 0 only if the server's verdict is ``succeeded`` — so the harness's "did the
    sender's exit status tell the truth" column holds the server's verdict to account.
    """

    def __post_init__(self) -> None:
        self.name = "fleetcast-server"

    def _env(self, ctx: RunContext) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return {
            **os.environ,
            "PYTHONPATH": path,
            "FLEETCAST_DATA": str(ctx.image.data_dir),
            "FLEETCAST_DATABASE_URL": f"sqlite:///{ctx.work / 'fleetcast.db'}",
            "FLEETCAST_ENROLLMENT_TOKEN": ENROLL,
            "FLEETCAST_MULTICAST_IFACE": "lab0",
            "FLEETCAST_ADMIN_PASSWORD": "bench-password-1",
        }

    def _cli(self, ctx: RunContext, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "fleetcast", *args],
            env=self._env(ctx),
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    def launch(self, ctx: RunContext) -> Launched:
        """Server up, agents enrolled; t0 is the API request that creates the session."""
        self._cli(ctx, "admin", "create-user", "admin")
        token = self._cli(ctx, "admin", "token", "admin")
        sock = ctx.work / "api.sock"
        env = {**self._env(ctx), "FLEETCAST_BENCH_TOKEN": token}
        argv = [sys.executable, "-m", "bench.viaserver", "serve", "--uds", str(sock)]
        argv += ["--timeout", str(int(ctx.timeout) + 60)]
        server = _popen(ctx, ctx.lab.sender, "sender", argv, env)
        with _client(sock, token) as api:
            if not wait_until(lambda: _healthy(api, server), 60, 0.2):
                raise RuntimeError(f"fleetcast server did not come up: {_read(ctx.log('sender'))}")
            agents = [self.start_receiver(ctx, i, n) for i, n in enumerate(ctx.lab.receivers)]
            n = ctx.scenario.receivers
            if not wait_until(lambda: len(api.get("/api/machines").json()) == n, 60, 0.2):
                raise RuntimeError(f"{n} agents did not enroll in 60 s: {_read(ctx.log('r0'))}")
            ids = [m["id"] for m in api.get("/api/machines").json()]
            t0 = time.monotonic()
            body = {
                "image": ctx.image.name,
                "machine_ids": ids,
                "start_policy": {"min_receivers": n, "max_wait": 30},
                "after": "none",
            }
            r = api.post("/api/sessions", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"session not created: {r.status_code} {r.text}")
        return Launched(server, agents, t0)

    def start_receiver(self, ctx: RunContext, i: int, node: Node) -> subprocess.Popen[bytes]:
        url = f"http://{ctx.lab.sender.address}:{PORT}"
        argv = [sys.executable, "-m", "fleetcast", "agent", "--server", url, "--token", ENROLL]
        argv += ["--target", str(ctx.targets[i]), "--wait", str(int(ctx.timeout))]
        argv += ["--timeout", str(int(ctx.timeout))]
        return _popen(ctx, node, node.name, argv, self._env(ctx))

    def bytes_written(self, image: PreparedImage) -> int:
        return image.data_bytes

    def payload_once(self, image: PreparedImage) -> int:
        return image.stored_bytes

    def reports(self, ctx: RunContext) -> dict[str, Any]:
        """The session's verdict and sender counters, as ``serve`` printed them."""
        out: dict[str, Any] = {}
        for line in reversed(_read(ctx.log("sender")).splitlines()):
            if line.startswith(VERDICT):
                d = json.loads(line.removeprefix(VERDICT))
                out["session_state"] = d.get("state")
                out["session_reason"] = d.get("reason")
                out["machine_states"] = [m.get("state") for m in d.get("machines", [])]
                out["sender_stats"] = d.get("stats") or {}
                out["nak_datagrams"] = sum(int(m.get("naks") or 0) for m in d.get("machines", []))
                break
        return out


VERDICT = "fleetcast-server verdict: "
TERMINAL = ("succeeded", "partial", "failed", "cancelled", "not-started")


@contextlib.contextmanager
def _client(sock: Path, token: str) -> Iterator[httpx.Client]:
    api = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)),
        base_url="http://fleetcast",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    try:
        yield api
    finally:
        api.close()


def _healthy(api: httpx.Client, server: subprocess.Popen[bytes]) -> bool:
    if server.poll() is not None:
        raise RuntimeError(f"fleetcast server exited with {server.returncode}")
    try:
        return api.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def serve(sock: Path, timeout: float) -> int:
    """Run ``fleetcast server`` as a child until the first session ends; 0 iff it succeeded.

    Prints the session's detail (one ``VERDICT`` line), then stops the server by its PID
    (SIGTERM, SIGKILL after 20 s) and reaps it, so its CPU time counts in ours.
    """
    argv = [sys.executable, "-m", "fleetcast", "server", "--host", "0.0.0.0"]
    argv += ["--port", str(PORT), "--uds", str(sock)]
    server = subprocess.Popen(argv, cwd=str(ROOT))
    detail: dict[str, Any] = {}
    try:
        with _client(sock, os.environ["FLEETCAST_BENCH_TOKEN"]) as api:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and server.poll() is None:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    rows = api.get("/api/sessions").json()
                    if rows and rows[0].get("state") in TERMINAL:
                        detail = api.get(f"/api/sessions/{rows[0]['id']}").json()
                        break
                time.sleep(0.1)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
    print(VERDICT + json.dumps(detail), flush=True)
    return 0 if detail.get("state") == "succeeded" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.viaserver")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the server until its first session ends")
    s.add_argument("--uds", type=Path, required=True)
    s.add_argument("--timeout", type=float, default=600)
    a = p.parse_args(argv)
    return serve(a.uds, a.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
