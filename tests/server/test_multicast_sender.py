"""The sender's I/O shell: GSO and plain sends, back-pressure, timer and receive path.

A scripted stand-in for SenderSession (the real one is tested in tests/protocol and end to
end in tests/e2e) sends unicast Transmits to a socket on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from server.multicast.sender import (
    SenderSocketError,
    SenderTransport,
    interface_address,
    open_sender_socket,
)


@dataclass
class Tx:
    data: bytes
    segment_size: int
    addr: tuple[str, int] | None


@dataclass
class ScriptedSession:
    """Hands out queued Transmits, records what it is fed, finishes when told."""

    batches: list[list[Tx]]
    received: list[tuple[bytes, Any]] = field(default_factory=list)
    timer_calls: int = 0
    finished: bool = False

    def next_event(self) -> object | None:
        return None

    def datagrams_to_send(self, now: float) -> list[Tx]:
        return self.batches.pop(0) if self.batches else []

    def get_timer(self) -> float | None:
        return None if self.finished else 0.0

    def handle_timer(self, now: float) -> None:
        self.timer_calls += 1
        if not self.batches:
            self.finished = True

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.received.append((data, addr))


def _sink() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setblocking(False)
    return s


def _drain(sink: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sink.recv(65536))
        except BlockingIOError:
            return out


def _payload(n: int, seg: int) -> bytes:
    return b"".join(bytes([i % 251]) * seg for i in range(n))[: n * seg - 100]


@pytest.mark.parametrize("gso", [True, False])
async def test_every_segment_arrives_as_its_own_datagram(gso: bool) -> None:
    sink = _sink()
    dest = sink.getsockname()
    data = _payload(40, 1472)  # 40 datagrams, the last one short
    session = ScriptedSession([[Tx(data, 1472, dest)], [Tx(b"x" * 300, 300, dest)]])
    tr = SenderTransport(
        session,
        open_sender_socket("lo"),
        loop=asyncio.get_running_loop(),
        group=dest,
        on_event=lambda e: None,
        gso=gso,
    )
    tr.start()
    await asyncio.wait_for(tr.finished.wait(), 5)
    tr.close()
    got = _drain(sink)
    assert b"".join(got[:-1]) == data and got[-1] == b"x" * 300
    assert [len(d) for d in got[:39]] == [1472] * 39
    assert tr.stats.datagrams_out == 41
    assert tr.stats.gso_calls == (1 if gso else 0)
    assert tr.stats.send_calls == (2 if gso else 41)


async def test_a_full_socket_parks_the_rest_until_writable() -> None:
    sink = _sink()
    dest = sink.getsockname()

    class Stubborn(socket.socket):
        """Refuses the first two sends as if the socket buffer were full."""

        refusals = 2

        def sendmsg(self, *args: Any) -> int:  # type: ignore[override]
            if Stubborn.refusals:
                Stubborn.refusals -= 1
                raise BlockingIOError
            return super().sendmsg(*args)

    real = open_sender_socket("lo")
    sock = Stubborn(socket.AF_INET, socket.SOCK_DGRAM, fileno=real.detach())
    data = _payload(10, 1000)
    session = ScriptedSession([[Tx(data, 1000, None), Tx(data, 1000, None)]])
    tr = SenderTransport(
        session, sock, loop=asyncio.get_running_loop(), group=dest, on_event=lambda e: None
    )
    tr.start()
    await asyncio.wait_for(tr.finished.wait(), 5)
    tr.close()
    assert tr.stats.blocked == 2
    assert b"".join(_drain(sink)) == data + data  # nothing lost, order kept


async def test_datagrams_from_receivers_reach_the_session_with_their_address() -> None:
    session = ScriptedSession([[]] * 3)
    sock = open_sender_socket("lo")
    tr = SenderTransport(
        session,
        sock,
        loop=asyncio.get_running_loop(),
        group=("127.0.0.1", 9),
        on_event=lambda e: None,
    )
    tr.start()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.sendto(b"nak", sock.getsockname())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if session.received:
            break
    tr.close()
    assert session.received == [(b"nak", peer.getsockname())]
    peer.close()


def test_an_interface_without_an_address_is_a_clear_error() -> None:
    assert interface_address("lo") == "127.0.0.1"
    with pytest.raises(SenderSocketError, match="no IPv4 address or does not exist"):
        open_sender_socket("nosuchif0")


async def test_a_session_bug_stops_the_shell_once_instead_of_spinning() -> None:
    class Broken(ScriptedSession):
        calls = 0

        def datagrams_to_send(self, now: float) -> list[Tx]:
            Broken.calls += 1
            raise RuntimeError("bug in the core")

    errors: list[BaseException] = []
    tr = SenderTransport(
        Broken([]),
        open_sender_socket("lo"),
        loop=asyncio.get_running_loop(),
        group=("127.0.0.1", 9),
        on_event=lambda e: None,
        on_error=errors.append,
    )
    tr.start()
    await asyncio.wait_for(tr.finished.wait(), 5)
    await asyncio.sleep(0.05)
    assert Broken.calls == 1
    assert [str(e) for e in errors] == ["bug in the core"]
