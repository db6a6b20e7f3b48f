"""Forger for the e2e tests: sniffs the session on GROUP:PORT and sends forged datagrams.

Run inside a lab namespace: ``python forge.py GROUP PORT IFACE SECONDS``. It waits for an
ANNOUNCE, takes its session id and sender instance from the (public) header, then for
SECONDS sends well-formed DATA and ANNOUNCE datagrams of that session — correct layout,
correct session id and sender instance — tagged under a key it made up. Prints how many it
sent. A receiver must drop every one of them (bad_tag) and write nothing they carry.
"""

from __future__ import annotations

import secrets
import socket
import struct
import sys
import time

from protocol.wire import DATA_BODY, HEADER, Header, PacketType, seal


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
    fragment = b"\xaa" * 1424
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for obj in range(64):
            for frag in range(4):
                seq += 1
                body = DATA_BODY.pack(obj, 1 << 20, frag, 0) + fragment
                dgram = seal(key, Header(PacketType.DATA, session, 0, instance, seq), body)
                sock.sendto(dgram, (group, port))
                sent += 1
        seq += 1
        sock.sendto(
            seal(key, Header(PacketType.ANNOUNCE, session, 0, instance, seq), announce),
            (group, port),
        )
        sent += 1
        time.sleep(0.01)
    print(f"sent {sent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
