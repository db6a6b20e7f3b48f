"""Overview, session detail (live grid), session actions and the new-session form."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import ValidationError
from sqlmodel import col, select

from server.api.deps import (
    WEB_PREFIX,
    BusDep,
    DbDep,
    Id,
    ManagerDep,
    SettingsDep,
    WebDep,
)
from server.models import Schedule, Session, SessionCreate, SessionMachine
from server.services import delta as delta_svc
from server.services import images as images_svc
from server.services import machines as machines_svc
from server.services import sessions as svc
from server.services.errors import ServiceError
from server.web.common import Csrf, check_post, page, see_other

router = APIRouter(prefix=WEB_PREFIX, include_in_schema=False)
#: Machine states that count as a failure in the overview.
FAILED = ("failed", "evicted", "no-show")
RATE_RANGE = "the rate must be between 0.001 and 12500 MB/s (or empty: automatic)"
#: The grid's columns, in the order state.json sends each machine's row (issue 9 added the
#: last four: the agent's phase, raw bytes its disk held (spared), raw bytes it fetched
#: by catch-up, and how its result came).
COLUMNS = (
    "id", "name", "mac", "state", "reason", "done", "total", "rate", "loss", "naks",
    "phase", "held", "catchup", "via",
)  # fmt: skip
#: The new-session form's delta choices (SessionCreate.delta).
DELTA_CHOICES = ("auto", "always", "never")


def spread(rows: list[SessionMachine]) -> dict[str, float]:
    """Slowest / median / fastest machine's fraction done (honest progress, not the max)."""
    fractions = [r.bytes_done / r.bytes_total if r.bytes_total else 0.0 for r in rows]
    fractions = [1.0 if r.state == "succeeded" else f for r, f in zip(rows, fractions, strict=True)]
    if not fractions:
        return {"slowest": 0.0, "median": 0.0, "fastest": 0.0}
    return {
        "slowest": min(fractions),
        "median": statistics.median(fractions),
        "fastest": max(fractions),
    }


def _summary(db: Any, s: Session) -> dict[str, Any]:
    rows = svc.session_machines(db, s.id or 0)
    active = [r.rate_bps for r in rows if r.state == "receiving" and r.rate_bps]
    return {
        "s": s,
        "counts": svc.counts(rows),
        "targets": len(rows),
        "spread": spread(rows),
        "median_rate": statistics.median(active) if active else 0.0,
        "spared": delta_svc.spared(rows),
    }


@router.get("", response_class=HTMLResponse)
def overview(request: Request, user: WebDep, db: DbDep) -> HTMLResponse:
    """Running and waiting sessions, recent sessions, recent machine failures."""
    live = db.exec(
        select(Session)
        .where(col(Session.state).in_(("running", "pending")))
        .order_by(col(Session.id).desc())
    )
    failures = db.exec(
        select(SessionMachine)
        .where(col(SessionMachine.state).in_(FAILED))
        .order_by(col(SessionMachine.id).desc())
        .limit(10)
    ).all()
    names = {m.id: m.name or m.mac for m in machines_svc.list_machines(db)}
    upcoming = db.exec(
        select(Schedule)
        .where(Schedule.enabled == True)  # noqa: E712 (SQL, not Python)
        .where(col(Schedule.next_run_at).is_not(None))
        .order_by(col(Schedule.next_run_at))
        .limit(5)
    ).all()
    return page(
        request,
        "overview.html",
        user,
        live=[_summary(db, s) for s in live],
        recent=[svc.public(db, s) for s in svc.list_sessions(db, limit=15)],
        failures=failures,
        names=names,
        upcoming=upcoming,
    )


@router.get("/sessions/{session_id}", response_class=HTMLResponse)
def session_page(request: Request, session_id: Id, user: WebDep, db: DbDep) -> HTMLResponse:
    """The live grid's page; its rows come from state.json and the event stream."""
    s = svc.get_session(db, session_id)
    return page(request, "session.html", user, **_summary(db, s))


@router.get("/sessions/{session_id}/state.json")
def session_state(session_id: Id, _user: WebDep, db: DbDep, manager: ManagerDep) -> Response:
    """The session and every machine's row, compact (500 machines is ~40 KB), and its
    throughput history (the running sender's, or the one kept when the session ended)."""
    d = svc.detail(db, svc.get_session(db, session_id))
    stats = dict(d.stats)
    history = manager.history(session_id) or stats.pop("throughput", None)
    stats.pop("throughput", None)
    rows = [
        [
            m.machine_id,
            m.machine_name,
            m.mac,
            m.state,
            m.reason,
            m.bytes_done,
            m.bytes_total,
            m.rate_bps,
            m.loss,
            m.naks,
            m.phase,
            m.held_bytes,
            m.catchup_bytes,
            m.via,
        ]
        for m in d.machines
    ]
    body = {
        "id": d.id,
        "state": d.state,
        "reason": d.reason,
        "stats": stats,
        "counts": d.counts,
        "columns": COLUMNS,
        "machines": rows,
        "spared": delta_svc.spared(d.machines),
        "history": history or {"start": None, "step": 1.0, "points": []},
    }
    return Response(json.dumps(body, default=str), media_type="application/json")


async def _session_stream(request: Request, bus: Any, session_id: int) -> AsyncIterator[str]:
    sub = bus.subscribe()
    try:
        yield ": fleetcast session events\n\n"
        while True:
            try:
                msg = await asyncio.wait_for(sub.queue.get(), 15.0)
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            if msg.get("session_id") == session_id:
                yield f"event: {msg['kind']}\ndata: {json.dumps(msg, default=str)}\n\n"
    finally:
        bus.unsubscribe(sub)


@router.get("/sessions/{session_id}/events")
async def session_events(
    request: Request, session_id: Id, _user: WebDep, bus: BusDep
) -> StreamingResponse:
    """This session's live events (SSE, the log-in cookie authenticates the EventSource)."""
    return StreamingResponse(
        _session_stream(request, bus, session_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


@router.post("/sessions/{session_id}/start")
def start(
    request: Request,
    session_id: Id,
    user: WebDep,
    db: DbDep,
    bus: BusDep,
    manager: ManagerDep,
    csrf: Csrf = "",
) -> Response:
    check_post(request, user, csrf)
    s = svc.get_session(db, session_id)
    svc.mark_running(db, bus, s, user.who.actor)
    db.commit()
    manager.launch(session_id)
    return see_other(f"{WEB_PREFIX}/sessions/{session_id}")


@router.post("/sessions/{session_id}/cancel")
def cancel(
    request: Request,
    session_id: Id,
    user: WebDep,
    db: DbDep,
    bus: BusDep,
    manager: ManagerDep,
    csrf: Csrf = "",
) -> Response:
    check_post(request, user, csrf)
    s = svc.get_session(db, session_id)
    svc.cancel(db, bus, s, user.who.actor)
    db.commit()
    manager.stop(session_id)
    return see_other(f"{WEB_PREFIX}/sessions/{session_id}")


@router.post("/sessions/{session_id}/rerun")
def rerun(
    request: Request,
    session_id: Id,
    user: WebDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    manager: ManagerDep,
    csrf: Csrf = "",
) -> Response:
    check_post(request, user, csrf)
    s = svc.rerun_failed(db, bus, settings, svc.get_session(db, session_id), user.who.actor)
    svc.mark_running(db, bus, s, user.who.actor)
    db.commit()
    manager.launch(s.id or 0)
    return see_other(f"{WEB_PREFIX}/sessions/{s.id}")


# -- creating a session -----------------------------------------------------------------------


def _form_choices(db: Any) -> dict[str, Any]:
    return {
        "images": images_svc.list_images(db),
        "groups": machines_svc.list_groups(db),
        "machines": machines_svc.list_machines(db),
    }


@router.get("/sessions-new", response_class=HTMLResponse)
def new_session_form(request: Request, user: WebDep, db: DbDep) -> HTMLResponse:
    return page(request, "session_new.html", user, form={}, errors={}, **_form_choices(db))


def parse_session_form(form: dict[str, str]) -> tuple[SessionCreate | None, dict[str, str]]:
    """The form's fields as a SessionCreate, or the problems keyed by field name."""
    errors: dict[str, str] = {}

    def number(key: str, kind: type[int] | type[float]) -> Any:
        raw = form.get(key, "").strip()
        if not raw:
            return None
        try:
            return kind(raw)
        except ValueError:
            errors[key] = f"{raw!r} is not a number"
            return None

    ids: list[int] = []
    for part in form.get("machine_ids", "").replace(",", " ").split():
        if not part.isdigit() or int(part) < 1:
            errors["machine_ids"] = f"{part!r} is not a machine id (numbers, comma-separated)"
            break
        ids.append(int(part))
    group = number("group_id", int)
    rate = number("rate_mbytes", float)
    policy: dict[str, Any] = {"start": form.get("start") or "now"}
    if form.get("delta", "auto") not in DELTA_CHOICES:
        errors["delta"] = "choose auto, always or never"
    if (n := number("min_receivers", int)) is not None:
        policy["min_receivers"] = n
    if (w := number("max_wait", float)) is not None:
        policy["max_wait"] = w
    if (q := number("quiet_period", float)) is not None:
        policy["quiet_period"] = q
    if rate is not None and not 0.001 <= rate <= 12_500:
        errors["rate_mbytes"] = RATE_RANGE
    if policy.get("min_receivers", 1) < 1:
        errors["min_receivers"] = "at least 1 (or empty: every target machine)"
    for key in ("max_wait", "quiet_period"):
        if not 0 <= policy.get(key, 0) <= 86_400:
            errors[key] = "between 0 and 86400 seconds"
    if not form.get("image"):
        errors["image"] = "choose an image"
    if group is None and not ids and "machine_ids" not in errors:
        errors["group_id"] = "choose a group, or list machine ids below"
    if errors:
        return None, errors
    body = {
        "image": form["image"],
        "group_id": group,
        "machine_ids": ids,
        "start_policy": policy,
        "rate_bps": int(rate * 8e6) if rate is not None else None,
        "delta": form.get("delta") or "auto",
    }
    try:
        return SessionCreate.model_validate(body), {}
    except ValidationError as exc:
        return None, _validation_errors(exc)


#: Where a SessionCreate validation problem shows on the form.
_FIELD_OF = {
    "rate_bps": "rate_mbytes",
    "machine_ids": "machine_ids",
    "group_id": "group_id",
    "image": "image",
    "start": "start",
    "min_receivers": "min_receivers",
    "max_wait": "max_wait",
}


def _validation_errors(exc: ValidationError) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in exc.errors():
        field = next((_FIELD_OF[str(p)] for p in reversed(e["loc"]) if str(p) in _FIELD_OF), "")
        msg = str(e["msg"])
        if field == "rate_mbytes":
            msg = RATE_RANGE
        out.setdefault(field or "form", msg)
    return out


def _field_of_service_error(message: str) -> str:
    for word, field in (("image", "image"), ("group", "group_id"), ("machine", "machine_ids")):
        if word in message:
            return field
    return "form"


@router.post("/sessions-new", response_model=None)
def create_session(
    request: Request,
    user: WebDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    manager: ManagerDep,
    image: Annotated[str, Form(max_length=128)] = "",
    group_id: Annotated[str, Form(max_length=32)] = "",
    machine_ids: Annotated[str, Form(max_length=100_000)] = "",
    start: Annotated[str, Form(max_length=16)] = "now",
    min_receivers: Annotated[str, Form(max_length=32)] = "",
    max_wait: Annotated[str, Form(max_length=32)] = "",
    quiet_period: Annotated[str, Form(max_length=32)] = "",
    rate_mbytes: Annotated[str, Form(max_length=32)] = "",
    delta: Annotated[str, Form(max_length=16)] = "auto",
    csrf: Csrf = "",
) -> Response:
    """Validate, create, start now unless the policy is manual; errors next to the fields."""
    check_post(request, user, csrf)
    form = {
        "image": image,
        "group_id": group_id,
        "machine_ids": machine_ids,
        "start": start,
        "min_receivers": min_receivers,
        "max_wait": max_wait,
        "quiet_period": quiet_period,
        "rate_mbytes": rate_mbytes,
        "delta": delta,
    }
    body, errors = parse_session_form(form)
    if body is not None:
        try:
            s = svc.create_session(db, bus, settings, body, user.who.actor)
            if body.start_policy.start == "now":
                svc.mark_running(db, bus, s, user.who.actor)
            db.commit()
        except ServiceError as exc:
            db.rollback()
            errors = {_field_of_service_error(str(exc)): str(exc)}
        else:
            if s.state == "running":
                manager.launch(s.id or 0)
            return see_other(f"{WEB_PREFIX}/sessions/{s.id}")
    return page(
        request, "session_new.html", user, 400, form=form, errors=errors, **_form_choices(db)
    )


__all__ = ["router", "spread"]
