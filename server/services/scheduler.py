"""Schedules: when deployments run (pure time arithmetic), and the task that runs them.

Every due time is computed as a *wall-clock* time in the schedule's IANA time zone, then
placed on the UTC line with ``fold=0``: a time that occurs twice (autumn) runs once, at its
first occurrence; a time that does not exist (spring) runs when the clock has jumped past it
(02:30 in Europe/Berlin on the last Sunday of March runs at 03:30 CEST). croniter reads the
cron expression, on naive wall-clock times (its own zone handling runs a 02:30 job twice on
the autumn night).

A run of a schedule (``Scheduler.tick``): ``wake_lead`` seconds before the due time the
session is created ``pending`` (so the network-boot route boots its machines into the
client, server/services/boot.py) and the machines are sent magic packets; at the due time it
starts. A run missed while the server was down starts late if it is at most ``grace`` seconds
late (and its window has not ended), else it is recorded ``missed``.

A schedule of action ``backup`` (issue 10) creates one pending capture session per machine
instead (server/services/backups.py: named ``<machine>/<date>``, pruned by its retention once
a backup succeeds); at its window end, captures that never started are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time as _time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy.engine import Engine
from sqlmodel import Session as DbSession
from sqlmodel import col, select

from server.config import Settings
from server.db import db_session
from server.events import EventBus
from server.images.store import ImageStore
from server.models import (
    Group,
    Machine,
    Schedule,
    ScheduleBase,
    ScheduleRun,
    ScheduleRunPublic,
    Session,
    SessionCreate,
    StartPolicy,
)
from server.services import backups, capture, wol
from server.services import sessions as svc
from server.services.audit import record
from server.services.errors import Conflict, Invalid, NotFound, ServiceError

log = logging.getLogger(__name__)

# -- pure time arithmetic -----------------------------------------------------------------


class ScheduleError(ValueError):
    """A schedule that cannot be computed (bad zone, cron expression, date or time)."""


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ScheduleError when it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin or UTC"
        ) from None


def _hhmm(text: str, what: str) -> tuple[int, int]:
    try:
        h, m = (int(x) for x in text.split(":"))
    except ValueError:
        h = m = -1
    if not (0 <= h <= 23 and 0 <= m <= 59 and len(text) == 5):
        raise ScheduleError(f"{what} {text!r} must be a time HH:MM, such as 02:00")
    return h, m


def check(s: ScheduleBase) -> None:
    """ScheduleError naming the first field of ``s`` that makes no sense."""
    zone(s.timezone)
    if s.action == "deploy" and not s.image:
        raise ScheduleError("a deploy schedule needs an image: name the image to deploy")
    if s.action == "backup" and s.image:
        raise ScheduleError(
            "a backup schedule takes no image: each run captures its machines as <machine>/<date>"
        )
    if s.start_policy.at is not None or s.start_policy.not_after is not None:
        raise ScheduleError(
            "a schedule's start_policy takes no 'at' or 'not_after': each run starts at its "
            "due time, and window_end sets the window; use min_receivers, quiet_period, "
            "max_wait and minimum"
        )
    if s.window_end:
        _hhmm(s.window_end, "window_end")
    if s.kind == "once":
        try:
            datetime.fromisoformat(s.once_at)
        except ValueError:
            raise ScheduleError(
                f"once_at {s.once_at!r} must be a local date and time like 2026-11-29T02:00"
            ) from None
    elif s.kind == "cron":
        if len(s.cron.split()) != 5 or not croniter.is_valid(s.cron):
            raise ScheduleError(
                f"cron {s.cron!r} is not a 5-field cron expression (like '0 2 * * sun')"
            )
    else:
        _hhmm(s.time, "time")
        if not s.weekdays:
            raise ScheduleError("weekdays must list at least one day (0 = Monday .. 6 = Sunday)")


def _on_line(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of wall-clock time ``wall`` in ``tz`` (fold=0: see the module doc)."""
    return wall.replace(tzinfo=tz, fold=0).astimezone(UTC)


def _walls(s: ScheduleBase, start: datetime) -> Iterator[datetime]:
    """Candidate wall-clock times of ``s`` from ``start`` (naive local) on, in order."""
    if s.kind == "once":
        yield datetime.fromisoformat(s.once_at).replace(tzinfo=None)
    elif s.kind == "cron":
        it = croniter(s.cron, start - timedelta(minutes=1))
        while True:
            yield it.get_next(datetime)
    else:
        h, m = _hhmm(s.time, "time")
        day = start.date()
        while True:
            if day.weekday() in s.weekdays:
                yield datetime(day.year, day.month, day.day, h, m)
            day += timedelta(days=1)


def next_run(s: ScheduleBase, after: datetime) -> datetime | None:
    """The first due time (UTC) of ``s`` strictly after ``after``; None when none is left."""
    tz = zone(s.timezone)
    # from a day earlier: a wall time in a spring gap lands later on the UTC line
    start = after.astimezone(tz).replace(tzinfo=None) - timedelta(days=1)
    for i, wall in enumerate(_walls(s, start)):
        at = _on_line(wall, tz)
        if at > after:
            return at
        if i > 5000:
            break
    return None


def upcoming(s: ScheduleBase, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` due times (UTC) of ``s`` after ``after``."""
    out: list[datetime] = []
    t: datetime | None = after
    while len(out) < count and t is not None:
        t = next_run(s, t)
        if t is not None:
            out.append(t)
    return out


def window_end(s: ScheduleBase, due: datetime) -> datetime | None:
    """The end of the maintenance window of the run due at ``due`` (UTC): the first
    ``window_end`` wall-clock time after it; None without a window."""
    if not s.window_end:
        return None
    tz = zone(s.timezone)
    h, m = _hhmm(s.window_end, "window_end")
    local = due.astimezone(tz)
    for days in range(3):
        d = local.date() + timedelta(days=days)
        end = _on_line(datetime(d.year, d.month, d.day, h, m), tz)
        if end > due:
            return end
    return None


# -- the scheduler task -------------------------------------------------------------------


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


Launch = Callable[[int], None]


class Scheduler:
    """Fires due schedules: ``await run()`` in the lifespan; ``tick(db, now)`` is one look
    (tests call it with their own ``now``). ``wake`` sends magic packets (blocking)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        bus: EventBus | None,
        launch: Launch,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        wake: Callable[..., int] = wol.send_wake,
    ) -> None:
        self.engine, self.settings, self.bus, self.launch = engine, settings, bus, launch
        self.clock, self.wake = clock, wake
        self.store = ImageStore(settings.image_root)

    async def run(self) -> None:
        """Look at the schedules every ``scheduler_tick`` seconds, until cancelled."""
        while True:
            try:
                started = await asyncio.to_thread(self._tick_once)
                for sid in started:
                    self.launch(sid)
            except Exception:  # one bad look must not stop the schedules
                log.exception("the scheduler's look at the schedules failed")
            await asyncio.sleep(self.settings.scheduler_tick)

    def _tick_once(self) -> list[int]:
        with db_session(self.engine) as db:
            capture.release_ended_pins(db, self.store)
            return self.tick(db, self.clock())

    def close_backups(self, db: DbSession, now: datetime) -> int:
        """At a backup run's window end, cancel its captures whose machine never started
        (and, with ``on_window_end`` "cancel", those still uploading); returns how many."""
        ended = 0
        for session, cap in backups.open_backup_captures(db):
            run = db.get(ScheduleRun, cap.schedule_run_id)
            s = db.get(Schedule, cap.schedule_id) if cap.schedule_id is not None else None
            if run is None or s is None:
                continue
            spec = ScheduleBase.model_validate(s, from_attributes=True)
            end = window_end(spec, _aware(run.due_at))
            if end is None or now < end:
                continue
            rows = svc.session_machines(db, session.id or 0)
            started = any(r.state == "receiving" for r in rows)
            if started and s.on_window_end != "cancel":
                continue
            why = "the maintenance window ended" + ("" if started else " before it started")
            svc.cancel(db, self.bus, session, f"schedule:{s.id}", why)
            ended += 1
        if ended:
            capture.release_ended_pins(db, self.store)
        return ended

    def tick(self, db: DbSession, now: datetime) -> list[int]:
        """Handle every schedule due at ``now``; returns the sessions to launch."""
        started: list[int] = []
        self.close_backups(db, now)
        q = select(Schedule).where(Schedule.enabled).where(col(Schedule.next_run_at).is_not(None))
        for s in db.exec(q):
            sid = self._step(db, s, now)
            if sid is not None:
                started.append(sid)
        return started

    def _step(self, db: DbSession, s: Schedule, now: datetime) -> int | None:
        due = _aware(s.next_run_at or now)
        spec = ScheduleBase.model_validate(s, from_attributes=True)
        end = window_end(spec, due)
        run = db.exec(
            select(ScheduleRun).where(ScheduleRun.schedule_id == s.id, ScheduleRun.due_at == due)
        ).first()
        if run is None and self._too_late(s, due, end, now):
            late = (now - due).total_seconds()
            why = f"the server was not running at the due time; {late:.0f} s late"
            self._record_run(db, s, due, "missed", why + f" (grace {s.grace:g} s)")
            self._advance(db, s, spec, max(now, due))
            return None
        if run is None and now >= due - timedelta(seconds=s.wake_lead):
            run = self._open(db, s, spec, due, end)
            if run.state == "failed":
                self._advance(db, s, spec, due)
                return None
        if run is None or now < due:
            return None
        self._advance(db, s, spec, due)
        if run.state == "waking" and self._too_late(s, due, end, now):
            self._give_up(db, run, now - due)
            return None
        return self._start(db, run)

    @staticmethod
    def _too_late(s: Schedule, due: datetime, end: datetime | None, now: datetime) -> bool:
        return now > due + timedelta(seconds=s.grace) or (end is not None and now >= end)

    def _give_up(self, db: DbSession, run: ScheduleRun, late: timedelta) -> None:
        """The server was down from the wake-up past the grace: the run is missed, and its
        pending session is cancelled (its machines boot their disks again)."""
        why = f"the server was not running at the due time; {late.total_seconds():.0f} s late"
        for session in self._run_sessions(db, run):
            if session.state == "pending":
                svc.cancel(db, self.bus, session, f"schedule:{run.schedule_id}", f"missed: {why}")
        run.state, run.reason = "missed", why
        db.add(run)

    def _open(
        self, db: DbSession, s: Schedule, spec: ScheduleBase, due: datetime, end: datetime | None
    ) -> ScheduleRun:
        """Create the run's session (pending) and wake its machines."""
        if s.action == "backup":
            return self._open_backup(db, s, due)
        policy = StartPolicy.model_validate(
            {
                **s.start_policy,
                "start": "manual",
                "not_after": end,
                "at_window_end": s.on_window_end,
            }
        )
        req = SessionCreate(
            image=s.image,
            group_id=s.group_id,
            machine_ids=s.machine_ids,
            start_policy=policy,
            rate_bps=s.rate_bps,
        )
        actor = f"schedule:{s.id}"
        try:
            session = svc.create_session(db, self.bus, self.settings, req, actor)
        except ServiceError as exc:
            return self._record_run(
                db, s, due, "failed", f"the session could not be created: {exc}"
            )
        run = self._record_run(db, s, due, "waking", "", session.id)
        if s.wake_lead > 0:
            targets = [r.machine_id for r in svc.session_machines(db, session.id or 0)]
            run.woken, run.reason = self._wake(db, s, targets, session.id)
        db.add(run)
        return run

    def _open_backup(self, db: DbSession, s: Schedule, due: datetime) -> ScheduleRun:
        """A backup run: one pending capture session per machine (backups.open_backups)."""
        run = self._record_run(db, s, due, "waking", "")
        ids, problems = backups.open_backups(
            db, self.bus, self.settings, self.store, s, run.id or 0, due
        )
        reason = "; ".join(problems)
        if not ids:
            run.state = "failed"
            run.reason = "no capture session could be created: " + (
                reason or "the schedule has no machines"
            )
        elif s.wake_lead > 0:
            targets = [r.machine_id for sid in ids for r in svc.session_machines(db, sid)]
            run.woken, why = self._wake(db, s, targets, None)
            run.reason = "; ".join(x for x in (reason, why) if x)
        else:
            run.reason = reason
        db.add(run)
        return run

    def _run_sessions(self, db: DbSession, run: ScheduleRun) -> list[Session]:
        """The session of a deploy run, or the capture sessions of a backup run."""
        if run.session_id is not None:
            return [svc.get_session(db, run.session_id)]
        return backups.run_sessions(db, run.id or 0)

    def _wake(
        self, db: DbSession, s: Schedule, targets: list[int], session_id: int | None
    ) -> tuple[int, str]:
        """Magic packets for the machines ``targets``; (machines woken, problem)."""
        machines = db.exec(select(Machine).where(col(Machine.id).in_(targets)))
        by_target: dict[tuple[str, int], list[str]] = {}
        for m in machines:
            group = db.get(Group, m.group_id) if m.group_id is not None else None
            addr = (group.wol_broadcast if group else "") or self.settings.wol_broadcast
            port = (group.wol_port if group else None) or self.settings.wol_port
            by_target.setdefault((addr, port), []).append(m.mac)
        woken, problems = 0, []
        for (addr, port), macs in by_target.items():
            try:
                woken += self.wake(
                    macs,
                    addr,
                    port,
                    repeats=self.settings.wol_repeats,
                    interval=self.settings.wol_interval,
                )
            except (OSError, ValueError) as exc:
                problems.append(f"waking {len(macs)} machines via {addr}:{port} failed: {exc}")
        record(
            db,
            self.bus,
            "schedule.woken",
            actor=f"schedule:{s.id}",
            session_id=session_id,
            message=f"schedule {s.name}: sent magic packets to {woken} machines",
        )
        return woken, "; ".join(problems)

    def _start(self, db: DbSession, run: ScheduleRun) -> int | None:
        if run.session_id is None:
            return self._start_backups(db, run)
        session = svc.get_session(db, run.session_id or 0)
        if session.state != "pending":
            run.state, run.reason = "failed", f"its session was {session.state} at the due time"
            db.add(run)
            return None
        svc.mark_running(db, self.bus, session, f"schedule:{run.schedule_id}")
        run.state = "started"
        db.add(run)
        return session.id

    def _start_backups(self, db: DbSession, run: ScheduleRun) -> None:
        """Start the run's pending capture sessions (no sender to launch: agents upload)."""
        started = 0
        for session in backups.run_sessions(db, run.id or 0):
            if session.state == "pending":
                svc.mark_running(db, self.bus, session, f"schedule:{run.schedule_id}")
                started += 1
        if started:
            run.state = "started"
        else:
            run.state, run.reason = "failed", "its capture sessions had all ended at the due time"
        db.add(run)
        return None

    def _record_run(
        self,
        db: DbSession,
        s: Schedule,
        due: datetime,
        state: str,
        reason: str,
        session_id: int | None = None,
    ) -> ScheduleRun:
        run = ScheduleRun(
            schedule_id=s.id or 0, due_at=due, state=state, reason=reason, session_id=session_id
        )
        db.add(run)
        db.flush()
        record(
            db,
            self.bus,
            f"schedule.{state}",
            actor=f"schedule:{s.id}",
            session_id=session_id,
            message=f"schedule {s.name}: run due {due.isoformat()} {state}"
            + (f": {reason}" if reason else ""),
        )
        return run

    def _advance(self, db: DbSession, s: Schedule, spec: ScheduleBase, after: datetime) -> None:
        s.next_run_at = next_run(spec, after)
        db.add(s)


def clock_from(fn: Callable[[], float] = _time.time) -> Callable[[], datetime]:
    """A datetime clock from a seconds clock (tests inject one)."""
    return lambda: datetime.fromtimestamp(fn(), UTC)


# -- the API's services -------------------------------------------------------------------


def create_schedule(db: DbSession, req: ScheduleBase, actor: str, now: datetime) -> Schedule:
    """A new schedule; Invalid for one that cannot be computed, Conflict for a taken name."""
    _valid(req)
    if db.exec(select(Schedule).where(Schedule.name == req.name)).first() is not None:
        raise Conflict(f"a schedule named {req.name!r} exists already")
    s = Schedule(**req.model_dump(mode="json"), created_by=actor)
    s.next_run_at = next_run(req, now) if req.enabled else None
    db.add(s)
    db.flush()
    return s


def update_schedule(db: DbSession, s: Schedule, req: ScheduleBase, now: datetime) -> Schedule:
    """Replace ``s``'s settings with ``req``; its next run is computed afresh."""
    _valid(req)
    for key, value in req.model_dump(mode="json").items():
        setattr(s, key, value)
    s.next_run_at = next_run(req, now) if req.enabled else None
    db.add(s)
    return s


def get_schedule(db: DbSession, schedule_id: int) -> Schedule:
    s = db.get(Schedule, schedule_id)
    if s is None:
        raise NotFound(f"no schedule with id {schedule_id}")
    return s


def delete_schedule(db: DbSession, s: Schedule) -> None:
    """Delete ``s`` and its history (the sessions it created stay; its backups stay too and
    are no longer pruned)."""
    backups.forget_schedule(db, s.id or 0)
    for run in db.exec(select(ScheduleRun).where(ScheduleRun.schedule_id == s.id)):
        db.delete(run)
    db.flush()  # the runs first: without a relationship the flush may order them last
    db.delete(s)


def history(db: DbSession, schedule_id: int, limit: int = 100) -> list[ScheduleRunPublic]:
    """The schedule's runs, newest first, with their sessions' states."""
    q = select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id)
    out = []
    for run in db.exec(q.order_by(col(ScheduleRun.due_at).desc()).limit(limit)):
        pub = ScheduleRunPublic.model_validate(run, from_attributes=True)
        if run.session_id is not None:
            pub.session_state = svc.get_session(db, run.session_id).state
        out.append(pub)
    return out


def _valid(req: ScheduleBase) -> None:
    try:
        check(req)
    except ScheduleError as exc:
        raise Invalid(str(exc)) from None
