"""Catch-up in a session's life: progress phases, catch-up results, and a verdict that waits
for catching-up machines — as long as they make progress (catchup_timeout)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from apitest import *  # noqa: F403
from apitest import Api
from catchuptest import MIB, captured, db, enroll, machines, row_of, session, set_row, set_session
from sqlmodel import select

from server.models import AgentProgress, Image, Machine, Session, utcnow
from server.services import catchup, delta


def _image(api: Api, name: str = "golden") -> tuple[str, int]:
    """(manifest digest, data bytes) of image ``name``."""
    with db(api) as d:
        image = d.exec(select(Image).where(Image.name == name)).one()
        return image.digest, image.data_bytes


def _progress(api: Api, agent: dict[str, str], sid: int, **fields: Any) -> dict[str, Any]:
    body = {"session_id": sid, "receiver_id": 9, "samples": [{"bytes_done": 1, "bytes_total": 2}]}
    r = api.client.post("/api/agent/progress", headers=agent, json={**body, **fields})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _result(api: Api, agent: dict[str, str], sid: int, **fields: Any) -> Any:
    body = {"session_id": sid, "result": "verified", **fields}
    return api.client.post("/api/agent/result", headers=agent, json=body)


def _kinds(api: Api, sid: int) -> list[str]:
    return [e["kind"] for e in api.get("/api/events", params={"session_id": sid}).json()]


def test_progress_phases_move_a_machine_to_catch_up_and_keep_what_it_held(api: Api) -> None:
    captured(api)
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    agent = enroll(api, mid)
    assert _progress(api, agent, sid, phase="hashing")["cancel"] is False
    assert (row_of(api, sid, mid)["state"], row_of(api, sid, mid)["phase"]) == (
        "receiving",
        "hashing",
    )
    _progress(api, agent, sid, phase="multicast", held_blocks=1, held_bytes=MIB)
    deadline = time.monotonic() + 10  # buffered: written by the once-a-second flush
    while row_of(api, sid, mid)["phase"] != "multicast":
        assert time.monotonic() < deadline, "the buffered phase was never written"
        time.sleep(0.1)
    assert row_of(api, sid, mid)["held_bytes"] == MIB
    assert _progress(api, agent, sid, phase="catchup", held_blocks=1, held_bytes=MIB) == {
        "cancel": False,
        "reason": "",
    }
    row = row_of(api, sid, mid)
    assert (row["state"], row["phase"], row["held_blocks"]) == ("catchup", "catchup", 1)
    assert row["reason"] == delta.EVICTED_REASON
    assert "machine.catchup" in _kinds(api, sid)
    _progress(api, agent, sid, phase="verifying")  # verifying a catch-up: still catching up
    assert row_of(api, sid, mid)["state"] == "catchup"


def test_the_live_update_of_a_report_carries_phase_and_held_counts() -> None:
    report = AgentProgress.model_validate(
        {
            "session_id": 1,
            "samples": [{"bytes_done": 5, "bytes_total": 10}],
            "phase": "catchup",
            "held_blocks": 3,
            "held_bytes": 3 * MIB,
        }
    )
    fields = delta.progress_fields(report)
    assert (fields["phase"], fields["held_blocks"], fields["held_bytes"]) == ("catchup", 3, 3 * MIB)
    assert fields["bytes_done"] == 5


def test_a_catch_up_counts_only_verified_against_the_sessions_manifest(api: Api) -> None:
    captured(api)
    digest, data_bytes = _image(api)
    good, blind, wrong = machines(api, 3)
    sid = session(api, "golden", [good, blind, wrong])
    for mid in (good, blind, wrong):
        set_row(api, sid, mid, state="catchup", started_at=utcnow())
    stats = {"catchup_blocks": 2, "catchup_bytes": 123_456}
    ok = _result(
        api, enroll(api, good), sid, via="catchup", manifest_digest=digest,
        bytes_done=data_bytes, blocks_done=2, stats=stats,
    )  # fmt: skip
    assert ok.json() == {"state": "succeeded"}
    r = _result(api, enroll(api, blind), sid, via="catchup", bytes_done=data_bytes)
    assert r.json() == {"state": "failed"}
    r = _result(
        api, enroll(api, wrong), sid, via="catchup", manifest_digest="ab" * 32,
        bytes_done=data_bytes,
    )  # fmt: skip
    assert r.json() == {"state": "failed"}
    rows = {m: row_of(api, sid, m) for m in (good, blind, wrong)}
    assert (rows[good]["via"], rows[good]["catchup_bytes"], rows[good]["catchup_blocks"]) == (
        "catchup",
        123_456,
        2,
    )
    assert "no manifest digest" in rows[blind]["reason"]
    assert "different manifest" in rows[wrong]["reason"]


def test_an_evicted_machine_may_still_report_its_catch_up_while_the_session_runs(
    api: Api,
) -> None:
    captured(api)
    digest, data_bytes = _image(api)
    late, old = machines(api, 2)
    sid = session(api, "golden", [late, old])
    for mid in (late, old):
        set_row(api, sid, mid, state="evicted", reason="straggler", started_at=utcnow())
    agent = enroll(api, late)
    r = _result(api, agent, sid, via="multicast", manifest_digest=digest, bytes_done=data_bytes)
    assert r.status_code == 409  # an evicted machine's multicast result is too late
    r = _result(api, agent, sid, via="catchup", manifest_digest=digest, bytes_done=data_bytes)
    assert r.json() == {"state": "succeeded"}
    set_session(api, sid, state="partial", ended_at=utcnow())
    r = _result(api, enroll(api, old), sid, via="catchup", manifest_digest=digest,
                bytes_done=data_bytes)  # fmt: skip
    assert r.status_code == 409 and "ended" in r.json()["detail"]


def test_held_bytes_count_as_verified_and_are_logged_as_spared(api: Api) -> None:
    image_id = captured(api)
    digest, data_bytes = _image(api)
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    agent = enroll(api, mid)
    _progress(api, agent, sid, phase="multicast", held_blocks=1, held_bytes=MIB)
    stats = {"held_blocks": 1, "held_bytes": MIB}
    r = _result(api, agent, sid, manifest_digest=digest, bytes_done=data_bytes - MIB, stats=stats)
    assert r.json() == {"state": "succeeded"}
    row = row_of(api, sid, mid)
    assert (row["held_bytes"], row["held_blocks"], row["via"]) == (MIB, 1, "multicast")
    spared = api.get("/api/events", params={"kind": "machine.spared"}).json()
    assert len(spared) == 1 and spared[0]["machine_id"] == mid
    assert spared[0]["data"]["percent"] == 50.0 and "spared 50%" in spared[0]["message"]
    assert api.get(f"/api/machines/{mid}").json()["last_image_id"] == image_id
    (short,) = machines(api, 1, prefix="52:54:00:9d:00")
    sid2 = session(api, "golden", [short])
    r = _result(api, enroll(api, short), sid2, manifest_digest=digest, bytes_done=MIB,
                stats={"held_bytes": 1})  # fmt: skip
    assert r.json() == {"state": "failed"}
    assert "plus 1 held" in row_of(api, sid2, short)["reason"]


def test_waiting_fails_a_catch_up_silent_for_the_timeout(api: Api) -> None:
    captured(api)
    busy, silent, multicast, done = machines(api, 4)
    sid = session(api, "golden", [busy, silent, multicast, done])
    now = utcnow()
    set_row(api, sid, busy, state="catchup", updated_at=now - timedelta(seconds=10))
    set_row(api, sid, silent, state="catchup", updated_at=now - timedelta(seconds=901))
    set_row(api, sid, multicast, state="receiving", updated_at=now)
    set_row(api, sid, done, state="succeeded")
    bus = api.client.app.state.bus  # type: ignore[attr-defined]
    with db(api) as d:
        w = catchup.waiting(d, bus, sid, 900.0, now)
    assert w == catchup.Waiting(multicast=1, catchup=1, expired=1)
    row = row_of(api, sid, silent)
    assert row["state"] == "failed" and "no progress for 900 s" in row["reason"]
    assert row_of(api, sid, busy)["state"] == "catchup"


async def test_the_verdict_waits_for_a_catch_up_and_counts_it(api: Api) -> None:
    captured(api)
    digest, data_bytes = _image(api)
    catching, gone = machines(api, 2)
    sid = session(api, "golden", [catching, gone])
    set_row(api, sid, catching, state="catchup", started_at=utcnow(), updated_at=utcnow())
    set_row(api, sid, gone, state="receiving", started_at=utcnow(), updated_at=utcnow())
    manager = api.client.app.state.manager  # type: ignore[attr-defined]
    manager.settings.result_grace, manager.settings.catchup_timeout = 0.2, 30.0
    agent = enroll(api, catching)
    started = time.monotonic()
    wait = asyncio.get_running_loop().create_task(manager._await_results(sid))
    await asyncio.sleep(1.0)
    assert not wait.done()  # the grace is over, but a machine catches up
    r = await asyncio.to_thread(
        _result, api, agent, sid, via="catchup", manifest_digest=digest, bytes_done=data_bytes
    )
    assert r.json() == {"state": "succeeded"}
    await asyncio.wait_for(wait, 5)
    assert time.monotonic() - started < 6
    await manager._db(manager._finalize, sid, None, "")
    detail = api.get(f"/api/sessions/{sid}").json()
    assert detail["state"] == "partial" and detail["transfer_ended_at"] is not None
    assert {m["machine_id"]: m["state"] for m in detail["machines"]} == {
        catching: "succeeded",
        gone: "failed",
    }
    assert "session.transfer-ended" in _kinds(api, sid)


async def test_the_verdict_stops_waiting_for_a_catch_up_without_progress(api: Api) -> None:
    captured(api)
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    set_row(api, sid, mid, state="catchup", started_at=utcnow(), updated_at=utcnow())
    manager = api.client.app.state.manager  # type: ignore[attr-defined]
    manager.settings.result_grace, manager.settings.catchup_timeout = 0.1, 1.0
    started = time.monotonic()
    await asyncio.wait_for(manager._await_results(sid), 10)
    assert 0.9 < time.monotonic() - started < 5
    await manager._db(manager._finalize, sid, None, "")
    detail = api.get(f"/api/sessions/{sid}").json()
    assert detail["state"] == "failed"
    assert "catch-up made no progress for 1 s" in detail["machines"][0]["reason"]


def test_finalize_fails_a_catch_up_cut_short_by_the_server(api: Api) -> None:
    captured(api)
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    set_row(api, sid, mid, state="catchup", started_at=utcnow())
    from server.services import sessions as session_svc

    with db(api) as d:
        s = d.get(Session, sid)
        assert s is not None
        session_svc.finalize(d, None, s, {}, {}, "")
    assert row_of(api, sid, mid)["reason"] == delta.UNFINISHED_REASON
    with db(api) as d:
        m = d.get(Machine, mid)
        assert m is not None and m.last_image_id is None


def test_a_machine_arriving_after_the_verdict_reopens_the_session_and_settles_it_again(
    api: Api,
) -> None:
    captured(api)
    digest, data_bytes = _image(api)
    done, late = machines(api, 2)
    sid = session(api, "golden", [done, late])
    set_row(api, sid, done, state="succeeded", via="multicast")
    set_row(api, sid, late, state="no-show", reason="did not join before the transfer started")
    ended = utcnow() - timedelta(seconds=60)
    set_session(api, sid, state="partial", ended_at=ended, transfer_started_at=ended)
    agent = enroll(api, late)
    a = api.client.get("/api/agent/assignment", headers=agent).json()
    assert (a["session_id"], a["mode"]) == (sid, "catchup")
    reopened = api.get(f"/api/sessions/{sid}").json()
    assert reopened["state"] == "running" and "arrived after the verdict" in reopened["reason"]
    assert row_of(api, sid, late)["state"] == "catchup"
    assert _progress(api, agent, sid, phase="catchup")["cancel"] is False
    r = _result(api, agent, sid, via="catchup", manifest_digest=digest, bytes_done=data_bytes)
    assert r.json() == {"state": "succeeded"}
    deadline = time.monotonic() + 15
    while api.get(f"/api/sessions/{sid}").json()["state"] == "running":
        assert time.monotonic() < deadline, "the reopened session never got a new verdict"
        time.sleep(0.1)
    final = api.get(f"/api/sessions/{sid}").json()
    assert final["state"] == "succeeded" and final["ended_at"] is not None
    kinds = _kinds(api, sid)
    assert kinds.count("session.running") == 2 and kinds[0] == "session.succeeded"


def test_a_verdict_too_old_cancelled_or_without_catch_up_is_not_reopened(api: Api) -> None:
    captured(api)
    old, cancelled, off = machines(api, 3)
    long_ago = utcnow() - timedelta(seconds=901)  # catchup_timeout 900 s
    recently = utcnow() - timedelta(seconds=10)
    for mid, state, at in ((old, "partial", long_ago), (cancelled, "cancelled", recently),
                           (off, "failed", recently)):  # fmt: skip
        sid = session(api, "golden", [mid])
        set_row(api, sid, mid, state="no-show")
        set_session(api, sid, state=state, ended_at=at, transfer_started_at=at)
    assert (
        api.client.get("/api/agent/assignment", headers=enroll(api, old)).json()["session_id"]
        is None
    )
    assert (
        api.client.get("/api/agent/assignment", headers=enroll(api, cancelled)).json()["session_id"]
        is None
    )
    api.client.app.state.settings.catchup = False  # type: ignore[attr-defined]
    assert (
        api.client.get("/api/agent/assignment", headers=enroll(api, off)).json()["session_id"]
        is None
    )
