"""Scheduled backups: the retention rule, a backup run's capture sessions, and pruning that
frees only the blocks no kept image uses (docs/SCHEDULING.md "Backups")."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apitest import *  # noqa: F403
from apitest import Api
from capturetest import Agent, disk, enrolled, image_of
from sqlalchemy.engine import Engine
from sqlmodel import select

from server.db import db_session, make_engine
from server.images.store import ImageStore
from server.models import Image, Retention
from server.services import capture as cap
from server.services import sessions as svc
from server.services.backups import Dated, keep
from server.services.scheduler import Scheduler

DAY = timedelta(days=1)
#: Monday 30 November 2026, 02:00 UTC
MONDAY = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)


def _days_back(*days: int) -> list[Dated]:
    return [Dated(i, MONDAY - d * DAY) for i, d in enumerate(days)]


def test_retention_keeps_the_newest_of_each_recent_day_week_and_month() -> None:
    # ids 0..9: today, today (older), 1, 2, 8, 9, 20, 40, 70, 100 days back
    backups = _days_back(0, 0, 1, 2, 8, 9, 20, 40, 70, 100)
    backups[1] = Dated(1, MONDAY - timedelta(hours=1))
    assert keep(backups, Retention(daily=3, weekly=0, monthly=0)) == {0, 2, 3}
    # weeks (ISO, Monday first): 0 and 1 are this week, 2 and 3 the week before ...
    assert keep(backups, Retention(daily=0, weekly=3, monthly=0)) == {0, 2, 4}
    assert keep(backups, Retention(daily=0, weekly=0, monthly=3)) == {0, 7, 8}  # Nov, Oct, Sep
    assert keep(backups, Retention(daily=1, weekly=2, monthly=4)) == {0, 2, 7, 8, 9}


def test_retention_always_keeps_the_newest_and_counts_days_in_the_zone() -> None:
    assert keep(_days_back(3, 1, 2), Retention(daily=0, weekly=0, monthly=0)) == {1}
    assert keep([], Retention()) == set()
    # 23:30 and 00:30 UTC are one day in New York (18:30 and 19:30) but two in UTC
    half_past = MONDAY.replace(hour=0, minute=30)
    late = [Dated(1, half_past), Dated(2, half_past - timedelta(hours=1))]
    assert keep(late, Retention(daily=2, weekly=0, monthly=0)) == {1, 2}
    ny = ZoneInfo("America/New_York")
    assert keep(late, Retention(daily=2, weekly=0, monthly=0), ny) == {1}


@pytest.fixture
def engine(api: Api) -> Iterator[Engine]:
    e = make_engine(api.settings.db_url)
    yield e
    e.dispose()


class Woken:
    def __init__(self) -> None:
        self.macs: list[str] = []

    def __call__(self, macs: list[str], *_a: Any, **_kw: Any) -> int:
        self.macs += macs
        return len(macs)


def _schedule(api: Api, **kw: Any) -> dict[str, Any]:
    body = {"name": "nightly backup", "action": "backup", "kind": "once", **kw}
    r = api.post("/api/schedules", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_a_backup_run_captures_each_machine_as_machine_slash_date(api: Api, engine: Engine) -> None:
    a = enrolled(api, "52:54:00:ba:00:01", "pc a")
    b = enrolled(api, "52:54:00:ba:00:02")
    busy = enrolled(api, "52:54:00:ba:00:03", "busy")
    group = api.post("/api/groups", json={"name": "lab"}).json()
    members = [a.machine_id, b.machine_id, busy.machine_id]
    api.put(f"/api/groups/{group['id']}/machines", json={"machine_ids": members})
    api.post("/api/captures", json={"machine_id": busy.machine_id, "target_image": "other"})
    s = _schedule(api, group_id=group["id"], once_at="2026-11-30T03:00", wake_lead=600,
                  timezone="Europe/Berlin")  # fmt: skip
    woken = Woken()
    scheduler = Scheduler(engine, api.settings, None, lambda _sid: None, wake=woken)
    due = MONDAY  # 03:00 in Berlin
    with db_session(engine) as db:
        assert scheduler.tick(db, due - timedelta(seconds=600)) == []
    runs = api.get(f"/api/schedules/{s['id']}/runs").json()
    assert runs[0]["state"] == "waking" and runs[0]["woken"] == 2
    assert "busy" in runs[0]["reason"] and "active session" in runs[0]["reason"]
    assert sorted(woken.macs) == ["52:54:00:ba:00:01", "52:54:00:ba:00:02"]
    caps = api.get("/api/captures", params={"schedule_run_id": runs[0]["id"]}).json()
    names = sorted(c["target_image"] for c in caps)
    assert names == ["pc-02/2026-11-30", "pc-a/2026-11-30"]  # b took its hostname
    assert all(c["backup"] and c["session_state"] == "pending" for c in caps)
    assert a.assignment()["session_id"] is None  # pending: booted into the client, waiting
    with db_session(engine) as db:
        assert scheduler.tick(db, due) == []  # no sender to launch
    assert api.get(f"/api/schedules/{s['id']}/runs").json()[0]["state"] == "started"
    job = a.assignment()
    assert job["kind"] == "capture" and job["image"] == "pc-a/2026-11-30"


def test_a_taken_backup_name_gets_a_suffix(api: Api, engine: Engine) -> None:
    a = enrolled(api, "52:54:00:ba:00:04", "pc-b")
    _upload(api, a, "pc-b/2026-11-30", 1)
    _schedule(api, machine_ids=[a.machine_id], once_at="2026-11-30T02:00")
    scheduler = Scheduler(engine, api.settings, None, lambda _sid: None, wake=Woken())
    with db_session(engine) as db:
        scheduler.tick(db, MONDAY)
    assert a.assignment()["image"] == "pc-b/2026-11-30-2"


def _upload(api: Api, agent: Agent, name: str, seed: int, raw: list[bytes] | None = None) -> int:
    """A complete capture of ``raw`` (default: disk(seed)) by ``agent`` as ``name``."""
    if agent.session_id == 0 or name:
        r = api.post("/api/captures", json={"machine_id": agent.machine_id, "target_image": name})
        assert r.status_code == 201, r.text
        agent.session_id = r.json()["id"]
    return _finish(agent, raw or disk(seed))


def _finish(agent: Agent, raw: list[bytes]) -> int:
    img = image_of(raw)
    agent.upload(img)
    r = agent.manifest(img.data)
    assert r.status_code == 200, r.text
    return int(r.json()["image_id"])


def _backup(api: Api, engine: Engine, agent: Agent, schedule_id: int, name: str) -> None:
    """A running backup capture session of ``agent``'s machine for ``schedule_id``."""
    from server.models_capture import CaptureCreate

    with db_session(engine) as db:
        req = CaptureCreate(machine_id=agent.machine_id, target_image=name)
        store = ImageStore(api.settings.image_root)
        s = cap.create_capture(db, None, api.settings, store, req, "test", schedule_id=schedule_id)
        svc.mark_running(db, None, s, "test")
        agent.session_id = s.id or 0


def _age(engine: Engine, image_id: int, days: int) -> None:
    with db_session(engine) as db:
        image = db.get(Image, image_id)
        assert image is not None
        image.created_at = datetime.now(UTC) - days * DAY
        db.add(image)


def test_retention_prunes_old_backups_and_frees_only_unshared_blocks(
    api: Api, engine: Engine
) -> None:
    agent = enrolled(api, "52:54:00:ba:00:05", "pc-c")
    s = _schedule(api, machine_ids=[agent.machine_id], once_at="2030-01-01T02:00",
                  retention={"daily": 2, "weekly": 0, "monthly": 0})  # fmt: skip
    store = ImageStore(api.settings.image_root)
    base = disk(10, blocks=4, zero=())
    shared = base[0]
    oldest = [shared, base[1], base[2], base[3]]
    middle = [shared, disk(11, blocks=2, zero=())[1]]
    newest = [disk(12, blocks=1, zero=())[0]]
    golden = enrolled(api, "52:54:00:ba:00:06")
    kept_elsewhere = _upload(api, golden, "golden", 0, [base[3]])  # not a backup of pc-c
    ids = []
    for days, raw, name in ((2, oldest, "pc-c/1"), (1, middle, "pc-c/2"), (0, newest, "pc-c/3")):
        _backup(api, engine, agent, s["id"], name)
        ids.append(_finish(agent, raw))
        _age(engine, ids[-1], days)
    names = [i["name"] for i in api.get("/api/images").json()]
    assert "pc-c/1" not in names and {"pc-c/2", "pc-c/3", "golden"} <= set(names)
    assert not store.exists("pc-c/1")
    oldest_img, golden_img = image_of(oldest), image_of([base[3]])
    gone = set(oldest_img.payloads) - set(image_of(middle).payloads) - set(golden_img.payloads)
    assert len(gone) == 2 and not any(store.has_block(d) for d in gone)
    for keep_img in (image_of(middle), image_of(newest), golden_img):
        assert all(store.has_block(d) for d in keep_img.payloads)
    with db_session(engine) as db:
        row = db.exec(select(Image).where(Image.id == ids[0])).first()
        assert row is not None and row.source["deleted"]  # its session keeps its history
        assert row.name == f"pc-c/1@deleted-{ids[0]}"
    backups = api.get(f"/api/machines/{agent.machine_id}/backups").json()
    assert [b["name"] for b in backups] == ["pc-c/3", "pc-c/2"]
    assert kept_elsewhere in [i["id"] for i in api.get("/api/images").json()]


def test_a_backup_run_reports_what_each_capture_uploaded(api: Api, engine: Engine) -> None:
    agent = enrolled(api, "52:54:00:ba:00:07", "pc-d")
    s = _schedule(api, machine_ids=[agent.machine_id], once_at="2030-01-01T02:00")
    raw = disk(20, blocks=6, zero=())
    _backup(api, engine, agent, s["id"], "pc-d/a")
    _finish(agent, raw)
    _backup(api, engine, agent, s["id"], "pc-d/b")
    changed = [*raw[:5], disk(21, blocks=1, zero=())[0]]
    _finish(agent, changed)
    caps = api.get("/api/captures", params={"machine_id": agent.machine_id}).json()
    second, first = caps
    assert (first["uploaded_blocks"], first["reused_blocks"]) == (6, 0)
    assert (second["uploaded_blocks"], second["reused_blocks"]) == (1, 5)
    assert second["uploaded_bytes"] < first["uploaded_bytes"] / 3


def test_at_the_window_end_a_backup_that_never_started_is_cancelled(
    api: Api, engine: Engine
) -> None:
    up = enrolled(api, "52:54:00:ba:00:08", "up")
    down = enrolled(api, "52:54:00:ba:00:09", "down")
    _schedule(api, machine_ids=[up.machine_id, down.machine_id], once_at="2026-11-30T02:00",
              window_end="04:00", on_window_end="run-on")  # fmt: skip
    scheduler = Scheduler(engine, api.settings, None, lambda _sid: None, wake=Woken())
    with db_session(engine) as db:
        scheduler.tick(db, MONDAY)
    job = up.assignment()
    up.session_id = job["session_id"]
    body = {"session_id": up.session_id, "phase": "reading",
            "samples": [{"bytes_done": 1, "bytes_total": 10}]}  # fmt: skip
    r = api.client.post("/api/agent/progress", headers=up.headers, json=body)
    assert r.status_code == 200 and r.json()["cancel"] is False
    with db_session(engine) as db:
        assert scheduler.close_backups(db, MONDAY + timedelta(hours=1)) == 0
        assert scheduler.close_backups(db, MONDAY + 2 * DAY / 24) == 1  # 04:00
    caps = {c["machine_id"]: c for c in api.get("/api/captures").json()}
    assert caps[down.machine_id]["session_state"] == "cancelled"
    assert "before it started" in caps[down.machine_id]["reason"]
    assert caps[up.machine_id]["session_state"] == "running"  # run-on: it may finish


def test_deleting_a_backup_schedule_keeps_its_backups(api: Api, engine: Engine) -> None:
    agent = enrolled(api, "52:54:00:ba:00:0a", "pc-e")
    s = _schedule(api, machine_ids=[agent.machine_id], once_at="2026-11-30T02:00")
    scheduler = Scheduler(engine, api.settings, None, lambda _sid: None, wake=Woken())
    with db_session(engine) as db:
        scheduler.tick(db, MONDAY)
    agent.session_id = agent.assignment()["session_id"]
    image_id = _finish(agent, disk(40))
    assert api.delete(f"/api/schedules/{s['id']}").status_code == 204  # with its history
    assert api.get(f"/api/images/{image_id}").status_code == 200
    cap = api.get("/api/captures").json()[0]
    assert (cap["schedule_id"], cap["backup"]) == (None, False)
