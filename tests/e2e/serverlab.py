"""The fleetcast server and agents in a namespace lab, driven over the server's Unix socket.

The server runs in the lab's sender namespace (its multicast senders go out of lab0, agents
reach its TCP port at the sender's lab address); the test talks to it through ``--uds``,
which works from the host namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fleethelp import ROOT

from bench.lab import Lab, Node

ENROLL = "lab-enrollment-token-0123456789"
PORT = 8080


@dataclass
class ServerLab:
    """``start()`` the server; ``agent(node, target)``; ``api`` is an httpx client as admin."""

    lab: Lab
    data_dir: Path
    work: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api: httpx.Client | None = None
    #: extra server settings (FLEETCAST_* variables), set before ``start()``
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FLEETCAST_DATA": str(self.data_dir),
            "FLEETCAST_DATABASE_URL": f"sqlite:///{self.work / 'fleetcast.db'}",
            "FLEETCAST_ENROLLMENT_TOKEN": ENROLL,
            "FLEETCAST_MULTICAST_IFACE": "lab0",
            "FLEETCAST_RESULT_GRACE": "10",
            "FLEETCAST_PROGRESS_INTERVAL": "0.5",
            **self.settings,
        }

    @property
    def url(self) -> str:
        return f"http://{self.lab.sender.address}:{PORT}"

    def admin_token(self) -> str:
        """Create the admin user (CLI) and return an API token for it."""
        env = {**self.env, "FLEETCAST_ADMIN_PASSWORD": "lab-password-1"}
        cmd = [sys.executable, "-m", "fleetcast", "admin"]
        subprocess.run(
            [*cmd, "create-user", "admin"],
            env=env,
            check=True,
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        out = subprocess.run(
            [*cmd, "token", "admin"],
            env=env,
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip()

    def start(self) -> httpx.Client:
        """Start (or restart) the server; returns an API client logged in as admin."""
        if self.api is not None:
            token = self.api.headers["Authorization"].removeprefix("Bearer ")
            self.api.close()
        else:
            token = self.admin_token()
        sock = self.work / "api.sock"
        self._spawn(
            self.lab.sender,
            "server",
            ["server", "--host", "0.0.0.0", "--port", str(PORT), "--uds", str(sock)],
        )
        self.api = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)),
            base_url="http://fleetcast",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sock.exists():
                try:
                    if self.api.get("/healthz").status_code == 200:
                        return self.api
                except httpx.TransportError:
                    pass
            if self.procs["server"].poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"the server did not come up:\n{self.log('server')}")

    def agent(self, node: Node, target: Path, *extra: str) -> subprocess.Popen[bytes]:
        argv = [
            "agent",
            "--server",
            self.url,
            "--token",
            ENROLL,
            "--target",
            str(target),
            "--wait",
            "90",
            "--timeout",
            "120",
            "--poll",
            "0.5",
            *extra,
        ]
        return self._spawn(node, node.name, argv)

    def _spawn(self, node: Node, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        try:
            proc = self.lab.popen(
                node,
                [sys.executable, "-m", "fleetcast", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=str(ROOT),
            )
        finally:
            out.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, what: str, predicate: Any, timeout: float) -> Any:
        """Poll ``predicate()`` until it returns something truthy; fail with the logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.25)
        logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def machines(self) -> list[dict[str, Any]]:
        """The server's machine list (GET /api/machines)."""
        assert self.api is not None, "start() the server first"
        machines: list[dict[str, Any]] = self.api.get("/api/machines").json()
        return machines

    def wait_for_machines(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until ``count`` agents have enrolled; their machine records."""

        def enrolled() -> list[dict[str, Any]] | None:
            machines = self.machines()
            return machines if len(machines) == count else None

        result: list[dict[str, Any]] = self.wait_for(f"{count} agents to enroll", enrolled, timeout)
        return result

    def close(self) -> None:
        if self.api is not None:
            self.api.close()
        for proc in self.procs.values():
            self.lab.kill(proc)
