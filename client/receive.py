"""One standalone receive: socket + ReceiverSession + write pipeline + target, to an outcome.

``run_receive(args)`` is what ``fleetcast receive`` runs; ``Receiver`` is the reusable part
(the boot agent drives the same object). The flow (docs/PROTOCOL.md §3): join the group,
learn the manifest from the session, open and check the target (refused targets are
reported to the sender as failed), zero the image's ZERO blocks, decode/verify/write every
DATA block the session hands over, fsync, tell the session the blocks are durable, and end
on Completed, Evicted, SessionAborted, a local failure, or the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from client.delta import DiskHolding, ScanError, receive_holding
from client.disk import DiskError, Target, TargetError
from client.pipeline import BlockPipeline
from client.progress import ProgressBar
from client.transport import (
    SessionTransport,
    TransportError,
    open_multicast_socket,
    open_unicast_socket,
)
from protocol import events as ev
from protocol.config import EngineConfig
from protocol.keys import KeyFormatError, parse_key
from protocol.manifest import BlockKind, Manifest
from protocol.receiver import ReceiverSession

log = logging.getLogger(__name__)

#: Outcome names, mapped to exit codes by client.cli.
OK, FAILED, EVICTED, ABORTED, REFUSED, USAGE = (
    "verified",
    "failed",
    "evicted",
    "aborted",
    "refused",
    "usage",
)
#: Drop reasons (docs/PROTOCOL.md §2.2) that mean a datagram was hostile or damaged; the
#: others are datagrams that were fine but not for this receiver at that moment.
REJECTED = frozenset(
    {
        "short",
        "bad_magic",
        "bad_version",
        "bad_tag",
        "unexpected_type",
        "malformed",
        "invalid",
        "replayed",
        "internal_error",
    }
)
#: mallopt(3) parameter: allocations at least this big are mmapped.
M_MMAP_THRESHOLD = -3
#: After the outcome is known, keep answering the sender this long at most (DONE/LEAVE acks).
LINGER = 3.0


@dataclass
class Outcome:
    """How a receive ended, with the reason and the counters for the summary."""

    result: str = ""
    reason: str = ""
    manifest: Manifest | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class Receiver:
    """Receives one session onto one target. Create, then ``await run(timeout)``."""

    def __init__(
        self,
        *,
        key: bytes,
        group: str,
        port: int,
        iface: str,
        target: str,
        assume_blank: bool = False,
        config: EngineConfig | None = None,
        progress: ProgressBar | None = None,
        holding: DiskHolding | None = None,
    ) -> None:
        self.key = key
        self.holding = holding  #: delta/resume: blocks verified on the target before joining
        self.group, self.port, self.iface = group, port, iface
        self.target_path = target
        self.assume_blank = assume_blank
        self.config = config or EngineConfig()
        self.progress = progress
        self.outcome = Outcome()
        self.target: Target | None = None
        self.pipeline: BlockPipeline | None = None
        self._transport: SessionTransport | None = None
        self._done: asyncio.Event | None = None
        self._durable_task: asyncio.Task[None] | None = None
        self._verified_blocks = 0
        self._verified_bytes = 0
        self._data_blocks = 0
        self._data_bytes = 0

    async def run(self, timeout: float | None = None) -> Outcome:
        """Receive until an outcome; raises TransportError if the group cannot be joined."""
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        sock = open_multicast_socket(self.group, self.port, self.iface)
        try:
            unicast = open_unicast_socket()
        except TransportError:
            sock.close()
            raise
        session = ReceiverSession(
            key=self.key, config=self.config, now=loop.time(), rng=random.Random()
        )
        self.session = session
        if holding := self.holding:  # the JOIN tells the sender what it need not send
            session.declare_have(holding.have_data(), loop.time())
        self._transport = SessionTransport(
            session,
            sock,
            loop=loop,
            default_addr=(self.group, self.port),
            on_event=self._on_event,
            on_error=self._internal_error,
            unicast=unicast,
        )
        self._transport.start()
        try:
            try:
                await self._wait_outcome(timeout)
            except asyncio.CancelledError:  # Ctrl-C / SIGTERM: tell the sender, then stop
                self._finish(ABORTED, "interrupted")
                self._call(session.fail, loop.time(), "receiver interrupted by its operator")
                await self._linger()
                raise
            await self._linger()
        finally:
            self._transport.close()
            if self.pipeline is not None:
                self.pipeline.close()
            elif self.target is not None:
                self.target.close()
        self.outcome.stats = self.counters()
        return self.outcome

    async def _wait_outcome(self, timeout: float | None) -> None:
        """Until an outcome is known, the session closes on its own, or ``timeout`` passes."""
        assert self._done is not None and self._transport is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._done.is_set():
            if self.session.finished:  # closed without an event we act on
                reason = self.session.fail_reason or self.session.outcome or "session closed"
                self._finish(FAILED if self.session.outcome == "failed" else ABORTED, reason)
                return
            if deadline is not None and loop.time() >= deadline:
                self._finish(ABORTED, f"no result after --timeout {timeout:g} s")
                self._call(self.session.fail, loop.time(), self.outcome.reason)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), 0.5)

    def counters(self) -> dict[str, Any]:
        """Every counter: the session's, the socket's and the writer's."""
        out: dict[str, Any] = {}
        stats = getattr(self.session, "stats", None)
        if isinstance(stats, dict):
            out["session"] = dict(stats)
        elif dataclasses.is_dataclass(stats) and not isinstance(stats, type):
            out["session"] = dataclasses.asdict(stats)
        elif stats is not None:
            out["session"] = dict(vars(stats))
        if self._transport is not None:
            out["socket"] = dataclasses.asdict(self._transport.stats)
        if self.target is not None:
            out["target"] = dataclasses.asdict(self.target.stats)
        if self.pipeline is not None:
            out["blocks_written"] = self.pipeline.blocks_written
            out["blocks_refused"] = self.pipeline.blocks_refused
        if self.holding is not None:
            out.update(self.holding.summary())
        out["verified_blocks"] = self._verified_blocks
        out["verified_bytes"] = self._verified_bytes
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["peak_rss_mib"] = round(_peak_rss_kib(usage) / 1024, 1)
        out["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 3)
        return out

    # -- events -------------------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    def _manifest_received(self, event: ev.ManifestReceived) -> None:
        if self.target is not None:
            return
        manifest = event.manifest
        self.outcome.manifest = manifest
        now = self._now()
        try:
            self.target = Target.open(
                self.target_path, manifest.image_size, assume_blank=self.assume_blank
            )
        except TargetError as exc:
            self._finish(REFUSED, str(exc))
            self.session.fail(now, f"target refused: {exc}")
            return
        if self.holding is not None and (why := self.holding.mismatch(event.manifest_bytes)):
            self._finish(FAILED, why)
            self.session.fail(now, why)
            return
        loop = asyncio.get_running_loop()
        self.pipeline = BlockPipeline(
            self.target,
            manifest if self.holding is None else self.holding.writing_manifest(),
            loop=loop,
            on_result=self._block_result,
            on_disk_error=self._disk_error,
            on_space=self._resume,
        )
        self.pipeline.start_zeroing()
        self._data_blocks = manifest.count(BlockKind.DATA)
        self._data_bytes = manifest.data_bytes()
        if self.holding is not None:  # held blocks are verified: they count as done
            self._verified_blocks = self.holding.data_blocks
            self._verified_bytes = self.holding.data_bytes
        if self.progress is not None:
            self.progress.start(self._data_bytes)
            self.progress.update(self._verified_bytes)

    def _block_received(self, event: ev.BlockReceived) -> None:
        if self.pipeline is None:
            return
        self.pipeline.submit(event.index, event.payload)
        if self.pipeline.full and self._transport is not None:
            self._transport.pause_reading()

    def _all_verified(self, event: ev.AllBlocksVerified) -> None:
        if self._durable_task is None and self.pipeline is not None:
            self._durable_task = asyncio.get_running_loop().create_task(self._make_durable())

    def _completed(self, event: ev.Completed) -> None:
        self._finish(OK, "")

    def _evicted(self, event: ev.Evicted) -> None:
        self._finish(EVICTED, event.reason)

    def _aborted(self, event: ev.SessionAborted) -> None:
        self._finish(ABORTED, event.reason)

    # -- pipeline callbacks -------------------------------------------------------------

    def _block_result(self, index: int, error: str | None) -> None:
        now = self._now()
        if error is None:
            self._verified_blocks += 1
            assert self.outcome.manifest is not None
            self._verified_bytes += self.outcome.manifest.block_length(index)
            if self.progress is not None:
                self.progress.update(self._verified_bytes)
            self._call(self.session.block_verified, index, now)
        else:
            self._call(self.session.block_failed, index, now, error)

    def _disk_error(self, exc: DiskError) -> None:
        self._finish(FAILED, str(exc))
        self._call(self.session.fail, self._now(), str(exc))

    def _resume(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    async def _make_durable(self) -> None:
        assert self.pipeline is not None
        try:
            await self.pipeline.finish()
        except DiskError as exc:
            self._disk_error(exc)
            return
        if self.target is not None:
            why = self.target.reread_partitions()
            if why:
                log.warning("%s: %s", self.target_path, why)
        self._call(self.session.blocks_durable, self._now())

    # -- helpers ------------------------------------------------------------------------

    def _finish(self, result: str, reason: str) -> None:
        if not self.outcome.result:
            self.outcome.result, self.outcome.reason = result, reason
        if self._done is not None:
            self._done.set()

    async def _linger(self) -> None:
        """Let the session finish its closing exchange (bounded by LINGER seconds)."""
        deadline = time.monotonic() + LINGER
        while not self.session.finished and time.monotonic() < deadline:
            if self._transport is None or self._transport.closed:
                return
            await asyncio.sleep(0.05)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """A session call from outside the transport's callbacks, guarded like them."""
        if self._transport is not None:
            self._transport.call(fn, *args)

    def _internal_error(self, exc: BaseException) -> None:
        self._finish(FAILED, f"internal error in the receiver: {exc!r}")

    def _now(self) -> float:
        return asyncio.get_running_loop().time()


_HANDLERS: dict[type, Any] = {
    ev.ManifestReceived: Receiver._manifest_received,
    ev.BlockReceived: Receiver._block_received,
    ev.AllBlocksVerified: Receiver._all_verified,
    ev.Completed: Receiver._completed,
    ev.Evicted: Receiver._evicted,
    ev.SessionAborted: Receiver._aborted,
}


def run_receive(args: argparse.Namespace) -> int:
    """Run ``fleetcast receive`` with parsed ``args``; print the summary; return the exit code."""
    from client.cli import EXIT_CODES

    try:
        with open(args.key_file) as f:
            key = parse_key(f.read())
    except (OSError, KeyFormatError) as exc:
        print(f"fleetcast receive: cannot use key file {args.key_file}: {exc}", file=sys.stderr)
        return EXIT_CODES[USAGE]
    try:
        holding = receive_holding(args.target, args.manifest, args.delta, say=_say)
    except ScanError as exc:
        print(f"fleetcast receive: {exc}", file=sys.stderr)
        return EXIT_CODES[USAGE]
    _keep_big_buffers_off_the_heap()
    progress = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    receiver = Receiver(
        key=key,
        group=args.group,
        port=args.port,
        iface=args.iface,
        target=args.target,
        assume_blank=args.assume_blank,
        progress=progress,
        holding=holding,
    )
    started = time.monotonic()
    try:
        outcome = asyncio.run(_interruptible(receiver, args.timeout))
    except TransportError as exc:
        print(f"fleetcast receive: {exc}", file=sys.stderr)
        return EXIT_CODES[USAGE]
    if progress is not None:
        progress.close()
    elapsed = time.monotonic() - started
    print(summary_line(args.target, outcome, elapsed), file=sys.stderr)
    if args.stats_json:
        _write_json(args.stats_json, outcome, elapsed)
    return EXIT_CODES[outcome.result]


def _say(line: str) -> None:
    print(f"fleetcast receive: {line}", file=sys.stderr)


def _keep_big_buffers_off_the_heap() -> None:
    """Have glibc mmap every buffer of 256 KiB or more, so freed blocks go back to the OS.

    Block payloads and decoded blocks are 0.1-16 MiB each; with glibc's default dynamic
    threshold they end up on the heap and fragment it, and RSS creeps up with the image
    size (69 MiB after 2 GiB, against 45 MiB with this). Harmless where it is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
    except (OSError, AttributeError):
        pass


async def _interruptible(receiver: Receiver, timeout: float | None) -> Outcome:
    """``receiver.run``, turning SIGINT/SIGTERM into an orderly 'aborted' outcome."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await receiver.run(timeout)
    except asyncio.CancelledError:
        receiver.outcome.stats = receiver.counters()
        return receiver.outcome
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def summary_line(target: str, outcome: Outcome, elapsed: float) -> str:
    """The one line a receive ends with."""
    s = outcome.stats
    session = s.get("session", {})
    dropped = session.get("dropped", {}) if isinstance(session.get("dropped"), dict) else {}
    rejected = sum(v for k, v in dropped.items() if k in REJECTED and isinstance(v, int))
    ignored = sum(v for k, v in dropped.items() if k not in REJECTED and isinstance(v, int))
    mib = s.get("verified_bytes", 0) / (1 << 20)
    rate = mib / elapsed if elapsed > 0 else 0.0
    head = f"fleetcast receive: {outcome.result.upper()}"
    if outcome.reason:
        head += f" ({outcome.reason})"
    sock = s.get("socket", {})
    return (
        f"{head}: {target}, {mib:.1f} MiB verified in {elapsed:.1f} s ({rate:.1f} MiB/s), "
        f"peak RSS {s.get('peak_rss_mib', 0):.0f} MiB, "
        f"{sock.get('datagrams_in', 0)} datagrams in, {rejected} rejected (forged, damaged, "
        f"replayed), {ignored} ignored (not for us now)"
        + (f" {json.dumps(dropped, separators=(',', ':'))}" if dropped else "")
    )


def _write_json(path: str, outcome: Outcome, elapsed: float) -> None:
    data = {"result": outcome.result, "reason": outcome.reason, "elapsed": elapsed, **outcome.stats}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def _peak_rss_kib(usage: resource.struct_rusage) -> int:
    """This program's own peak RSS in KiB: VmHWM, which exec resets.

    ru_maxrss also counts the peak of the process this one was exec'd from (Linux keeps
    the larger across exec), so a receiver started by a big parent would report its
    parent's size; it is only the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return usage.ru_maxrss
