"""QEMU machines network-boot, are imaged over multicast (or captured) and boot the new system.

The whole chain, with nothing faked: QEMU's iPXE ROM asks DHCP (a site DHCP server plus
fleetcast's proxy DHCP from ``fleetcast pxe dnsmasq-config``), chains the server's
``/boot/start.ipxe`` and ``/boot/ipxe?mac=``; unknown machines are registered and sent to
their (empty) disks, fail to boot, and retry. A session is then created for them: the next
network boot starts the client boot image (deploy/bootimage/build), which enrolls, writes the
multicast image to the virtio disk and reboots; the server now sends them to their disks,
which boot a tiny Linux printing this run's marker on the serial console.

Capture (issue 10): a reference machine holding that tiny Linux network-boots into the client
in capture mode, which reads its disk (partclone maps the FAT partition) and uploads it; the
machine then boots its own disk again, and the captured image, deployed to a second machine
with an empty disk, boots there too.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleethelp import build_image, file_sha256
from pxelab import (
    BootServerLab,
    Machine,
    PxeLab,
    accelerator,
    boot_image,
    marker_disk,
    missing_tools,
)

from bench.lab import Lab
from protocol.manifest import BlockKind
from server.images.store import ImageStore

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]
MACHINES = 2
DISK_MIB = 24
#: Bounds for each phase under TCG on 2 shared cores (seconds).
REGISTER_WITHIN = 120
DEPLOY_WITHIN = 240
MARKER_WITHIN = 120
CAPTURE_WITHIN = 240


@pytest.fixture
def pxe_lab(make_lab: Callable[..., Lab], tmp_path: Path) -> Iterator[PxeLab]:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    image_dir = boot_image()
    lab = make_lab(1)  # r0 plays the site's DHCP server
    server = BootServerLab(lab, tmp_path / "data", tmp_path)
    server.boot_dir = image_dir
    pl = PxeLab(lab, server, tmp_path, accel=accelerator(image_dir / "vmlinuz", tmp_path))
    try:
        yield pl
    finally:
        pl.close()


def _machines(pl: PxeLab) -> list[dict[str, Any]]:
    assert pl.server.api is not None
    machines: list[dict[str, Any]] = pl.server.api.get("/api/machines").json()
    return machines


def _wait(pl: PxeLab, what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}\n{pl.report()}")


def test_two_machines_pxe_boot_get_imaged_over_multicast_and_boot_their_disks(
    pxe_lab: PxeLab, tmp_path: Path
) -> None:
    pl = pxe_lab
    marker = f"FLEETCAST-MARKER-{secrets.token_hex(8)}"
    disk = tmp_path / "golden.raw"
    marker_disk(disk, pl.server.boot_dir / "vmlinuz", marker, tmp_path, DISK_MIB)
    image = build_image(pl.server.data_dir, "tiny-linux", disk)
    api = pl.server.start()
    conf = pl.start_dhcp()
    assert "dhcp-range=" in conf and ",proxy," in conf
    vms = [pl.add_machine(f"vm{i}", DISK_MIB) for i in range(MACHINES)]
    started = time.monotonic()
    for vm in vms:
        pl.start_machine(vm)

    # 1. unknown machines are registered by their first network boot
    macs = {vm.mac for vm in vms}
    machines = _wait(
        pl,
        "both machines to be registered by PXE",
        lambda: {m["mac"] for m in _machines(pl)} >= macs and _machines(pl),
        REGISTER_WITHIN,
    )
    registered = time.monotonic() - started
    assert all(m["inventory"].get("pxe", {}).get("platform") == "pcbios" for m in machines)

    # 2. a deployment to them: their next network boot runs the client
    r = api.post(
        "/api/sessions",
        json={
            "image": image.name,
            "machine_ids": [m["id"] for m in machines],
            "start_policy": {"start": "now", "min_receivers": MACHINES, "max_wait": 200},
        },
    )
    assert r.status_code == 201, r.text
    session_id = r.json()["id"]

    created = time.monotonic()
    enrolled: dict[str, float] = {}

    def ended() -> dict[str, Any] | None:
        for vm in vms:  # when each client came up, for the timings printed below
            if vm.name not in enrolled and "fleetcast: enrolled with" in vm.console():
                enrolled[vm.name] = time.monotonic() - created
        assert pl.server.api is not None
        detail: dict[str, Any] = pl.server.api.get(f"/api/sessions/{session_id}").json()
        return detail if detail["state"] not in ("pending", "running") else None

    detail = _wait(pl, "the session to end", ended, DEPLOY_WITHIN)
    deployed = time.monotonic() - started
    assert detail["state"] == "succeeded", f"{detail}\n{pl.report()}"
    assert [m["state"] for m in detail["machines"]] == ["succeeded"] * MACHINES

    # 3. they reboot, the server sends them to their disks, the new system prints the marker
    for vm in vms:
        _wait(
            pl,
            f"{vm.name} to print the marker",
            lambda vm=vm: marker in vm.console(),
            MARKER_WITHIN,
        )
    booted = time.monotonic() - started
    for vm in vms:
        assert vm.proc is not None
        assert pl.lab.wait(vm.proc, 60) == 0  # the tiny Linux powered the machine off
        console = vm.console()
        assert "fleetcast: enrolled with" in console and "deployment succeeded" in console
        assert file_sha256(vm.disk) == hashlib.sha256(disk.read_bytes()).digest()
    kinds = [e["kind"] for e in api.get("/api/events", params={"kind": "machine.boot"}).json()]
    assert len(kinds) >= 3 * MACHINES  # registered, deploy, then local disk, per machine
    clients = ", ".join(f"{t:.0f}" for t in sorted(enrolled.values()))
    print(
        f"\nPXE lab ({pl.accel}): registered {registered:.0f} s, imaged {deployed:.0f} s, "
        f"marker {booted:.0f} s after power-on; clients enrolled {clients} s after the "
        "session was created"
    )


def _session_end(pl: PxeLab, session_id: int, timeout: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        assert pl.server.api is not None
        detail: dict[str, Any] = pl.server.api.get(f"/api/sessions/{session_id}").json()
        return detail if detail["state"] not in ("pending", "running") else None

    detail: dict[str, Any] = _wait(pl, f"session {session_id} to end", ended, timeout)
    assert detail["state"] == "succeeded", f"{detail}\n{pl.report()}"
    return detail


def _boots_marker(pl: PxeLab, vm: Machine, marker: str) -> None:
    """``vm`` prints ``marker`` from its own disk and powers itself off."""
    _wait(pl, f"{vm.name} to print the marker", lambda: marker in vm.console(), MARKER_WITHIN)
    assert vm.proc is not None
    assert pl.lab.wait(vm.proc, 60) == 0  # the tiny Linux powered the machine off


def test_a_machine_captured_over_pxe_is_deployed_to_another_which_boots(
    pxe_lab: PxeLab, tmp_path: Path
) -> None:
    pl = pxe_lab
    marker = f"FLEETCAST-CAPTURED-{secrets.token_hex(8)}"
    golden = tmp_path / "reference.raw"
    marker_disk(golden, pl.server.boot_dir / "vmlinuz", marker, tmp_path, DISK_MIB)
    api = pl.server.start()
    pl.start_dhcp()
    ref, blank = pl.add_machine("ref", DISK_MIB), pl.add_machine("blank", DISK_MIB)
    ref.disk.write_bytes(golden.read_bytes())  # the machine staff set up by hand
    ids = {}
    for vm in (ref, blank):  # known machines (as a first network boot would register them)
        r = api.post("/api/machines", json={"mac": vm.mac, "name": vm.name})
        assert r.status_code == 201, r.text
        ids[vm.name] = r.json()["id"]
    started = time.monotonic()

    # 1. capture the reference machine: its next network boot runs the client in capture mode
    r = api.post(
        "/api/captures",
        json={"machine_id": ids["ref"], "target_image": "lab/ref", "level": 1, "after": "reboot"},
    )
    assert r.status_code == 201, r.text
    pl.start_machine(ref)
    _session_end(pl, r.json()["id"], CAPTURE_WITHIN)
    captured = time.monotonic() - started
    _, m = ImageStore(pl.server.data_dir / "images").load_manifest("lab/ref")
    assert m.partitions[0].fs == "vfat" and m.partitions[0].used_map == "partclone"
    assert m.count(BlockKind.UNUSED) > 0  # the free FAT clusters were not read
    assert m.image_sha256 == hashlib.sha256(golden.read_bytes()).digest()
    # ... and it boots its own disk again, untouched
    _boots_marker(pl, ref, marker)
    console = ref.console()
    assert "capture verified" in console and file_sha256(ref.disk) == m.image_sha256

    # 2. the captured image, deployed to the machine with the empty disk, boots there
    r = api.post(
        "/api/sessions",
        json={
            "image": "lab/ref",
            "machine_ids": [ids["blank"]],
            "start_policy": {"start": "now", "min_receivers": 1, "max_wait": 200},
        },
    )
    assert r.status_code == 201, r.text
    deploy_started = time.monotonic()
    pl.start_machine(blank)
    _session_end(pl, r.json()["id"], DEPLOY_WITHIN)
    deployed = time.monotonic() - deploy_started
    _boots_marker(pl, blank, marker)
    assert file_sha256(blank.disk) == m.image_sha256
    print(
        f"\nPXE capture lab ({pl.accel}): captured {captured:.0f} s after power-on, "
        f"deployed {deployed:.0f} s after the second machine's power-on, "
        f"{time.monotonic() - started:.0f} s in all"
    )
