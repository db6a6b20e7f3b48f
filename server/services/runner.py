"""Runs the multicast sender of every running session as an asyncio task in the server's loop.

``launch(id)`` starts one (callable from any thread), ``stop(id)`` cancels it: the engine
closes the session and tells the receivers (ABORT). Several sessions run side by side, each
with its own socket, group, port, wire session id and key (server/multicast/sender.py).
When a sender ends, the runner waits ``result_grace`` seconds for the agents' verdicts and
then settles the session (services.sessions.finalize). ``shutdown()`` stops every sender
and ends its session as failed, saying the server stopped; a server killed outright leaves
its sessions ``running`` in the database, and the next start ends them the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Engine

from protocol.config import EngineConfig
from server.config import Settings
from server.db import db_session
from server.events import EventBus
from server.images.store import ImageStore, StoreError
from server.metrics import Metrics
from server.models import Session, StartPolicy, utcnow
from server.multicast.run import SendOptions, SendReport, SessionRunner
from server.multicast.sender import SenderSocketError
from server.services import catchup
from server.services import sessions as svc
from server.services.engine_ends import EngineEnds
from server.services.policy import NotStarted, StartNow, WaitState, evaluate
from server.services.progress import ProgressBuffer
from server.services.throughput import ThroughputHistory, median_mbytes

log = logging.getLogger(__name__)
T = TypeVar("T")
STATS_INTERVAL = 1.0
#: How often a waiting sender's start policy is evaluated (seconds).
GATE_TICK = 0.2
#: The engine's own start threshold while the server's start policy decides: never reached.
HOLD = 1 << 30
SHUTDOWN_REASON = "the server was stopped while the session was running; re-run the failed machines"


class SessionManager:
    """The session runners of one server process."""

    def __init__(
        self,
        engine: Engine,
        store: ImageStore,
        settings: Settings,
        bus: EventBus,
        metrics: Metrics,
        progress: ProgressBuffer | None = None,
    ) -> None:
        self.engine, self.store, self.settings = engine, store, settings
        self.progress = progress
        #: the engine's evictions and failures, recorded as they happen (engine_ends.py)
        self.ends = EngineEnds(engine, bus, progress, catchup=settings.catchup)
        self.bus, self.metrics = bus, metrics
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.runners: dict[int, SessionRunner] = {}
        self._stopping = False
        #: wall clock (seconds since the epoch) the start policies are evaluated with
        self.clock: Callable[[], float] = time.time
        self._forced: set[int] = set()
        #: sessions the gate ended: session id -> ("not-started" | "cancelled", reason)
        self._verdicts: dict[int, tuple[str, str]] = {}
        #: running sessions' throughput over time (kept in ``stats["throughput"]`` at the end)
        self.histories: dict[int, ThroughputHistory] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    # -- control, from any thread -------------------------------------------------------

    def launch(self, session_id: int) -> None:
        """Start the sender of running session ``session_id``."""
        self._in_loop(self._launch, session_id)

    def stop(self, session_id: int) -> None:
        """Cancel the sender of ``session_id`` (its receivers are told)."""
        self._in_loop(self._stop, session_id)

    def watch_catchup(self, session_id: int) -> None:
        """Settle ``session_id`` again once its catch-ups end: a late machine reopened it
        after its verdict (services/sessions.py ``assignment``); no sender runs."""
        self._in_loop(self._launch_catchup, session_id)

    def force_start(self, session_id: int) -> None:
        """Start the transfer of a waiting session with the machines present (the "now"
        condition of the start policy)."""
        self._in_loop(self._forced.add, session_id)

    def _in_loop(self, fn: Callable[[int], None], session_id: int) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the session manager is not running")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(session_id)
        else:
            loop.call_soon_threadsafe(fn, session_id)

    def history(self, session_id: int) -> dict[str, Any] | None:
        """The throughput history of running session ``session_id`` (ThroughputHistory.to_json),
        None when it has none (not running in this process)."""
        h = self.histories.get(session_id)
        return h.to_json() if h is not None else None

    def _launch(self, session_id: int) -> None:
        if session_id in self.tasks or self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._run(session_id))
        self.tasks[session_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(session_id, None))

    def _launch_catchup(self, session_id: int) -> None:
        if session_id in self.tasks or self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._catchup_only(session_id))
        self.tasks[session_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(session_id, None))

    async def _catchup_only(self, session_id: int) -> None:
        """Wait for a reopened session's catch-ups (services/catchup.py), then its verdict."""
        reason = ""
        try:
            await self._await_results(session_id)
        except asyncio.CancelledError:
            reason = SHUTDOWN_REASON if self._stopping else ""
        except Exception as exc:  # a bug must end the session with a reason
            log.exception("session %d: catch-up watch crashed", session_id)
            reason = f"internal error in the session runner: {exc!r}"
        await asyncio.shield(self._db(self._finalize, session_id, None, reason))

    def _stop(self, session_id: int) -> None:
        task = self.tasks.get(session_id)
        if task is not None:
            task.cancel()

    async def shutdown(self, timeout: float = 15.0) -> None:
        """Stop every sender; their sessions end as failed (SHUTDOWN_REASON)."""
        self._stopping = True
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    # -- one session --------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        def work() -> T:
            with db_session(self.engine) as db:
                return fn(db, *args)

        return await asyncio.to_thread(work)

    async def _run(self, session_id: int) -> None:
        report: SendReport | None = None
        reason = ""
        try:
            runner, policy, targets = await self._db(self._prepare, session_id)
            self.runners[session_id] = runner
            runner.on_receiver_end = self.ends.hook(session_id)
            loop = asyncio.get_running_loop()
            run_task = loop.create_task(runner.run())
            stats_task = loop.create_task(self._watch(session_id, runner))
            gate = loop.create_task(self._gate(session_id, runner, run_task, policy, targets))
            try:
                report = await run_task
            finally:
                stats_task.cancel()
                gate.cancel()
                self._count(runner)
            log.info("session %d: sender ended: %s", session_id, report.outcome)
            await self._await_results(session_id)
        except asyncio.CancelledError:
            reason = SHUTDOWN_REASON if self._stopping else "cancelled"
            if session_id in self._verdicts and not self._stopping:
                reason = "gate"
            report = self.runners[session_id].report if session_id in self.runners else None
        except (SenderSocketError, StoreError, _NotRunnable) as exc:
            reason = f"the sender could not run: {exc}"
            log.error("session %d: %s", session_id, reason)
        except Exception as exc:  # a bug must end the session with a reason, not leave it running
            log.exception("session %d: runner crashed", session_id)
            reason = f"internal error in the session runner: {exc!r}"
        finally:
            self.runners.pop(session_id, None)
            self._forced.discard(session_id)
        await asyncio.shield(self.ends.settle(session_id))
        await asyncio.shield(self._db(self._finalize, session_id, report, reason))

    def _prepare(self, db: Any, session_id: int) -> tuple[SessionRunner, StartPolicy, int]:
        s = svc.get_session(db, session_id)
        if s.state != "running":
            raise _NotRunnable(f"session {session_id} is {s.state}")
        if not self.settings.multicast_iface:
            raise _NotRunnable(
                "no multicast interface configured: set FLEETCAST_MULTICAST_IFACE to the NIC "
                "facing the lab and restart the server"
            )
        targets = len(svc.session_machines(db, session_id))
        policy = StartPolicy.model_validate(s.start_policy)
        manifest_bytes, manifest = self.store.load_manifest(s.image_name)
        options = SendOptions(
            group=s.mcast_group,
            port=s.mcast_port,
            iface=self.settings.multicast_iface,
            key=bytes.fromhex(s.key_hex),
            # the start policy (self._gate) decides when the transfer begins, not the engine
            min_receivers=HOLD,
            max_wait=None,
            rate_bps=s.rate_bps,
            auto_rate=s.rate_bps is None,
            ttl=self.settings.multicast_ttl,
            session_id=s.wire_session_id,
        )
        config = EngineConfig(
            rate_bps=s.rate_bps,
            auto_rate=s.rate_bps is None,
            straggler_grace=self.settings.straggler_grace,
            tag_data=self.settings.tag_data,
        )
        runner = SessionRunner(
            s.image_name, manifest_bytes, manifest, self.store.read_block, options, config=config
        )
        return runner, policy, targets

    async def _gate(
        self,
        session_id: int,
        runner: SessionRunner,
        run_task: asyncio.Task[SendReport],
        policy: StartPolicy,
        targets: int,
    ) -> None:
        """Hold the transfer until the start policy says go (services/policy.py), or end the
        session ``not-started``; then cancel it at the window end if the policy says so."""
        opened, last_joined, last_join_at = self.clock(), 0, None
        while True:
            now = self.clock()
            joined = len(runner.report.receivers)
            if joined > last_joined:
                last_joined, last_join_at = joined, now
            forced = session_id in self._forced
            decision = evaluate(
                policy, WaitState(opened, targets, joined, last_join_at, forced), now
            )
            if isinstance(decision, StartNow):
                _release(runner)
                log.info("session %d: transfer starts: %s", session_id, decision.reason)
                await self._db(svc.transfer_started, self.bus, session_id, decision.reason)
                break
            if isinstance(decision, NotStarted):
                log.warning("session %d: not started: %s", session_id, decision.reason)
                self._verdicts[session_id] = ("not-started", decision.reason)
                run_task.cancel()
                return
            await asyncio.sleep(GATE_TICK)
        if policy.not_after is None or policy.at_window_end != "cancel":
            return
        while self.clock() < policy.not_after.timestamp():
            await asyncio.sleep(min(1.0, max(0.05, policy.not_after.timestamp() - self.clock())))
        why = f"cancelled at the end of the maintenance window ({policy.not_after.isoformat()})"
        self._verdicts[session_id] = ("cancelled", why)
        run_task.cancel()

    async def _watch(self, session_id: int, runner: SessionRunner) -> None:
        """Every second: the sender's counters to /metrics, the throughput history and the
        live stream (``session.stats`` carries the new point: ``t``, ``sender_mbps``,
        ``median_mbps``)."""
        history = self.histories.setdefault(session_id, ThroughputHistory())
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self._count(runner)
            await self.ends.retry(session_id)
            stats = _engine_stats(runner)
            median = median_mbytes(await self._db(_receiving_rates, session_id))
            now = self.clock()
            sender, median = history.record(now, int(stats.get("bytes_sent", 0)), median)
            self.bus.publish(
                "session.stats",
                session_id=session_id,
                t=now,
                sender_mbps=round(sender, 3),
                median_mbps=round(median, 3),
                **stats,
            )

    def _count(self, runner: SessionRunner) -> None:
        self.metrics.add_sender(id(runner), _engine_stats(runner))

    async def _await_results(self, session_id: int) -> None:
        """Give the agents ``result_grace`` seconds to report their verdicts, and machines
        catching up over HTTP as long as they make progress (services/catchup.py)."""
        await self._db(catchup.transfer_ended, self.bus, session_id)
        deadline = time.monotonic() + self.settings.result_grace
        timeout = self.settings.catchup_timeout
        while True:
            w = await self._db(catchup.waiting, self.bus, session_id, timeout, utcnow())
            in_grace = time.monotonic() < deadline
            if w.catchup == 0 and (w.multicast == 0 or not in_grace):
                return
            await asyncio.sleep(0.25 if in_grace else 1.0)

    def _finalize(self, db: Any, session_id: int, report: SendReport | None, reason: str) -> None:
        if self.progress is not None:
            self.progress.flush(db)
        s = db.get(Session, session_id)
        if s is None:
            return
        engine_states: dict[int, tuple[str, str]] = {}
        stats: dict[str, Any] = dict(s.stats)
        if report is not None:
            engine_states = {rid: (r.state, r.reason) for rid, r in report.receivers.items()}
            stats = {
                "outcome": report.outcome,
                "elapsed": round(report.elapsed, 3),
                "wire": report.wire,
                **_summary(report),
            }
        history = self.histories.pop(session_id, None)
        if history is not None and len(history):
            stats["throughput"] = history.to_json()
        if reason == "gate":
            verdict, reason = self._verdicts.pop(session_id)
            if verdict == "not-started":
                svc.not_started(db, self.bus, session_id, reason)
            elif s.state in ("pending", "running"):
                svc.cancel(db, self.bus, s, "server", reason)
            reason = ""
        if reason == "cancelled":
            reason = ""
        svc.finalize(db, self.bus, s, engine_states, stats, reason)


def _release(runner: SessionRunner) -> None:
    """Let the engine start the transfer with the receivers present.

    The engine (protocol/sender.py) is held at HOLD receivers; the server's start policy
    decides, then starts it through the engine's public start_transfer (PROTOCOL.md §3.2).
    """
    session = getattr(runner, "session", None)
    if session is not None:
        session.start_transfer(asyncio.get_running_loop().time())


class _NotRunnable(Exception):
    """The session cannot be sent (its state, or the server's configuration)."""


def _receiving_rates(db: Any, session_id: int) -> list[float | None]:
    """The measured rates (bits/s) of the session's receiving machines."""
    return [r.rate_bps for r in svc.session_machines(db, session_id) if r.state == "receiving"]


def _engine_stats(runner: SessionRunner) -> dict[str, Any]:
    session = getattr(runner, "session", None)
    if session is None:
        return {}
    st = session.stats
    return {
        "bytes_sent": int(st.get("bytes_sent", 0)),
        "datagrams_sent": int(st.get("datagrams_sent", 0)),
        "repair_datagrams": int(st.get("repair_datagrams", 0)),
        "naks": int(st.get("naks_received", 0)),
        "evictions": int(st.get("evictions", 0)),
        "rate_bps": st.get("rate_bps"),
        "receivers": len(st.get("receivers", {})),
    }


def _summary(report: SendReport) -> dict[str, Any]:
    with contextlib.suppress(Exception):
        return {
            "receivers": {
                f"{rid:08x}": {"state": r.state, "reason": r.reason, "naks": r.naks, "loss": r.loss}
                for rid, r in report.receivers.items()
            }
        }
    return {}
