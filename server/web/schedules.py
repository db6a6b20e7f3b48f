"""Schedules (issue 5's API, docs/SCHEDULING.md): list, create, edit, delete; upcoming runs
and history. Field problems show next to their fields."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlmodel import col, select

from server.api.deps import WEB_PREFIX, DbDep, Id, WebDep
from server.db import db_session
from server.models import Retention, Schedule, ScheduleCreate
from server.services import images as images_svc
from server.services import machines as machines_svc
from server.services import scheduler as svc
from server.services.errors import ServiceError
from server.web.captures import backup_captures
from server.web.common import Csrf, check_post, page, see_other
from server.web.sessions import RATE_RANGE

router = APIRouter(prefix=WEB_PREFIX, include_in_schema=False)
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
#: A schedule's text fields as the form posts them (weekdays come as a list).
FIELDS = (
    "name", "image", "group_id", "machine_ids", "kind", "once_at", "cron", "time", "timezone",
    "window_end", "on_window_end", "wake_lead_min", "grace", "rate_mbytes", "start",
    "min_receivers", "max_wait", "quiet_period", "enabled", "action", "keep_daily",
    "keep_weekly", "keep_monthly",
)  # fmt: skip
#: Where a scheduler error (its message begins with the field's name) shows on the form.
_ERROR_FIELD = {
    "unknown time zone": "timezone", "window_end": "window_end", "once_at": "once_at",
    "cron": "cron", "time": "time", "weekdays": "weekdays", "image": "image",
    "group": "group_id", "machine": "machine_ids", "a schedule named": "name",
    "a deploy schedule": "image", "a backup schedule": "image",
}  # fmt: skip


def _choices(db: Any) -> dict[str, Any]:
    return {
        "images": images_svc.list_images(db),
        "groups": machines_svc.list_groups(db),
        "weekday_names": WEEKDAYS,
    }


def _as_form(s: Schedule) -> dict[str, Any]:
    """A stored schedule as the form's field values."""
    p = s.start_policy
    return {
        "name": s.name, "image": s.image, "group_id": str(s.group_id or ""),
        "machine_ids": ", ".join(str(i) for i in s.machine_ids), "kind": s.kind,
        "once_at": s.once_at, "cron": s.cron, "weekdays": [str(d) for d in s.weekdays],
        "time": s.time, "timezone": s.timezone, "window_end": s.window_end,
        "on_window_end": s.on_window_end, "wake_lead_min": f"{s.wake_lead / 60:g}",
        "grace": f"{s.grace:g}", "rate_mbytes": f"{s.rate_bps / 8e6:g}" if s.rate_bps else "",
        "start": p.get("start", "now"), "min_receivers": str(p.get("min_receivers") or ""),
        "max_wait": f"{p.get('max_wait', 300):g}",
        "quiet_period": f"{p['quiet_period']:g}" if p.get("quiet_period") is not None else "",
        "enabled": "on" if s.enabled else "", "action": s.action,
        **{f"keep_{k}": str(v) for k, v in Retention.model_validate(s.retention)},
    }  # fmt: skip


def parse_schedule_form(form: dict[str, Any]) -> tuple[ScheduleCreate | None, dict[str, str]]:
    """The form as a ScheduleCreate, or the problems keyed by field name."""
    errors: dict[str, str] = {}

    def number(key: str, kind: type[int] | type[float]) -> Any:
        raw = str(form.get(key, "")).strip()
        if not raw:
            return None
        try:
            return kind(raw)
        except ValueError:
            errors[key] = f"{raw!r} is not a number"
            return None

    ids = []
    for part in str(form.get("machine_ids", "")).replace(",", " ").split():
        if not part.isdigit() or int(part) < 1:
            errors["machine_ids"] = f"{part!r} is not a machine id (numbers, comma-separated)"
            break
        ids.append(int(part))
    policy: dict[str, Any] = {"start": form.get("start") or "now"}
    for key, kind in (("min_receivers", int), ("max_wait", float), ("quiet_period", float)):
        if (v := number(key, kind)) is not None:
            policy[key] = v
    rate, lead = number("rate_mbytes", float), number("wake_lead_min", float)
    grace = number("grace", float)
    group = number("group_id", int)
    if rate is not None and not 0.001 <= rate <= 12_500:
        errors["rate_mbytes"] = RATE_RANGE
    if lead is not None and not 0 <= lead <= 120:
        errors["wake_lead_min"] = "between 0 and 120 minutes (0: no Wake-on-LAN)"
    if not str(form.get("name", "")).strip():
        errors["name"] = "give the schedule a name"
    backup = form.get("action") == "backup"
    retention = {k: number(f"keep_{k}", int) for k in ("daily", "weekly", "monthly")}
    if not form.get("image") and not backup:
        errors["image"] = "choose an image"
    if group is None and not ids and "machine_ids" not in errors:
        errors["group_id"] = "choose a group, or list machine ids"
    if errors:
        return None, errors
    body: dict[str, Any] = {
        "name": str(form["name"]).strip(), "image": "" if backup else form["image"],
        "group_id": group, "action": "backup" if backup else "deploy",
        "retention": {k: v for k, v in retention.items() if v is not None},
        "machine_ids": ids, "start_policy": policy, "kind": form.get("kind") or "weekly",
        "once_at": form.get("once_at", ""), "cron": form.get("cron", ""),
        "weekdays": [int(d) for d in form.get("weekdays", []) if str(d).isdigit()],
        "time": form.get("time", ""), "timezone": form.get("timezone") or "UTC",
        "window_end": form.get("window_end", ""),
        "on_window_end": form.get("on_window_end") or "run-on",
        "wake_lead": (lead or 0) * 60, "enabled": bool(form.get("enabled")),
        "rate_bps": int(rate * 8e6) if rate is not None else None,
    }  # fmt: skip
    if grace is not None:
        body["grace"] = grace
    try:
        return ScheduleCreate.model_validate(body), {}
    except ValidationError as exc:
        out: dict[str, str] = {}
        for e in exc.errors():
            names = [str(p) for p in e["loc"]]
            if names[:1] == ["retention"]:
                names = [f"keep_{names[-1]}"]
            field = next((n for n in reversed(names) if n in FIELDS), "form")
            out.setdefault(field, str(e["msg"]))
        return None, out


def _error_field(message: str) -> str:
    for prefix, field in _ERROR_FIELD.items():
        if message.startswith(prefix) or prefix in message.split(" ", 2)[:2]:
            return field
    return "form"


@router.get("/schedules", response_class=HTMLResponse)
def schedules(request: Request, user: WebDep, db: DbDep) -> HTMLResponse:
    """Every schedule with its next run; the form to add one."""
    rows = db.exec(select(Schedule).order_by(col(Schedule.name))).all()
    return page(
        request, "schedules.html", user, schedules=rows, form={"enabled": "on",
        "timezone": "UTC", "kind": "weekly", "max_wait": "300"}, errors={},
        groups_by_id={g.id: g.name for g in machines_svc.list_groups(db)}, **_choices(db),
    )  # fmt: skip


def _form_of(request_form: Any) -> dict[str, Any]:
    out: dict[str, Any] = {k: str(request_form.get(k, "")) for k in FIELDS}
    out["weekdays"] = [str(d) for d in request_form.getlist("weekdays")]
    return out


@router.post("/schedules", response_model=None)
async def create_schedule(request: Request, user: WebDep, csrf: Csrf = "") -> Response:
    check_post(request, user, csrf)
    form = _form_of(await request.form())
    return await _save(request, user, form, None)


@router.get("/schedules/{schedule_id}", response_class=HTMLResponse)
def schedule_page(request: Request, schedule_id: Id, user: WebDep, db: DbDep) -> HTMLResponse:
    """Edit a schedule; its next runs and what became of the past ones."""
    s = svc.get_schedule(db, schedule_id)
    return _edit_page(request, user, db, s, _as_form(s), {})


def _edit_page(
    request: Request, user: Any, db: Any, s: Schedule, form: dict[str, Any],
    errors: dict[str, str], status: int = 200,
) -> HTMLResponse:  # fmt: skip
    upcoming: list[datetime] = []
    if s.enabled:
        spec = ScheduleCreate.model_validate(s, from_attributes=True)
        upcoming = svc.upcoming(spec, datetime.now(UTC), 5)
    return page(
        request, "schedule.html", user, status, s=s, form=form, errors=errors,
        upcoming=upcoming, runs=svc.history(db, s.id or 0, 20), **_choices(db),
        captures=backup_captures(db, s),
    )  # fmt: skip


@router.post("/schedules/{schedule_id}", response_model=None)
async def update_schedule(
    request: Request, schedule_id: Id, user: WebDep, csrf: Csrf = ""
) -> Response:
    check_post(request, user, csrf)
    form = _form_of(await request.form())
    return await _save(request, user, form, schedule_id)


async def _save(
    request: Request, user: Any, form: dict[str, Any], schedule_id: int | None
) -> Response:
    return await asyncio.to_thread(_save_sync, request, user, form, schedule_id)


def _save_sync(
    request: Request, user: Any, form: dict[str, Any], schedule_id: int | None
) -> Response:
    with db_session(request.app.state.engine) as db:
        s = svc.get_schedule(db, schedule_id) if schedule_id else None
        body, errors = parse_schedule_form(form)
        if body is not None:
            try:
                now = datetime.now(UTC)
                if s is None:
                    s = svc.create_schedule(db, body, user.who.actor, now)
                else:
                    svc.update_schedule(db, s, body, now)
                db.commit()
                return see_other(f"{WEB_PREFIX}/schedules/{s.id}")
            except ServiceError as exc:
                db.rollback()
                errors = {_error_field(str(exc)): str(exc)}
        if s is not None:
            return _edit_page(request, user, db, s, form, errors, 400)
        return page(
            request, "schedules.html", user, 400, form=form, errors=errors,
            schedules=db.exec(select(Schedule).order_by(col(Schedule.name))).all(),
            groups_by_id={g.id: g.name for g in machines_svc.list_groups(db)}, **_choices(db),
        )  # fmt: skip


@router.post("/schedules/{schedule_id}/delete")
def delete_schedule(
    request: Request, schedule_id: Id, user: WebDep, db: DbDep, csrf: Csrf = ""
) -> Response:
    check_post(request, user, csrf)
    svc.delete_schedule(db, svc.get_schedule(db, schedule_id))
    db.commit()
    return see_other(f"{WEB_PREFIX}/schedules")
