"""The receiver's socket setup refuses bad groups and interfaces with a clear message.

(Receiving real multicast is covered end to end in tests/e2e, inside namespaces.)
"""

from __future__ import annotations

import pytest

from client.transport import TransportError, open_multicast_socket


def test_a_unicast_address_is_not_a_group() -> None:
    with pytest.raises(TransportError, match="not a multicast group"):
        open_multicast_socket("10.1.2.3", 5000, "lo")


def test_a_missing_interface_is_named() -> None:
    with pytest.raises(TransportError, match="interface 'nosuch0' does not exist"):
        open_multicast_socket("239.1.2.3", 5000, "nosuch0")


def test_garbage_is_not_an_address() -> None:
    with pytest.raises(TransportError, match="is not an IPv4 address"):
        open_multicast_socket("lab-group", 5000, "lo")
