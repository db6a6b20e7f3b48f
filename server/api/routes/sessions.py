"""Deployment sessions: create, list, detail, start now, cancel, re-run the failed machines."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from server.api.deps import ERRORS, AdminDep, BusDep, DbDep, Id, ManagerDep, OptId, SettingsDep
from server.models import SESSION_STATES, SessionCreate, SessionDetail, SessionPublic
from server.services import sessions as svc
from server.services.errors import Invalid

router = APIRouter(prefix="/api/sessions", tags=["sessions"], responses=ERRORS)


@router.get("", response_model=list[SessionPublic])
def list_sessions(
    _who: AdminDep,
    db: DbDep,
    state: str | None = None,
    image_id: OptId = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[SessionPublic]:
    if state is not None and state not in SESSION_STATES:
        raise Invalid(f"state must be one of {', '.join(SESSION_STATES)}")
    return [
        svc.public(db, s)
        for s in svc.list_sessions(db, state=state, image_id=image_id, limit=limit)
    ]


@router.post("", response_model=SessionDetail, status_code=status.HTTP_201_CREATED)
def create_session(
    body: SessionCreate,
    who: AdminDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    manager: ManagerDep,
) -> SessionDetail:
    """A session of an image to a group and/or machines; starts now unless the policy says
    ``manual``."""
    s = svc.create_session(db, bus, settings, body, who.actor)
    if body.start_policy.start == "now":
        svc.mark_running(db, bus, s, who.actor)
    db.commit()
    if s.state == "running":
        manager.launch(s.id or 0)
    return svc.detail(db, s)


@router.get("/{session_id}", response_model=SessionDetail)
def get_session(session_id: Id, _who: AdminDep, db: DbDep) -> SessionDetail:
    return svc.detail(db, svc.get_session(db, session_id))


@router.post("/{session_id}/start", response_model=SessionDetail)
def start_session(
    session_id: Id, who: AdminDep, db: DbDep, bus: BusDep, manager: ManagerDep
) -> SessionDetail:
    """Start a pending session now; on a running session still waiting for its machines,
    start the transfer now with those present (as soon as one has joined)."""
    s = svc.get_session(db, session_id)
    if s.state == "running" and s.transfer_started_at is None:
        manager.force_start(session_id)
        return svc.detail(db, s)
    svc.mark_running(db, bus, s, who.actor)
    db.commit()
    if s.kind != "capture":  # a capture has no sender: its agent uploads (issue 10)
        manager.launch(session_id)
    return svc.detail(db, s)


@router.post("/{session_id}/cancel", response_model=SessionDetail)
def cancel_session(
    session_id: Id, who: AdminDep, db: DbDep, bus: BusDep, manager: ManagerDep
) -> SessionDetail:
    """Stop the sender (receivers are told) and end the session as cancelled."""
    s = svc.get_session(db, session_id)
    svc.cancel(db, bus, s, who.actor)
    db.commit()
    manager.stop(session_id)
    return svc.detail(db, s)


@router.post(
    "/{session_id}/rerun", response_model=SessionDetail, status_code=status.HTTP_201_CREATED
)
def rerun_session(
    session_id: Id,
    who: AdminDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    manager: ManagerDep,
) -> SessionDetail:
    """A new session to the machines of this one that did not succeed; starts now."""
    s = svc.rerun_failed(db, bus, settings, svc.get_session(db, session_id), who.actor)
    svc.mark_running(db, bus, s, who.actor)
    db.commit()
    manager.launch(s.id or 0)
    return svc.detail(db, s)
