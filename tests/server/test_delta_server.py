"""The assignment's ``mode``, ``delta`` and ``image_id`` (contract of issue 9).

delta: the session option "always"/"never"; "auto" is on when the machine's last verified
image is of the same family as the session's, or when it resumes this session (or one it
re-runs). mode: "catchup" once the machine was evicted or missed the transfer.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from apitest import *  # noqa: F403
from apitest import Api
from catchuptest import (
    captured,
    db,
    disk_bytes,
    enroll,
    machines,
    row_of,
    session,
    set_row,
    set_session,
)

from server.models import Machine, image_family, utcnow


def _assignment(api: Api, agent: dict[str, str]) -> dict[str, object]:
    r = api.client.get("/api/agent/assignment", headers=agent)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _last_image(api: Api, mid: int, image_id: int | None) -> None:
    with db(api) as d:
        m = d.get(Machine, mid)
        assert m is not None
        m.last_image_id = image_id
        d.add(m)


@pytest.mark.parametrize(
    ("name", "family"),
    [("win11", "win11"), ("lab/win11", "lab"), ("a/b/c", "a/b"), ("/x", "/x"), ("x/", "x")],
)
def test_the_default_family_is_the_name_up_to_its_last_slash(name: str, family: str) -> None:
    assert image_family(name) == family


def test_images_get_their_family_from_the_name_or_as_given(api: Api) -> None:
    captured(api, "lab/v1")
    captured(api, "solo")
    captured(api, "lab-next", disk_bytes(2), family="lab")
    families = {i["name"]: i["family"] for i in api.get("/api/images").json()}
    assert families == {"lab/v1": "lab", "solo": "solo", "lab-next": "lab"}


def test_a_fresh_machine_joins_the_multicast_without_delta(api: Api) -> None:
    image_id = captured(api, "lab/v2")
    (mid,) = machines(api, 1)
    sid = session(api, "lab/v2", [mid])
    a = _assignment(api, enroll(api, mid))
    assert (a["session_id"], a["mode"], a["delta"], a["image_id"]) == (
        sid,
        "multicast",
        False,
        image_id,
    )


def test_auto_delta_follows_the_family_of_the_last_verified_image(api: Api) -> None:
    v1 = captured(api, "lab/v1")
    other = captured(api, "other", disk_bytes(3))
    captured(api, "lab/v2", disk_bytes(2))
    same, foreign, never = machines(api, 3)
    _last_image(api, same, v1)
    _last_image(api, foreign, other)
    _last_image(api, never, None)
    session(api, "lab/v2", [same, foreign, never])
    assert _assignment(api, enroll(api, same))["delta"] is True
    assert _assignment(api, enroll(api, foreign))["delta"] is False
    assert _assignment(api, enroll(api, never))["delta"] is False


@pytest.mark.parametrize(("option", "expected"), [("always", True), ("never", False)])
def test_the_session_option_overrides_auto(api: Api, option: str, expected: bool) -> None:
    v1 = captured(api, "lab/v1")
    captured(api, "lab/v2", disk_bytes(2))
    same, fresh = machines(api, 2)
    _last_image(api, same, v1)
    sid = session(api, "lab/v2", [same, fresh], delta=option)
    assert api.get(f"/api/sessions/{sid}").json()["delta"] == option
    assert _assignment(api, enroll(api, same))["delta"] is expected
    assert _assignment(api, enroll(api, fresh))["delta"] is expected


def test_a_bad_delta_option_is_refused(api: Api) -> None:
    captured(api, "golden")
    (mid,) = machines(api, 1)
    body = {"image": "golden", "machine_ids": [mid], "delta": "sometimes"}
    assert api.post("/api/sessions", json=body).status_code == 422


def test_a_machine_that_restarts_mid_session_resumes_with_delta(api: Api) -> None:
    captured(api, "golden")
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    agent = enroll(api, mid)
    assert _assignment(api, agent)["delta"] is False  # nothing on its disk yet
    progress = {
        "session_id": sid,
        "receiver_id": 5,
        "samples": [{"bytes_done": 1, "bytes_total": 9}],
    }
    assert api.client.post("/api/agent/progress", headers=agent, json=progress).status_code == 200
    again = _assignment(api, agent)  # it rebooted: same session, multicast, resume
    assert (again["session_id"], again["mode"], again["delta"]) == (sid, "multicast", True)


def test_a_rerun_resumes_machines_that_had_started_the_first_run(api: Api) -> None:
    captured(api, "golden")
    started, idle = machines(api, 2)
    first = session(api, "golden", [started, idle])
    set_row(api, first, started, state="failed", started_at=utcnow())
    set_row(api, first, idle, state="no-show")
    set_session(api, first, state="partial", ended_at=utcnow())
    r = api.post(f"/api/sessions/{first}/rerun")
    assert r.status_code == 201, r.text
    second = int(r.json()["id"])
    assert r.json()["rerun_of"] == first
    deadline = time.monotonic() + 10  # a re-run starts at once; here no sender can run
    while api.get(f"/api/sessions/{second}").json()["state"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    set_session(api, second, state="running", ended_at=None)  # the control plane alone
    for mid in (started, idle):
        set_row(api, second, mid, state="pending", reason="", ended_at=None)
    a = _assignment(api, enroll(api, started))
    assert (a["session_id"], a["delta"]) == (second, True)
    assert _assignment(api, enroll(api, idle))["delta"] is False


def test_after_the_transfer_ended_a_machine_is_sent_to_catch_up(api: Api) -> None:
    captured(api, "golden")
    late, receiving = machines(api, 2)
    sid = session(api, "golden", [late, receiving])
    set_row(api, sid, receiving, state="receiving", started_at=utcnow())
    set_session(api, sid, transfer_ended_at=utcnow())
    a = _assignment(api, enroll(api, late))
    assert (a["session_id"], a["mode"]) == (sid, "catchup")
    row = row_of(api, sid, late)
    assert row["state"] == "catchup" and "transfer is over" in row["reason"]
    b = _assignment(api, enroll(api, receiving))  # rebooted after the transfer ended
    assert (b["mode"], b["delta"]) == ("catchup", True)
    kinds = [e["kind"] for e in api.get("/api/events", params={"session_id": sid}).json()]
    assert kinds.count("machine.catchup") == 2


def test_a_no_show_of_a_running_session_catches_up_and_an_evicted_one_keeps_catching_up(
    api: Api,
) -> None:
    captured(api, "golden")
    absent, evicted = machines(api, 2)
    sid = session(api, "golden", [absent, evicted])
    set_session(api, sid, transfer_started_at=utcnow() - timedelta(seconds=30))
    set_row(api, sid, absent, state="no-show", reason="did not join before the transfer started")
    set_row(api, sid, evicted, state="catchup", started_at=utcnow())
    a = _assignment(api, enroll(api, absent))
    assert (a["session_id"], a["mode"], a["delta"]) == (sid, "catchup", False)
    assert row_of(api, sid, absent)["state"] == "catchup"
    agent = enroll(api, evicted)
    for _ in range(2):  # until it reports a result
        assert _assignment(api, agent)["mode"] == "catchup"


def test_without_catch_up_nothing_changes(api: Api) -> None:
    captured(api, "golden")
    absent, present = machines(api, 2)
    sid = session(api, "golden", [absent, present])
    set_row(api, sid, absent, state="no-show")
    set_session(api, sid, transfer_ended_at=utcnow())
    api.client.app.state.settings.catchup = False  # type: ignore[attr-defined]
    assert _assignment(api, enroll(api, absent))["session_id"] is None
    assert _assignment(api, enroll(api, present))["mode"] == "multicast"


def test_a_late_machine_that_network_boots_gets_the_client_to_catch_up(api: Api) -> None:
    from server.services.boot import DEPLOY, LOCAL, BootRequest, decide

    captured(api)
    (late,) = machines(api, 1)
    mac = api.get(f"/api/machines/{late}").json()["mac"]
    sid = session(api, "golden", [late])
    set_session(api, sid, transfer_started_at=utcnow())
    set_row(api, sid, late, state="no-show")
    with db(api) as d:
        assert decide(d, None, BootRequest(mac), "local").action == LOCAL  # catch-up off
        due = decide(d, None, BootRequest(mac), "local", late_window=900.0)
    assert (due.action, due.session_id) == (DEPLOY, sid)
    assert "catch-up" in due.reason


def test_schema_0004_gives_existing_images_their_family_and_sessions_delta_auto(
    database_url: str,
) -> None:
    from alembic import command
    from sqlalchemy import text

    from server.db import alembic_config, make_engine

    engine = make_engine(database_url)
    try:
        cfg = alembic_config(database_url)

        def upgrade(to: str) -> None:
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, to)

        upgrade("0003")
        with engine.begin() as conn:
            for i, name in enumerate(("lab/win11/v1", "solo"), 1):
                conn.execute(
                    text(
                        "INSERT INTO image (id, name, digest, image_size, stored_bytes, "
                        "data_bytes, block_size, block_count, data_blocks, zero_blocks, "
                        "partition_table, source, created_at) VALUES (:i, :n, '', 1, 1, 1, 1, "
                        "1, 1, 0, 'none', '{}', CURRENT_TIMESTAMP)"
                    ),
                    {"i": i, "n": name},
                )
        upgrade("0004")
        with engine.begin() as conn:
            rows = conn.execute(text("SELECT name, family FROM image ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [("lab/win11/v1", "lab/win11"), ("solo", "solo")]
    finally:
        engine.dispose()
