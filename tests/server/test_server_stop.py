"""``fleetcast server`` stops promptly on SIGTERM while agents hold long polls.

uvicorn waits for in-flight requests (up to timeout_graceful_shutdown, 20 s) before the app
shuts down; an agent's assignment request may wait 25 s. The server answers such requests
as it begins to stop (server/admin.py), so the process ends well before either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
ENROLL = "stop-test-enrollment-token-0123"
#: A generous bound for the whole stop (not a speed figure): it only has to be clearly
#: below the 20 s graceful timeout and the 25 s wait the request asked for.
STOP_DEADLINE = 10.0


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    sock = tmp_path / "api.sock"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLEETCAST_DATA": str(tmp_path / "data"),
        "FLEETCAST_DATABASE_URL": f"sqlite:///{tmp_path / 'fleetcast.db'}",
        "FLEETCAST_ENROLLMENT_TOKEN": ENROLL,
    }
    argv = ["server", "--host", "127.0.0.1", "--port", "0", "--uds", str(sock)]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (the child keeps it)
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetcast", *argv], env=env, cwd=ROOT, stdout=log, stderr=log
        )
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://fleetcast", timeout=40
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if sock.exists() and client.get("/healthz").status_code == 200:
                return proc, client
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=10)
    raise AssertionError(f"the server did not come up:\n{(tmp_path / 'server.log').read_text()}")


def test_sigterm_ends_the_server_while_an_agent_long_polls(tmp_path: Path) -> None:
    proc, client = _start(tmp_path)
    try:
        r = client.post(
            "/api/agent/register",
            headers={"Authorization": f"Bearer {ENROLL}"},
            json={"macs": ["52:54:00:5e:00:01"], "hostname": "pc-01", "inventory": {}},
        )
        assert r.status_code == 200, r.text
        agent = {"Authorization": f"Bearer {r.json()['credential']}"}
        answer: dict[str, Any] = {}

        def long_poll() -> None:
            try:
                reply = client.get("/api/agent/assignment", params={"wait": 25}, headers=agent)
                answer["reply"] = (reply.status_code, reply.json())
            except httpx.HTTPError as exc:
                answer["error"] = exc

        poller = threading.Thread(target=long_poll, daemon=True)
        poller.start()
        time.sleep(1.0)  # the request is in the server's hands by now
        assert poller.is_alive(), f"the long poll answered before the stop: {answer}"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_DEADLINE)  # raises TimeoutExpired: the stop waited on the poll
        poller.join(timeout=5)
        assert answer.get("reply") == (200, _empty_with_pause(answer)), answer
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    # uvicorn re-raises the SIGTERM it caught once it has shut down
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()


def _empty_with_pause(answer: dict[str, Any]) -> Any:
    """The reply body a stopping server gives: nothing, and ask again after a pause."""
    body = answer.get("reply", (0, {}))[1]
    assert body.get("session_id") is None and body.get("retry_after", 0) > 0, body
    return body
