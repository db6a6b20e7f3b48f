"""The API against the real app and a real database: images, machines, groups, sessions."""

from __future__ import annotations

import os
import time
from pathlib import Path

from apitest import *  # noqa: F403
from apitest import Api

from server.db import db_session, make_engine
from server.images.capture import CaptureOptions, capture_image
from server.images.store import ImageStore
from server.main import RESTART_REASON, create_app
from server.models import Session
from server.services import sessions as session_svc

MIB = 1 << 20


def _disk(path: Path, mib: int = 3) -> Path:
    with open(path, "wb") as f:
        f.write(b"fleetcast " * (MIB // 10))
        f.write(os.urandom(MIB))
        f.write(bytes((mib - 2) * MIB - MIB // 10 * 10 + MIB))
    return path


def _captured(api: Api, name: str = "golden") -> int:
    store = ImageStore(api.settings.image_root)
    capture_image(
        store,
        name,
        _disk(api.settings.data_dir.parent / f"{name}.img"),
        CaptureOptions(level=1, used_only=False, progress=False),
    )
    r = api.post("/api/images", json={"name": name, "mode": "existing"})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def test_health_and_docs_are_public(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/docs").status_code == 200
    assert "/api/sessions" in api.client.get("/openapi.json").json()["paths"]


def test_login_gives_a_working_token_and_wrong_password_gets_401(api: Api) -> None:
    from apitest import PASSWORD

    r = api.client.post("/api/auth/login", json={"username": "admin", "password": PASSWORD})
    assert r.status_code == 200
    me = api.client.get("/api/auth/me", headers={"Authorization": f"Bearer {r.json()['token']}"})
    assert me.json()["username"] == "admin"
    bad = api.client.post("/api/auth/login", json={"username": "admin", "password": "nope-nope"})
    assert bad.status_code == 401
    assert "wrong user name or password" in bad.json()["detail"]


def test_image_register_capture_list_detail_delete(api: Api, tmp_path: Path) -> None:
    disk = _disk(tmp_path / "disk.img")
    r = api.post("/api/images", json={"name": "lab-a", "path": str(disk), "all_blocks": True})
    assert r.status_code == 201, r.text
    image = r.json()
    assert image["image_size"] == disk.stat().st_size
    assert image["data_blocks"] >= 2
    assert [i["name"] for i in api.get("/api/images").json()] == ["lab-a"]
    assert api.get(f"/api/images/{image['id']}").json()["digest"] == image["digest"]
    again = api.post("/api/images", json={"name": "lab-a", "path": str(disk)})
    assert again.status_code == 409
    missing = api.post("/api/images", json={"name": "lab-b", "path": str(tmp_path / "nope")})
    assert missing.status_code == 400 and "nope" in missing.json()["detail"]
    assert api.delete(f"/api/images/{image['id']}").status_code == 204
    assert api.get("/api/images").json() == []
    assert not ImageStore(api.settings.image_root).exists("lab-a")


def test_upload_streams_the_body_into_the_store(api: Api, tmp_path: Path) -> None:
    disk = _disk(tmp_path / "up.img")

    def chunks():  # a generator body: httpx sends it chunked, never as one buffer
        with open(disk, "rb") as f:
            while chunk := f.read(256 << 10):
                yield chunk

    r = api.put(
        "/api/images/upload",
        params={"name": "uploaded"},
        content=chunks(),
        headers={**api.auth, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    _, manifest = ImageStore(api.settings.image_root).load_manifest("uploaded")
    import hashlib

    assert manifest.image_sha256 == hashlib.sha256(disk.read_bytes()).digest()
    assert not list(ImageStore(api.settings.image_root).tmp_dir.glob("*upload*"))
    empty = api.put("/api/images/upload", params={"name": "empty"}, content=b"")
    assert empty.status_code == 400


def test_machines_groups_and_csv_import(api: Api) -> None:
    csv = "MAC,name,group\n52:54:00:00:00:01,pc01,lab-b\n52-54-00-00-00-02,pc02,lab-b\n"
    r = api.post(
        "/api/machines/import", content=csv, headers={**api.auth, "Content-Type": "text/csv"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"created": 2, "updated": 0, "groups_created": 1}
    machines = api.get("/api/machines").json()
    assert [m["mac"] for m in machines] == ["52:54:00:00:00:01", "52:54:00:00:00:02"]
    group = api.get("/api/groups").json()[0]
    assert group["name"] == "lab-b" and len(group["machine_ids"]) == 2
    bad = api.post(
        "/api/machines/import",
        content="52:54:00:00:00:03,ok\nnot-a-mac,x\n",
        headers={**api.auth, "Content-Type": "text/csv"},
    )
    assert bad.status_code == 400 and "line 2" in bad.json()["detail"]
    assert len(api.get("/api/machines").json()) == 2  # all or nothing
    mid = machines[0]["id"]
    assert api.patch(f"/api/machines/{mid}", json={"name": "front-desk"}).json()["name"] == (
        "front-desk"
    )
    g2 = api.post("/api/groups", json={"name": "lab-c"}).json()
    assert api.put(f"/api/groups/{g2['id']}/machines", json={"machine_ids": [mid]}).json()[
        "machine_ids"
    ] == [mid]
    assert api.get(f"/api/machines/{mid}").json()["group_id"] == g2["id"]
    assert api.post("/api/groups", json={"name": "lab-c"}).status_code == 409
    assert api.post("/api/machines", json={"mac": "zz"}).status_code == 422
    assert api.delete(f"/api/machines/{mid}").status_code == 204
    assert api.get(f"/api/machines/{mid}").status_code == 404


def test_agent_enrolls_by_mac_and_cannot_report_for_another(api: Api) -> None:
    _captured(api)
    a = api.enroll("52:54:00:aa:00:01", ram_bytes=1 << 30, disks=[{"name": "sda", "size": 1}])
    b = api.enroll("52:54:00:aa:00:02")
    again = api.enroll("52:54:00:aa:00:01")
    machines = api.get("/api/machines").json()
    assert len(machines) == 2 and machines[0]["inventory"]["ram_bytes"] == 1 << 30
    old = api.client.get("/api/agent/assignment", headers=a)
    assert old.status_code == 401  # re-enrolling revoked the first credential
    assert api.client.get("/api/agent/assignment", headers=again).json()["session_id"] is None
    wrong = api.client.post(
        "/api/agent/register",
        headers={"Authorization": "Bearer nope"},
        json={"macs": ["52:54:00:aa:00:03"]},
    )
    assert wrong.status_code == 401
    s = api.post(
        "/api/sessions",
        json={
            "image": "golden",
            "machine_ids": [machines[0]["id"]],
            "start_policy": {"start": "manual"},
        },
    ).json()
    other = api.client.post(
        "/api/agent/progress",
        headers=b,
        json={"session_id": s["id"], "samples": [{"bytes_done": 1, "bytes_total": 2}]},
    )
    assert other.status_code == 403
    forged = api.client.post(
        "/api/agent/result", headers=b, json={"session_id": s["id"], "result": "verified"}
    )
    assert forged.status_code == 403
    assert api.get(f"/api/sessions/{s['id']}").json()["machines"][0]["state"] == "pending"


def test_session_lifecycle_without_a_multicast_interface_fails_with_the_reason(api: Api) -> None:
    image_id = _captured(api)
    m1 = api.post("/api/machines", json={"mac": "52:54:00:bb:00:01"}).json()
    s = api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [m1["id"]], "start_policy": {"start": "manual"}},
    ).json()
    assert s["state"] == "pending" and s["machines"][0]["state"] == "pending"
    busy = api.post("/api/sessions", json={"image": "golden", "machine_ids": [m1["id"]]})
    assert busy.status_code == 409 and "already a target" in busy.json()["detail"]
    assert api.delete(f"/api/images/{image_id}").status_code == 409  # in use
    r = api.post(f"/api/sessions/{s['id']}/start")
    assert r.status_code == 200 and r.json()["state"] == "running"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        detail = api.get(f"/api/sessions/{s['id']}").json()
        if detail["state"] != "running":
            break
        time.sleep(0.1)
    assert detail["state"] == "failed"
    assert "FLEETCAST_MULTICAST_IFACE" in detail["reason"]
    assert detail["machines"][0]["state"] == "no-show"
    rerun = api.post(f"/api/sessions/{s['id']}/rerun")
    assert rerun.status_code == 201 and rerun.json()["rerun_of"] == s["id"]
    kinds = [e["kind"] for e in api.get("/api/events", params={"session_id": s["id"]}).json()]
    assert kinds[::-1][:3] == ["session.created", "session.running", "machine.no-show"]
    assert api.post(f"/api/sessions/{s['id']}/cancel").status_code == 409


def test_cancel_a_pending_session(api: Api) -> None:
    _captured(api)
    m = api.post("/api/machines", json={"mac": "52:54:00:cc:00:01"}).json()
    s = api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [m["id"]], "start_policy": {"start": "manual"}},
    ).json()
    r = api.post(f"/api/sessions/{s['id']}/cancel").json()
    assert r["state"] == "cancelled" and r["machines"][0]["state"] == "cancelled"
    assert api.post("/api/sessions", json={"image": "golden", "machine_ids": []}).status_code == 400
    assert api.get("/api/sessions", params={"state": "cancelled"}).json()[0]["id"] == s["id"]


def test_a_session_left_running_by_a_killed_server_ends_failed_on_restart(api: Api) -> None:
    _captured(api)
    m = api.post("/api/machines", json={"mac": "52:54:00:dd:00:01"}).json()
    s = api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [m["id"]], "start_policy": {"start": "manual"}},
    ).json()
    engine = make_engine(api.settings.db_url)
    with db_session(engine) as db:  # what a kill -9 mid-session leaves behind
        row = db.get(Session, s["id"])
        assert row is not None
        session_svc.mark_running(db, None, row, "test")
    engine.dispose()
    from fastapi.testclient import TestClient

    with TestClient(create_app(api.settings)) as again:
        d = again.get(f"/api/sessions/{s['id']}", headers=api.auth).json()
    assert d["state"] == "failed" and d["reason"] == RESTART_REASON
    assert d["machines"][0]["state"] == "no-show"


def test_metrics_count_sessions_by_state(api: Api) -> None:
    _captured(api)
    m = api.post("/api/machines", json={"mac": "52:54:00:ee:00:01"}).json()
    api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [m["id"]], "start_policy": {"start": "manual"}},
    )
    text = api.get("/metrics").text
    assert 'fleetcast_sessions{state="pending"} 1.0' in text
    assert "fleetcast_sent_bytes_total" in text


def test_progress_is_buffered_then_written_and_a_cancel_reaches_the_agent(api: Api) -> None:
    _captured(api)
    agent = api.enroll("52:54:00:ab:00:01")
    mid = api.get("/api/machines").json()[0]["id"]
    s = api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [mid], "start_policy": {"start": "manual"}},
    ).json()
    engine = make_engine(api.settings.db_url)
    with db_session(engine) as db:  # running, without a sender: the control plane alone
        row = db.get(Session, s["id"])
        assert row is not None
        session_svc.mark_running(db, None, row, "test")
    engine.dispose()

    def report(n: int) -> dict[str, object]:
        r = api.client.post(
            "/api/agent/progress",
            headers=agent,
            json={
                "session_id": s["id"],
                "receiver_id": 7,
                "samples": [{"bytes_done": n, "bytes_total": 1000, "naks": n}],
            },
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert report(10) == {"cancel": False, "reason": ""}
    first = api.get(f"/api/sessions/{s['id']}").json()["machines"][0]
    assert first["state"] == "receiving" and first["bytes_done"] == 10
    for n in (20, 30, 40):
        report(n)
    deadline = time.monotonic() + 10
    while api.get(f"/api/sessions/{s['id']}").json()["machines"][0]["bytes_done"] != 40:
        assert time.monotonic() < deadline, "buffered progress was never written"
        time.sleep(0.1)
    assert api.post(f"/api/sessions/{s['id']}/cancel").status_code == 200
    deadline = time.monotonic() + 5
    while not (reply := report(50))["cancel"]:
        assert time.monotonic() < deadline, "the agent was never told to stop"
        time.sleep(0.05)
    assert "cancelled by user:admin" in str(reply["reason"])


def test_csv_that_is_not_csv_gets_a_400(api: Api) -> None:
    for body in ("\r\xf1\x8b", 'a,"unterminated\n', "52:54:00:00:00:09,a,b,c\n"):
        r = api.post(
            "/api/machines/import", content=body.encode(), headers={"Content-Type": "text/csv"}
        )
        assert r.status_code == 400, (body, r.text)
