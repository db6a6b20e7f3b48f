"""Network boot decisions, through the real app and database: which machine boots what."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from apitest import *  # noqa: F403
from apitest import ENROLL, Api
from fastapi.testclient import TestClient

from server.config import Settings
from server.images.capture import CaptureOptions, capture_image
from server.images.store import ImageStore
from server.main import create_app

MIB = 1 << 20
KERNEL_BYTES = os.urandom(4096)
INITRD_BYTES = os.urandom(8192)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:  # the boot variant of apitest.settings
    boot = tmp_path / "bootfiles"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(KERNEL_BYTES)
    (boot / "initrd.img").write_bytes(INITRD_BYTES)
    return Settings(
        FLEETCAST_DATA=tmp_path / "data",
        database_url=database_url,
        enrollment_token=ENROLL,
        compression_level=1,
        boot_enabled=True,
        boot_dir=str(boot),
        boot_kernel_args="console=ttyS0,115200 quiet",
    )


def _script(api: Api, mac: str, **facts: str) -> str:
    r = api.client.get("/boot/ipxe", params={"mac": mac, **facts})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    text: str = r.text
    assert text.startswith("#!ipxe\n")
    return text


def _kernel_args(script: str) -> dict[str, str]:
    line = next(x for x in script.splitlines() if x.startswith("kernel "))
    return dict(a.split("=", 1) for a in line.split()[2:] if "=" in a)


def _boots_local_disk(script: str) -> bool:
    return "sanboot --no-describe --drive 0x80" in script and "\nkernel " not in script


def _golden(api: Api) -> dict[str, object]:
    disk = api.settings.data_dir.parent / "golden.img"
    disk.write_bytes(b"fleetcast" * 1024 + os.urandom(MIB) + bytes(MIB - 9 * 1024))
    store = ImageStore(api.settings.image_root)
    capture_image(store, "golden", disk, CaptureOptions(level=1, used_only=False, progress=False))
    r = api.post("/api/images", json={"name": "golden", "mode": "existing"})
    assert r.status_code == 201, r.text
    image: dict[str, object] = r.json()
    return image


def _session(api: Api, machine_id: int) -> int:
    r = api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": [machine_id], "start_policy": {"start": "manual"}},
    )
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def test_an_unknown_machine_is_registered_with_what_ipxe_tells_and_boots_its_disk(
    api: Api,
) -> None:
    script = _script(
        api, "52-54-00-AB-CD-01", manufacturer="QEMU", product="Standard PC", platform="pcbios"
    )
    assert _boots_local_disk(script)
    assert "iseq ${platform} efi && exit" in script  # UEFI firmware: exit to the next entry
    machines = api.get("/api/machines").json()
    assert [m["mac"] for m in machines] == ["52:54:00:ab:cd:01"]
    assert machines[0]["inventory"]["pxe"] == {
        "manufacturer": "QEMU",
        "product": "Standard PC",
        "platform": "pcbios",
    }
    assert machines[0]["last_seen_at"] is not None
    kinds = [e["kind"] for e in api.get("/api/events").json()]
    assert kinds[:2] == ["machine.boot", "machine.created"]
    assert _boots_local_disk(_script(api, "52:54:00:ab:cd:01"))  # known now, nothing due
    assert len(api.get("/api/machines").json()) == 1


def test_a_machine_with_a_due_deployment_boots_the_client_with_its_parameters(api: Api) -> None:
    _golden(api)
    m = api.post("/api/machines", json={"mac": "52:54:00:ab:cd:02"}).json()
    session_id = _session(api, m["id"])
    script = _script(api, "52:54:00:AB:CD:02")
    args = _kernel_args(script)
    assert args["fleetcast.server"] == "http://testserver"
    assert args["fleetcast.token"] == ENROLL
    assert args["fleetcast.machine"] == str(m["id"])
    assert args["fleetcast.session"] == str(session_id)
    assert args["fleetcast.disk"] == "auto" and args["fleetcast.after"] == "reboot"
    assert args["BOOTIF"] == "01-52-54-00-ab-cd-02" and args["console"] == "ttyS0,115200"
    assert "initrd http://testserver/boot/files/initrd.img" in script
    kernel_url = script.split("kernel ", 1)[1].split()[0]
    assert kernel_url == "http://testserver/boot/files/vmlinuz"
    assert api.client.get("/boot/files/vmlinuz").content == KERNEL_BYTES
    assert api.client.get("/boot/files/initrd.img").content == INITRD_BYTES


def test_after_a_verified_deployment_the_next_boot_goes_to_the_disk(api: Api) -> None:
    image = _golden(api)
    agent = api.enroll("52:54:00:ab:cd:03")
    machine_id = api.get("/api/machines").json()[0]["id"]
    session_id = _session(api, machine_id)
    assert "fleetcast.machine" in _script(api, "52:54:00:ab:cd:03")
    r = api.client.post(
        "/api/agent/result",
        headers=agent,
        json={
            "session_id": session_id,
            "result": "verified",
            "bytes_done": image["data_bytes"],
            "manifest_digest": image["digest"],
        },
    )
    assert r.status_code == 200 and r.json()["state"] == "succeeded"
    assert _boots_local_disk(_script(api, "52:54:00:ab:cd:03"))


def test_a_cancelled_or_failed_deployment_boots_the_disk_too(api: Api) -> None:
    _golden(api)
    m = api.post("/api/machines", json={"mac": "52:54:00:ab:cd:04"}).json()
    session_id = _session(api, m["id"])
    assert api.post(f"/api/sessions/{session_id}/cancel").status_code == 200
    assert _boots_local_disk(_script(api, "52:54:00:ab:cd:04"))


def test_a_bad_mac_is_refused_and_registers_nothing(api: Api) -> None:
    for bad in ("", "52:54:00:ab:cd", "zz:54:00:ab:cd:01", "${net0/mac}"):
        r = api.client.get("/boot/ipxe", params={"mac": bad})
        assert r.status_code in (400, 422), bad
    assert api.get("/api/machines").json() == []


def test_boot_files_serve_only_plain_names_from_the_boot_dir(api: Api) -> None:
    assert api.client.get("/boot/files/missing.img").status_code == 404
    assert api.client.get("/boot/files/..%2Fdata").status_code == 404
    assert api.client.get("/boot/files/.hidden").status_code == 404


def _app(tmp_path: Path, **boot: object) -> TestClient:
    db = tmp_path / f"app{len(list(tmp_path.glob('app*.db')))}.db"
    settings = Settings(
        FLEETCAST_DATA=tmp_path / "data",
        database_url=f"sqlite:///{db}",
        compression_level=1,
        **boot,  # type: ignore[arg-type]
    )
    return TestClient(create_app(settings))


def test_unknown_machines_get_a_menu_when_configured(tmp_path: Path) -> None:
    boot = tmp_path / "b"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"k")
    (boot / "initrd.img").write_bytes(b"i")
    client = _app(
        tmp_path,
        enrollment_token=ENROLL,
        boot_enabled=True,
        boot_dir=str(boot),
        boot_unknown="menu",
        boot_menu_timeout=3,
        boot_server_url="http://10.9.8.7:8080",
    )
    with client:
        script = client.get("/boot/ipxe", params={"mac": "52:54:00:ab:cd:05"}).text
        assert "choose --timeout 3000 --default local target" in script
        assert "kernel http://10.9.8.7:8080/boot/files/vmlinuz" in script
        assert "fleetcast.session" not in script  # the client only enrolls and waits
        assert "sanboot" in script.split(":local", 1)[1]
        again = client.get("/boot/ipxe", params={"mac": "52:54:00:ab:cd:05"}).text
        assert "menu" not in again and "sanboot" in again  # known now: its disk


def test_without_enrollment_token_or_boot_image_the_script_says_so_and_boots_the_disk(
    tmp_path: Path,
) -> None:
    client = _app(tmp_path, boot_enabled=True, boot_unknown="menu")
    with client:
        script = client.get("/boot/ipxe", params={"mac": "52:54:00:ab:cd:06"}).text
        assert "enrollment is closed: set FLEETCAST_ENROLLMENT_TOKEN" in script
        assert _boots_local_disk(script)
    client = _app(tmp_path, boot_enabled=True, boot_unknown="menu", enrollment_token="t")
    with client:
        script = client.get("/boot/ipxe", params={"mac": "52:54:00:ab:cd:07"}).text
        assert "vmlinuz is missing: build the client boot image" in script
        assert _boots_local_disk(script)


def test_boot_routes_exist_only_when_enabled(tmp_path: Path) -> None:
    client = _app(tmp_path)
    with client:
        assert client.get("/boot/ipxe", params={"mac": "52:54:00:ab:cd:08"}).status_code == 404
        assert client.get("/boot/files/vmlinuz").status_code == 404


def test_the_start_script_asks_for_this_machines_script_by_mac(api: Api) -> None:
    text = api.client.get("/boot/start.ipxe").text
    assert text.startswith("#!ipxe\n")
    chain = next(x for x in text.splitlines() if x.startswith("chain "))
    assert "http://testserver/boot/ipxe?mac=${netX/mac}&" in chain
    assert "manufacturer=${manufacturer:uristring}" in chain
    assert "sanboot --no-describe --drive 0x80" in text  # the server did not answer: the disk


def test_enabling_boot_opens_only_the_boot_routes(api: Api) -> None:
    from fastapi.routing import APIRoute

    from server.api.deps import PUBLIC_ROUTES, WEB_PREFIX, WEB_PUBLIC_ROUTES
    from server.api.routes.boot import BOOT_PUBLIC_ROUTES

    def flatten(routes: list[Any]) -> list[Any]:
        out: list[Any] = []
        for route in routes:
            inner = getattr(route, "original_router", None)
            out += flatten(list(inner.routes)) if inner is not None else [route]
        return out

    routes = [
        (method, route.path)
        for route in flatten(list(api.client.app.routes))  # type: ignore[attr-defined]
        if isinstance(route, APIRoute)
        for method in route.methods - {"HEAD", "OPTIONS"}
    ]
    assert set(routes) >= BOOT_PUBLIC_ROUTES
    for method, path in routes:
        if (method, path) in PUBLIC_ROUTES | BOOT_PUBLIC_ROUTES:
            continue
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        r = api.client.request(method, concrete, json={}, follow_redirects=False)
        if path.startswith(WEB_PREFIX):  # dashboard pages send a stranger to the log-in page
            if (method, path) not in WEB_PUBLIC_ROUTES:
                assert r.status_code == 303, f"{method} {path} answered without a log-in"
            continue
        assert r.status_code == 401, f"{method} {path} answered without a token"
