"""A machine's page: capture its disk now, its backups with a Restore button (issue 10).

The page calls the same services as the API (services/capture.py, services/backups.py);
a started capture or restore goes to its session page, which shows its progress.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlmodel import Session as DbSession

from server.api.deps import (
    WEB_PREFIX,
    BusDep,
    DbDep,
    Id,
    ManagerDep,
    SettingsDep,
    StoreDep,
    WebDep,
)
from server.models import Schedule
from server.models_capture import CaptureCreate, CapturePublic, RestoreRequest
from server.services import backups
from server.services import capture as svc
from server.services import sessions as sessions_svc
from server.services.errors import ServiceError
from server.services.machines import get_machine
from server.web.common import Csrf, check_post, page, see_other

router = APIRouter(prefix=WEB_PREFIX, include_in_schema=False)


def backup_captures(db: DbSession, schedule: Schedule) -> dict[int, list[CapturePublic]]:
    """The captures of a backup schedule's runs, by run id (for its history table)."""
    if schedule.action != "backup":
        return {}
    out: dict[int, list[CapturePublic]] = {}
    for c in svc.list_captures(db, limit=1000):
        if c.schedule_id == schedule.id and c.schedule_run_id is not None:
            out.setdefault(c.schedule_run_id, []).append(c)
    return out


def _machine_page(
    request: Request, user: Any, db: DbSession, machine_id: int, status: int = 200, **ctx: Any
) -> HTMLResponse:
    m = get_machine(db, machine_id)
    base = (m.name or m.mac.replace(":", "-")).replace(" ", "-")
    ctx.setdefault("error", "")
    ctx.setdefault("form", {"target_image": f"{base}/{datetime.now(UTC):%Y-%m-%d}-ref"})
    return page(
        request,
        "machine.html",
        user,
        status,
        m=m,
        backups=backups.backups_public(db, machine_id),
        captures=svc.list_captures(db, machine_id=machine_id, limit=20),
        **ctx,
    )


@router.get("/machines/{machine_id}", response_class=HTMLResponse)
def machine_page(request: Request, machine_id: Id, user: WebDep, db: DbDep) -> HTMLResponse:
    """One machine: capture its disk now; its backups and captures, each restorable."""
    return _machine_page(request, user, db, machine_id)


@router.post("/machines/{machine_id}/capture", response_model=None)
def start_capture(
    request: Request,
    machine_id: Id,
    user: WebDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    store: StoreDep,
    target_image: Annotated[str, Form(max_length=128)] = "",
    disk_rule: Annotated[str, Form(max_length=128)] = "",
    after: Annotated[str, Form(max_length=16)] = "",
    csrf: Csrf = "",
) -> Response:
    """Start a capture session of this machine into a new image; go to its session page."""
    check_post(request, user, csrf)
    form = {"target_image": target_image, "disk_rule": disk_rule, "after": after}
    try:
        req = CaptureCreate.model_validate(
            {
                "machine_id": machine_id,
                "target_image": target_image.strip(),
                "disk_rule": disk_rule.strip() or None,
                "after": after or None,
            }
        )
        svc.release_ended_pins(db, store)
        s = svc.create_capture(db, bus, settings, store, req, user.who.actor)
        sessions_svc.mark_running(db, bus, s, user.who.actor)
        db.commit()
    except (ServiceError, ValidationError) as exc:
        db.rollback()
        why = (
            "; ".join(str(e["msg"]) for e in exc.errors())
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        return _machine_page(request, user, db, machine_id, 400, error=why, form=form)
    return see_other(f"{WEB_PREFIX}/sessions/{s.id}")


@router.post("/machines/{machine_id}/restore", response_model=None)
def restore(
    request: Request,
    machine_id: Id,
    user: WebDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    manager: ManagerDep,
    image_id: Annotated[int, Form(ge=1, le=2**31 - 1)],
    csrf: Csrf = "",
) -> Response:
    """Deploy one of this machine's images back to it, now; go to the session's page."""
    check_post(request, user, csrf)
    try:
        s = backups.restore(
            db, bus, settings, machine_id, RestoreRequest(image_id=image_id), user.who.actor
        )
        db.commit()
    except ServiceError as exc:
        db.rollback()
        return _machine_page(request, user, db, machine_id, exc.status, error=str(exc))
    manager.launch(s.id or 0)
    return see_other(f"{WEB_PREFIX}/sessions/{s.id}")
