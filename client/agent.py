"""The boot-time agent: enroll with the server, wait for an assignment, receive, report.

``fleetcast agent --server URL --token ENROLLMENT_TOKEN --target DISK`` (client/cli.py):

1. register: POST /api/agent/register with this machine's MACs and hardware inventory,
   authenticated by the enrollment token; the server answers with this machine's own
   credential, used from then on (so one machine cannot report for another);
2. ask GET /api/agent/assignment?wait=20 (a long poll) until a session is assigned (group,
   port, key, manifest);
3. run the same receive path as ``fleetcast receive`` (client.receive.Receiver) onto the
   target, sending batched progress at most every ``progress_interval`` seconds (the server
   says how often) from a worker thread, so the receive loop never waits on HTTP; a reply
   ``cancel`` stops the receive;
4. check that the manifest received over multicast is the one assigned, then POST the result.

Only the stdlib (urllib), protocol/ and the client's own modules: this runs in the boot image.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.progress import ProgressBar
from client.receive import ABORTED, FAILED, Outcome, Receiver
from client.transport import TransportError

log = logging.getLogger(__name__)

SIOCGIFADDR = 0x8915
HTTP_TIMEOUT = 15.0
#: Seconds the server may hold an assignment request (long poll; the server allows 25).
LONG_POLL = 20.0
#: Transient HTTP failures are retried this many times, with growing pauses.
RETRIES = 5
#: How often the agent looks whether the transfer has started, to report it at once.
FIRST_REPORT_POLL = 0.05


class AgentError(Exception):
    """The agent cannot go on; the message says what went wrong and what to check."""


@dataclass
class AgentOptions:
    server: str  #: base URL, e.g. http://10.0.0.1:8080
    token: str  #: the enrollment token
    target: str  #: file or block device to write
    iface: str = ""  #: "" = the interface that routes to the server
    poll: float = 2.0  #: seconds between assignment polls
    wait: float | None = None  #: give up waiting for an assignment after this long
    timeout: float | None = None  #: give up a receive after this long


# -- HTTP -------------------------------------------------------------------------------------


class ServerApi:
    """JSON over HTTP to the fleetcast server, with a bearer token."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = HTTP_TIMEOUT
    ) -> tuple[int, Any]:
        """(status, JSON reply); retries connection failures and 5xx; raises AgentError.
        ``timeout``: seconds each attempt may take (a long poll asks for more)."""
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(RETRIES + 1):
            req = urllib.request.Request(self.base + path, data=data, method=method)
            req.add_header("Authorization", f"Bearer {self.token}")
            if data is not None:
                req.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return resp.status, _json(resp.read())
            except urllib.error.HTTPError as exc:
                payload = _json(exc.read())
                if exc.code < 500:
                    return exc.code, payload
                last = f"HTTP {exc.code}: {payload}"
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last = str(getattr(exc, "reason", exc))
            time.sleep(min(0.5 * 2**attempt, 5.0))
        raise AgentError(f"server {self.base} unreachable for {method} {path}: {last}")


def _poll_pause(reply: dict[str, Any], asked: float, took: float, poll: float) -> float:
    """Seconds to pause after an empty assignment answer: none when the server held the
    request (``retry_after`` 0 after at least half the ``asked`` wait), else the old
    server's ``retry_after`` or ``poll``, whichever is longer."""
    retry_after = float(reply.get("retry_after") or 0)
    if retry_after <= 0 and asked > 0 and took >= asked / 2:
        return 0.0
    return max(retry_after, poll)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"detail": raw[:200].decode(errors="replace")}


def _detail(reply: Any) -> str:
    return str(reply.get("detail", reply)) if isinstance(reply, dict) else str(reply)


# -- this machine -----------------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def local_macs(sys_net: Path = Path("/sys/class/net")) -> list[str]:
    """MAC addresses of this machine's Ethernet interfaces (physical first), sorted."""
    macs = []
    for dev in sorted(sys_net.iterdir()) if sys_net.is_dir() else []:
        mac = _read(dev / "address")
        if dev.name == "lo" or not mac or mac == "00:00:00:00:00:00" or len(mac) != 17:
            continue
        macs.append(mac.lower())
    return macs


def inventory() -> dict[str, Any]:
    """What the server records about this machine: disks, CPU, RAM, NICs."""
    disks = []
    for dev in sorted(Path("/sys/block").iterdir()) if Path("/sys/block").is_dir() else []:
        if dev.name.startswith(("loop", "ram", "zram", "dm-", "sr")):
            continue
        sectors = _read(dev / "size")
        disks.append(
            {
                "name": dev.name,
                "size": int(sectors) * 512 if sectors.isdigit() else 0,
                "model": _read(dev / "device" / "model"),
                "serial": _read(dev / "device" / "serial") or _read(dev / "serial"),
            }
        )
    nics = []
    for dev in sorted(Path("/sys/class/net").iterdir()) if Path("/sys/class/net").is_dir() else []:
        if dev.name != "lo":
            speed = _read(dev / "speed")
            nics.append(
                {
                    "name": dev.name,
                    "mac": _read(dev / "address"),
                    "speed_mbps": int(speed) if speed.lstrip("-").isdigit() else None,
                }
            )
    cpu_model = ""
    for line in _read(Path("/proc/cpuinfo")).splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    ram = 0
    for line in _read(Path("/proc/meminfo")).splitlines():
        if line.startswith("MemTotal:"):
            ram = int(line.split()[1]) * 1024
    return {
        "disks": disks,
        "cpu": {"model": cpu_model, "cores": os.cpu_count() or 0},
        "ram_bytes": ram,
        "nics": nics,
    }


def route_interface(server_url: str) -> str:
    """The interface this machine reaches ``server_url`` through (where multicast arrives)."""
    parsed = urllib.parse.urlsplit(server_url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(host), port))
        except OSError as exc:
            raise AgentError(f"no route to the server {server_url}: {exc}") from None
        local = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):
                res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)
                if socket.inet_ntoa(res[20:24]) == local:
                    return name
    raise AgentError(f"no interface holds {local} (the route to the server): pass --iface")


# -- progress reports -------------------------------------------------------------------------


class ProgressReporter(ProgressBar):
    """Receives the receiver's progress calls; the agent sends them on, rate-limited."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def start(self, total: int) -> None:
        self.total, self.done, self._started = total, 0, time.monotonic()

    def update(self, done: int, *, force: bool = False) -> None:
        self.done = done

    def close(self) -> None:
        return None

    def sample(self, session_stats: dict[str, Any]) -> dict[str, Any]:
        """One progress sample for the server.

        ``loss`` is the receiver's loss since it joined (lost / expected sender datagrams,
        the ``loss_total`` of its stats), steadier than the last STATUS interval's figure.
        """
        elapsed = max(time.monotonic() - self._started, 1e-6)
        naks = int(session_stats.get("naks_sent", 0))
        return {
            "bytes_done": self.done,
            "bytes_total": self.total,
            "blocks_done": int(session_stats.get("blocks_done", 0)),
            "blocks_total": int(session_stats.get("blocks_total", 0)),
            "rate_bps": self.done * 8 / elapsed,
            "loss": _fraction(session_stats.get("loss_total", session_stats.get("loss", 0.0))),
            "naks": naks,
        }


def _fraction(value: object) -> float:
    """``value`` as a float clamped to [0, 1]; 0.0 when it is not a number."""
    try:
        return min(max(float(value), 0.0), 1.0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


#: Counters the result carries (issue 9 adds held_* and catchup_*).
_RESULT_STATS = (
    "verified_bytes",
    "peak_rss_mib",
    "held_blocks",
    "held_bytes",
    "catchup_blocks",
    "catchup_bytes",
)


# -- the agent --------------------------------------------------------------------------------


class Agent:
    """register() once, then run_once() per deployment."""

    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.enroll_api = ServerApi(options.server, options.token)
        self.api: ServerApi | None = None
        self.machine_id = 0
        self.progress_interval = 1.0
        #: issue 9: phase, held_blocks, held_bytes sent with each progress report
        self.phase_fields: dict[str, Any] = {}

    def register(self) -> int:
        """Enroll; returns this machine's id. Raises AgentError."""
        macs = local_macs()
        if not macs:
            raise AgentError("no network interface with a MAC address found in /sys/class/net")
        body = {"macs": macs, "hostname": socket.gethostname(), "inventory": inventory()}
        status, reply = self.enroll_api.call("POST", "/api/agent/register", body)
        if status != 200:
            raise AgentError(f"the server refused enrollment (HTTP {status}): {_detail(reply)}")
        self.machine_id = int(reply["machine_id"])
        self.progress_interval = max(float(reply.get("progress_interval", 1.0)), 0.2)
        self.api = ServerApi(self.options.server, str(reply["credential"]))
        log.info("enrolled as machine %d (MACs %s)", self.machine_id, ", ".join(macs))
        return self.machine_id

    def wait_assignment(self) -> dict[str, Any]:
        """Ask until a session is assigned; raises AgentError after ``options.wait``.

        Each request is a long poll (``?wait=``, at most LONG_POLL s, never past the
        deadline): the server answers as soon as a session is assigned. An empty answer with
        ``retry_after`` 0 after the server waited: ask again at once; otherwise (a server
        without the long poll) pause ``max(retry_after, options.poll)``."""
        assert self.api is not None
        deadline = None if self.options.wait is None else time.monotonic() + self.options.wait
        while True:
            ask = LONG_POLL if deadline is None else min(LONG_POLL, deadline - time.monotonic())
            ask = max(round(ask, 2), 0.0)
            started = time.monotonic()
            status, reply = self.api.call(
                "GET", f"/api/agent/assignment?wait={ask:.2f}", timeout=ask + HTTP_TIMEOUT
            )
            if status != 200:
                raise AgentError(f"assignment refused (HTTP {status}): {_detail(reply)}")
            if reply.get("session_id"):
                return dict(reply)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise AgentError(f"no session assigned within {self.options.wait:g} s")
            pause = _poll_pause(reply, ask, now - started, self.options.poll)
            time.sleep(pause if deadline is None else min(pause, deadline - now))

    async def run_once(self) -> dict[str, Any]:
        """Wait for an assignment, receive it, report; returns the server's verdict."""
        assert self.api is not None
        job = await asyncio.to_thread(self.wait_assignment)
        if job.get("kind") == "capture":  # issue 10: read the disk and upload it instead
            from client.capture import run_capture

            return await asyncio.to_thread(run_capture, self, job)
        session_id = int(job["session_id"])
        expected = str(job.get("manifest_digest", ""))
        manifest_bytes = base64.b64decode(job.get("manifest", ""))
        if expected and hashlib.sha256(manifest_bytes).hexdigest() != expected:
            raise AgentError(
                f"session {session_id}: the assigned manifest does not match its digest"
            )
        iface = self.options.iface or route_interface(self.options.server)
        log.info(
            "session %d: receiving %s on %s:%s via %s",
            session_id,
            job.get("image"),
            job["group"],
            job["port"],
            iface,
        )
        reporter = ProgressReporter()
        from client.resume import deploy  # issue 9: delta, resume, catch-up

        outcome, receiver = await deploy(self, job, manifest_bytes, iface, reporter)
        verdict = await asyncio.to_thread(self._report, session_id, receiver, outcome, expected)
        # what the session says the machine does next (client/boot.py acts on it under PXE)
        verdict["after"] = str(job.get("after") or "")
        verdict["disk_rule"] = str(job.get("disk_rule") or "")
        return verdict

    async def _receive(
        self, session_id: int, receiver: Receiver, reporter: ProgressReporter
    ) -> Outcome:
        task = asyncio.get_running_loop().create_task(receiver.run(self.options.timeout))
        stop_reason = ""
        reported = False
        try:
            while not task.done():
                # The first report goes out as soon as the transfer starts (the server then
                # shows the machine receiving), later ones every progress_interval.
                wait = self.progress_interval if reported else FIRST_REPORT_POLL
                await asyncio.wait({task}, timeout=wait)
                if task.done():
                    break
                if not reported and not reporter.total:
                    continue
                reported = True
                reply = await asyncio.to_thread(self._progress, session_id, receiver, reporter)
                if reply.get("cancel"):
                    stop_reason = str(reply.get("reason") or "the server cancelled the session")
                    task.cancel()
            return task.result()
        except asyncio.CancelledError:
            if not stop_reason:
                raise
            outcome = receiver.outcome
            outcome.result, outcome.reason = ABORTED, stop_reason
            outcome.stats = receiver.counters()
            return outcome
        except TransportError as exc:
            return Outcome(result=FAILED, reason=str(exc))

    def _progress(
        self, session_id: int, receiver: Receiver, reporter: ProgressReporter
    ) -> dict[str, Any]:
        assert self.api is not None
        stats = getattr(getattr(receiver, "session", None), "stats", {}) or {}
        body = {
            "session_id": session_id,
            "receiver_id": stats.get("receiver_id"),
            "samples": [reporter.sample(stats)],
            **self.phase_fields,
        }
        try:
            status, reply = self.api.call("POST", "/api/agent/progress", body)
        except AgentError as exc:  # progress is best effort; the result is what counts
            log.warning("session %d: progress not sent: %s", session_id, exc)
            return {}
        return dict(reply) if status == 200 and isinstance(reply, dict) else {}

    def _report(
        self, session_id: int, receiver: Receiver | None, outcome: Outcome, expected: str
    ) -> dict[str, Any]:
        assert self.api is not None
        result, reason = outcome.result, outcome.reason
        digest = outcome.manifest.digest().hex() if outcome.manifest is not None else ""
        if result == "verified" and digest != expected:
            result, reason = FAILED, "the manifest received over multicast is not the assigned one"
        stats = outcome.stats
        body = {
            "session_id": session_id,
            "result": result if result != "usage" else FAILED,
            "reason": reason[:2048],
            "bytes_done": int(stats.get("verified_bytes", 0)),
            "blocks_done": int(stats.get("verified_blocks", 0)),
            "manifest_digest": digest,
            "stats": {k: stats[k] for k in _RESULT_STATS if k in stats},
            "via": str(stats.get("via", "multicast")),
        }
        status, reply = self.api.call("POST", "/api/agent/result", body)
        log.info(
            "session %d: %s %s; server says HTTP %d %s", session_id, result, reason, status, reply
        )
        verdict = dict(reply) if isinstance(reply, dict) else {}
        verdict.setdefault("state", result if status == 200 else f"not recorded: {_detail(reply)}")
        verdict["result"] = result
        verdict["reason"] = reason
        return verdict
