"""Forger for the e2e tests: sniffs the session on GROUP:PORT and sends forged datagrams.

Run inside a lab namespace: ``python forge.py GROUP PORT IFACE SECONDS``. It waits for an
ANNOUNCE, takes its session id and sender instance from the (public) header, then for
SECONDS sends well-formed DATA and ANNOUNCE datagrams of that session — correct layout,
correct session id and sender instance — tagged under a key it made up, and, for every
genuine untagged DATA datagram it hears, untagged garbage for the next fragments of that
block (right object, size and lengths: the strongest forgery without the key). Prints how
many it sent. A receiver must drop the tagged ones (bad_tag), catch the spoiled blocks by
their hash, get them again tagged, and write nothing forged (docs/PROTOCOL.md §6.1).
"""

from __future__ import annotations

import secrets
import socket
import struct
import sys
import time

from protocol.wire import (
    DATA_BODY,
    DATA_HEADER,
    FLAG_TAGGED,
    HEADER,
    MAGIC,
    VERSION,
    Header,
    PacketType,
    seal,
)


def main() -> int:
    group, port, iface, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((group, port))
    ifindex = socket.if_nametoindex(iface)
    mreqn = struct.pack("4s4si", socket.inet_aton(group), bytes(4), ifindex)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
    sock.settimeout(0.5)
    deadline = time.monotonic() + 30
    session = instance = 0
    announce = b""
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        _, _, ptype, session, source, instance, _ = HEADER.unpack_from(data)
        if ptype == PacketType.ANNOUNCE and source == 0:
            announce = data[HEADER.size : -16]
            break
    else:
        print("no session heard", flush=True)
        return 1
    print(f"forging session {session:08x}", flush=True)
    key = secrets.token_bytes(32)
    seq, sent = 1 << 30, 0
    fp = 1424  # fragment payload at the default payload size 1472
    fragment = b"\xaa" * fp
    sock.settimeout(0.002)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)  # not its own datagrams
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for obj in range(64):
            for frag in range(4):
                seq += 1
                body = DATA_BODY.pack(obj, 1 << 20, frag, FLAG_TAGGED) + fragment
                dgram = seal(key, Header(PacketType.DATA, session, 0, instance, seq), body)
                sock.sendto(dgram, (group, port))
                sent += 1
        seq += 1
        sock.sendto(
            seal(key, Header(PacketType.ANNOUNCE, session, 0, instance, seq), announce),
            (group, port),
        )
        sent += 1
        pause = time.monotonic() + 0.01
        for _ in range(50):  # what it hears for 10 ms, at most 50 datagrams
            if time.monotonic() >= pause:
                break
            sent += _spoil_what_comes(sock, group, port, session, instance, fp)
    print(f"sent {sent}", flush=True)
    return 0


def _spoil_what_comes(
    sock: socket.socket, group: str, port: int, session: int, instance: int, fp: int
) -> int:
    """Hear one genuine untagged DATA datagram; send garbage for its block's next fragments."""
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return 0
    head = DATA_HEADER.unpack_from(data) if len(data) > DATA_HEADER.size else None
    if head is None or head[2] != PacketType.DATA or head[4] != 0 or head[10] & FLAG_TAGGED:
        return 0
    seq, obj, size, frag = head[6], head[7], head[8], head[9]
    n = 0
    for f in range(frag + 1, min(frag + 9, -(-size // fp))):
        length = min(fp, size - f * fp)
        dgram = DATA_HEADER.pack(
            MAGIC, VERSION, PacketType.DATA, session, 0, instance, seq + f - frag, obj, size, f, 0
        )
        sock.sendto(dgram + b"\x55" * length, (group, port))
        n += 1
    return n


if __name__ == "__main__":
    sys.exit(main())
