"""The server side's commands: ``fleetcast image`` (image_main) and ``fleetcast send`` (send_main).

``image_main`` is added by the image store's work; ``send_main`` lives with the multicast
shell in server/multicast/command.py and is imported only when used.
"""

from __future__ import annotations

from collections.abc import Sequence


def image_main(argv: Sequence[str]) -> int:
    """``fleetcast image capture|import|list|info|verify|export|delete|gc ...`` (see --help)."""
    from server.images.cli import main as run

    return run(argv)


def send_main(argv: Sequence[str]) -> int:
    """``fleetcast send IMAGE --group G --port P --iface IF --key-file F ...`` (see --help)."""
    from server.multicast.command import send_main as run

    return run(argv)


def server_main(argv: Sequence[str]) -> int:
    """``fleetcast server [--host H] [--port P]``: run the control plane (see --help)."""
    from server.admin import server_main as run

    return run(argv)


def admin_main(argv: Sequence[str]) -> int:
    """``fleetcast admin create-user|token|migrate ...`` (see --help)."""
    from server.admin import admin_main as run

    return run(argv)


def pxe_main(argv: Sequence[str]) -> int:
    """``fleetcast pxe dnsmasq-config ...``: network boot helpers (docs/PXE.md)."""
    from server.pxe import pxe_main as run

    return run(argv)
