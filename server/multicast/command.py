"""``fleetcast send``: multicast an image from the store (server/cli.py's send_main)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from protocol.config import MAX_PAYLOAD_SIZE, MIN_PAYLOAD_SIZE
from protocol.keys import KeyFormatError, parse_key
from server.multicast.run import SendOptions, SendReport, SessionRunner
from server.multicast.sender import SenderSocketError

EXIT_OK = 0  #: every receiver completed with every block verified
EXIT_ERROR = 1  #: the send could not run (image, socket, key) or was interrupted
EXIT_USAGE = 2  #: bad arguments
EXIT_PARTIAL = 3  #: some receivers were evicted, failed or left; the others completed
EXIT_NONE = 4  #: no receiver completed (none joined, or all evicted/failed)

SEND_EPILOG = """\
exit status:
  0  every receiver that joined completed, each block verified against the manifest
  1  error: the image, key file or interface could not be used, or interrupted
  2  usage: bad arguments
  3  partial: some receivers were evicted, failed or left (see the summary); others completed
  4  no receiver completed: none joined before --max-wait, or every one was evicted/failed

IMAGE is a name in the image store under $FLEETCAST_DATA/images (default ./data).
"""
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:bit|b|bps)?$")
_MULT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_rate(text: str) -> int | None:
    """``"auto"`` -> None, ``"900M"``/``"1g"``/``"250mbit"`` -> bits per second."""
    if text.strip().lower() == "auto":
        return None
    m = _RATE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"rate {text!r} is not 'auto' or like 900M, 1G, 250mbit")
    rate = int(float(m.group(1)) * _MULT[m.group(2).lower()])
    if rate < 8192:
        raise argparse.ArgumentTypeError(f"rate {text!r} is below 8 kbit/s")
    return rate


def send_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fleetcast send``."""
    p = argparse.ArgumentParser(
        prog="fleetcast send",
        description="Multicast an image from the store to every receiver that joins.",
        epilog=SEND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE", help="image name in the store")
    p.add_argument("--group", required=True, help="multicast group, e.g. 239.1.2.3")
    p.add_argument("--port", required=True, type=int, help="UDP port of the session")
    p.add_argument("--iface", required=True, help="network interface to send on")
    p.add_argument("--key-file", required=True, help="session key file (fleetcast keygen)")
    p.add_argument(
        "--min-receivers",
        type=int,
        default=1,
        metavar="N",
        help="start once N receivers joined (default 1)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=None,
        metavar="S",
        help="start after S seconds with whoever joined (default: wait for N)",
    )
    p.add_argument(
        "--rate",
        type=parse_rate,
        default=None,
        metavar="R|auto",
        help="bits/s cap like 900M or 1G, or auto (default) to follow loss",
    )
    p.add_argument("--ttl", type=int, default=1, help="multicast TTL (default 1: this LAN)")
    p.add_argument(
        "--payload-size",
        type=int,
        default=1472,
        metavar="BYTES",
        help="UDP payload per datagram: 1472 for a 1500-byte MTU (default), 8972 for jumbo "
        "frames of 9000; receivers follow the sender",
    )
    p.add_argument("--no-gso", action="store_true", help="one send per datagram (no UDP GSO)")
    p.add_argument(
        "--tag-data",
        action="store_true",
        help="tag every DATA datagram, not only blocks a receiver reports spoiled (costs CPU "
        "at both ends; a forger on the LAN then cannot make receivers fetch blocks twice)",
    )
    p.add_argument("--data-dir", default=None, help="override $FLEETCAST_DATA")
    p.add_argument(
        "--stats-json",
        metavar="FILE",
        help="write the session's counters and timeline (time.monotonic() stamps) to FILE",
    )
    return p


class _Refused(Exception):
    """The command cannot start; ``code`` is its exit status, the message says why."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def send_main(argv: Sequence[str]) -> int:
    """``fleetcast send``; returns one of the EXIT_* codes above."""
    try:
        args = send_parser().parse_args(list(argv))
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    try:
        runner = _prepare(args)
    except _Refused as exc:
        print(f"fleetcast send: {exc}", file=sys.stderr)
        return exc.code
    live = LiveLines(sys.stderr) if sys.stderr.isatty() else None
    runner.on_update = live.update if live else None
    from server.images.store import ImageStore, StoreError

    try:  # a reader lease: 'fleetcast image delete' refuses while the send reads the store
        with ImageStore(_image_root(args.data_dir)).reading(args.image, "fleetcast send"):
            report = asyncio.run(_interruptible(runner))
    except (SenderSocketError, StoreError) as exc:
        print(f"fleetcast send: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if live is not None:
        live.close()
    _print_report(report)
    if args.stats_json:
        _write_stats(Path(args.stats_json), report)
    return exit_code(report)


def _write_stats(path: Path, report: SendReport) -> None:
    """The report as JSON: outcome, elapsed, wire and session counters, the timeline."""
    data = {
        "outcome": report.outcome,
        "elapsed": report.elapsed,
        "exit": exit_code(report),
        "receivers": {f"{r.receiver_id:08x}": vars(r) for r in report.receivers.values()},
        "wire": report.wire,
        "session": report.session,
        "timeline": report.timeline,
        "rates": report.rates,
    }
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _prepare(args: argparse.Namespace) -> SessionRunner:
    """Check the arguments, read the key and the image; raises _Refused."""
    if not 1 <= args.port <= 65535 or args.min_receivers < 1:
        raise _Refused("--port must be 1..65535 and --min-receivers >= 1", EXIT_USAGE)
    if not MIN_PAYLOAD_SIZE <= args.payload_size <= MAX_PAYLOAD_SIZE:
        raise _Refused(
            f"--payload-size must be {MIN_PAYLOAD_SIZE}..{MAX_PAYLOAD_SIZE} "
            "(1472 for a 1500-byte MTU)",
            EXIT_USAGE,
        )
    try:
        key = parse_key(Path(args.key_file).read_text())
    except (OSError, KeyFormatError) as exc:
        raise _Refused(f"cannot use key file {args.key_file}: {exc}", EXIT_ERROR) from None
    from server.images.store import ImageStore, StoreError

    store = ImageStore(_image_root(args.data_dir))
    try:
        manifest_bytes, manifest = store.load_manifest(args.image)
    except StoreError as exc:
        raise _Refused(str(exc), EXIT_ERROR) from None
    options = SendOptions(
        group=args.group,
        port=args.port,
        iface=args.iface,
        key=key,
        min_receivers=args.min_receivers,
        max_wait=args.max_wait,
        rate_bps=args.rate,
        auto_rate=args.rate is None,
        ttl=args.ttl,
        gso=not args.no_gso,
        payload_size=args.payload_size,
        tag_data=args.tag_data,
    )
    return SessionRunner(args.image, manifest_bytes, manifest, store.read_block, options)


def _print_report(report: SendReport) -> None:
    print(summary_line(report), file=sys.stderr)
    if "error" in report.summary:
        print(f"fleetcast send: {report.summary['error']}", file=sys.stderr)
    for rec in report.receivers.values():
        if rec.state != "completed":
            print(
                f"  receiver {rec.receiver_id:08x} ({rec.address}) {rec.state}: "
                f"{rec.reason or 'did not finish'}",
                file=sys.stderr,
            )


async def _interruptible(runner: SessionRunner) -> SendReport:
    """``runner.run``; SIGINT/SIGTERM abort the session (receivers are told) and report it."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await runner.run()
    except asyncio.CancelledError:
        runner.report.outcome = "aborted"
        return runner.report
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def exit_code(report: SendReport) -> int:
    """The truth about a session, as an exit status."""
    completed = report.count("completed")
    if report.outcome in ("aborted", "error"):
        return EXIT_ERROR
    if completed == 0:
        return EXIT_NONE
    return EXIT_OK if completed == len(report.receivers) else EXIT_PARTIAL


def summary_line(report: SendReport) -> str:
    """The one line a send ends with."""
    w = report.wire
    n = len(report.receivers)
    mib = report.manifest.stored_bytes / (1 << 20)
    return (
        f"fleetcast send: {report.outcome or 'ended'}: image {report.image} "
        f"({mib:.1f} MiB stored) to {n} receivers in {report.elapsed:.1f} s: "
        f"{report.count('completed')} completed, {report.count('evicted')} evicted, "
        f"{report.count('failed')} failed, {report.count('left')} left; "
        f"{w.get('datagrams_out', 0)} datagrams ({w.get('bytes_out', 0) / (1 << 20):.1f} MiB) "
        f"in {w.get('send_calls', 0)} sends, gso={'on' if w.get('gso') else 'off'}"
    )


class LiveLines:
    """A live progress line per receiver on a terminal, redrawn at most 5 times a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines = 0
        self._drawn = 0.0

    def update(self, report: SendReport) -> None:
        """Redraw from ``report`` (rate-limited)."""
        now = time.monotonic()
        if now - self._drawn < 0.2:
            return
        self._drawn = now
        total = max(report.manifest.data_bytes(), 1)
        out = [f"\x1b[{self._lines}F"] if self._lines else []
        for rec in report.receivers.values():
            frac = min(rec.done_bytes / total, 1.0)
            bar = "#" * int(frac * 20)
            out.append(
                f"\x1b[2K{rec.receiver_id:08x} {rec.address:15} [{bar:20}] {frac * 100:5.1f}% "
                f"loss {rec.loss * 100:4.1f}% naks {rec.naks:5} {rec.state} {rec.reason}\n"
            )
        self._lines = len(report.receivers)
        self.stream.write("".join(out))
        self.stream.flush()

    def close(self) -> None:
        """Leave the last frame on screen."""
        self.stream.flush()


def _image_root(override: str | None) -> Path:
    if override:
        return Path(override) / "images"
    if "FLEETCAST_DATA" in os.environ:
        # What Settings would read, without importing pydantic (~80 ms of a short send).
        return Path(os.environ["FLEETCAST_DATA"]) / "images"
    try:
        from server.config import Settings

        return Settings().image_root
    except ImportError:  # pydantic-settings not installed: read the variable directly
        return Path(os.environ.get("FLEETCAST_DATA", "./data")) / "images"
