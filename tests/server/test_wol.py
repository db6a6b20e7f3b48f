"""Wake-on-LAN magic packets, byte for byte, sent to a loopback listener."""

from __future__ import annotations

import socket

import pytest

from server.services.wol import magic_packet, send_wake


def test_the_magic_packet_is_six_ff_then_sixteen_macs() -> None:
    p = magic_packet("52-54-00-12-34-56")
    assert len(p) == 102
    assert p == bytes([0xFF] * 6) + bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]) * 16


def test_a_bad_mac_is_refused() -> None:
    with pytest.raises(ValueError, match="not a MAC"):
        magic_packet("52:54:00:12:34")


def test_each_machine_gets_its_packet_repeated() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2.0)
        port = rx.getsockname()[1]
        macs = ["52:54:00:00:00:01", "52:54:00:00:00:02"]
        assert send_wake(macs, "127.0.0.1", port, repeats=3, interval=0.01) == 2
        got = [rx.recv(200) for _ in range(6)]
    assert sorted(got) == sorted([magic_packet(m) for m in macs] * 3)


def test_a_bad_target_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="IPv4"):
        send_wake(["52:54:00:00:00:01"], "lab.example", 9)
