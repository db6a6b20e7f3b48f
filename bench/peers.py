"""How each contender is started in the lab, how it is told done, and what it reports.

Every tool gets the same input: the image as the exact bytes every receiver must end with
(``fleetcast image export`` of the captured image: used blocks, zeros elsewhere), and the same
lab. A tool's ``launch`` starts its processes (receivers first for the multicast peers, as
their manuals say) and returns the instant the transfer was set going; the harness in
bench/compare.py polls, hashes the targets and measures. Flags and why are in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lab import Lab, Node, wait_until
from bench.scenarios import Scenario

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


@dataclass(frozen=True)
class PreparedImage:
    """One benchmark image, captured into a fleetcast store and exported for the peers."""

    kind: str  #: "realistic" or "random"
    name: str  #: image name in the store under ``data_dir``
    data_dir: Path  #: FLEETCAST_DATA of the scratch store
    raw: Path  #: the exported image: what every receiver's target must equal
    sha256: str  #: hex SHA-256 of ``raw``
    size: int  #: bytes in ``raw``
    data_bytes: int  #: raw bytes of the image's DATA blocks (what fleetcast writes)
    stored_bytes: int  #: compressed bytes of those blocks (what fleetcast multicasts once)
    zstd_bytes: int  #: ``zstd -1`` of ``raw`` (what udpcast+zstd multicasts once)


@dataclass
class RunContext:
    """Everything one run of one tool needs."""

    lab: Lab
    scenario: Scenario
    image: PreparedImage
    work: Path  #: this run's scratch directory (logs, status files)
    targets: list[Path]  #: receiver i writes ``targets[i]``
    port: int
    group: str
    key_file: Path
    timeout: float  #: seconds the whole transfer may take
    t0: float = 0.0  #: time.monotonic() when the sender (or the downloads) started

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"


@dataclass
class Launched:
    """The processes of one run and when the transfer was set going (time.monotonic)."""

    sender: subprocess.Popen[bytes]
    receivers: list[subprocess.Popen[bytes]]
    t0: float


@dataclass
class Tool:
    """A contender. Subclasses say how to start it and read its reports."""

    name: str = ""
    binaries: tuple[str, ...] = ()
    #: the sender is a server that never exits by itself (HTTP): stop it when receivers end
    sender_is_server: bool = False
    #: receivers are daemons that do not exit when done (uftpd): ``receiver_complete`` says
    receivers_are_daemons: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def missing(self) -> list[str]:
        """Binaries this tool needs that are not installed."""
        return [b for b in self.binaries if shutil.which(b) is None]

    def launch(self, ctx: RunContext) -> Launched:
        """Receivers first, a moment to bind, then the sender; t0 is the sender's start."""
        receivers = [self.start_receiver(ctx, i, n) for i, n in enumerate(ctx.lab.receivers)]
        time.sleep(0.5)
        t0 = ctx.t0 = time.monotonic()
        sender = self.start_sender(ctx)
        return Launched(sender, receivers, t0)

    def start_receiver(self, ctx: RunContext, i: int, node: Node) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def start_sender(self, ctx: RunContext) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def receiver_complete(self, ctx: RunContext, i: int) -> bool:
        """For daemons: has receiver ``i`` said it holds the whole image?"""
        return False

    def progress(self, ctx: RunContext, i: int) -> float:
        """Fraction (0..1) of its image receiver ``i`` has written, from the target's blocks."""
        try:
            st = os.stat(ctx.targets[i])
        except OSError:
            return 0.0
        return min(1.0, st.st_blocks * 512 / max(1, self.bytes_written(ctx.image)))

    def bytes_written(self, image: PreparedImage) -> int:
        """Bytes a receiver of this tool writes (zeros included, for the raw peers)."""
        return image.size

    def payload_once(self, image: PreparedImage) -> int:
        """Bytes of payload the tool must put on the wire once per receiver group."""
        return image.size

    def reports(self, ctx: RunContext) -> dict[str, Any]:
        """What the tool itself says about the run: retransmissions, NAKs (where it says)."""
        return {}


def _popen(
    ctx: RunContext, node: Node, name: str, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(ctx.log(name), "wb") as out:
        return ctx.lab.popen(
            node, argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ctx.work)
        )


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# -- udpcast ---------------------------------------------------------------------------------


@dataclass
class Udpcast(Tool):
    """udp-sender / udp-receiver, optionally through a zstd pipe at both ends."""

    zstd: bool = False

    def __post_init__(self) -> None:
        self.name = "udpcast+zstd" if self.zstd else "udpcast"
        self.binaries = ("udp-sender", "udp-receiver", *(("zstd",) if self.zstd else ()))

    def _common(self, ctx: RunContext) -> list[str]:
        return ["--interface", "lab0", "--nokbd", "--portbase", str(ctx.port)]

    def start_receiver(self, ctx: RunContext, i: int, node: Node) -> subprocess.Popen[bytes]:
        argv = ["udp-receiver", *self._common(ctx), "--file", str(ctx.targets[i])]
        if self.zstd:
            argv += ["--pipe", "zstd -q -d -c"]
        return _popen(ctx, node, node.name, argv)

    def start_sender(self, ctx: RunContext) -> subprocess.Popen[bytes]:
        argv = ["udp-sender", *self._common(ctx), "--nopointopoint"]
        argv += ["--min-receivers", str(ctx.scenario.receivers), "--file", str(ctx.image.raw)]
        if self.zstd:
            argv += ["--pipe", "zstd -q -c -1 -T1"]
        return _popen(ctx, ctx.lab.sender, "sender", argv)

    def payload_once(self, image: PreparedImage) -> int:
        return image.zstd_bytes if self.zstd else image.size

    def reports(self, ctx: RunContext) -> dict[str, Any]:
        # udp-sender's last progress line: "bytes= 536 870 912 re-xmits=0000123 ( 0.1%) ..."
        found = re.findall(r"re-xmits=\s*(\d+)\s*\(\s*([\d.]+)%\)", _read(ctx.log("sender")))
        if not found:
            return {}
        count, share = found[-1]
        return {"retransmitted_share": float(share) / 100, "retransmitted_slices": int(count)}


# -- UFTP ------------------------------------------------------------------------------------


#: uftpd's RESULT status words for a file it holds (man page: "copy"; 5.0 prints "copied")
_UFTPD_DONE = {"copy", "copied", "overwrite", "overwritten"}


@dataclass
class Uftp(Tool):
    """uftp / uftpd at full speed (-R -1), closed group of fixed client ids."""

    def __post_init__(self) -> None:
        self.name = "uftp"
        self.binaries = ("uftp", "uftpd")
        self.receivers_are_daemons = True

    @staticmethod
    def client_id(i: int) -> str:
        return f"0x{i + 1:08x}"

    def _status(self, ctx: RunContext, i: int) -> Path:
        return ctx.work / f"uftpd-{i}.status"

    def start_receiver(self, ctx: RunContext, i: int, node: Node) -> subprocess.Popen[bytes]:
        dest = ctx.targets[i].parent
        argv = ["uftpd", "-d", "-q", "-I", "lab0", "-p", str(ctx.port), "-U", self.client_id(i)]
        argv += ["-D", str(dest), "-F", str(self._status(ctx, i)), "-B", str(16 * MIB)]
        return _popen(ctx, node, node.name, argv)

    def start_sender(self, ctx: RunContext) -> subprocess.Popen[bytes]:
        ids = ",".join(self.client_id(i) for i in range(ctx.scenario.receivers))
        argv = ["uftp", "-R", "-1", "-I", "lab0", "-p", str(ctx.port), "-H", ids]
        argv += ["-B", str(16 * MIB), "-S", str(ctx.work / "uftp.status")]
        argv += ["-D", ctx.targets[0].name, str(ctx.image.raw)]
        return _popen(ctx, ctx.lab.sender, "sender", argv)

    def receiver_complete(self, ctx: RunContext, i: int) -> bool:
        text = _read(self._status(ctx, i))
        return any(
            line.startswith("RESULT;") and line.rstrip().rsplit(";", 1)[-1] in _UFTPD_DONE
            for line in text.splitlines()
        )

    def reports(self, ctx: RunContext) -> dict[str, Any]:
        status = _read(ctx.work / "uftp.status").splitlines()
        out: dict[str, Any] = {"sender_status": [s for s in status if s.startswith("RESULT")]}
        naks = re.findall(r"(\d+)\s+NAKs", _read(ctx.log("sender")))
        if naks:
            out["nak_count"] = sum(int(n) for n in naks)
        return out


# -- HTTP ------------------------------------------------------------------------------------


@dataclass
class Http(Tool):
    """N parallel ``curl`` downloads from one ``python -m http.server`` in the sender ns."""

    def __post_init__(self) -> None:
        self.name = "http"
        self.binaries = ("curl",)
        self.sender_is_server = True

    def _url(self, ctx: RunContext) -> str:
        return f"http://{ctx.lab.sender.address}:{ctx.port}/{ctx.image.raw.name}"

    def launch(self, ctx: RunContext) -> Launched:
        """Server up and answering first; t0 is when the downloads start."""
        argv = [sys.executable, "-m", "http.server", str(ctx.port)]
        argv += ["--bind", ctx.lab.sender.address, "--directory", str(ctx.image.raw.parent)]
        sender = _popen(ctx, ctx.lab.sender, "sender", argv)
        # HEAD: http.server ignores Range, so a GET probe would send the whole image
        probe = ["curl", "-sfI", "--noproxy", "*", "-o", "/dev/null", self._url(ctx)]
        node = ctx.lab.receivers[0]
        up = wait_until(lambda: ctx.lab.run(node, probe, check=False).returncode == 0, 15, 0.1)
        if not up:
            raise RuntimeError(f"http.server did not answer in 15 s: {_read(ctx.log('sender'))}")
        t0 = ctx.t0 = time.monotonic()
        receivers = [self.start_receiver(ctx, i, n) for i, n in enumerate(ctx.lab.receivers)]
        return Launched(sender, receivers, t0)

    def start_receiver(self, ctx: RunContext, i: int, node: Node) -> subprocess.Popen[bytes]:
        argv = ["curl", "-sS", "-f", "--noproxy", "*", "-o", str(ctx.targets[i]), self._url(ctx)]
        return _popen(ctx, node, node.name, argv)

    def payload_once(self, image: PreparedImage) -> int:
        return image.size  # per receiver: unicast sends it N times


# -- fleetcast -------------------------------------------------------------------------------


@dataclass
class Fleetcast(Tool):
    """``fleetcast send`` / ``fleetcast receive`` (the standalone engine CLI)."""

    sender_args: tuple[str, ...] = ()
    #: the source tree whose engine runs (another checkout: ``bench.compare --baseline``)
    root: Path = ROOT

    def __post_init__(self) -> None:
        self.name = "fleetcast" if self.root == ROOT else "fleetcast-base"

    def _argv(self, ctx: RunContext, *args: str) -> list[str]:
        common = ["--group", ctx.group, "--port", str(ctx.port), "--iface", "lab0"]
        return [sys.executable, "-m", "fleetcast", *args, *common, "--key-file", str(ctx.key_file)]

    def _env(self, ctx: RunContext) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self.root), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "FLEETCAST_DATA": str(ctx.image.data_dir), "PYTHONPATH": path}

    def _stats(self, ctx: RunContext, i: int) -> Path:
        return ctx.work / f"r{i}.json"

    def start_receiver(self, ctx: RunContext, i: int, node: Node) -> subprocess.Popen[bytes]:
        argv = self._argv(ctx, "receive", "--target", str(ctx.targets[i]))
        argv += ["--stats-json", str(self._stats(ctx, i)), "--timeout", str(int(ctx.timeout))]
        return _popen(ctx, node, node.name, argv, self._env(ctx))

    def start_sender(self, ctx: RunContext) -> subprocess.Popen[bytes]:
        argv = self._argv(ctx, "send", ctx.image.name)
        argv += ["--min-receivers", str(ctx.scenario.receivers), "--max-wait", "30"]
        if "--stats-json" in _read(self.root / "server" / "multicast" / "command.py"):
            argv += ["--stats-json", str(ctx.work / "sender.json")]  # older trees lack it
        return _popen(ctx, ctx.lab.sender, "sender", [*argv, *self.sender_args], self._env(ctx))

    def bytes_written(self, image: PreparedImage) -> int:
        return image.data_bytes  # zero and unused blocks are holes in a fresh target

    def payload_once(self, image: PreparedImage) -> int:
        return image.stored_bytes

    def reports(self, ctx: RunContext) -> dict[str, Any]:
        out: dict[str, Any] = {}
        naks = 0
        per_receiver: list[dict[str, Any]] = []
        for i in range(ctx.scenario.receivers):
            path = self._stats(ctx, i)
            if not path.exists():
                continue
            stats = json.loads(path.read_text())
            per_receiver.append(stats)
            session = stats.get("session", {})
            naks += int(session.get("naks_sent", 0) or 0)
        out["nak_datagrams"] = naks
        out["receiver_stats"] = per_receiver
        out["timeline"] = self._timeline(ctx, per_receiver)
        sender = ctx.work / "sender.json"
        if sender.exists():  # one pass of every object: what a receiver with nothing needs
            session = json.loads(sender.read_text()).get("session", {})
            out["data_datagrams"] = session.get("data_datagrams")
        m = re.search(r"(\d+) datagrams \(([\d.]+) MiB\) in (\d+) sends", _read(ctx.log("sender")))
        if m:
            sent = int(m.group(1))
            out["sender_datagrams"] = sent
            out["sender_send_calls"] = int(m.group(3))
            # A verified receiver accepted each fragment once: that is what one pass takes.
            once = max((s.get("session", {}).get("fragments", 0) for s in per_receiver), default=0)
            if once and sent:
                out["retransmitted_share"] = max(0.0, (sent - once) / sent)
        return out

    def _timeline(self, ctx: RunContext, per_receiver: list[dict[str, Any]]) -> dict[str, float]:
        """Seconds after the sender's start when each phase ended (docs/BENCHMARKS.md):
        ``run`` (Python start-up, imports, manifest load), ``transfer`` (joins and the start
        rule), ``last_data`` (the sender's last data send), ``last_in`` (the last datagram a
        receiver read), ``completed`` (the last DONE the sender accepted: decode, verify,
        write and fsync of the last blocks, then the DONE exchange)."""
        path = ctx.work / "sender.json"
        if not path.exists():
            return {}
        stamps = json.loads(path.read_text()).get("timeline", {})
        out = {k: stamps[k] - ctx.t0 for k in ("run", "transfer", "last_data") if k in stamps}
        done = [v for k, v in stamps.items() if k.startswith("completed:")]
        if done:
            out["completed"] = max(done) - ctx.t0
        last_in = [s.get("socket", {}).get("last_in_at") for s in per_receiver]
        if last_in and all(isinstance(t, float) for t in last_in):
            out["last_in"] = max(t for t in last_in if t is not None) - ctx.t0
        return {k: round(v, 3) for k, v in out.items()}


def all_tools() -> list[Tool]:
    """Every contender, fleetcast last (its ratios are to the others); ``fleetcast-server``
    (bench/viaserver.py: the same engine driven through the server and its agents) is
    chosen by name only (``--tools``)."""
    return [Udpcast(), Udpcast(zstd=True), Uftp(), Http(), Fleetcast()]


def tool_by_name() -> dict[str, Tool]:
    """Every tool ``--tools`` may name, the default set plus ``fleetcast-server``."""
    from bench.viaserver import FleetcastServer  # it builds on this module

    return {t.name: t for t in [*all_tools(), FleetcastServer()]}
