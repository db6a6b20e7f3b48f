"""Wake-on-LAN: magic packets (6 x 0xFF, then 16 x the MAC) to a broadcast address.

``magic_packet`` is the one byte layout; ``send_wake`` sends one per machine, ``repeats``
times (a switch port that is still coming up, or a lost datagram, must not keep a machine
asleep). Blocking: call it from a thread (the scheduler does).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Iterable

from server.models import normalize_mac

log = logging.getLogger(__name__)

#: 6 bytes of 0xFF, then the 6-byte MAC 16 times: 102 bytes
MAGIC_SIZE = 102


def magic_packet(mac: str) -> bytes:
    """The magic packet that wakes ``mac``; ValueError when ``mac`` is not a MAC address."""
    raw = bytes.fromhex(normalize_mac(mac).replace(":", ""))
    return b"\xff" * 6 + raw * 16


def check_target(address: str, port: int) -> None:
    """ValueError unless ``address`` is an IPv4 address and ``port`` a UDP port."""
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(
            f"Wake-on-LAN broadcast address {address!r} is not an IPv4 address "
            "(use the lab's broadcast address, e.g. 10.1.2.255)"
        ) from None
    if not 1 <= port <= 65535:
        raise ValueError(f"Wake-on-LAN port {port} must be 1-65535 (usually 9 or 7)")


def send_wake(
    macs: Iterable[str], address: str, port: int, *, repeats: int = 3, interval: float = 0.5
) -> int:
    """Send each MAC's magic packet to ``address``:``port``, ``repeats`` times ``interval``
    seconds apart; returns how many machines were sent packets. Raises OSError when the
    socket cannot send (no route to the broadcast address) and ValueError for bad input."""
    check_target(address, port)
    packets = [magic_packet(m) for m in macs]
    if not packets:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for i in range(max(1, repeats)):
            if i:
                time.sleep(interval)
            for p in packets:
                sock.sendto(p, (address, port))
    log.info("woke %d machines via %s:%d (%d times)", len(packets), address, port, repeats)
    return len(packets)
