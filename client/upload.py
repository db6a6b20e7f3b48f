"""The capture upload API (docs/CAPTURE.md) over one persistent HTTP/1.1 connection.

``CaptureApi`` speaks the three calls of ``/api/agent/captures/{session_id}/...``: ``have``
(which digests the store lacks, and the stored size of the ones it has), ``put_block`` and
``post_manifest``. Every call is idempotent on the server, so a call that fails on the
network is simply made again on a fresh connection: ``call_with_retry`` retries with growing
pauses for at most ``retry_for`` seconds, then raises ``Unreachable``. A block the server
refuses (422) raises ``BlockRefused`` naming it. Not thread-safe: one thread owns it.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The contract's limit of digests per ``have`` call.
MAX_HAVE = 16384
HTTP_TIMEOUT = 30.0
#: Pauses between retries grow from FIRST_PAUSE, doubling, up to MAX_PAUSE seconds.
FIRST_PAUSE = 0.5
MAX_PAUSE = 8.0


class UploadError(Exception):
    """The server refused a capture call; the message says which and why."""


class BlockRefused(UploadError):
    """The server refused one block (422): its hash, frame or size is wrong."""

    def __init__(self, digest: bytes, detail: str) -> None:
        super().__init__(f"the server refused block {digest.hex()}: {detail}")
        self.digest = digest


class Unreachable(UploadError):
    """The server could not be reached (or kept failing with 5xx) for too long."""


class _Transient(Exception):
    """One failed attempt worth repeating (network error, 5xx)."""


class CaptureApi:
    """``have`` / ``put_block`` / ``post_manifest`` of one capture session."""

    def __init__(
        self,
        server: str,
        token: str,
        session_id: int,
        *,
        retry_for: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        url = urllib.parse.urlsplit(server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UploadError(f"server URL {server!r} is not http(s)://HOST[:PORT]")
        self.scheme, self.host, self.port = url.scheme, url.hostname, url.port
        self.prefix = url.path.rstrip("/") + f"/api/agent/captures/{session_id}"
        self.token = token
        self.retry_for = retry_for
        self.sleep, self.clock = sleep, clock
        self.retries = 0  #: failed attempts retried so far (reconnects)
        self._conn: http.client.HTTPConnection | None = None

    # -- the calls ---------------------------------------------------------------------------

    def have(self, digests: list[bytes]) -> tuple[list[bytes], dict[bytes, int]]:
        """(missing digests, {present digest: stored size}) for ``digests``; retries."""
        missing: list[bytes] = []
        present: dict[bytes, int] = {}
        for at in range(0, len(digests), MAX_HAVE):
            chunk = digests[at : at + MAX_HAVE]
            body = json.dumps({"digests": [d.hex() for d in chunk]}).encode()
            status, reply = self.call_with_retry(
                functools.partial(self._request, "POST", "/have", body, "application/json")
            )
            if status != 200 or not isinstance(reply, dict):
                raise UploadError(f"'have' refused (HTTP {status}): {_detail(reply)}")
            try:
                missing += [bytes.fromhex(h) for h in reply.get("missing", [])]
                present.update(
                    {bytes.fromhex(h): int(n) for h, n in dict(reply.get("present", {})).items()}
                )
            except (ValueError, TypeError) as exc:
                raise UploadError(f"'have' answered nonsense: {exc}") from None
        return missing, present

    def put_block(self, digest: bytes, payload: bytes, raw_length: int) -> bool:
        """Upload one block's payload; True when it was stored now, False when it was there.

        Raises BlockRefused when the server refuses it (422), Unreachable, UploadError.
        """
        headers = {"X-Fleetcast-Raw-Length": str(raw_length)}
        status, reply = self.call_with_retry(
            lambda: self._request(
                "PUT", f"/blocks/{digest.hex()}", payload, "application/octet-stream", headers
            )
        )
        if status == 422:
            raise BlockRefused(digest, _detail(reply))
        if status not in (200, 201):
            raise UploadError(f"block {digest.hex()} refused (HTTP {status}): {_detail(reply)}")
        return status == 201

    def post_manifest(self, manifest: bytes) -> dict[str, Any]:
        """Send the finished manifest; the server's reply (image_id, name, digest)."""
        status, reply = self.call_with_retry(
            lambda: self._request("POST", "/manifest", manifest, "application/octet-stream")
        )
        if status != 200 or not isinstance(reply, dict):
            raise UploadError(f"the manifest was refused (HTTP {status}): {_detail(reply)}")
        return reply

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- retries -----------------------------------------------------------------------------

    def call_with_retry(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` until it does not fail transiently; Unreachable after retry_for s."""
        deadline = self.clock() + self.retry_for
        pause = FIRST_PAUSE
        while True:
            try:
                return attempt()
            except _Transient as exc:
                self.close()
                if self.clock() + pause > deadline:
                    raise Unreachable(
                        f"the server {self.host} did not answer for {self.retry_for:.0f} s "
                        f"({exc}); the capture resumes where it stopped when run again"
                    ) from None
                self.retries += 1
                log.warning("capture upload: %s; retrying in %.1f s", exc, pause)
                self.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)

    def _request(
        self,
        method: str,
        path: str,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One request on the persistent connection; raises _Transient on network/5xx."""
        all_headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            **(headers or {}),
        }
        try:
            conn = self._connection()
            conn.request(method, self.prefix + path, body=body, headers=all_headers)
            resp = conn.getresponse()
            _ack_now(conn)
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"{method} {path.split('/')[1]}: {exc or type(exc).__name__}") from exc
        if resp.will_close:
            self.close()
        reply = _json(raw)
        if resp.status >= 500 or resp.status in (408, 429):
            raise _Transient(f"{method} {path.split('/')[1]}: HTTP {resp.status} {_detail(reply)}")
        return resp.status, reply

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self.scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self.host, self.port, timeout=HTTP_TIMEOUT)
        return self._conn


def _ack_now(conn: http.client.HTTPConnection) -> None:
    """ACK what arrived at once (Linux TCP_QUICKACK, re-armed per response).

    A server that writes a response's headers and body separately with Nagle's algorithm on
    (uvicorn on a socket without TCP_NODELAY) holds the body until the headers are ACKed,
    and on a kept-alive connection Linux delays that ACK by ~40 ms: measured 44 ms per
    request instead of 1 ms, which capped uploads at ~20 blocks/s on one connection.
    """
    sock = conn.sock
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"detail": raw[:200].decode(errors="replace")}


def _detail(reply: Any) -> str:
    return str(reply.get("detail", reply)) if isinstance(reply, dict) else str(reply)
