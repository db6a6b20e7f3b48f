"""``fleetcast receive`` and ``fleetcast keygen``: the boot-time agent's standalone commands."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence

from protocol.keys import KEY_SIZE, format_key

# Exit codes of ``fleetcast receive`` (also in its --help).
EXIT_OK = 0  #: every block verified, the target synced
EXIT_FAILED = 1  #: a block, the disk or the session failed
EXIT_USAGE = 2  #: bad arguments, unreadable key file
EXIT_EVICTED = 3  #: the sender evicted this receiver (too slow, silent, ...)
EXIT_ABORTED = 4  #: the session was aborted by the sender, or --timeout passed
EXIT_REFUSED = 5  #: the target was refused before anything was written

#: Outcome names of client.receive -> exit codes.
EXIT_CODES = {
    "verified": EXIT_OK,
    "failed": EXIT_FAILED,
    "usage": EXIT_USAGE,
    "evicted": EXIT_EVICTED,
    "aborted": EXIT_ABORTED,
    "refused": EXIT_REFUSED,
}

RECEIVE_EPILOG = """\
exit status:
  0  every block verified and the target was synced: the target equals the image
  1  failed: a disk error, or the session failed (the sender was told why)
  2  usage: bad arguments or key file
  3  evicted by the sender (too slow or silent); the target is incomplete
  4  aborted: the sender ended the session, or --timeout passed
  5  the target was refused (mounted, read-only, too small) and was not touched
"""


def keygen_main(argv: Sequence[str]) -> int:
    """``fleetcast keygen FILE``: write a new random session key, mode 0600, never overwriting."""
    parser = argparse.ArgumentParser(
        prog="fleetcast keygen",
        description=f"Write {KEY_SIZE} random bytes as {2 * KEY_SIZE} hex characters to FILE "
        "(mode 0600). Hand the same file to 'fleetcast send' and every 'fleetcast receive'.",
    )
    parser.add_argument("file", metavar="FILE", help="where to write the key (must not exist)")
    args = parser.parse_args(list(argv))
    text = format_key(secrets.token_bytes(KEY_SIZE))
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        print(
            f"fleetcast keygen: {args.file} already exists; remove it first or pick another "
            "name (a key is never overwritten)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except OSError as exc:
        print(f"fleetcast keygen: cannot create {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(text)
    print(f"wrote a new session key to {args.file}", file=sys.stderr)
    return EXIT_OK


def receive_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fleetcast receive``."""
    parser = argparse.ArgumentParser(
        prog="fleetcast receive",
        description="Receive a multicast image onto a file or block device, verifying every "
        "block against the image manifest before writing it.",
        epilog=RECEIVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", required=True, help="file or block device to write")
    parser.add_argument("--group", required=True, help="multicast group, e.g. 239.1.2.3")
    parser.add_argument("--port", required=True, type=_port, help="UDP port of the session")
    parser.add_argument("--iface", required=True, help="network interface to join on")
    parser.add_argument("--key-file", required=True, help="session key file (fleetcast keygen)")
    parser.add_argument(
        "--assume-blank",
        action="store_true",
        help="the target already reads as zeros: skip zeroing the image's zero blocks",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up after S seconds"
    )
    parser.add_argument(
        "--stats-json", metavar="FILE", help="write the receiver's counters to FILE at the end"
    )
    parser.add_argument(
        "--delta",
        choices=("auto", "always", "never"),
        default="auto",
        help="hash the target first and receive only the blocks it lacks (resume, re-image); "
        "needs --manifest; auto (default): when the target already holds data",
    )
    parser.add_argument(
        "--manifest",
        metavar="FILE",
        help="the image's manifest (the server's images/manifests/NAME.json), for --delta",
    )
    return parser


def receive_main(argv: Sequence[str]) -> int:
    """``fleetcast receive``; returns one of the EXIT_* codes above."""
    parser = receive_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    from client.receive import run_receive  # the engine is imported only when used

    return run_receive(args)


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 1..65535")
    return port


AGENT_EPILOG = """\
exit status:
  0  the deployment succeeded: the server recorded every block verified
  1  the deployment failed, was evicted or aborted (the server was told why)
  2  usage: bad arguments
  3  the agent could not enroll, reach the server, or got no assignment within --wait
"""


def agent_main(argv: Sequence[str]) -> int:
    """``fleetcast agent --server URL --token T --target T``: enroll, receive, report."""
    parser = argparse.ArgumentParser(
        prog="fleetcast agent",
        description="Enroll with a fleetcast server, wait for a deployment assigned to this "
        "machine, receive it onto --target and report the result. A capture session reads "
        "--target instead and uploads it as an image (docs/CAPTURE.md).",
        epilog=AGENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", required=True, help="server URL, e.g. http://10.0.0.1:8080")
    parser.add_argument("--token", required=True, help="the enrollment token")
    parser.add_argument(
        "--target", required=True, help="file or block device to write (a capture: to read)"
    )
    parser.add_argument("--iface", default="", help="interface (default: the route to --server)")
    parser.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="S",
        help="give up when nothing is assigned within S seconds",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up a receive after S seconds"
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=2.0,
        metavar="S",
        help="least seconds between assignment requests when the server did not hold one open "
        "(servers long-poll: an agent learns of a new session at once)",
    )
    parser.add_argument(
        "--loop",
        action="store_true",
        help="after a deployment, wait for the next one (default: exit)",
    )
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    import asyncio
    import logging

    from client.agent import Agent, AgentError, AgentOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    agent = Agent(
        AgentOptions(
            server=args.server,
            token=args.token,
            target=args.target,
            iface=args.iface,
            poll=args.poll,
            wait=args.wait,
            timeout=args.timeout,
        )
    )
    try:
        agent.register()
        while True:
            verdict = asyncio.run(agent.run_once())
            print(
                f"fleetcast agent: {verdict.get('state')} {verdict.get('reason', '')}".rstrip(),
                file=sys.stderr,
            )
            if not args.loop:
                return EXIT_OK if verdict.get("state") == "succeeded" else EXIT_FAILED
    except AgentError as exc:
        print(f"fleetcast agent: {exc}", file=sys.stderr)
        return 3
