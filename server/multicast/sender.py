"""The sender's I/O shell: one UDP socket, one SenderSession, one timer, UDP GSO.

Like client/transport.py (and aioquic's asyncio/protocol.py): datagrams from receivers are
fed to the sans-I/O session with the loop's clock; then its events are drained, its
Transmits sent and its one timer re-armed. Data goes to the group with one ``sendmsg`` per
Transmit carrying a ``UDP_SEGMENT`` control message (UDP GSO: the kernel cuts it into
datagrams, 7-10x cheaper per datagram than one ``sendto`` each); if the kernel refuses GSO
the shell falls back to one send per datagram. A full socket buffer (EAGAIN) parks the
unsent part and waits for writability, so a sender faster than its link (or its tbf
qdisc) is slowed by the kernel instead of losing datagrams. Several sessions run in one
event loop without cross-talk: each has its own socket, group, port, session id and key.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SOL_UDP = 17
UDP_SEGMENT = 103
SIOCGIFADDR = 0x8915
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: The kernel takes at most 64 segments per GSO send.
GSO_MAX_SEGMENTS = 64
MAX_DATAGRAM = 65535
READ_BATCH = 64
#: A send of at least this many bytes carried data (control datagrams are far smaller).
DATA_SIZED = 1000
#: Wait this long before retrying after ENOBUFS (it signals no writability).
NOBUFS_RETRY = 0.001


class SenderSocketError(Exception):
    """The sender's socket could not be set up; the message says what to check."""


@dataclass
class SendStats:
    """What the shell did on the wire."""

    datagrams_out: int = 0
    bytes_out: int = 0
    send_calls: int = 0
    gso_calls: int = 0
    blocked: int = 0  #: times a full socket buffer made the shell wait
    datagrams_in: int = 0
    send_errors: int = 0
    gso: bool = True
    last_data_at: float | None = None  #: time.monotonic() of the last data-sized send


def interface_address(iface: str) -> str:
    """The IPv4 address of ``iface``; raises SenderSocketError when it has none."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("256s", iface.encode()[:15])
        res = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, req)
    except OSError as exc:
        raise SenderSocketError(
            f"interface {iface!r} has no IPv4 address or does not exist ({exc.strerror}); "
            "see 'ip addr'"
        ) from None
    finally:
        probe.close()
    return socket.inet_ntoa(res[20:24])


def open_sender_socket(iface: str, *, ttl: int = 1, loop: bool = False) -> socket.socket:
    """A non-blocking UDP socket that multicasts out of ``iface`` and hears receivers.

    Bound to the interface's address on an ephemeral port (receivers answer the source
    address of the ANNOUNCE), multicast TTL ``ttl`` (1: never leaves the LAN), loopback
    off. Raises SenderSocketError.
    """
    address = interface_address(iface)
    ifindex = socket.if_nametoindex(iface)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(loop))
        mreqn = struct.pack("4s4si", bytes(4), socket.inet_aton(address), ifindex)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind((address, 0))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SenderSocketError(f"cannot set up a multicast socket on {iface}: {exc}") from None
    return sock


class SenderTransport:
    """Drives one SenderSession from one socket; see the module docstring."""

    def __init__(
        self,
        session: Any,
        sock: socket.socket,
        *,
        loop: asyncio.AbstractEventLoop,
        group: tuple[str, int],
        on_event: Callable[[object], None],
        on_error: Callable[[BaseException], None] = lambda exc: None,
        gso: bool = True,
    ) -> None:
        self.session = session
        self.sock = sock
        self.group = group
        self.stats = SendStats(gso=gso)
        self.finished = asyncio.Event()
        self._loop = loop
        self._on_event = on_event
        self._on_error = on_error
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        self._pending: collections.deque[tuple[memoryview, int, tuple[str, int]]] = (
            collections.deque()
        )
        self._writer = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False

    def start(self) -> None:
        """Start reading receivers' datagrams and run the session."""
        self._loop.add_reader(self.sock.fileno(), self.call, self._on_readable)
        self.call(self.process)

    def call(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` then ``process()``; a session exception stops the session.

        Such an exception is a bug (network input never raises): it is logged once, I/O
        stops, ``finished`` is set and ``on_error`` gets it.
        """
        if self._closed:
            return
        try:
            fn(*args)
            if fn != self.process:
                self.process()
        except Exception as exc:
            log.exception("the sender session failed internally; stopping")
            self.close()
            self._on_error(exc)

    def process(self) -> None:
        """Drain events, send what the session wants sent, re-arm its timer."""
        if self._closed:
            return
        session = self.session
        event = session.next_event()
        while event is not None:
            self._on_event(event)
            event = session.next_event()
        if not self._pending:
            for transmit in session.datagrams_to_send(self._loop.time()):
                addr = transmit.addr or self.group
                self._pending.append((memoryview(transmit.data), transmit.segment_size, addr))
            self._flush()
        if session.finished and not self._pending:
            self.finished.set()
        # While parked on a full socket the writability callback drives us; a pacing timer
        # that is already due would only spin.
        self._arm_timer(None if self._pending else session.get_timer())

    def close(self) -> None:
        """Stop all I/O and close the socket (the session is not told: call its close first)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        if self._writer:
            self._loop.remove_writer(self.sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
        self.sock.close()
        self.finished.set()

    # -- sending ------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send parked Transmits in order until done or the socket is full."""
        pending = self._pending
        while pending:
            data, seg, addr = pending[0]
            sent = self._send(data, seg, addr)
            if sent == len(data):
                pending.popleft()
                continue
            pending[0] = (data[sent:], seg, addr)
            return
        if self._writer:
            self._loop.remove_writer(self.sock.fileno())
            self._writer = False

    def _send(self, data: memoryview, seg: int, addr: tuple[str, int]) -> int:
        """Send as much of ``data`` (segments of ``seg``) as the socket takes; bytes sent."""
        done = 0
        total = len(data)
        while done < total:
            chunk = min(total - done, seg * GSO_MAX_SEGMENTS)
            try:
                if chunk > seg and self.stats.gso:
                    n = self._send_gso(data[done : done + chunk], seg, addr)
                else:
                    chunk = min(chunk, seg)
                    n = self.sock.sendto(data[done : done + chunk], addr)
                    self.stats.send_calls += 1
            except BlockingIOError:
                self._wait_writable()
                return done
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._wait_later()
                    return done
                if chunk > seg and self.stats.gso and exc.errno in _GSO_REFUSED:
                    log.warning("UDP GSO refused (%s); sending one datagram per call", exc)
                    self.stats.gso = False
                    continue
                # Anything else (e.g. ENETUNREACH) loses this Transmit; the protocol's
                # NAKs repair data, and control datagrams are repeated.
                self.stats.send_errors += 1
                log.warning("send to %s failed: %s", addr, exc)
                return total
            segments = -(-n // seg)
            if n >= DATA_SIZED:
                self.stats.last_data_at = time.monotonic()
            self.stats.datagrams_out += segments
            self.stats.bytes_out += n
            done += n
        return done

    def _send_gso(self, data: memoryview, seg: int, addr: tuple[str, int]) -> int:
        cmsg = [(SOL_UDP, UDP_SEGMENT, _SEG.pack(seg))]
        n = self.sock.sendmsg([data], cmsg, 0, addr)
        self.stats.send_calls += 1
        self.stats.gso_calls += 1
        return n

    def _wait_writable(self) -> None:
        self.stats.blocked += 1
        if not self._writer:
            self._loop.add_writer(self.sock.fileno(), self.call, self._on_writable)
            self._writer = True

    def _wait_later(self) -> None:
        self.stats.blocked += 1
        self._loop.call_later(NOBUFS_RETRY, self.call, self._on_writable)

    def _on_writable(self) -> None:
        self._flush()

    # -- receiving and time -------------------------------------------------------------

    def _on_readable(self) -> None:
        now = self._loop.time()
        for _ in range(READ_BATCH):
            try:
                n, addr = self.sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("recv error: %s", exc)
                continue
            self.stats.datagrams_in += 1
            self.session.receive_datagram(bytes(self._view[:n]), addr, now)

    def _arm_timer(self, when: float | None) -> None:
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._loop.call_at(when, self.call, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.session.handle_timer(self._loop.time())


_SEG = struct.Struct("=H")
_GSO_REFUSED = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE)
