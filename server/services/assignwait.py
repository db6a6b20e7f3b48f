"""The long poll of ``GET /api/agent/assignment?wait=S``: an idle agent's request waits here.

Without it an idle agent asked every ``retry_after`` (2 s) seconds, so a new session reached
its machines up to 2 s late. Now a request that finds nothing waits up to S seconds for an
event that may change what its machine is assigned, then looks again:

* an event naming no machine (``session.created``, ``session.running``, a verdict that lets a
  late machine reopen a session...) wakes every waiter; one naming a machine wakes that
  machine's waiters only; the high-rate ``machine.progress`` and ``session.stats`` wake none;
* events are published before their transaction commits, so a wake-up looks after SETTLE[0]
  seconds and again at the later SETTLE delays while nothing is found;
* a change made without an event (another process writing the database) is found by a look
  every RECHECK seconds.

Each look is the caller's coroutine (a fresh database session in a worker thread): nothing
is held while waiting. ``close()`` (the server stopping) answers every waiter at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from server.events import EventBus
from server.models import Assignment

#: The longest wait an agent may ask for (s); below any usual proxy or client idle timeout.
MAX_WAIT = 25.0
#: Look again this often while waiting, whatever the events say (s).
RECHECK = 5.0
#: After a wake-up, look this long after it (s): the first lets the publisher commit, the
#: later ones catch a slow commit.
SETTLE = (0.05, 0.5, 2.0)
#: Events that never change an assignment and come often.
QUIET = frozenset({"machine.progress", "session.stats"})

Look = Callable[[], Awaitable[Assignment]]


class AssignmentWaits:
    """The waiting assignment requests, by machine id; a bus listener wakes them."""

    def __init__(self, bus: EventBus, recheck: float = RECHECK) -> None:
        self.bus = bus
        self.recheck = recheck
        self.closed = False
        #: how many events could have woken someone (a look compares it across its query)
        self.events = 0
        self._waiters: dict[int, set[asyncio.Event]] = {}

    def on_event(self, message: dict[str, Any]) -> None:
        """The bus listener (on the loop): wake whoever the event may concern."""
        if self.closed or message.get("kind") in QUIET:
            return
        self.events += 1
        machine_id = message.get("machine_id")
        if machine_id is None:
            for waiters in self._waiters.values():
                for changed in waiters:
                    changed.set()
            return
        for changed in self._waiters.get(machine_id, ()):
            changed.set()

    def close(self) -> None:
        """The server is stopping: every waiter answers now, new requests do not wait."""
        self.closed = True
        for waiters in self._waiters.values():
            for changed in waiters:
                changed.set()

    def waiting(self, machine_id: int | None = None) -> int:
        """How many requests wait now (for ``machine_id``, or in all)."""
        if machine_id is not None:
            return len(self._waiters.get(machine_id, ()))
        return sum(len(w) for w in self._waiters.values())

    async def wait(self, machine_id: int, seconds: float, look: Look, since: int) -> Assignment:
        """Look until ``look()`` finds a session or ``seconds`` pass; ``since`` is ``events``
        as it was before the caller's own first look (an event after it is not missed).

        Returns the assignment found, or an empty one with ``retry_after`` 0 (the agent asks
        again at once), or, when the server stops, an empty one with the default
        ``retry_after`` (the agent pauses before asking again)."""
        changed = asyncio.Event()
        if self.events != since:
            changed.set()
        self._waiters.setdefault(machine_id, set()).add(changed)
        try:
            return await self._until_found(changed, seconds, look)
        finally:
            waiters = self._waiters.get(machine_id)
            if waiters is not None:
                waiters.discard(changed)
                if not waiters:
                    del self._waiters[machine_id]

    async def _until_found(self, changed: asyncio.Event, seconds: float, look: Look) -> Assignment:
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline, last_look = now + seconds, now
        woke: float | None = None  # the first wake-up not looked after yet
        last_wake = -1e18
        while not self.closed:
            due = [deadline, last_look + self.recheck]
            if woke is not None:
                due.append(woke + SETTLE[0])
            due += [t for t in (last_wake + s for s in SETTLE[1:]) if t > last_look]
            if await _wait(changed, min(due) - loop.time()):
                changed.clear()
                last_wake = loop.time()
                woke = last_wake if woke is None else woke
                continue
            if self.closed or loop.time() >= deadline:
                break
            woke, last_look = None, loop.time()
            found = await look()
            if found.session_id is not None:
                return found
        return Assignment() if self.closed else Assignment(retry_after=0.0)


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """True when ``event`` is set within ``timeout`` seconds."""
    if event.is_set():
        return True
    if timeout <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


def waits_for(state: Any) -> AssignmentWaits:
    """The app's AssignmentWaits (``state`` = ``app.state``), made and subscribed to the
    event bus on first use."""
    waits: AssignmentWaits | None = getattr(state, "assign_waits", None)
    if waits is None or waits.bus is not state.bus:
        waits = AssignmentWaits(state.bus)
        state.bus.listeners.append(waits.on_event)
        state.assign_waits = waits
    return waits


def close_waits(state: Any) -> None:
    """Answer every waiting assignment request now (the server is stopping)."""
    if getattr(state, "bus", None) is not None:  # else the app never started
        waits_for(state).close()
