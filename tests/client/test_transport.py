"""The receiver's socket setup refuses bad groups and interfaces with a clear message.

(Receiving real multicast is covered end to end in tests/e2e, inside namespaces.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import pytest

from client.transport import (
    SOL_UDP,
    UDP_GRO,
    SessionTransport,
    TransportError,
    open_multicast_socket,
)


def test_a_unicast_address_is_not_a_group() -> None:
    with pytest.raises(TransportError, match="not a multicast group"):
        open_multicast_socket("10.1.2.3", 5000, "lo")


def test_a_missing_interface_is_named() -> None:
    with pytest.raises(TransportError, match="interface 'nosuch0' does not exist"):
        open_multicast_socket("239.1.2.3", 5000, "nosuch0")


def test_garbage_is_not_an_address() -> None:
    with pytest.raises(TransportError, match="is not an IPv4 address"):
        open_multicast_socket("lab-group", 5000, "lo")


class _Recorder:
    """A session that keeps a copy of every datagram it is handed."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def receive_datagram(self, data: object, addr: object, now: float) -> None:
        assert isinstance(data, memoryview | bytes)
        self.got.append(bytes(data))

    def datagrams_to_send(self, now: float) -> list[object]:
        return []

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def next_event(self) -> None:
        return None


def _receive_all(sock: socket.socket, want: int) -> tuple[_Recorder, SessionTransport]:
    loop = asyncio.new_event_loop()
    session = _Recorder()
    transport = SessionTransport(
        session, sock, loop=loop, default_addr=("127.0.0.1", 9), on_event=lambda e: None
    )
    transport.start()

    async def wait() -> None:
        for _ in range(200):
            if len(session.got) >= want:
                return
            await asyncio.sleep(0.01)

    try:
        loop.run_until_complete(wait())
    finally:
        transport.close()
        loop.close()
    return session, transport


def test_a_gso_train_is_handed_over_as_its_datagrams_in_order() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    with contextlib.suppress(OSError):
        rx.setsockopt(SOL_UDP, UDP_GRO, 1)
    rx.setblocking(False)
    seg = 1472
    datagrams = [bytes([i]) * seg for i in range(9)] + [b"last, shorter"]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        train = b"".join(datagrams)
        try:
            tx.sendmsg([train], [(SOL_UDP, 103, struct.pack("=H", seg))], 0, rx.getsockname())
        except OSError:  # no UDP GSO here: the same datagrams one by one
            for d in datagrams:
                tx.sendto(d, rx.getsockname())
        tx.sendto(b"alone", rx.getsockname())
        session, transport = _receive_all(rx, len(datagrams) + 1)
    finally:
        tx.close()
    assert session.got == [*datagrams, b"alone"]
    assert transport.stats.datagrams_in == len(datagrams) + 1
    if transport.stats.gro:
        assert transport.stats.reads < transport.stats.datagrams_in
