"""The audit log and the live event stream (Server-Sent Events)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from server.api.deps import ERRORS, AdminDep, BusDep, DbDep, OptId
from server.models import Event, EventPublic
from server.services.audit import list_events

router = APIRouter(prefix="/api/events", tags=["events"], responses=ERRORS)


@router.get("", response_model=list[EventPublic])
def audit_log(
    _who: AdminDep,
    db: DbDep,
    session_id: OptId = None,
    machine_id: OptId = None,
    kind: Annotated[str | None, Query(max_length=48)] = None,
    before_id: OptId = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[Event]:
    """Newest first."""
    return list_events(
        db,
        session_id=session_id,
        machine_id=machine_id,
        kind=kind,
        before_id=before_id,
        limit=limit,
    )


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def stream(_who: AdminDep, bus: BusDep) -> StreamingResponse:
    """Live session and machine changes as Server-Sent Events (``event: KIND``, JSON data)."""
    sub = bus.subscribe()
    return StreamingResponse(
        bus.sse(sub), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
