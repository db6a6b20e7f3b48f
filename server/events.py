"""Live updates fan-out: every subscriber (an SSE stream) gets its own bounded queue.

``publish`` may be called from any thread (the API's worker threads, the session runners);
it hands the message to the event loop, which puts it on each subscriber's queue. A
subscriber that falls behind loses its oldest messages (counted in ``dropped``), never
slows the publisher or the other subscribers, and never grows without bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Subscriber:
    """One live stream's queue."""

    queue: asyncio.Queue[dict[str, Any]]
    dropped: int = 0


@dataclass
class EventBus:
    """Publish/subscribe of small JSON-able messages ``{"kind": ..., ...}``."""

    queue_size: int = 256
    loop: asyncio.AbstractEventLoop | None = None
    subscribers: set[Subscriber] = field(default_factory=set)
    #: Called on the loop with every message (caches that must drop stale entries).
    listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    published: int = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver on ``loop`` (the server's event loop) from now on."""
        self.loop = loop

    def publish(self, kind: str, **data: Any) -> None:
        """Send ``{"kind": kind, **data}`` to every subscriber; safe from any thread."""
        message = {"kind": kind, **data}
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(message)
        else:
            loop.call_soon_threadsafe(self._deliver, message)

    def _deliver(self, message: dict[str, Any]) -> None:
        self.published += 1
        for listener in self.listeners:
            listener(message)
        for sub in self.subscribers:
            if sub.queue.full():
                sub.queue.get_nowait()
                sub.dropped += 1
            sub.queue.put_nowait(message)

    def subscribe(self) -> Subscriber:
        """A new subscriber; call ``unsubscribe`` when its stream ends."""
        sub = Subscriber(asyncio.Queue(maxsize=self.queue_size))
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def sse(self, sub: Subscriber, *, keepalive: float = 15.0) -> AsyncIterator[str]:
        """Server-Sent Events text for ``sub`` until cancelled; a comment every ``keepalive``."""
        try:
            yield ": fleetcast live events\n\n"
            while True:
                try:
                    msg = await asyncio.wait_for(sub.queue.get(), keepalive)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                yield f"event: {msg['kind']}\ndata: {json.dumps(msg, default=str)}\n\n"
        finally:
            self.unsubscribe(sub)
