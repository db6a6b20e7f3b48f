"""Write-behind of agents' progress: the newest sample per machine, flushed once a second.

Hundreds of agents reporting every second would otherwise be hundreds of write transactions
a second; on SQLite, with one writer at a time, they queue behind each other's locks. The
progress route records a sample here (no database write), and ``flush`` writes every
machine's newest sample in one transaction. State changes (the first report, results) are
still written at once; a result takes its machine's pending sample first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session as DbSession
from sqlmodel import col, select

from server.models import MACHINE_ACTIVE, ProgressSample, SessionMachine


@dataclass(frozen=True)
class Pending:
    """The newest progress of one machine in one session, not yet in the database."""

    receiver_id: int | None
    sample: ProgressSample
    at: datetime
    #: issue 9: what the agent does (hashing | multicast | catchup | verifying; "": an
    #: older agent, which leaves the row's as it is) and what its disk already held
    phase: str = ""
    held_blocks: int = 0
    held_bytes: int = 0


def apply(row: SessionMachine, pending: Pending) -> None:
    """Copy ``pending`` onto ``row``."""
    s = pending.sample
    if pending.receiver_id is not None:
        row.receiver_id = pending.receiver_id
    row.bytes_done, row.bytes_total = s.bytes_done, s.bytes_total
    row.blocks_done, row.blocks_total = s.blocks_done, s.blocks_total
    row.rate_bps, row.loss, row.naks = s.rate_bps, s.loss, s.naks
    row.updated_at = pending.at
    if pending.phase:
        row.phase = pending.phase
        row.held_blocks, row.held_bytes = pending.held_blocks, pending.held_bytes


class ProgressBuffer:
    """Thread-safe map (session id, machine id) -> Pending."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, int], Pending] = {}
        self.flushed = 0

    def put(self, session_id: int, machine_id: int, pending: Pending) -> None:
        with self._lock:
            self._pending[(session_id, machine_id)] = pending

    def take(self, session_id: int, machine_id: int) -> Pending | None:
        """Remove and return one machine's pending sample."""
        with self._lock:
            return self._pending.pop((session_id, machine_id), None)

    def machine_for(self, session_id: int, receiver_id: int) -> int | None:
        """The machine whose pending sample of ``session_id`` claims ``receiver_id``."""
        with self._lock:
            for (sid, machine_id), pending in self._pending.items():
                if sid == session_id and pending.receiver_id == receiver_id:
                    return machine_id
        return None

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self, db: DbSession) -> int:
        """Write every pending sample of a still-active machine; returns how many."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        sessions = {sid for sid, _ in batch}
        rows = db.exec(
            select(SessionMachine)
            .where(col(SessionMachine.session_id).in_(sessions))
            .where(col(SessionMachine.state).in_(MACHINE_ACTIVE))
        )
        written = 0
        for row in rows:
            pending = batch.get((row.session_id, row.machine_id))
            if pending is not None:
                apply(row, pending)
                db.add(row)
                written += 1
        self.flushed += written
        return written
