"""Catch-up's lifecycle: after the multicast sender ends, the verdict waits for catch-ups.

A machine evicted from the transfer (services/engine_ends.py), or one that boots after the
transfer started (services/delta.py ``assignment_mode``), is ``catchup``: its agent fetches
the missing blocks over HTTP (services/blocks.py) and reports a result ``via`` "catchup".
When the sender ends, the runner (services/runner.py ``_await_results``) marks the transfer
ended (later arrivals go straight to catch-up) and waits for the agents' results: machines
still in the multicast at most ``result_grace`` seconds, catching-up machines as long as
they make progress — one silent for ``catchup_timeout`` seconds fails with that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import Session as DbSession

from server.events import EventBus
from server.models import MACHINE_ACTIVE, utcnow
from server.services.audit import record
from server.services.sessions import _set_machine_state, get_session, session_machines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Waiting:
    """Who a session's verdict still waits for."""

    multicast: int  #: machines active but not catching up (their result is due)
    catchup: int  #: machines catching up, each still within its timeout
    expired: int  #: catching-up machines failed just now for lack of progress


def transfer_ended(db: DbSession, bus: EventBus | None, session_id: int) -> None:
    """The session's multicast sender has ended: from now on its machines catch up."""
    s = get_session(db, session_id)
    if s.transfer_ended_at is not None:
        return
    s.transfer_ended_at = utcnow()
    db.add(s)
    rows = session_machines(db, session_id)
    left = sum(1 for r in rows if r.state in MACHINE_ACTIVE)
    record(
        db,
        bus,
        "session.transfer-ended",
        actor="server",
        session_id=session_id,
        message=f"session {session_id}: multicast transfer ended; {left} machines unfinished",
        unfinished=left,
    )


def waiting(
    db: DbSession, bus: EventBus | None, session_id: int, timeout: float, now: datetime
) -> Waiting:
    """Count who the verdict waits for; fail each catching-up machine without progress for
    ``timeout`` seconds before ``now`` (an aware UTC time)."""
    multicast = catchup = expired = 0
    limit = now - timedelta(seconds=timeout)
    for row in session_machines(db, session_id):
        if row.state == "catchup":
            last = _aware(row.updated_at or row.started_at or row.assigned_at or now)
            if last <= limit:
                why = (
                    f"catch-up made no progress for {timeout:.0f} s (last at "
                    f"{last.strftime('%H:%M:%S')} UTC); re-run the session for this machine"
                )
                _set_machine_state(db, bus, row, "failed", why, "server")
                log.warning("session %d: machine %d: %s", session_id, row.machine_id, why)
                expired += 1
            else:
                catchup += 1
        elif row.state in MACHINE_ACTIVE:
            multicast += 1
    return Waiting(multicast, catchup, expired)


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
