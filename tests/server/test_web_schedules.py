"""The dashboard's schedule pages, on issue 5's scheduler service and a real database."""

from __future__ import annotations

from apitest import *  # noqa: F403
from apitest import Api
from test_api import _captured
from test_web import UI, _login

BASE = {
    "name": "nightly",
    "image": "golden",
    "machine_ids": "1",
    "kind": "weekly",
    "weekdays": ["0", "3"],
    "time": "02:00",
    "timezone": "Europe/Berlin",
    "window_end": "06:00",
    "on_window_end": "cancel",
    "wake_lead_min": "5",
    "max_wait": "600",
    "enabled": "on",
}


def test_a_schedule_form_shows_each_problem_next_to_its_field(api: Api) -> None:
    csrf = _login(api)
    _captured(api)
    api.enroll("52:54:00:bb:00:01")
    zone = api.client.post(f"{UI}/schedules", data={**BASE, "csrf": csrf, "timezone": "Mars/Base"})
    assert zone.status_code == 400 and 'id="err-timezone"' in zone.text
    assert "unknown time zone" in zone.text
    days = api.client.post(f"{UI}/schedules", data={**BASE, "csrf": csrf, "weekdays": []})
    assert 'id="err-weekdays"' in days.text
    many = api.client.post(
        f"{UI}/schedules",
        data={**BASE, "csrf": csrf, "name": "", "wake_lead_min": "999", "rate_mbytes": "x"},
    )
    for field in ("name", "wake_lead_min", "rate_mbytes"):
        assert f'id="err-{field}"' in many.text, field
    assert api.get("/api/schedules").json() == [], "a refused form must create nothing"


def test_create_see_the_next_runs_edit_and_delete_a_schedule(api: Api) -> None:
    csrf = _login(api)
    _captured(api)
    api.enroll("52:54:00:bb:00:02")
    r = api.client.post(f"{UI}/schedules", data={**BASE, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text
    (made,) = api.get("/api/schedules").json()
    assert made["weekdays"] == [0, 3] and made["wake_lead"] == 300
    assert made["timezone"] == "Europe/Berlin" and made["start_policy"]["max_wait"] == 600
    assert made["window_end"] == "06:00" and made["on_window_end"] == "cancel"
    page = api.client.get(r.headers["location"]).text
    assert page.count("<li>") == 5 and 'value="Europe/Berlin"' in page
    assert "nightly" in api.client.get(UI).text, "the overview lists the next scheduled run"
    edit = api.client.post(
        r.headers["location"], data={**BASE, "csrf": csrf, "time": "03:30"}, follow_redirects=False
    )
    assert edit.status_code == 303
    assert api.get(f"/api/schedules/{made['id']}").json()["time"] == "03:30"
    bad = api.client.post(r.headers["location"], data={**BASE, "csrf": csrf, "time": "25:00"})
    assert bad.status_code == 400 and 'id="err-time"' in bad.text
    gone = api.client.post(
        f"{r.headers['location']}/delete", data={"csrf": csrf}, follow_redirects=False
    )
    assert gone.status_code == 303 and api.get("/api/schedules").json() == []
