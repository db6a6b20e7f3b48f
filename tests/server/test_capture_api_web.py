"""The dashboard's part of issue 10: a machine's page starts a capture and restores a backup
in one click; a backup schedule is set up in the schedule form with its retention."""

from __future__ import annotations

from apitest import *  # noqa: F403
from apitest import Api
from capturetest import disk, enrolled, image_of, start_capture
from test_web import UI, _login


def test_capture_from_the_machine_page_then_restore_its_image(api: Api) -> None:
    csrf = _login(api)
    agent = enrolled(api, "52:54:00:d0:00:01", "ref")
    assert f'href="{UI}/machines/{agent.machine_id}"' in api.client.get(f"{UI}/machines").text
    page = api.client.get(f"{UI}/machines/{agent.machine_id}")
    assert page.status_code == 200 and "Capture now" in page.text and "ref/" in page.text
    bad = api.client.post(
        f"{UI}/machines/{agent.machine_id}/capture", data={"csrf": csrf, "target_image": "a b"}
    )
    assert bad.status_code == 400 and "invalid image name" in bad.text
    r = api.client.post(
        f"{UI}/machines/{agent.machine_id}/capture",
        data={"csrf": csrf, "target_image": "ref/golden", "after": "poweroff"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    sid = int(r.headers["location"].rsplit("/", 1)[1])
    agent.session_id = sid
    job = agent.assignment()
    assert (job["kind"], job["image"], job["after"]) == ("capture", "ref/golden", "poweroff")
    assert "ref/golden" in api.client.get(f"{UI}/sessions/{sid}").text
    img = image_of(disk(30))
    agent.upload(img)
    assert agent.manifest(img.data).status_code == 200
    page = api.client.get(f"{UI}/machines/{agent.machine_id}").text
    assert "ref/golden" in page and "Restore" in page
    image_id = api.get(f"/api/machines/{agent.machine_id}/backups").json()[0]["image_id"]
    r = api.client.post(
        f"{UI}/machines/{agent.machine_id}/restore",
        data={"csrf": csrf, "image_id": str(image_id)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    restore_id = int(r.headers["location"].rsplit("/", 1)[1])
    s = api.get(f"/api/sessions/{restore_id}").json()
    assert (s["kind"], s["image_id"]) == ("deploy", image_id)
    assert [m["machine_id"] for m in s["machines"]] == [agent.machine_id]


def test_a_backup_schedule_from_the_form_with_its_retention(api: Api) -> None:
    csrf = _login(api)
    agent = enrolled(api, "52:54:00:d0:00:02", "pc")
    form = {
        "csrf": csrf, "name": "backups", "action": "backup", "machine_ids": str(agent.machine_id),
        "kind": "weekly", "weekdays": ["6"], "time": "01:00", "timezone": "UTC",
        "keep_daily": "3", "keep_weekly": "2", "keep_monthly": "x",
    }  # fmt: skip
    bad = api.client.post(f"{UI}/schedules", data=form)
    assert bad.status_code == 400 and "is not a number" in bad.text
    r = api.client.post(
        f"{UI}/schedules", data={**form, "keep_monthly": "1"}, follow_redirects=False
    )
    assert r.status_code == 303, r.text
    s = api.get("/api/schedules").json()[0]
    assert (s["action"], s["image"]) == ("backup", "")
    assert s["retention"] == {"daily": 3, "weekly": 2, "monthly": 1}
    page = api.client.get(r.headers["location"]).text
    assert 'value="backup" selected' in page and 'name="keep_daily" size="4" value="3"' in page
    assert "backup (keep 3 d / 2 w / 1 m)" in api.client.get(f"{UI}/schedules").text
    deploy = {**form, "name": "deploys", "action": "deploy", "keep_monthly": "1"}
    nope = api.client.post(f"{UI}/schedules", data=deploy)
    assert nope.status_code == 400 and "choose an image" in nope.text


def test_a_capture_sessions_page_and_the_overview_show_it(api: Api) -> None:
    _login(api)
    agent = enrolled(api, "52:54:00:d0:00:03", "ov")
    start_capture(api, agent, "ov/one")
    assert "capture → ov/one" in api.client.get(UI).text
    page = api.client.get(f"{UI}/sessions/{agent.session_id}").text
    assert "Capture into image <b>ov/one</b>" in page
    state = api.client.get(f"{UI}/sessions/{agent.session_id}/state.json")
    assert state.status_code == 200
