"""Schedules: due times in a named zone across DST, window ends, and the scheduler's runs
(wake, start, missed after downtime) on a real database with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apitest import *  # noqa: F403
from sqlmodel import select

from server.config import Settings
from server.db import db_session, make_engine, migrate
from server.models import Group, Image, Machine, Schedule, ScheduleBase, ScheduleRun
from server.models import Session as DeploySession
from server.services.scheduler import (
    ScheduleError,
    Scheduler,
    check,
    next_run,
    upcoming,
    window_end,
)

BERLIN = "Europe/Berlin"


def sched(**kw: Any) -> ScheduleBase:
    base: dict[str, Any] = {"name": "lab-b", "image": "win11", "timezone": BERLIN}
    return ScheduleBase(**{**base, **kw})


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


def test_weekly_runs_on_the_named_days_at_local_time() -> None:
    s = sched(kind="weekly", weekdays=[6], time="02:00")  # Sundays 02:00 Berlin
    # 2026-11-26 is a Thursday; Sunday 29th 02:00 CET = 01:00 UTC
    assert upcoming(s, utc(2026, 11, 26, 1, 35), 2) == [utc(2026, 11, 29, 1), utc(2026, 12, 6, 1)]


def test_cron_next_run_in_the_zone() -> None:
    s = sched(kind="cron", cron="0 2 * * sun")
    assert next_run(s, utc(2026, 11, 26)) == utc(2026, 11, 29, 1)
    # summer: CEST is UTC+2
    assert next_run(s, utc(2026, 7, 1)) == utc(2026, 7, 5, 0)


@pytest.mark.parametrize("kind", ["cron", "weekly"])
def test_spring_forward_a_time_in_the_gap_runs_once_after_the_jump(kind: str) -> None:
    # 2026-03-29: Berlin jumps from 02:00 CET to 03:00 CEST; 02:30 does not exist
    s = sched(kind=kind, cron="30 2 * * *", weekdays=list(range(7)), time="02:30")
    runs = upcoming(s, utc(2026, 3, 28, 12), 3)
    assert runs == [utc(2026, 3, 29, 1, 30), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]
    assert runs[0].astimezone(check_zone()).strftime("%H:%M %Z") == "03:30 CEST"


@pytest.mark.parametrize("kind", ["cron", "weekly"])
def test_fall_back_a_time_that_occurs_twice_runs_once(kind: str) -> None:
    # 2026-10-25: Berlin goes from 03:00 CEST back to 02:00 CET; 02:30 happens twice
    s = sched(kind=kind, cron="30 2 * * *", weekdays=list(range(7)), time="02:30")
    runs = upcoming(s, utc(2026, 10, 24, 12), 3)
    assert runs == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30), utc(2026, 10, 27, 1, 30)]


def test_a_one_shot_runs_once() -> None:
    s = sched(kind="once", once_at="2026-11-29T02:00")
    assert next_run(s, utc(2026, 11, 26)) == utc(2026, 11, 29, 1)
    assert next_run(s, utc(2026, 11, 29, 1)) is None


def test_window_end_is_the_first_such_local_time_after_the_start() -> None:
    s = sched(kind="weekly", weekdays=[6], time="23:00", window_end="05:00")
    due = utc(2026, 11, 29, 22)  # Sunday 23:00 CET
    assert window_end(s, due) == utc(2026, 11, 30, 4)  # Monday 05:00 CET
    assert window_end(sched(kind="weekly", weekdays=[6], time="02:00"), due) is None


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"timezone": "Mars/Olympus"}, "time zone"),
        ({"kind": "cron", "cron": "61 * * * *"}, "cron"),
        ({"kind": "cron", "cron": "0 2 * *"}, "cron"),
        ({"kind": "weekly", "weekdays": [], "time": "02:00"}, "weekdays"),
        ({"kind": "weekly", "weekdays": [1], "time": "2:00"}, "time"),
        ({"kind": "once", "once_at": "Sunday"}, "once_at"),
        ({"kind": "weekly", "weekdays": [1], "time": "02:00", "window_end": "24:00"}, "window"),
    ],
)
def test_bad_schedules_are_refused_naming_the_field(fields: dict[str, Any], word: str) -> None:
    with pytest.raises(ScheduleError, match=word):
        check(sched(**fields))


def check_zone() -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo(BERLIN)


# -- the scheduler on a real database -----------------------------------------------------


class World:
    """A database with an image, a group of 3 machines and a schedule; a fake waker."""

    def __init__(self, settings: Settings, **schedule: Any) -> None:
        self.engine = make_engine(settings.db_url)
        migrate(self.engine)
        self.woken: list[tuple[list[str], str, int]] = []
        with db_session(self.engine) as db:
            db.add(
                Image(
                    name="win11",
                    digest="0" * 64,
                    image_size=1,
                    stored_bytes=1,
                    data_bytes=1,
                    block_size=1,
                    block_count=1,
                    data_blocks=1,
                    zero_blocks=0,
                )
            )
            g = Group(name="lab-b", wol_broadcast="10.9.0.255", wol_port=4009)
            db.add(g)
            db.flush()
            for i in range(3):
                db.add(Machine(mac=f"52:54:00:00:00:0{i}", group_id=g.id))
            spec = sched(group_id=g.id, **schedule)
            row = Schedule(**spec.model_dump(mode="json"))
            row.next_run_at = next_run(spec, utc(2026, 11, 26))
            db.add(row)
        self.scheduler = Scheduler(self.engine, settings, None, lambda _sid: None, wake=self.wake)

    def wake(self, macs: list[str], addr: str, port: int, **_kw: Any) -> int:
        self.woken.append((sorted(macs), addr, port))
        return len(macs)

    def tick(self, now: datetime) -> list[int]:
        with db_session(self.engine) as db:
            return self.scheduler.tick(db, now)

    def runs(self) -> list[ScheduleRun]:
        with db_session(self.engine) as db:
            return list(db.exec(select(ScheduleRun).order_by(ScheduleRun.id)))

    def schedule(self) -> Schedule:
        with db_session(self.engine) as db:
            return db.exec(select(Schedule)).one()

    def session(self, sid: int) -> DeploySession:
        with db_session(self.engine) as db:
            s = db.get(DeploySession, sid)
            assert s is not None
            return s


SUNDAY_2AM = utc(2026, 11, 29, 1)


def test_wake_lead_creates_the_pending_session_and_wakes_the_group(settings: Settings) -> None:
    w = World(
        settings,
        kind="weekly",
        weekdays=[6],
        time="02:00",
        wake_lead=600,
        window_end="05:00",
        on_window_end="cancel",
    )
    assert w.tick(SUNDAY_2AM - timedelta(seconds=601)) == []
    assert w.runs() == []
    assert w.tick(SUNDAY_2AM - timedelta(seconds=600)) == []
    (run,) = w.runs()
    assert (run.state, run.woken) == ("waking", 3)
    macs = [f"52:54:00:00:00:0{i}" for i in range(3)]
    assert w.woken == [(macs, "10.9.0.255", 4009)]
    assert w.session(run.session_id or 0).state == "pending"  # PXE boots them into the client
    started = w.tick(SUNDAY_2AM)
    assert started == [run.session_id]
    s = w.session(run.session_id or 0)
    assert s.state == "running"
    assert s.start_policy["not_after"].startswith("2026-11-29T04:00")
    assert s.start_policy["at_window_end"] == "cancel"
    assert w.runs()[0].state == "started"
    next_at = w.schedule().next_run_at
    assert next_at is not None and next_at.replace(tzinfo=UTC) == utc(2026, 12, 6, 1)
    assert w.tick(SUNDAY_2AM + timedelta(seconds=5)) == []  # nothing twice


def test_a_run_missed_within_the_grace_runs_late(settings: Settings) -> None:
    w = World(settings, kind="weekly", weekdays=[6], time="02:00", grace=900)
    started = w.tick(SUNDAY_2AM + timedelta(seconds=899))
    assert len(started) == 1 and w.runs()[0].state == "started"
    assert w.woken == []  # no wake lead: no magic packets


def test_a_run_missed_beyond_the_grace_is_recorded_missed(settings: Settings) -> None:
    w = World(settings, kind="weekly", weekdays=[6], time="02:00", grace=900)
    assert w.tick(SUNDAY_2AM + timedelta(hours=3)) == []
    (run,) = w.runs()
    assert run.state == "missed" and "10800 s late" in run.reason
    assert run.session_id is None
    next_at = w.schedule().next_run_at
    assert next_at is not None and next_at.replace(tzinfo=UTC) == utc(2026, 12, 6, 1)


def test_a_run_whose_window_ended_during_downtime_is_missed(settings: Settings) -> None:
    w = World(settings, kind="weekly", weekdays=[6], time="02:00", grace=86_400, window_end="02:10")
    assert w.tick(SUNDAY_2AM + timedelta(minutes=11)) == []
    assert w.runs()[0].state == "missed"


def test_a_run_that_cannot_create_its_session_is_failed_with_the_reason(
    settings: Settings,
) -> None:
    w = World(settings, kind="once", once_at="2026-11-29T02:00")
    with db_session(w.engine) as db:
        db.exec(select(Image)).one().name = "renamed"
    assert w.tick(SUNDAY_2AM) == []
    (run,) = w.runs()
    assert run.state == "failed" and "no image named 'win11'" in run.reason
    assert w.schedule().next_run_at is None  # a one-shot is done


def test_a_run_woken_before_downtime_and_due_beyond_the_grace_is_missed(
    settings: Settings,
) -> None:
    w = World(settings, kind="weekly", weekdays=[6], time="02:00", wake_lead=600, grace=60)
    w.tick(SUNDAY_2AM - timedelta(seconds=300))
    (run,) = w.runs()
    assert run.state == "waking"
    assert w.tick(SUNDAY_2AM + timedelta(seconds=61)) == []  # the server was down meanwhile
    (run,) = w.runs()
    assert run.state == "missed" and "61 s late" in run.reason
    s = w.session(run.session_id or 0)
    assert s.state == "cancelled" and s.reason.startswith("missed:")


def test_a_session_cancelled_between_wake_and_due_time_is_a_failed_run(settings: Settings) -> None:
    w = World(settings, kind="weekly", weekdays=[6], time="02:00", wake_lead=600)
    w.tick(SUNDAY_2AM - timedelta(seconds=600))
    with db_session(w.engine) as db:
        s = db.get(DeploySession, w.runs()[0].session_id)
        assert s is not None
        s.state = "cancelled"
    assert w.tick(SUNDAY_2AM) == []
    (run,) = w.runs()
    assert run.state == "failed" and "cancelled at the due time" in run.reason


def test_woken_machines_network_boot_into_the_client_for_the_runs_session(
    settings: Settings,
) -> None:
    from server.services.boot import BootRequest, decide

    w = World(settings, kind="weekly", weekdays=[6], time="02:00", wake_lead=600, grace=60)
    with db_session(w.engine) as db:
        before = decide(db, None, BootRequest("52:54:00:00:00:01"), "local")
    assert before.action == "local"
    w.tick(SUNDAY_2AM - timedelta(seconds=600))
    sid = w.runs()[0].session_id
    with db_session(w.engine) as db:
        woken = decide(db, None, BootRequest("52:54:00:00:00:01"), "local")
    assert (woken.action, woken.session_id) == ("deploy", sid)
    w.tick(SUNDAY_2AM + timedelta(seconds=61))  # missed: the pending session is cancelled
    with db_session(w.engine) as db:
        after = decide(db, None, BootRequest("52:54:00:00:00:01"), "local")
    assert after.action == "local"


def test_a_schedule_policy_with_a_fixed_start_time_or_window_is_refused() -> None:
    at = {"at": "2026-11-29T02:00:00Z"}
    with pytest.raises(ScheduleError, match="window_end"):
        check(sched(kind="weekly", weekdays=[6], time="02:00", start_policy=at))
