"""The progress route's hot path: who a machine credential is, and where its row stands.

500 agents reporting every second would otherwise cost four SELECTs and two worker-thread
hops each. With this cache a steady-state report touches no database at all: the credential
maps to its machine, (session, machine) to the session's and the row's state, and the
sample goes to the ProgressBuffer. Entries are dropped whenever the event bus carries a
change of that session or machine (every state change is published, services/audit.py), and
expire after TTL seconds in any case.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

#: An entry is trusted this long at most, even without a change event.
TTL = 30.0


@dataclass(frozen=True)
class RowState:
    session_state: str
    machine_state: str
    reason: str
    expires: float


class AgentCache:
    """Credential -> machine id, and (session id, machine id) -> RowState."""

    def __init__(self, ttl: float = TTL) -> None:
        self.ttl = ttl
        self._machines: dict[str, tuple[int, float]] = {}
        self._rows: dict[tuple[int, int], RowState] = {}
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # the loop reads and drops, worker threads fill

    def machine(self, token_hash: str) -> int | None:
        entry = self._machines.get(token_hash)
        if entry is None or entry[1] < time.monotonic():
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def remember_machine(self, token_hash: str, machine_id: int) -> None:
        with self._lock:
            self._machines[token_hash] = (machine_id, time.monotonic() + self.ttl)

    def row(self, session_id: int, machine_id: int) -> RowState | None:
        entry = self._rows.get((session_id, machine_id))
        if entry is None or entry.expires < time.monotonic():
            return None
        return entry

    def remember_row(
        self, session_id: int, machine_id: int, session_state: str, machine_state: str, reason: str
    ) -> None:
        expires = time.monotonic() + self.ttl
        with self._lock:
            self._rows[(session_id, machine_id)] = RowState(
                session_state, machine_state, reason, expires
            )

    def on_event(self, message: dict[str, Any]) -> None:
        """An event bus listener: forget what a change may have made stale."""
        kind = str(message.get("kind", ""))
        if kind in ("machine.progress", "session.stats"):
            return
        with self._lock:
            self._forget(kind, message.get("machine_id"), message.get("session_id"))

    def _forget(self, kind: str, machine_id: Any, session_id: Any) -> None:
        if machine_id is not None:
            for key in [k for k in self._rows if k[1] == machine_id]:
                del self._rows[key]
            if kind.startswith(("machine.deleted", "machine.enrolled")):
                for tok in [t for t, (m, _) in self._machines.items() if m == machine_id]:
                    del self._machines[tok]
        elif session_id is not None:
            for key in [k for k in self._rows if k[0] == session_id]:
                del self._rows[key]
