"""The dashboard's pages, on the real app and database: log-in, forms, the grid's data."""

from __future__ import annotations

import re
from pathlib import Path

from apitest import *  # noqa: F403
from apitest import PASSWORD, Api
from sqlmodel import select
from test_api import _captured

from server.api.deps import WEB_COOKIE
from server.db import db_session
from server.models import SessionMachine
from server.services import machines as machines_svc
from server.services import sessions as svc
from server.services.throughput import ThroughputHistory
from server.web.sessions import spread

UI = "/ui"


def _login(api: Api) -> str:
    """Log in through the form; returns the CSRF token the pages carry."""
    r = api.client.post(
        f"{UI}/login",
        data={"username": "admin", "password": PASSWORD, "next": f"{UI}/machines"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == f"{UI}/machines"
    page = api.client.get(UI)
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([0-9a-f]{32})"', page.text)
    assert found, "the overview has no log-out form with a CSRF token"
    return found.group(1)


def test_log_in_sets_a_strict_http_only_cookie_and_log_out_revokes_its_token(api: Api) -> None:
    wrong = api.client.post(f"{UI}/login", data={"username": "admin", "password": "nope"})
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    r = api.client.post(
        f"{UI}/login", data={"username": "admin", "password": PASSWORD}, follow_redirects=False
    )
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    token = api.client.cookies[WEB_COOKIE]
    assert api.client.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"}).is_success
    csrf = re.search(r'name="csrf" value="(\w+)"', api.client.get(UI).text)
    assert csrf is not None
    out = api.client.post(f"{UI}/logout", data={"csrf": csrf.group(1)}, follow_redirects=False)
    assert out.status_code == 303
    me = api.client.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 401, "log-out must revoke the cookie's token"
    api.client.cookies.set(WEB_COOKIE, token)
    assert api.client.get(UI, follow_redirects=False).status_code == 303


def test_log_in_never_redirects_off_the_dashboard(api: Api) -> None:
    for target in ("https://evil.example/", "//evil.example/ui", "/api/images"):
        r = api.client.post(
            f"{UI}/login",
            data={"username": "admin", "password": PASSWORD, "next": target},
            follow_redirects=False,
        )
        assert r.headers["location"] == UI, target


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(api: Api) -> None:
    csrf = _login(api)
    assert api.client.post(f"{UI}/groups", data={"name": "lab-a"}).status_code == 403
    foreign = api.client.post(
        f"{UI}/groups",
        data={"name": "lab-a", "csrf": csrf},
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status_code == 403 and "may not post here" in foreign.text
    ok = api.client.post(f"{UI}/groups", data={"name": "lab-a", "csrf": csrf})
    assert ok.status_code == 200 and "lab-a" in ok.text
    assert [g["name"] for g in api.get("/api/groups").json()] == ["lab-a"]


def test_the_new_session_form_puts_each_problem_next_to_its_field(api: Api) -> None:
    csrf = _login(api)
    empty = api.client.post(f"{UI}/sessions-new", data={"csrf": csrf})
    assert empty.status_code == 400
    assert 'id="err-image"' in empty.text and 'id="err-group_id"' in empty.text
    _captured(api)
    bad = api.client.post(
        f"{UI}/sessions-new",
        data={
            "csrf": csrf,
            "image": "golden",
            "machine_ids": "1, x",
            "rate_mbytes": "fast",
            "quiet_period": "-5",
        },
    )
    assert 'id="err-quiet_period"' in bad.text
    assert 'id="err-machine_ids"' in bad.text and "&#39;x&#39; is not a machine id" in bad.text
    assert 'id="err-rate_mbytes"' in bad.text
    slow = api.client.post(
        f"{UI}/sessions-new",
        data={"csrf": csrf, "image": "golden", "machine_ids": "1", "rate_mbytes": "0.0001"},
    )
    assert 'id="err-rate_mbytes"' in slow.text and "between 0.001 and 12500 MB/s" in slow.text
    unknown = api.client.post(
        f"{UI}/sessions-new", data={"csrf": csrf, "image": "nope", "machine_ids": "1"}
    )
    assert unknown.status_code == 400 and 'id="err-image"' in unknown.text
    assert api.get("/api/sessions").json() == [], "a refused form must create nothing"


def test_a_manual_session_is_created_started_and_cancelled_from_its_page(api: Api) -> None:
    csrf = _login(api)
    _captured(api)
    api.enroll("52:54:00:aa:00:01")
    r = api.client.post(
        f"{UI}/sessions-new",
        data={
            "csrf": csrf,
            "image": "golden",
            "machine_ids": "1",
            "start": "manual",
            "rate_mbytes": "50",
            "quiet_period": "20",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    page = r.headers["location"]
    session = api.get(f"/api/sessions/{page.rsplit('/', 1)[1]}").json()
    assert session["state"] == "pending" and session["rate_bps"] == 400_000_000
    assert session["start_policy"]["start"] == "manual"
    assert session["start_policy"]["quiet_period"] == 20
    html = api.client.get(page).text
    assert "Start now" in html and "400000000" not in html and "50.0 MB/s" in html
    state = api.client.get(f"{page}/state.json").json()
    assert state["state"] == "pending" and state["machines"][0][3] == "pending"
    again = api.client.post(f"{page}/cancel", data={"csrf": csrf}, follow_redirects=False)
    assert again.status_code == 303
    assert api.get(f"/api/sessions/{session['id']}").json()["state"] == "cancelled"
    twice = api.client.post(f"{page}/cancel", data={"csrf": csrf})
    assert twice.status_code == 409 and "has ended already" in twice.text


def test_the_grid_data_of_a_500_machine_session(api: Api) -> None:
    """500 machines in one session: state.json carries every row; the page renders."""
    csrf = _login(api)
    _captured(api)
    lines = "\n".join(
        f"52:54:00:01:{i // 256:02x}:{i % 256:02x},pc-{i:03d},hall" for i in range(500)
    )
    r = api.client.post(f"{UI}/machines-import", data={"csrf": csrf, "csv_text": lines})
    assert r.status_code == 200 and "500 created" in r.text
    group = api.get("/api/groups").json()[0]["id"]
    r = api.client.post(
        f"{UI}/sessions-new",
        data={"csrf": csrf, "image": "golden", "group_id": str(group), "start": "manual"},
        follow_redirects=False,
    )
    page = r.headers["location"]
    sid = int(page.rsplit("/", 1)[1])
    with db_session(api.client.app.state.engine) as db:  # type: ignore[attr-defined]
        for row in db.exec(select(SessionMachine).where(SessionMachine.session_id == sid)):
            row.state, row.bytes_total = "receiving", 1000
            row.bytes_done, row.rate_bps = row.machine_id % 1001, 8e6 * (row.machine_id % 7)
    state = api.client.get(f"{page}/state.json").json()
    assert len(state["machines"]) == 500 and state["counts"] == {"receiving": 500}
    first = dict(zip(state["columns"], state["machines"][0], strict=True))
    assert first["name"] == "pc-000" and first["done"] == 1 and first["total"] == 1000
    html = api.client.get(page).text
    assert 'slowest <b id="t-slowest">0.1%' in html and 'fastest <b id="t-fastest">50.0%' in html
    overview = api.client.get(UI).text
    assert f"#{sid}</a>" in overview and "0 / 500 done" in overview


def test_progress_is_the_slowest_median_and_fastest_machine_not_the_maximum() -> None:
    rows = [
        SessionMachine(session_id=1, machine_id=i, state=st, bytes_done=d, bytes_total=100)
        for i, (st, d) in enumerate(
            [("receiving", 10), ("receiving", 40), ("succeeded", 0), ("pending", 0)]
        )
    ]
    assert spread(rows) == {"slowest": 0.0, "median": 0.25, "fastest": 1.0}
    assert spread([]) == {"slowest": 0.0, "median": 0.0, "fastest": 0.0}


def test_images_page_shows_sizes_and_refuses_to_delete_an_image_in_use(api: Api) -> None:
    csrf = _login(api)
    image_id = _captured(api)
    html = api.client.get(f"{UI}/images").text
    assert "golden" in html and "3.0 MiB" in html
    api.enroll("52:54:00:aa:00:02")
    api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [1], "start_policy": {"start": "manual"}},
    )
    refused = api.client.post(f"{UI}/images/{image_id}/delete", data={"csrf": csrf})
    assert refused.status_code == 409 and "golden" in refused.text
    bad = api.client.post(
        f"{UI}/images", data={"csrf": csrf, "name": "x", "path": "/nonexistent/disk.img"}
    )
    assert bad.status_code == 400 and 'role="alert"' in bad.text


def test_machines_page_edits_a_machine_and_a_bad_csv_names_its_line(
    api: Api, tmp_path: Path
) -> None:
    csrf = _login(api)
    api.enroll("52:54:00:aa:00:03")
    api.client.post(f"{UI}/groups", data={"name": "lab-b", "csrf": csrf})
    gid = api.get("/api/groups").json()[0]["id"]
    r = api.client.post(
        f"{UI}/machines/1",
        data={"csrf": csrf, "name": "front-desk", "group_id": str(gid)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    m = api.get("/api/machines/1").json()
    assert (m["name"], m["group_id"]) == ("front-desk", gid)
    bad = api.client.post(
        f"{UI}/machines-import",
        data={"csrf": csrf, "csv_text": "52:54:00:aa:00:04,pc-4,lab-b\nnot-a-mac,pc-5,lab-b"},
    )
    assert bad.status_code == 400 and "line 2" in bad.text
    with db_session(api.client.app.state.engine) as db:  # type: ignore[attr-defined]
        assert len(machines_svc.list_machines(db)) == 1, "a bad CSV imports nothing"


def test_re_run_from_the_page_makes_a_new_session_for_the_machines_that_did_not_succeed(
    api: Api,
) -> None:
    csrf = _login(api)
    _captured(api)
    api.enroll("52:54:00:aa:00:05")
    first = api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [1], "start_policy": {"start": "manual"}},
    ).json()
    early = api.client.post(f"{UI}/sessions/{first['id']}/rerun", data={"csrf": csrf})
    assert early.status_code == 409 and "still pending" in early.text
    api.post(f"/api/sessions/{first['id']}/cancel")
    r = api.client.post(
        f"{UI}/sessions/{first['id']}/rerun", data={"csrf": csrf}, follow_redirects=False
    )
    assert r.status_code == 303
    again = api.get(f"/api/sessions/{r.headers['location'].rsplit('/', 1)[1]}").json()
    assert again["rerun_of"] == first["id"] and [m["machine_id"] for m in again["machines"]] == [1]


def test_an_upload_from_the_images_page_is_captured_and_needs_the_csrf_header(
    api: Api, tmp_path: Path
) -> None:
    csrf = _login(api)
    body = b"fleetcast upload " * 4096 + bytes(1 << 20)
    url = f"{UI}/images/upload?name=uploaded"
    headers = {"Content-Type": "application/octet-stream"}
    assert api.client.post(url, content=body, headers=headers).status_code == 403
    r = api.client.post(url, content=body, headers={**headers, "X-CSRF-Token": csrf})
    assert r.status_code == 204, r.text
    (image,) = api.get("/api/images").json()
    assert image["name"] == "uploaded" and image["image_size"] == len(body)
    taken = api.client.post(url, content=body, headers={**headers, "X-CSRF-Token": csrf})
    assert taken.status_code == 409 and "already exists" in taken.text


def test_a_group_is_renamed_given_a_wake_on_lan_target_and_deleted(api: Api) -> None:
    csrf = _login(api)
    api.client.post(f"{UI}/groups", data={"name": "lab-c", "csrf": csrf})
    gid = api.get("/api/groups").json()[0]["id"]
    form = {"csrf": csrf, "name": "lab-d", "description": "room 4", "wol_broadcast": "10.9.0.255"}
    r = api.client.post(
        f"{UI}/groups/{gid}", data={**form, "wol_port": "7"}, follow_redirects=False
    )
    assert r.status_code == 303
    g = api.get(f"/api/groups/{gid}").json()
    assert (g["name"], g["description"], g["wol_broadcast"], g["wol_port"]) == (
        "lab-d",
        "room 4",
        "10.9.0.255",
        7,
    )
    bad = api.client.post(f"{UI}/groups/{gid}", data={**form, "wol_broadcast": "lab.example"})
    assert bad.status_code == 400 and 'role="alert"' in bad.text
    assert api.get(f"/api/groups/{gid}").json()["wol_broadcast"] == "10.9.0.255"
    gone = api.client.post(f"{UI}/groups/{gid}/delete", data={"csrf": csrf}, follow_redirects=False)
    assert gone.status_code == 303 and api.get("/api/groups").json() == []


def test_a_finished_session_page_carries_its_whole_throughput_history(api: Api) -> None:
    """The chart of an ended session starts from the history the runner kept, not empty."""
    _login(api)
    _captured(api)
    api.enroll("52:54:00:aa:00:07")
    sid = api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [1], "start_policy": {"start": "manual"}},
    ).json()["id"]
    page = f"{UI}/sessions/{sid}"
    assert api.client.get(f"{page}/state.json").json()["history"]["points"] == []
    engine = api.client.app.state.engine  # type: ignore[attr-defined]
    with db_session(engine) as db:  # running, without a sender: the test plays the runner
        svc.mark_running(db, None, svc.get_session(db, sid), "test")
    manager = api.client.app.state.manager  # type: ignore[attr-defined]
    history = manager.histories.setdefault(sid, ThroughputHistory())
    for i in range(6):
        history.record(1_800_000_000.0 + i, i * 50_000_000, 20.0)
    running = api.client.get(f"{page}/state.json").json()["history"]
    assert len(running["points"]) == 5 and running["points"][0] == [1.0, 50.0, 20.0]
    with db_session(engine) as db:
        manager._finalize(db, sid, None, "the test ended it")
    state = api.client.get(f"{page}/state.json").json()
    assert state["state"] == "failed" and state["reason"] == "the test ended it"
    assert state["history"] == running and "throughput" not in state["stats"]
