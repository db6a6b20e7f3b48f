"""A private multicast lab made of Linux network namespaces (issue 8; reused by tests/e2e).

``Lab(receivers=N)`` builds, as root::

    [sender ns] lab0 ── veth ── p-s  ┐
    [recv0  ns] lab0 ── veth ── p-r0 ├─ br0  (in its own bridge namespace)
    [recvN  ns] lab0 ── veth ── p-rN ┘

MTU 1500, a bridge that floods multicast like an unmanaged switch (``mcast_snooping 0
stp_state 0 forward_delay 0``), addresses in 198.18.X.0/24 (RFC 2544's benchmarking range)
that exist only inside these namespaces, ``brd +``, ``rp_filter=0``, IPv6 off and a route
``224.0.0.0/4 dev lab0`` in every endpoint namespace. Optional ``tc tbf`` shaping on the
sender's egress or on a receiver's bridge port, optional random loss per namespace with an
nftables ``numgen random`` drop rule. Processes started with ``popen`` are tracked by PID,
killed by PID and reaped on exit. Every namespace is deleted on exit, after exceptions too;
namespaces left by a process that died without cleaning up (SIGKILL, a CI timeout) carry that
process's PID in their name and are swept by the next lab. Nothing touches the host's
interfaces or routes: every link is created inside a lab namespace.

Usage::

    with Lab(receivers=4, sender_rate="1gbit") as lab:
        lab.set_loss(lab.receivers[0], 2)
        p = lab.popen(lab.receivers[0], ["fleetcast", "receive", ...])
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

#: Every lab namespace's name starts with this, then the creating PID.
PREFIX = "fclab"
LAB_IF = "lab0"
MTU = 1500
_CMD_TIMEOUT = 30.0
_live_labs: set[Lab] = set()


class LabError(RuntimeError):
    """The lab could not be built or a lab command failed."""


@dataclass(frozen=True)
class Node:
    """One endpoint of the lab: a namespace with one interface on the bridge."""

    name: str  #: "sender" or "r0", "r1", ...
    netns: str  #: namespace name, for ``ip netns exec``
    address: str  #: IPv4 address of ``ifname``
    port: str  #: this node's veth port in the bridge namespace
    ifname: str = LAB_IF


class Lab:
    """A bridge, one sender and ``receivers`` receiver namespaces; a context manager.

    ``sender_rate`` (e.g. "1gbit") shapes the sender's egress with tbf; None leaves it
    unshaped. ``start()`` raises LabError when not root or when a tool is missing.
    """

    sender: Node

    def __init__(self, receivers: int = 1, *, sender_rate: str | None = None) -> None:
        if not 1 <= receivers <= 200:
            raise ValueError(f"a lab has 1..200 receivers, not {receivers}")
        self.receivers_wanted = receivers
        self.sender_rate = sender_rate
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.receivers: list[Node] = []
        self._namespaces: list[str] = []
        self._procs: dict[int, subprocess.Popen[Any]] = {}
        #: first three octets of the lab's /24 (198.18.0.0/15 is RFC 2544's benchmark range)
        self.subnet = f"198.18.{secrets.randbelow(256)}"
        self.bridge_ns = f"{PREFIX}-{self.tag}-br"

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Build the topology; on any failure tear down what was made and raise LabError."""
        require_lab_support()
        sweep_stale()
        _live_labs.add(self)
        try:
            self._add_netns(self.bridge_ns)
            _ip(
                "-n",
                self.bridge_ns,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            )
            _ip("-n", self.bridge_ns, "link", "set", "br0", "mtu", str(MTU), "up")
            self.sender = self._add_node("sender", "p-s", f"{self.subnet}.1")
            for i in range(self.receivers_wanted):
                self.receivers.append(self._add_node(f"r{i}", f"p-r{i}", f"{self.subnet}.{10 + i}"))
            if self.sender_rate:
                self.shape(self.sender, self.sender_rate)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill every tracked process, then delete every namespace this lab made."""
        for pid in list(self._procs):
            self.kill(self._procs[pid], signal.SIGKILL)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=_CMD_TIMEOUT)
        self._namespaces.clear()
        _live_labs.discard(self)

    @property
    def nodes(self) -> list[Node]:
        """The sender, then every receiver."""
        return [self.sender, *self.receivers]

    # -- shaping and loss -------------------------------------------------------------

    def shape(self, node: Node, rate: str, burst: str = "128kb", latency: str = "50ms") -> None:
        """tbf on ``node``'s egress (for the sender: every datagram it sends)."""
        _run_in(
            node.netns,
            [
                "tc",
                "qdisc",
                "replace",
                "dev",
                node.ifname,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                burst,
                "latency",
                latency,
            ],
        )

    def shape_port(
        self, node: Node, rate: str, burst: str = "128kb", latency: str = "50ms"
    ) -> None:
        """tbf on the bridge port toward ``node``: a slow switch port in front of it."""
        _run_in(
            self.bridge_ns,
            [
                "tc",
                "qdisc",
                "replace",
                "dev",
                node.port,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                burst,
                "latency",
                latency,
            ],
        )

    def set_loss(self, node: Node, percent: int) -> None:
        """Drop ``percent``% of UDP datagrams arriving in ``node``'s namespace at random."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0..100 percent, not {percent}")
        ruleset = (
            "table inet fclab\ndelete table inet fclab\n"
            "table inet fclab {\n chain in {\n  type filter hook input priority 0; policy accept;\n"
            f"  meta l4proto udp numgen random mod 100 < {percent} counter drop\n }}\n}}\n"
        )
        _run_in(node.netns, ["nft", "-f", "-"], input=ruleset)

    def nft_counters(self, node: Node) -> str:
        """The lab's nftables ruleset in ``node`` with its counters, as text."""
        return _run_in(node.netns, ["nft", "list", "table", "inet", "fclab"]).stdout

    # -- processes --------------------------------------------------------------------

    def popen(
        self,
        node: Node,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``node``'s namespace; it is tracked and killed on close.

        ``ip netns exec`` execs the command in place, so the Popen's PID is the command's.
        """
        proc = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cwd,
        )
        self._procs[proc.pid] = proc
        return proc

    def run(
        self,
        node: Node,
        argv: Sequence[str],
        *,
        timeout: float = _CMD_TIMEOUT,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in ``node``'s namespace and return its output."""
        return _run_in(node.netns, argv, timeout=timeout, check=check, input=input)

    def kill(
        self, proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, timeout: float = 10.0
    ) -> int | None:
        """Send ``sig`` to ``proc`` by its PID and reap it; its exit status (None if it lives)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if sig != signal.SIGKILL:
                    return self.kill(proc, signal.SIGKILL, timeout)
                return None
        self._procs.pop(proc.pid, None)
        return proc.returncode

    def wait(self, proc: subprocess.Popen[Any], timeout: float) -> int:
        """Wait at most ``timeout`` s for ``proc``; raises subprocess.TimeoutExpired."""
        code = proc.wait(timeout=timeout)
        self._procs.pop(proc.pid, None)
        return code

    def wait_usage(
        self, proc: subprocess.Popen[Any], timeout: float
    ) -> tuple[int, resource.struct_rusage]:
        """Wait for ``proc`` and return its exit status and resource usage (CPU s, max RSS).

        For benchmarks: ``usage.ru_utime + usage.ru_stime`` is the CPU time it used,
        ``usage.ru_maxrss`` its peak RSS in KiB. Raises subprocess.TimeoutExpired.
        """
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                self._procs.pop(proc.pid, None)
                return proc.returncode, usage
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            time.sleep(0.02)

    # -- internals --------------------------------------------------------------------

    def _add_netns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _sysctl(
            ns,
            {
                "net.ipv6.conf.all.disable_ipv6": 1,
                "net.ipv6.conf.default.disable_ipv6": 1,
                "net.ipv4.conf.all.rp_filter": 0,
                "net.ipv4.conf.default.rp_filter": 0,
            },
        )
        _ip("-n", ns, "link", "set", "lo", "up")

    def _add_node(self, name: str, port: str, address: str) -> Node:
        ns = f"{PREFIX}-{self.tag}-{name}"
        self._add_netns(ns)
        # The pair is made inside the bridge namespace with its peer placed straight into the
        # node's namespace, so no interface ever exists in the host namespace.
        veth = f"link add {port} mtu {MTU} type veth peer name {LAB_IF} mtu {MTU} netns {ns}"
        _ip("-n", self.bridge_ns, *veth.split())
        _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        _sysctl(
            ns,
            {
                f"net.ipv4.conf.{LAB_IF}.rp_filter": 0,
                f"net.ipv6.conf.{LAB_IF}.disable_ipv6": 1,
            },
        )
        _ip("-n", ns, "addr", "add", f"{address}/24", "brd", "+", "dev", LAB_IF)
        _ip("-n", ns, "link", "set", LAB_IF, "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", LAB_IF)
        return Node(name=name, netns=ns, address=address, port=port)


def require_lab_support() -> None:
    """Raise LabError with the reason when this machine cannot build a lab."""
    if os.geteuid() != 0:
        raise LabError("the namespace lab needs root (ip netns add); run as root")
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            raise LabError(f"the namespace lab needs {tool!r}; run scripts/setup")


def lab_unavailable_reason() -> str | None:
    """None when a lab can be built here, else why not (for pytest skips)."""
    try:
        require_lab_support()
    except LabError as exc:
        return str(exc)
    probe = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}"
    out = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=_CMD_TIMEOUT
    )
    if out.returncode != 0:
        return f"'ip netns add' does not work here: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=_CMD_TIMEOUT)
    return None


def lab_namespaces() -> list[str]:
    """Names of every lab namespace on this machine (any creator)."""
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=_CMD_TIMEOUT
    )
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX + "-")]


def sweep_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone; return their names."""
    swept = []
    for ns in lab_namespaces():
        parts = ns.split("-")
        if len(parts) < 3 or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=_CMD_TIMEOUT)
        swept.append(ns)
    return swept


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` s pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@contextlib.contextmanager
def lab(receivers: int = 1, *, sender_rate: str | None = None) -> Iterator[Lab]:
    """``with lab(4) as l:`` — the same as ``with Lab(4) as l:``."""
    with Lab(receivers, sender_rate=sender_rate) as built:
        yield built


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sysctl(ns: str, settings: dict[str, int]) -> None:
    """Set net.* sysctls inside ``ns`` by writing /proc/sys there (no procps needed)."""
    script = "; ".join(
        f"echo {value} > /proc/sys/{key.replace('.', '/')}" for key, value in settings.items()
    )
    _run_in(ns, ["sh", "-ec", script])


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run_in(
    ns: str,
    argv: Sequence[str],
    *,
    timeout: float = _CMD_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return _run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check, input=input)


def _run(
    argv: Sequence[str],
    *,
    timeout: float = _CMD_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and out.returncode != 0:
        raise LabError(
            f"lab command failed ({out.returncode}): {' '.join(argv)}: {out.stderr.strip()}"
        )
    return out


@atexit.register
def _close_all() -> None:
    for built in list(_live_labs):
        built.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.lab list|sweep``: show lab namespaces, or delete orphaned ones."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["list"]:
        print("\n".join(lab_namespaces()))
        return 0
    if args == ["sweep"]:
        for ns in sweep_stale():
            print(f"deleted {ns}")
        return 0
    print("usage: python -m bench.lab list|sweep", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
