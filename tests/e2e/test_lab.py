"""The namespace lab: real multicast between namespaces, loss, shaping, guaranteed teardown."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from bench.lab import Lab, LabError, lab_namespaces

pytestmark = pytest.mark.netns

# Joins GROUP:PORT on lab0, counts datagrams for SECONDS, prints the count.
LISTEN = """
import socket, struct, sys, time
group, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: a burst fits
s.bind((group, port))
ifaddr = socket.inet_aton(sys.argv[4])
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + ifaddr)
s.settimeout(0.2)
print("ready", flush=True)
n, end = 0, time.monotonic() + secs
while time.monotonic() < end:
    try:
        s.recv(2048); n += 1
    except socket.timeout:
        pass
print(n, flush=True)
"""

SEND = """
import socket, sys, time
group, port, count, ifaddr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ifaddr))
for i in range(count):
    s.sendto(b"x" * 1000, (group, port))
    if i % 50 == 0:
        time.sleep(0.002)
"""


def _listeners(lab: Lab, group: str, port: int, secs: float) -> list[subprocess.Popen[bytes]]:
    procs = []
    for node in lab.receivers:
        p = lab.popen(
            node,
            [sys.executable, "-c", LISTEN, group, str(port), str(secs), node.address],
            stdout=subprocess.PIPE,
        )
        procs.append(p)
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"ready"
    return procs


def test_multicast_reaches_every_receiver_and_loss_drops_some(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab(3, sender_rate="1gbit")
    lab.set_loss(lab.receivers[2], 30)
    procs = _listeners(lab, "239.255.42.1", 5001, 2.0)
    lab.run(
        lab.sender, [sys.executable, "-c", SEND, "239.255.42.1", "5001", "1000", lab.sender.address]
    )
    counts = []
    for p in procs:
        out, _ = p.communicate(timeout=10)
        counts.append(int(out.split()[-1]))
    assert counts[0] == counts[1] == 1000
    assert 500 < counts[2] < 900  # 30% random loss, by nftables in that namespace only
    assert "counter packets" in lab.nft_counters(lab.receivers[2])


def test_every_namespace_is_gone_after_an_exception(make_lab: Callable[..., Lab]) -> None:
    with pytest.raises(RuntimeError), Lab(2) as lab:
        names = [n.netns for n in lab.nodes] + [lab.bridge_ns]
        proc = lab.popen(lab.receivers[0], ["sleep", "60"])
        assert set(names) <= set(lab_namespaces())
        raise RuntimeError("test failure inside the lab")
    assert not set(names) & set(lab_namespaces())
    assert proc.poll() is not None  # killed by PID and reaped


def test_killing_a_process_by_pid_reaps_it(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1)
    proc = lab.popen(lab.receivers[0], ["sleep", "60"])
    assert lab.kill(proc) == -9


def test_host_namespace_is_untouched(make_lab: Callable[..., Lab]) -> None:
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    lab = make_lab(2)
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == before
    assert subprocess.run(["ip", "route"], capture_output=True, text=True).stdout == routes
    assert lab.subnet.startswith("198.18.")


def test_a_failing_lab_command_is_a_clear_error(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1)
    with pytest.raises(LabError, match="lab command failed"):
        lab.shape(lab.sender, "not-a-rate")


def test_a_slow_bridge_port_throttles_only_its_receiver(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(2)
    lab.shape_port(lab.receivers[1], "8mbit", burst="16kb", latency="20ms")
    procs = _listeners(lab, "239.255.42.2", 5002, 2.0)
    fast_send = SEND.replace("if i % 50 == 0", "if False")  # one burst, faster than 8 Mbit/s
    lab.run(
        lab.sender,
        [sys.executable, "-c", fast_send, "239.255.42.2", "5002", "1000", lab.sender.address],
    )
    counts = [int(p.communicate(timeout=10)[0].split()[-1]) for p in procs]
    assert counts[0] == 1000
    assert counts[1] < 500  # tbf on its port dropped what did not fit


def test_wait_usage_reports_cpu_and_rss(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1)
    burn = (
        "import time\nx = bytearray(50 << 20)\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass"
    )
    proc = lab.popen(lab.receivers[0], [sys.executable, "-c", burn])
    code, usage = lab.wait_usage(proc, 30)
    assert code == 0
    assert usage.ru_utime + usage.ru_stime >= 0.25
    assert usage.ru_maxrss > 50 << 10  # KiB


def test_namespaces_left_by_a_dead_run_are_swept(make_lab: Callable[..., Lab]) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that no longer runs
    orphan = f"fclab-{dead.pid}-dead00-r0"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    try:
        make_lab(1)  # building a lab sweeps first
        assert orphan not in lab_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", orphan], capture_output=True)
