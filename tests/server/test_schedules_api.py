"""The schedules API: create, upcoming runs, history, errors; a group's WoL target."""

from __future__ import annotations

from apitest import *  # noqa: F403


def test_a_schedule_lists_its_upcoming_runs_and_an_empty_history(api: Api) -> None:  # noqa: F405
    body = {
        "name": "lab-b nightly",
        "image": "win11",
        "kind": "cron",
        "cron": "0 2 * * sun",
        "timezone": "Europe/Berlin",
        "window_end": "05:00",
        "wake_lead": 600,
    }
    r = api.post("/api/schedules", json=body)
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["next_run_at"] is not None and s["created_by"].startswith("user:")
    up = api.get(f"/api/schedules/{s['id']}/upcoming?count=3").json()
    assert len(up) == 3 and up == sorted(up)
    assert api.get(f"/api/schedules/{s['id']}/runs").json() == []
    assert api.post("/api/schedules", json=body).status_code == 409
    assert api.delete(f"/api/schedules/{s['id']}").status_code == 204
    assert api.get(f"/api/schedules/{s['id']}").status_code == 404


def test_a_schedule_that_cannot_be_computed_is_a_400_naming_the_field(api: Api) -> None:  # noqa: F405
    r = api.post("/api/schedules", json={"name": "x", "image": "i", "kind": "cron", "cron": "nope"})
    assert r.status_code == 400 and "cron" in r.json()["detail"]
    r = api.post(
        "/api/schedules",
        json={
            "name": "y",
            "image": "i",
            "timezone": "Nowhere/City",
            "weekdays": [0],
            "time": "02:00",
        },
    )
    assert r.status_code == 400 and "time zone" in r.json()["detail"]


def test_a_group_wake_target_is_checked_and_kept(api: Api) -> None:  # noqa: F405
    g = api.post("/api/groups", json={"name": "lab-b"}).json()
    r = api.put(f"/api/groups/{g['id']}/wake", json={"wol_broadcast": "10.1.2.255", "wol_port": 7})
    assert r.status_code == 200 and (r.json()["wol_broadcast"], r.json()["wol_port"]) == (
        "10.1.2.255",
        7,
    )
    bad = api.put(f"/api/groups/{g['id']}/wake", json={"wol_broadcast": "lab-b.local"})
    assert bad.status_code == 400 and "IPv4" in bad.json()["detail"]
