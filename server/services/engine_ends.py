"""The engine's verdicts on receivers (evicted, failed) reach the database as they happen.

The multicast engine (protocol/sender.py) ends a receiver with ReceiverEvicted (silent too
long, NAKing one object without end, a straggler) or ReceiverFailed (it told the sender it
failed). The session runner (services/runner.py) hands each such end here the moment the
engine reports it; the machine's row becomes ``evicted`` / ``failed`` with the engine's
reason, an audit Event and a live update (``machine.evicted`` on the EventBus) — long
before the session ends, which matters most when the agent is dead and will never report.

**Mapping receivers to machines.** The engine knows a receiver by the 32-bit id the
receiver chose and by the UDP source address of its datagrams. The server maps by the id
only: each agent reports its receiver id in its progress reports, under its own per-machine
credential (``SessionMachine.receiver_id``, or a sample still in the progress buffer). A
source address would be a guess: several NICs, NAT, or a datagram with a forged source
could tie a verdict to the wrong machine. An end whose receiver no agent has claimed yet
(it was evicted before its agent's first progress report) is kept and tried again every
second while the session runs; at the end, services.sessions.finalize settles what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session as DbSession
from sqlmodel import select

from server.db import db_session
from server.events import EventBus
from server.models import MACHINE_ACTIVE, SessionMachine
from server.services.delta import EVICTED_REASON
from server.services.progress import ProgressBuffer
from server.services.progress import apply as apply_progress
from server.services.sessions import _set_machine_state

log = logging.getLogger(__name__)

#: Engine receiver states recorded as they happen -> machine states.
ENGINE_ENDS = {"evicted": "evicted", "failed": "failed"}


@dataclass(frozen=True)
class EngineEnd:
    """The engine ended receiver ``receiver_id`` of session ``session_id``."""

    session_id: int
    receiver_id: int
    state: str  #: "evicted" or "failed" (ReceiverRecord.state)
    reason: str


def record_end(
    db: DbSession,
    bus: EventBus | None,
    end: EngineEnd,
    buffer: ProgressBuffer | None = None,
    catchup: bool = False,
) -> bool:
    """Record ``end`` on the machine whose agent claimed its receiver id; with ``catchup``
    an eviction moves the machine to ``catchup`` (its agent fetches the rest over HTTP).

    Returns True when it is settled (recorded now, or the machine had ended already), False
    when no machine has claimed the receiver id yet (try again later).
    """
    row = db.exec(
        select(SessionMachine).where(
            SessionMachine.session_id == end.session_id,
            SessionMachine.receiver_id == end.receiver_id,
        )
    ).first()
    pending = None
    if row is None and buffer is not None:
        machine_id = buffer.machine_for(end.session_id, end.receiver_id)
        if machine_id is not None:
            row = db.exec(
                select(SessionMachine).where(
                    SessionMachine.session_id == end.session_id,
                    SessionMachine.machine_id == machine_id,
                )
            ).first()
    if row is None:
        return False
    if row.state not in MACHINE_ACTIVE or row.state == "catchup":
        return True
    if buffer is not None:
        pending = buffer.take(row.session_id, row.machine_id)
    if pending is not None:
        apply_progress(row, pending)
    row.receiver_id = end.receiver_id
    state = ENGINE_ENDS[end.state]
    reason = end.reason or f"the sender {state} this receiver"
    if state == "evicted" and catchup:  # issue 9: services/delta.py
        state, reason = "catchup", f"{reason}; {EVICTED_REASON}"
    _set_machine_state(db, bus, row, state, reason, "server", receiver_id=f"{end.receiver_id:08x}")
    log.info(
        "session %d: machine %d %s by the engine: %s", row.session_id, row.machine_id, state, reason
    )
    return True


class EngineEnds:
    """Per server: the ends the engines reported, written to the database off the loop."""

    def __init__(
        self,
        engine: Engine,
        bus: EventBus | None,
        buffer: ProgressBuffer | None = None,
        catchup: bool = False,
    ) -> None:
        self.engine, self.bus, self.buffer = engine, bus, buffer
        self.catchup = catchup  #: evicted machines catch up over HTTP (issue 9)
        #: session id -> ends no machine has claimed yet
        self.unclaimed: dict[int, list[EngineEnd]] = {}
        self._writes: dict[int, set[asyncio.Task[None]]] = {}

    def hook(self, session_id: int) -> Callable[[Any], None]:
        """A callback for SessionRunner.on_receiver_end (called in the event loop)."""

        def ended(rec: Any) -> None:
            if rec.state not in ENGINE_ENDS:
                return
            end = EngineEnd(session_id, int(rec.receiver_id), str(rec.state), str(rec.reason))
            task = asyncio.get_running_loop().create_task(self._write([end]))
            tasks = self._writes.setdefault(session_id, set())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return ended

    async def retry(self, session_id: int) -> None:
        """Try the unclaimed ends of ``session_id`` again."""
        ends = self.unclaimed.pop(session_id, [])
        if ends:
            await self._write(ends)

    async def flush(self, session_id: int) -> None:
        """Wait for the writes of ``session_id`` started so far."""
        tasks = list(self._writes.pop(session_id, set()))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def settle(self, session_id: int) -> None:
        """Finish every write of ``session_id`` and forget it (before finalize, which
        settles what no agent claimed)."""
        await self.flush(session_id)
        await self.retry(session_id)
        self.unclaimed.pop(session_id, None)

    async def _write(self, ends: list[EngineEnd]) -> None:
        def work() -> list[EngineEnd]:
            with db_session(self.engine) as db:
                return [
                    e for e in ends if not record_end(db, self.bus, e, self.buffer, self.catchup)
                ]

        try:
            left = await asyncio.to_thread(work)
        except Exception:  # the session goes on; finalize settles the machine at the end
            log.exception("session %d: engine verdicts not recorded", ends[0].session_id)
            return
        for e in left:
            self.unclaimed.setdefault(e.session_id, []).append(e)
