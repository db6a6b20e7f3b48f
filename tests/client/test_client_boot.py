"""The boot image's client: kernel command line, and which disk it dares to overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.boot import BootError, BootParams, Disk, list_disks, parse_cmdline, pick_disk

GB = 10**9


def test_the_command_line_the_server_writes_is_read_back() -> None:
    line = (
        "initrd=initrd.img fleetcast.server=http://10.0.0.1:8080 fleetcast.token=abc "
        "fleetcast.machine=7 fleetcast.disk=serial:XY12 fleetcast.after=poweroff "
        "BOOTIF=01-52-54-00-00-00-01 fleetcast.session=3 console=ttyS0,115200 quiet"
    )
    assert parse_cmdline(line) == BootParams(
        server="http://10.0.0.1:8080",
        token="abc",
        machine=7,
        session=3,
        disk="serial:XY12",
        after="poweroff",
    )
    assert parse_cmdline("fleetcast.server=http://s fleetcast.token=t").disk == "auto"


def test_a_session_may_leave_the_machine_up_after_the_deployment() -> None:
    line = "fleetcast.server=http://s fleetcast.token=t fleetcast.after=none fleetcast.disk=sda"
    assert parse_cmdline(line).after == "none"
    assert parse_cmdline("fleetcast.server=http://s fleetcast.token=t").after == "reboot"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("quiet", "no fleetcast.server="),
        ("fleetcast.server=http://s", "no fleetcast.token="),
        (
            "fleetcast.server=http://s fleetcast.token=t fleetcast.after=halt",
            "reboot, poweroff or none",
        ),
        ("fleetcast.server=http://s fleetcast.token=t fleetcast.machine=x", "must be numbers"),
    ],
)
def test_a_command_line_without_what_the_client_needs_says_so(line: str, message: str) -> None:
    with pytest.raises(BootError, match=message):
        parse_cmdline(line)


def _sys_block(root: Path, disks: dict[str, dict[str, str]]) -> Path:
    """A /sys/block-shaped tree (files as the kernel lays them out)."""
    for name, attrs in disks.items():
        d = root / name
        (d / "device").mkdir(parents=True)
        (d / "size").write_text(attrs.get("size", "0") + "\n")
        (d / "removable").write_text(attrs.get("removable", "0") + "\n")
        (d / "device" / "model").write_text(attrs.get("model", "") + "\n")
        (d / "device" / "serial").write_text(attrs.get("serial", "") + "\n")
    return root


def test_disks_are_read_from_sys_block_leaving_out_loop_ram_optical_and_empty(
    tmp_path: Path,
) -> None:
    root = _sys_block(
        tmp_path,
        {
            "vda": {"size": "2097152"},
            "sda": {"size": "1000", "model": "Samsung SSD", "serial": "S1"},
            "loop0": {"size": "100"},
            "sr0": {"size": "100"},
            "ram0": {"size": "100"},
            "sdb": {"size": "0"},  # a card reader without a card
        },
    )
    assert [(d.name, d.size, d.model) for d in list_disks(root)] == [
        ("sda", 512000, "Samsung SSD"),
        ("vda", 2097152 * 512, ""),
    ]


def test_auto_takes_the_only_fixed_disk_and_refuses_to_guess_between_several() -> None:
    ssd = Disk("nvme0n1", 512 * GB, model="Samsung 980", serial="S1")
    stick = Disk("sdb", 32 * GB, model="Cruzer", removable=True, usb=True)
    assert pick_disk("auto", [ssd, stick]) == ssd
    hdd = Disk("sda", 1000 * GB, model="WDC", serial="W9")
    with pytest.raises(BootError, match=r"2 disks match fleetcast\.disk=auto.*Refusing to guess"):
        pick_disk("auto", [ssd, hdd, stick])
    with pytest.raises(BootError, match=r"no disk matches fleetcast\.disk=auto"):
        pick_disk("auto", [stick])


def test_rules_name_a_device_a_model_a_serial_or_a_size() -> None:
    ssd = Disk("nvme0n1", 512 * GB, model="Samsung 980", serial="S1")
    hdd = Disk("sda", 1000 * GB, model="WDC WD10", serial="W9")
    disks = [ssd, hdd]
    assert pick_disk("/dev/sda", disks) == hdd and pick_disk("nvme0n1", disks) == ssd
    assert pick_disk("model:samsung", disks) == ssd and pick_disk("serial:W9", disks) == hdd
    assert pick_disk("largest", disks) == hdd and pick_disk("smallest", disks) == ssd
    with pytest.raises(BootError, match=r"no disk matches fleetcast\.disk=sdc"):
        pick_disk("sdc", disks)
    twin = Disk("sdb", 1000 * GB, model="WDC WD10", serial="W8")
    with pytest.raises(BootError, match=r"2 disks match fleetcast\.disk=largest"):
        pick_disk("largest", [ssd, hdd, twin])
    with pytest.raises(BootError, match=r"2 disks match fleetcast\.disk=model:WDC"):
        pick_disk("model:WDC", [hdd, twin])
