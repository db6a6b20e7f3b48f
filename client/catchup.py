"""Catch-up: fetch the blocks a target still lacks from the server over HTTP, verified.

A machine evicted from a multicast session (too slow), or one that arrives after the
transfer ended, finishes from ``GET /api/agent/sessions/{sid}/blocks/{index}``: the block's
payload exactly as the store keeps it (a zstd frame, or raw bytes), decoded and checked
against the manifest's SHA-256 by the same ``decode_block`` the multicast path uses, then
written. One persistent HTTP/1.1 connection carries every request; a download that drops
resumes with ``Range: bytes=N-``; a block whose content does not match is fetched again
(``max_bad`` times), then the catch-up fails saying which block and why. Disk errors
(DiskError) and refusals (401/403/404) end it at once with the server's reason.

Blocking: run it off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from client.disk import Target
from client.pipeline import zero_runs
from protocol.codec import BlockError, decode_block
from protocol.manifest import BlockKind, Manifest

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 30.0
#: Connection failures and 5xx answers per block before giving up.
MAX_ATTEMPTS = 6
#: Fetches of one block whose content does not match the manifest before giving up.
MAX_BAD = 3
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class CatchupError(Exception):
    """The catch-up cannot finish; the message says what went wrong and what to check."""


class _Dropped(Exception):
    """The connection failed or the server answered 5xx: retry, resuming at ``got``."""

    def __init__(self, message: str, got: int) -> None:
        super().__init__(message)
        self.got = got


@dataclass
class CatchupStats:
    """What a catch-up did."""

    blocks: int = 0  #: blocks fetched, verified and written
    raw_bytes: int = 0  #: their raw length
    wire_bytes: int = 0  #: payload bytes received (resumed ranges count once)
    resumed: int = 0  #: downloads continued with a Range after a drop
    refetched: int = 0  #: blocks fetched again after a content mismatch
    reconnects: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {
            "catchup_blocks": self.blocks,
            "catchup_bytes": self.raw_bytes,
            "catchup_wire_bytes": self.wire_bytes,
            "catchup_resumed": self.resumed,
            "catchup_refetched": self.refetched,
            "catchup_reconnects": self.reconnects,
            "catchup_seconds": round(self.seconds, 3),
        }


class BlockFetcher:
    """Fetches stored block payloads of one session over one keep-alive connection."""

    def __init__(
        self,
        base_url: str,
        token: str,
        session_id: int,
        *,
        timeout: float = HTTP_TIMEOUT,
        max_attempts: int = MAX_ATTEMPTS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CatchupError(f"server URL {base_url!r} is not an http(s) URL")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/") + f"/api/agent/sessions/{session_id}/blocks/"
        self._token = token
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._sleep = sleep
        self._conn: http.client.HTTPConnection | None = None
        self.stats = CatchupStats()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def fetch(self, index: int, size: int, digest: bytes) -> bytearray:
        """Block ``index``'s stored payload of ``size`` bytes; resumes a dropped download.

        Raises CatchupError when the server refuses, or keeps failing ``max_attempts`` times.
        """
        buf = bytearray(size)
        got = 0
        last = ""
        for attempt in range(self._max_attempts):
            try:
                self._get(index, buf, got, digest)
                return buf
            except _Dropped as exc:
                last, got = str(exc), exc.got
                self.close()
                self._sleep(min(0.2 * 2**attempt, 5.0))
        raise CatchupError(
            f"block {index}: the server failed {self._max_attempts} times ({last}); "
            "check the server and the network"
        )

    def _get(self, index: int, buf: bytearray, got: int, digest: bytes) -> None:
        """One request for ``buf[got:]``: fills it, or raises _Dropped with the progress."""
        headers = {"Authorization": f"Bearer {self._token}"}
        if got:
            headers["Range"] = f"bytes={got}-"
        try:
            conn = self._connection()
            conn.request("GET", f"{self._prefix}{index}", headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise _Dropped(f"{type(exc).__name__}: {exc}", got) from None
        got = self._check_response(index, resp, len(buf), got, digest)  # 0 after a 200
        self.stats.resumed += 1 if got else 0
        view = memoryview(buf)
        try:
            while got < len(buf):
                n = resp.readinto(view[got:])
                if not n:
                    raise _Dropped(f"the download ended at {got} of {len(buf)}", got)
                got += n
                self.stats.wire_bytes += n
        except (OSError, http.client.HTTPException) as exc:
            raise _Dropped(f"{type(exc).__name__} at {got} of {len(buf)}", got) from None
        if not resp.isclosed() and resp.read(1):
            raise CatchupError(f"block {index}: the server sent more than its {len(buf)} bytes")

    def _check_response(
        self, index: int, resp: http.client.HTTPResponse, size: int, got: int, digest: bytes
    ) -> int:
        """Where the body starts in the payload; raises for a refusal or a wrong block."""
        status = resp.status
        if status >= 500 or status == 429:
            resp.read()
            raise _Dropped(f"HTTP {status}", got)
        if status == 416:
            resp.read()
            raise _Dropped(f"HTTP 416 for bytes {got}-", 0)
        if status not in (200, 206):
            detail = _detail(resp.read())
            raise CatchupError(
                f"the server refused block {index} (HTTP {status}): {detail}"
                + (" — is this machine a target of the session?" if status in (401, 403) else "")
            )
        served = resp.getheader("X-Fleetcast-Digest", "")
        if served and served.lower() != digest.hex():
            resp.read()
            raise CatchupError(
                f"the server's block {index} is not the manifest's (digest {served[:16]}..., "
                f"expected {digest.hex()[:16]}...): the session's image changed; start again"
            )
        if status == 200:
            length = resp.getheader("Content-Length")
            if length is not None and int(length) != size:
                resp.read()
                raise CatchupError(
                    f"block {index}: the server sends {length} bytes, the manifest says {size}"
                )
            return 0
        match = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
        if not match or int(match[1]) != got or int(match[2]) != size - 1 or int(match[3]) != size:
            resp.read()
            raise _Dropped(f"bad Content-Range {resp.getheader('Content-Range')!r}", 0)
        return got

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout)
            self._conn.connect()
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stats.reconnects += 1
        return self._conn


def _detail(raw: bytes) -> str:
    try:
        reply = json.loads(raw)
    except ValueError:
        return raw[:200].decode(errors="replace")
    return str(reply.get("detail", reply)) if isinstance(reply, dict) else str(reply)


def catch_up(
    fetcher: BlockFetcher,
    manifest: Manifest,
    target: Target,
    blocks: Iterable[int],
    *,
    held: bytearray | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_bad: int = MAX_BAD,
) -> CatchupStats:
    """Fetch, verify and write each DATA block in ``blocks``; zero the ZERO blocks not
    ``held``; fsync. ``progress(blocks, raw_bytes)`` after each block.

    Raises CatchupError (a block that keeps failing, a refusal) or DiskError.
    """
    stats = fetcher.stats
    started = time.monotonic()
    for index in blocks:
        if manifest.kinds[index] != BlockKind.DATA:
            raise ValueError(f"block {index} is not a data block")
        raw = _verified(fetcher, manifest, index, max_bad)
        target.write(index * manifest.block_size, raw)
        stats.blocks += 1
        stats.raw_bytes += len(raw)
        if progress is not None:
            progress(stats.blocks, stats.raw_bytes)
    for offset, length in zero_runs(manifest):
        _zero_unheld(target, manifest, offset, length, held)
    target.sync()
    stats.seconds += time.monotonic() - started
    return stats


def _verified(fetcher: BlockFetcher, manifest: Manifest, index: int, max_bad: int) -> bytes:
    length, digest = manifest.block_length(index), manifest.digest_of(index)
    why = ""
    for _ in range(max_bad):
        payload = fetcher.fetch(index, manifest.stored_sizes[index], digest)
        try:
            return decode_block(payload, length, digest)
        except BlockError as exc:
            why = str(exc)
            fetcher.stats.refetched += 1
            log.warning("block %d from the server refused: %s; fetching it again", index, why)
    raise CatchupError(
        f"block {index} from the server failed verification {max_bad} times ({why}); "
        "the image store may be damaged: run 'fleetcast image verify' on the server"
    )


def _zero_unheld(
    target: Target, m: Manifest, offset: int, length: int, held: bytearray | None
) -> None:
    """Zero [offset, offset+length) of ZERO blocks, skipping those already zero."""
    if held is None:
        target.zero(offset, length)
        return
    first, end = offset // m.block_size, offset + length
    i = first
    while i * m.block_size < end:
        if held[i]:
            i += 1
            continue
        j = i
        while j * m.block_size < end and not held[j]:
            j += 1
        start = i * m.block_size
        target.zero(start, min(j * m.block_size, end) - start)
        i = j
