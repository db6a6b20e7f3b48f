"""Schedules (issue 5, docs/SCHEDULING.md): CRUD, upcoming runs, history; a group's
Wake-on-LAN target."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, status

from server.api.deps import ERRORS, AdminDep, DbDep, Id
from server.models import (
    GroupPublic,
    GroupWake,
    Schedule,
    ScheduleCreate,
    SchedulePublic,
    ScheduleRunPublic,
)
from server.services import scheduler as svc
from server.services import wol
from server.services.errors import Invalid
from server.services.machines import get_group

router = APIRouter(prefix="/api/schedules", tags=["schedules"], responses=ERRORS)


def _public(s: Schedule) -> SchedulePublic:
    return SchedulePublic.model_validate(s, from_attributes=True)


def _now() -> datetime:
    return datetime.now(UTC)


@router.get("", response_model=list[SchedulePublic])
def list_schedules(_who: AdminDep, db: DbDep) -> list[SchedulePublic]:
    from sqlmodel import select

    return [_public(s) for s in db.exec(select(Schedule).order_by(Schedule.name))]


@router.post("", response_model=SchedulePublic, status_code=status.HTTP_201_CREATED)
def create_schedule(body: ScheduleCreate, who: AdminDep, db: DbDep) -> SchedulePublic:
    """A schedule; 400 names the field that cannot be computed (zone, cron, time, date)."""
    s = svc.create_schedule(db, body, who.actor, _now())
    db.commit()
    return _public(s)


@router.get("/{schedule_id}", response_model=SchedulePublic)
def get_schedule(schedule_id: Id, _who: AdminDep, db: DbDep) -> SchedulePublic:
    return _public(svc.get_schedule(db, schedule_id))


@router.put("/{schedule_id}", response_model=SchedulePublic)
def replace_schedule(
    schedule_id: Id, body: ScheduleCreate, _who: AdminDep, db: DbDep
) -> SchedulePublic:
    """Replace a schedule's settings; its next run is computed afresh."""
    s = svc.update_schedule(db, svc.get_schedule(db, schedule_id), body, _now())
    db.commit()
    return _public(s)


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_schedule(schedule_id: Id, _who: AdminDep, db: DbDep) -> None:
    svc.delete_schedule(db, svc.get_schedule(db, schedule_id))
    db.commit()


@router.get("/{schedule_id}/upcoming", response_model=list[datetime])
def upcoming_runs(
    schedule_id: Id,
    _who: AdminDep,
    db: DbDep,
    count: Annotated[int, Query(ge=1, le=100)] = 10,
) -> list[datetime]:
    """The next ``count`` due times (UTC)."""
    s = svc.get_schedule(db, schedule_id)
    if not s.enabled:
        return []
    spec = ScheduleCreate.model_validate(s, from_attributes=True)
    return svc.upcoming(spec, _now(), count)


@router.get("/{schedule_id}/runs", response_model=list[ScheduleRunPublic])
def run_history(
    schedule_id: Id,
    _who: AdminDep,
    db: DbDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[ScheduleRunPublic]:
    """What became of each due time (waking, started, missed, failed), newest first."""
    svc.get_schedule(db, schedule_id)
    return svc.history(db, schedule_id, limit)


wake_router = APIRouter(prefix="/api/groups", tags=["groups"], responses=ERRORS)


@wake_router.put("/{group_id}/wake", response_model=GroupPublic)
def set_group_wake(group_id: Id, body: GroupWake, _who: AdminDep, db: DbDep) -> GroupPublic:
    """The broadcast address and UDP port a group's magic packets go to ("": the server's)."""
    g = get_group(db, group_id)
    if body.wol_broadcast:
        try:
            wol.check_target(body.wol_broadcast, body.wol_port or 9)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    g.wol_broadcast, g.wol_port = body.wol_broadcast, body.wol_port
    db.add(g)
    db.commit()
    return GroupPublic.model_validate(g, from_attributes=True)
