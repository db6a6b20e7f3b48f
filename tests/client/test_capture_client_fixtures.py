"""Fixtures for the client capture tests (no tests here): the real server app served on
loopback, a capture session of one enrolled machine, and a TCP proxy that cuts connections."""

from __future__ import annotations

import contextlib
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # apitest

import uvicorn
from apitest import Api

from client.capture import CaptureJob
from client.upload import CaptureApi


@dataclass
class Served:
    """The app under test over HTTP, and how to start captures on it."""

    api: Api
    url: str

    def capture_session(self, name: str, level: int = 1) -> tuple[int, str]:
        """A running capture session (as image ``name``) of a newly enrolled machine;
        (session id, the machine's credential)."""
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        auth = self.api.enroll(mac)
        machine = next(m for m in self.api.get("/api/machines").json() if m["mac"] == mac)
        return self.capture_of(machine["id"], name, level), auth["Authorization"].split()[1]

    def capture_of(self, machine_id: int, name: str, level: int = 1) -> int:
        r = self.api.post(
            "/api/captures",
            json={"machine_id": machine_id, "target_image": name, "level": level},
        )
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    def job(self, session_id: int, name: str, level: int = 1) -> CaptureJob:
        return CaptureJob(session_id=session_id, image=name, level=level)

    def capture_api(self, session_id: int, token: str, url: str = "") -> CaptureApi:
        return CaptureApi(url or self.url, token, session_id, retry_for=20)


@contextlib.contextmanager
def serve(api: Api) -> Iterator[Served]:
    """The app of ``api`` served by uvicorn on a loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    app = api.client.app
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield Served(api, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


class CuttingProxy:
    """A loopback TCP proxy to ``target`` that resets every open connection once
    ``cut_after`` bytes went upstream in total (then carries on, counting cuts)."""

    def __init__(self, target: str, cut_after: int) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.sent = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                if up:
                    with self._lock:
                        self.sent += len(data)
                        cut = self.cut_after and self.sent >= self.cut_after
                        if cut:
                            self.cut_after = 0
                    if cut:
                        self.cut_all()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def cut_all(self, count: bool = True) -> None:
        """Reset every connection open now (RST, as a dropped link looks to a peer)."""
        with self._lock:
            socks, self._open = self._open, []
            self.cuts += count
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                s.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self.cut_all(count=False)


@pytest.fixture
def served(api: Api) -> Iterator[Served]:
    with serve(api) as s:
        yield s


__all__ = ["CuttingProxy", "Served", "serve", "served"]
