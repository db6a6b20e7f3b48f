"""The audit log: every change of note becomes an Event row and a live update."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session as DbSession
from sqlmodel import col, select

from server.events import EventBus
from server.models import Event


def record(
    db: DbSession,
    bus: EventBus | None,
    kind: str,
    *,
    actor: str,
    message: str = "",
    session_id: int | None = None,
    machine_id: int | None = None,
    **data: Any,
) -> Event:
    """Add an Event (committed with ``db``'s transaction) and publish it live."""
    event = Event(
        kind=kind,
        actor=actor,
        message=message[:4096],
        session_id=session_id,
        machine_id=machine_id,
        data=data,
    )
    db.add(event)
    if bus is not None:
        bus.publish(
            kind, actor=actor, message=message, session_id=session_id, machine_id=machine_id, **data
        )
    return event


def list_events(
    db: DbSession,
    *,
    session_id: int | None = None,
    machine_id: int | None = None,
    kind: str | None = None,
    limit: int = 200,
    before_id: int | None = None,
) -> list[Event]:
    """Newest first, filtered."""
    q = select(Event).order_by(col(Event.id).desc()).limit(limit)
    if session_id is not None:
        q = q.where(Event.session_id == session_id)
    if machine_id is not None:
        q = q.where(Event.machine_id == machine_id)
    if kind:
        q = q.where(Event.kind == kind)
    if before_id is not None:
        q = q.where(col(Event.id) < before_id)
    return list(db.exec(q))
