"""The receiver's asyncio shell: multicast socket in, ReceiverSession in the middle, timer.

Modelled on aioquic's ``asyncio/protocol.py``: a datagram comes in, is fed to the sans-I/O
session with the loop's clock, then the session's events are drained, its datagrams sent
and its one timer re-armed. Reading is done in batches with ``recvmsg_into`` into one
preallocated buffer, with UDP GRO where the kernel has it (one read returns a train of
datagrams), and can be paused while the write pipeline is full (the kernel's 32 MiB
receive buffer holds what arrives meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
RCVBUF = 32 << 20
#: One read: a datagram, or a UDP GRO train of them (at most 64 KiB of payload).
READ_BUFFER = 1 << 17
#: Datagrams read per readiness callback before the session's output is processed.
READ_BATCH = 256
SOL_UDP = 17
#: setsockopt: let the kernel hand over a train of same-size datagrams of one flow in one
#: read, with their size in a control message (Linux 5.0+). Fewer reads, and where the
#: sender's UDP GSO trains arrive whole (a bridge, veth) the kernel never splits them.
UDP_GRO = 104
_GRO_ANC = socket.CMSG_SPACE(4)
_INT = struct.Struct("=i")


class TransportError(Exception):
    """The multicast socket could not be set up; the message says what to check."""


@dataclass
class TransportStats:
    """Socket-level counters for the summary line."""

    datagrams_in: int = 0
    bytes_in: int = 0
    datagrams_out: int = 0
    send_errors: int = 0
    rcvbuf: int = 0
    gro: bool = False  #: UDP GRO is on: one read may carry many datagrams
    reads: int = 0  #: receive calls that returned data
    truncated: int = 0  #: reads longer than the buffer (dropped; the protocol repairs them)
    #: time.monotonic() of the first and the latest read that found datagrams
    first_in_at: float | None = None
    last_in_at: float | None = None


def open_multicast_socket(group: str, port: int, iface: str, rcvbuf: int = RCVBUF) -> socket.socket:
    """A non-blocking UDP socket bound to ``group:port`` and joined to it on ``iface``.

    Raises TransportError when the group is not multicast, the interface does not exist
    or the join fails.
    """
    try:
        packed = socket.inet_aton(group)
    except OSError:
        raise TransportError(f"{group!r} is not an IPv4 address") from None
    if not 224 <= packed[0] <= 239:
        raise TransportError(f"{group} is not a multicast group (224.0.0.0/4)")
    try:
        ifindex = socket.if_nametoindex(iface)
    except OSError:
        raise TransportError(
            f"network interface {iface!r} does not exist (see 'ip link')"
        ) from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Only the groups joined on this socket, never another session's on the same port.
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        _set_rcvbuf(sock, rcvbuf)
        with contextlib.suppress(OSError):  # an older kernel: one datagram per read
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        sock.bind((group, port))
        mreqn = struct.pack("4s4si", packed, bytes(4), ifindex)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot join {group}:{port} on {iface}: {exc.strerror}") from None
    return sock


def open_unicast_socket(rcvbuf: int = RCVBUF) -> socket.socket:
    """A non-blocking UDP socket on an ephemeral port: the receiver's own address.

    Its control datagrams go out from it, so the sender learns where to send the repairs
    only this receiver asked for (docs/PROTOCOL.md §4.3); they come in on it, never on the
    group socket, so several receivers on one host each get their own.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _set_rcvbuf(sock, rcvbuf)
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        sock.bind(("0.0.0.0", 0))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot open the receiver's unicast socket: {exc.strerror}") from None
    return sock


def _gro_on(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(SOL_UDP, UDP_GRO))
    except OSError:
        return False


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:  # not root: the kernel caps SO_RCVBUF at net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class SessionTransport:
    """Drives a sans-I/O session (ReceiverSession) from a datagram socket, and optionally
    a second, ``unicast`` one that sends every Transmit and reads what comes back to it.

    ``session`` must offer receive_datagram / datagrams_to_send / get_timer /
    handle_timer / next_event; ``default_addr`` is where a Transmit with no address goes.
    ``on_event`` is called on the loop for each event the session emits. Datagrams are
    handed over as memoryviews of the one read buffer, valid only during the call
    (ReceiverSession copies what it keeps); ``copy_datagrams`` hands over bytes instead.
    """

    def __init__(
        self,
        session: Any,
        sock: socket.socket,
        *,
        loop: asyncio.AbstractEventLoop,
        default_addr: tuple[str, int],
        on_event: Callable[[object], None],
        on_error: Callable[[BaseException], None] = lambda exc: None,
        copy_datagrams: bool = False,
        unicast: socket.socket | None = None,
    ) -> None:
        self.session = session
        self.sock = sock
        self.unicast = unicast
        self._socks = [sock] if unicast is None else [sock, unicast]
        self.stats = TransportStats(
            rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), gro=_gro_on(sock)
        )
        self._loop = loop
        self._default_addr = default_addr
        self._on_event = on_event
        self._on_error = on_error
        self._copy = copy_datagrams
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._reading = False
        self._closed = False

    def start(self) -> None:
        """Start reading and arm the session's first timer."""
        self.resume_reading()
        self.call(self.process)

    @property
    def closed(self) -> bool:
        """True once closed (after close() or an internal error)."""
        return self._closed

    def call(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` (a session call), then ``process()``.

        An exception from the session is a bug, not a network condition: it is logged
        once, I/O stops, and ``on_error`` gets it, so the shell ends with a failure
        instead of retrying the same crash on every datagram and timer.
        """
        if self._closed:
            return
        try:
            fn(*args)
            if fn != self.process:
                self.process()
        except Exception as exc:
            log.exception("the session failed internally; stopping")
            self.close()
            self._on_error(exc)

    def pause_reading(self) -> None:
        """Stop reading the socket (datagrams wait in the kernel buffer)."""
        if self._reading:
            for sock in self._socks:
                self._loop.remove_reader(sock.fileno())
            self._reading = False

    def resume_reading(self) -> None:
        """Read the socket again."""
        if not self._reading and not self._closed:
            for sock in self._socks:
                self._loop.add_reader(sock.fileno(), self.call, self._on_readable, sock)
            self._reading = True

    def process(self) -> None:
        """Drain the session: events to ``on_event``, datagrams out, timer re-armed.

        Call it after anything that can change the session (block_verified, ...).
        """
        if self._closed:
            return
        now = self._loop.time()
        session = self.session
        event = session.next_event()
        while event is not None:
            self._on_event(event)
            if self._closed:
                return
            event = session.next_event()
        for transmit in session.datagrams_to_send(now):
            self._transmit(transmit)
        self._arm_timer(session.get_timer())

    def close(self) -> None:
        """Stop reading, cancel the timer and close the socket (idempotent)."""
        if self._closed:
            return
        self.pause_reading()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in self._socks:
            sock.close()

    # -- internals ----------------------------------------------------------------------

    def _on_readable(self, sock: socket.socket) -> None:
        view, session, stats = self._view, self.session, self.stats
        now = self._loop.time()
        before = stats.datagrams_in
        self._read_batch(sock, view, session, stats, now)
        if stats.datagrams_in != before:
            stats.last_in_at = now
            if stats.first_in_at is None:
                stats.first_in_at = now

    def _read_batch(
        self, sock: socket.socket, view: memoryview, session: Any, stats: TransportStats, now: float
    ) -> None:
        """Read until the socket is empty, READ_BATCH datagrams were handled or reading was
        paused; a GRO read is cut into its datagrams (every one ``seg`` long but the last)."""
        buffers = [self._buf]
        copy = self._copy
        trains = getattr(session, "receive_datagrams", None)  # a whole GRO train per call
        budget = READ_BATCH
        while budget > 0:
            try:
                n, anc, flags, addr = sock.recvmsg_into(buffers, _GRO_ANC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ECONNREFUSED from an ICMP error: keep going
                log.debug("recv error: %s", exc)
                budget -= 1
                continue
            stats.reads += 1
            if flags & socket.MSG_TRUNC:
                stats.truncated += 1
                budget -= 1
                continue
            seg = n
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    seg = _INT.unpack_from(data)[0] or n
            stats.bytes_in += n
            if seg >= n:
                stats.datagrams_in += 1
                budget -= 1
                session.receive_datagram(bytes(view[:n]) if copy else view[:n], addr, now)
            else:
                count = -(-n // seg)
                stats.datagrams_in += count
                budget -= count
                if trains is not None and not copy:
                    trains(view[:n], seg, addr, now)
                else:
                    for start in range(0, n, seg):
                        part = view[start : min(start + seg, n)]
                        session.receive_datagram(bytes(part) if copy else part, addr, now)
            if not self._reading:
                break

    def _transmit(self, transmit: Any) -> None:
        addr = transmit.addr or self._default_addr
        data = transmit.data
        seg = transmit.segment_size or len(data)
        out = self.unicast or self.sock
        for start in range(0, len(data), seg):
            try:
                out.sendto(data[start : start + seg], addr)
                self.stats.datagrams_out += 1
            except OSError as exc:
                # Control datagrams are repeated by the protocol until acknowledged, so a
                # full buffer or an unreachable sender costs a retry, not the session.
                self.stats.send_errors += 1
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED):
                    log.warning("sending to %s failed: %s", addr, exc)

    def _arm_timer(self, when: float | None) -> None:
        if when == self._timer_at:
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
