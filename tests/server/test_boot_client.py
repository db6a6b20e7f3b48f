"""The boot image's client (client/boot.py) against the real server on loopback: a machine
that cannot tell which disk to overwrite refuses its session, and the server records why."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from apitest import *  # noqa: F403
from apitest import ENROLL, Api

from client.agent import local_macs
from client.boot import BootParams, deploy
from server.images.capture import CaptureOptions, capture_image
from server.images.store import ImageStore

MIB = 1 << 20


@pytest.fixture
def served(api: Api) -> Iterator[str]:
    """The same app served over HTTP on 127.0.0.1 (the client speaks urllib); its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    app = api.client.app
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def _sys_block(root: Path, disks: dict[str, tuple[int, str]]) -> Path:
    for name, (sectors, serial) in disks.items():
        (root / name / "device").mkdir(parents=True)
        (root / name / "size").write_text(f"{sectors}\n")
        (root / name / "removable").write_text("0\n")
        (root / name / "device" / "serial").write_text(serial + "\n")
    return root


def test_two_fixed_disks_make_the_client_refuse_and_the_server_record_the_reason(
    api: Api, served: str, tmp_path: Path
) -> None:
    if not local_macs():
        pytest.skip("this machine has no network interface with a MAC address")
    disk = tmp_path / "golden.img"
    disk.write_bytes(os.urandom(MIB) + bytes(MIB))
    store = ImageStore(api.settings.image_root)
    capture_image(store, "golden", disk, CaptureOptions(level=1, used_only=False, progress=False))
    assert api.post("/api/images", json={"name": "golden", "mode": "existing"}).status_code == 201
    # the machine as its network boot registered it (by the MAC the client will enroll with)
    machine = api.post("/api/machines", json={"mac": local_macs()[0]}).json()
    session = api.post(
        "/api/sessions",
        json={
            "image": "golden",
            "machine_ids": [machine["id"]],
            "start_policy": {"start": "manual"},
        },
    ).json()
    sys_block = _sys_block(tmp_path / "sys-block", {"sda": (2**21, "A1"), "sdb": (2**21, "B2")})
    params = BootParams(
        server=served, token=ENROLL, machine=machine["id"], session=session["id"], disk="auto"
    )

    assert deploy(params, sys_block) is False

    row = api.get(f"/api/sessions/{session['id']}").json()["machines"][0]
    assert row["state"] == "failed"
    assert "2 disks match fleetcast.disk=auto" in row["reason"]
    assert "serial:TEXT" in row["reason"]  # and what to do about it
    assert "/dev/sda" in row["reason"] and "/dev/sdb" in row["reason"]
