"""The ``fleetcast`` command: a thin dispatcher to the server and client command sets.

Each sub-command lives with the code it drives (``server.cli``, ``client.cli``) and is
imported only when used, so the boot image (client only) never needs server code and
``fleetcast receive`` starts fast.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from fleetcast import __version__

#: command -> ("module:function", one-line help). The function takes the remaining argv
#: and returns an exit status.
COMMANDS: dict[str, tuple[str, str]] = {
    "image": ("server.cli:image_main", "manage golden images (capture, import, verify, ...)"),
    "send": ("server.cli:send_main", "multicast an image from the store to receivers"),
    "receive": ("client.cli:receive_main", "receive a multicast image onto a disk or file"),
    "keygen": ("client.cli:keygen_main", "write a new random session key file"),
    "server": ("server.cli:server_main", "run the control plane (HTTP API, sessions)"),
    "admin": ("server.cli:admin_main", "create users and API tokens, migrate the database"),
    "agent": ("client.cli:agent_main", "enroll with a server and receive what it assigns"),
    "pxe": ("server.cli:pxe_main", "network boot helpers (dnsmasq configuration)"),
    "capture": ("server.capture_cli:capture_main", "capture a machine's disk over the network"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        f"fleetcast {__version__}: multicast deployment of golden disk images",
        "",
        "usage: fleetcast COMMAND [ARGS...]   (fleetcast COMMAND --help for details)",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def _load(target: str) -> Callable[[Sequence[str]], int]:
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    func: Callable[[Sequence[str]], int] = getattr(module, func_name)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"fleetcast {__version__}")
        return 0
    command = args[0]
    if command not in COMMANDS:
        print(f"fleetcast: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return _load(COMMANDS[command][0])(args[1:])
    except KeyboardInterrupt:
        print("fleetcast: interrupted", file=sys.stderr)
        return 130
