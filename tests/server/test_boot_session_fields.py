"""A session says what its machines do after the deployment and which disk they write.

``after`` (reboot | poweroff | none) and ``disk_rule`` (auto | a device | model:... |
serial:... | largest | smallest) are fields of a session, defaulting to the server's
FLEETCAST_BOOT_AFTER / FLEETCAST_BOOT_DISK; the network-boot script puts the session's
values on the client's kernel command line, and the agent's assignment carries them too.
Real app, real database (SQLite, and PostgreSQL with FLEETCAST_TEST_POSTGRES_URL).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from apitest import *  # noqa: F403
from apitest import ENROLL, Api
from sqlmodel import select

from server.config import Settings
from server.db import db_session
from server.images.capture import CaptureOptions, capture_image
from server.images.store import ImageStore
from server.models import Session

MIB = 1 << 20


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:  # boot enabled, non-default rules
    boot = tmp_path / "bootfiles"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(os.urandom(4096))
    (boot / "initrd.img").write_bytes(os.urandom(4096))
    return Settings(
        FLEETCAST_DATA=tmp_path / "data",
        database_url=database_url,
        enrollment_token=ENROLL,
        compression_level=1,
        boot_enabled=True,
        boot_dir=str(boot),
        boot_after="poweroff",
        boot_disk="serial:LAB-0001",
    )


def _golden(api: Api) -> None:
    disk = api.settings.data_dir.parent / "golden.img"
    disk.write_bytes(os.urandom(MIB) + bytes(MIB))
    store = ImageStore(api.settings.image_root)
    capture_image(store, "golden", disk, CaptureOptions(level=1, used_only=False, progress=False))
    r = api.post("/api/images", json={"name": "golden", "mode": "existing"})
    assert r.status_code == 201, r.text


def _create(api: Api, machine_id: int, **fields: object) -> dict[str, object]:
    body = {"image": "golden", "machine_ids": [machine_id], "start_policy": {"start": "manual"}}
    r = api.post("/api/sessions", json={**body, **fields})
    assert r.status_code == 201, r.text
    created: dict[str, object] = r.json()
    return created


def _kernel_args(api: Api, mac: str) -> dict[str, str]:
    r = api.client.get("/boot/ipxe", params={"mac": mac})
    assert r.status_code == 200, r.text
    line = next(x for x in r.text.splitlines() if x.startswith("kernel "))
    return dict(a.split("=", 1) for a in line.split()[2:] if "=" in a)


def _machine(api: Api, mac: str) -> int:
    r = api.post("/api/machines", json={"mac": mac})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def test_a_session_without_the_fields_takes_the_servers_defaults(api: Api) -> None:
    _golden(api)
    mid = _machine(api, "52:54:00:5e:00:01")
    s = _create(api, mid)
    assert (s["after"], s["disk_rule"]) == ("poweroff", "serial:LAB-0001")
    detail = api.get(f"/api/sessions/{s['id']}").json()
    assert (detail["after"], detail["disk_rule"]) == ("poweroff", "serial:LAB-0001")
    args = _kernel_args(api, "52:54:00:5e:00:01")
    assert args["fleetcast.after"] == "poweroff"
    assert args["fleetcast.disk"] == "serial:LAB-0001"


@pytest.mark.parametrize(
    ("after", "rule"),
    [
        ("none", "model:Samsung_SSD_870"),
        ("reboot", "/dev/nvme0n1"),
        ("poweroff", "largest"),
        ("reboot", "sda"),
    ],
)
def test_the_sessions_own_fields_go_on_the_kernel_command_line(
    api: Api, after: str, rule: str
) -> None:
    _golden(api)
    mid = _machine(api, "52:54:00:5e:00:02")
    s = _create(api, mid, after=after, disk_rule=rule)
    assert (s["after"], s["disk_rule"]) == (after, rule)
    args = _kernel_args(api, "52:54:00:5e:00:02")
    assert (args["fleetcast.after"], args["fleetcast.disk"]) == (after, rule)
    assert args["fleetcast.session"] == str(s["id"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("after", "halt"),
        ("after", ""),
        ("disk_rule", "model:"),
        ("disk_rule", "sda; rm -rf /"),
        ("disk_rule", "serial:a b"),
        ("disk_rule", "${root}"),
        ("disk_rule", "x" * 129),
    ],
)
def test_a_bad_after_or_disk_rule_is_refused_with_a_clear_message(
    api: Api, field: str, value: str
) -> None:
    _golden(api)
    mid = _machine(api, "52:54:00:5e:00:03")
    body = {"image": "golden", "machine_ids": [mid], field: value}
    r = api.post("/api/sessions", json=body)
    assert r.status_code == 422, r.text
    assert field in r.text
    assert api.get("/api/sessions").json() == []  # nothing was created


def test_the_agents_assignment_and_a_rerun_carry_the_sessions_fields(api: Api) -> None:
    _golden(api)
    agent = api.enroll("52:54:00:5e:00:04")
    mid = api.get("/api/machines").json()[0]["id"]
    s = _create(api, mid, after="none", disk_rule="smallest")
    # The sender needs a multicast interface this test does not give; the assignment only
    # needs the session to be running, so the test marks it so in the database.
    with db_session(api.client.app.state.engine) as db:  # type: ignore[attr-defined]
        row = db.exec(select(Session).where(Session.id == s["id"])).one()
        row.state = "running"
        db.add(row)
    job = api.client.get("/api/agent/assignment", headers=agent).json()
    assert job["session_id"] == s["id"]
    assert (job["after"], job["disk_rule"]) == ("none", "smallest")
    r = api.client.post(
        "/api/agent/result",
        headers=agent,
        json={"session_id": s["id"], "result": "failed", "reason": "disk went away"},
    )
    assert r.status_code == 200, r.text
    with db_session(api.client.app.state.engine) as db:  # type: ignore[attr-defined]
        row = db.exec(select(Session).where(Session.id == s["id"])).one()
        row.state = "failed"
        db.add(row)
    rerun = api.post(f"/api/sessions/{s['id']}/rerun")
    assert rerun.status_code == 201, rerun.text
    assert (rerun.json()["after"], rerun.json()["disk_rule"]) == ("none", "smallest")
