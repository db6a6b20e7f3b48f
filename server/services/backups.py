"""Backups: a machine's captures made by backup schedules, their retention, and restore.

Retention is grandfather-father-son over a machine's backup images: keep the newest backup
of each of the last ``daily`` days, ``weekly`` ISO weeks and ``monthly`` months that have
one (days counted in the schedule's time zone), and always the newest backup; every other
backup image of that machine is deleted through the store, whose sweep frees only blocks
no kept image (and no open capture) uses. ``keep`` is the pure rule; ``prune`` applies it.

Restore is a deployment of one image to one machine, started at once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from sqlmodel import Session as DbSession
from sqlmodel import col, select

from server.config import Settings
from server.events import EventBus
from server.images.store import ImageStore
from server.models import (
    SESSION_ACTIVE,
    Group,
    Image,
    Machine,
    Retention,
    Schedule,
    Session,
    SessionCreate,
    StartPolicy,
)
from server.models_capture import BackupPublic, Capture, CaptureCreate, RestoreRequest
from server.services import sessions as svc
from server.services.audit import record
from server.services.capture import create_capture
from server.services.errors import Conflict, ServiceError
from server.services.images import delete_image, get_image
from server.services.machines import get_machine, group_member_ids

log = logging.getLogger(__name__)


# -- the rule -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dated:
    """One backup: an id and when it was taken (UTC)."""

    id: int
    at: datetime


def keep(backups: list[Dated], retention: Retention, tz: ZoneInfo | None = None) -> set[int]:
    """The ids of ``backups`` that ``retention`` keeps (see the module doc)."""
    tz = tz or ZoneInfo("UTC")
    newest_first = sorted(backups, key=lambda b: (_aware(b.at), b.id), reverse=True)
    kept: set[int] = {newest_first[0].id} if newest_first else set()
    periods = (
        (retention.daily, lambda d: d.isoformat()),
        (retention.weekly, lambda d: "{}-W{:02d}".format(*d.isocalendar()[:2])),
        (retention.monthly, lambda d: f"{d.year}-{d.month:02d}"),
    )
    for count, period in periods:
        seen: set[str] = set()
        for b in newest_first:
            if len(seen) >= count:
                break
            key = period(_aware(b.at).astimezone(tz).date())
            if key not in seen:
                seen.add(key)
                kept.add(b.id)
    return kept


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# -- applying it --------------------------------------------------------------------------


def machine_backups(db: DbSession, machine_id: int, *, backups_only: bool = False) -> list[Image]:
    """The images captured from ``machine_id`` (by backups only, if asked), newest first."""
    q = (
        select(Image, Capture)
        .join(Capture, col(Capture.image_id) == Image.id)
        .where(Capture.machine_id == machine_id)
    )
    if backups_only:
        q = q.where(Capture.backup)
    rows = db.exec(q.order_by(col(Image.created_at).desc(), col(Image.id).desc()))
    return [image for image, _ in rows if not image.source.get("deleted")]


def backups_public(db: DbSession, machine_id: int) -> list[BackupPublic]:
    """The images captured from ``machine_id``, newest first, with what each uploaded."""
    get_machine(db, machine_id)
    out = []
    for image in machine_backups(db, machine_id):
        cap = db.exec(select(Capture).where(Capture.image_id == image.id)).first()
        assert cap is not None
        out.append(
            BackupPublic(
                image_id=image.id or 0,
                name=image.name,
                created_at=image.created_at,
                data_bytes=image.data_bytes,
                stored_bytes=image.stored_bytes,
                session_id=cap.session_id,
                backup=cap.backup,
                uploaded_bytes=cap.uploaded_bytes,
                reused_bytes=cap.reused_bytes,
            )
        )
    return out


def prune(
    db: DbSession,
    bus: EventBus | None,
    store: ImageStore,
    machine_id: int,
    retention: Retention,
    tz: ZoneInfo | None = None,
) -> list[str]:
    """Delete the backups of ``machine_id`` that ``retention`` does not keep; returns their
    names. One that cannot be deleted now (a session uses it, the store is busy) is logged
    and left for the next prune."""
    images = machine_backups(db, machine_id, backups_only=True)
    kept = keep([Dated(i.id or 0, i.created_at) for i in images], retention, tz)
    deleted = []
    for image in images:
        if image.id in kept:
            continue
        name = image.name
        try:
            delete_image(db, store, image)
        except ServiceError as exc:
            log.warning("machine %s: backup %s kept for now: %s", machine_id, name, exc)
            continue
        deleted.append(name)
        record(
            db,
            bus,
            "image.deleted",
            actor="retention",
            machine_id=machine_id,
            message=f"backup {name} of machine {machine_id} pruned by retention",
        )
    return deleted


def after_capture(
    db: DbSession, bus: EventBus | None, store: ImageStore, session_id: int
) -> list[str]:
    """Once a backup capture succeeded: prune its machine's backups by its schedule's
    retention (default retention if the schedule is gone). Returns the pruned names."""
    cap = db.get(Capture, session_id)
    if cap is None or not cap.backup or cap.image_id is None:
        return []
    schedule = db.get(Schedule, cap.schedule_id) if cap.schedule_id is not None else None
    retention = Retention.model_validate(schedule.retention if schedule else {})
    tz = _zone(schedule.timezone if schedule else "UTC")
    return prune(db, bus, store, cap.machine_id, retention, tz)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


# -- scheduled runs -----------------------------------------------------------------------


def backup_name(db: DbSession, store: ImageStore, machine: Machine, day: date) -> str:
    """``<machine>/<YYYY-MM-DD>``, with ``-2``, ``-3`` ... when that name is taken (the
    machine's name made an image name: other characters become ``-``; no name: its MAC)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", machine.name or machine.mac.replace(":", "-"))
    base = base.strip("-.") or f"machine-{machine.id}"
    stem = f"{base[:100]}/{day.isoformat()}"
    for n in range(1, 1000):
        name = stem if n == 1 else f"{stem}-{n}"
        if not _taken(db, store, name):
            return name
    raise Conflict(f"no free backup name for machine {machine.id} on {day}")


def _taken(db: DbSession, store: ImageStore, name: str) -> bool:
    if store.exists(name) or db.exec(select(Image).where(Image.name == name)).first():
        return True
    q = select(Session).where(Session.kind == "capture", Session.target_image == name)
    return db.exec(q).first() is not None


def schedule_targets(db: DbSession, schedule: Schedule) -> list[int]:
    """The machines of a schedule: its group's members, then its own machine ids."""
    targets: list[int] = []
    if schedule.group_id is not None and db.get(Group, schedule.group_id) is not None:
        targets += group_member_ids(db, schedule.group_id)
    for mid in schedule.machine_ids:
        if mid not in targets and db.get(Machine, mid) is not None:
            targets.append(mid)
    return targets


def open_backups(
    db: DbSession,
    bus: EventBus | None,
    settings: Settings,
    store: ImageStore,
    schedule: Schedule,
    run_id: int,
    due: datetime,
) -> tuple[list[int], list[str]]:
    """One pending capture session per machine of ``schedule``'s backup run ``run_id``, named
    ``<machine>/<local date of due>``. Returns the session ids and, for machines left out
    (busy in another session, ...), why."""
    day = _aware(due).astimezone(_zone(schedule.timezone)).date()
    created, problems = [], []
    for mid in schedule_targets(db, schedule):
        machine = get_machine(db, mid)
        try:  # create_capture checks everything before it adds a row
            name = backup_name(db, store, machine, day)
            req = CaptureCreate(machine_id=mid, target_image=name)
            actor = f"schedule:{schedule.id}"
            s = create_capture(
                db, bus, settings, store, req, actor, schedule_id=schedule.id, run_id=run_id
            )
            created.append(s.id or 0)
        except ServiceError as exc:
            problems.append(f"machine {machine.name or machine.mac}: {exc}")
    return created, problems


def run_sessions(db: DbSession, run_id: int) -> list[Session]:
    """The capture sessions of backup run ``run_id``."""
    q = (
        select(Session)
        .join(Capture, col(Capture.session_id) == Session.id)
        .where(Capture.schedule_run_id == run_id)
        .order_by(col(Session.id))
    )
    return list(db.exec(q))


def forget_schedule(db: DbSession, schedule_id: int) -> None:
    """Unlink the captures of a schedule being deleted (its backup images stay)."""
    for cap in db.exec(select(Capture).where(Capture.schedule_id == schedule_id)):
        cap.schedule_id = cap.schedule_run_id = None
        cap.backup = False  # no retention prunes it any more
        db.add(cap)
    db.flush()


def open_backup_captures(db: DbSession) -> list[tuple[Session, Capture]]:
    """Backup capture sessions still pending or running, with their Capture rows."""
    q = (
        select(Session, Capture)
        .join(Capture, col(Capture.session_id) == Session.id)
        .where(col(Capture.schedule_run_id).is_not(None))
        .where(col(Session.state).in_(SESSION_ACTIVE))
    )
    return list(db.exec(q))


# -- restore ------------------------------------------------------------------------------


def restore(
    db: DbSession,
    bus: EventBus | None,
    settings: Settings,
    machine_id: int,
    req: RestoreRequest,
    actor: str,
) -> Session:
    """A running deploy session of image ``req.image_id`` to machine ``machine_id`` alone
    (the caller launches its sender). Raises NotFound, Conflict (machine busy, image
    deleted)."""
    get_machine(db, machine_id)
    image = get_image(db, req.image_id)
    if image.source.get("deleted"):
        raise Conflict(f"image {image.name!r} was deleted; pick another backup")
    create = SessionCreate(
        image=image.name,
        machine_ids=[machine_id],
        start_policy=StartPolicy(start="now", min_receivers=1),
        after=req.after,
        disk_rule=req.disk_rule,
    )
    s = svc.create_session(db, bus, settings, create, actor)
    svc.mark_running(db, bus, s, actor)
    record(
        db,
        bus,
        "machine.restore",
        actor=actor,
        session_id=s.id,
        machine_id=machine_id,
        message=f"restore of machine {machine_id} from image {image.name} (session {s.id})",
    )
    return s
