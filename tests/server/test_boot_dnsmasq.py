"""``fleetcast pxe dnsmasq-config``: configurations dnsmasq accepts, and clear refusals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fleetcast.cli import main
from server.pxe import DnsmasqOptions, PxeConfigError, dnsmasq_config


@pytest.fixture
def tftp(tmp_path: Path) -> Path:
    """A TFTP root holding the two iPXE programs (as Debian's ipxe package does)."""
    for name in ("undionly.kpxe", "snponly.efi", "ipxe.efi"):
        (tmp_path / name).write_bytes(b"\0" * 64)
    return tmp_path


def _check_with_dnsmasq(text: str, tmp_path: Path) -> None:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq (Debian: dnsmasq-base) is not installed")
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(text)
    r = subprocess.run(["dnsmasq", "--test", "-C", str(conf)], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr.decode()


def test_proxy_mode_answers_pxe_with_ipxe_and_ipxe_with_the_servers_script(
    tftp: Path, tmp_path: Path
) -> None:
    opt = DnsmasqOptions("http://10.0.0.1:8080", "eth1", subnet="10.0.0.0/24", tftp_root=tftp)
    text = dnsmasq_config(opt)
    lines = text.splitlines()
    assert "dhcp-range=10.0.0.0,proxy,255.255.255.0" in lines
    assert "port=0" in lines and "interface=eth1" in lines and f"tftp-root={tftp}" in lines
    assert "dhcp-userclass=set:ipxe,iPXE" in lines and "dhcp-match=set:ipxe,175" in lines
    assert 'pxe-service=tag:!ipxe,x86PC,"fleetcast: load iPXE (BIOS)",undionly.kpxe' in lines
    assert 'pxe-service=tag:!ipxe,X86-64_EFI,"fleetcast: load iPXE (UEFI)",snponly.efi' in lines
    assert 'pxe-service=tag:ipxe,x86PC,"fleetcast",http://10.0.0.1:8080/boot/start.ipxe' in lines
    assert not any(x.startswith("dhcp-boot") for x in lines)
    _check_with_dnsmasq(text, tmp_path)


def test_own_range_mode_with_router_advertisements(tftp: Path, tmp_path: Path) -> None:
    opt = DnsmasqOptions(
        "http://10.0.0.1:8080/",
        "br0",
        dhcp_range="10.0.0.100,10.0.0.200",
        tftp_root=tftp,
        uefi_file="ipxe.efi",
        router_advertisements=True,
    )
    lines = dnsmasq_config(opt).splitlines()
    assert "dhcp-range=10.0.0.100,10.0.0.200,255.255.255.0,1h" in lines
    assert "dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe" in lines
    assert "dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi" in lines
    assert "dhcp-boot=tag:ipxe,http://10.0.0.1:8080/boot/start.ipxe" in lines
    assert "enable-ra" in lines and "dhcp-range=::,constructor:br0,ra-only" in lines
    _check_with_dnsmasq("\n".join(lines) + "\n", tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"server_url": "10.0.0.1:8080"}, "must be like http://"),
        ({"server_url": "http://x/boot"}, "no path"),
        ({"interface": "eth 1"}, "not a network interface"),
        ({"subnet": ""}, "give either --proxy"),
        ({"dhcp_range": "10.0.0.1,10.0.0.9"}, "give either --proxy"),
        ({"subnet": "10.0.0.0/33"}, "bad address"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_reason(
    tftp: Path, changes: dict[str, str], message: str
) -> None:
    base = {"server_url": "http://10.0.0.1:8080", "interface": "eth1", "subnet": "10.0.0.0/24"}
    with pytest.raises(PxeConfigError, match=message):
        dnsmasq_config(DnsmasqOptions(**{**base, **changes}, tftp_root=tftp))  # type: ignore[arg-type]


def test_a_missing_ipxe_program_names_the_package(tmp_path: Path) -> None:
    opt = DnsmasqOptions("http://10.0.0.1:8080", "eth1", subnet="10.0.0.0/24", tftp_root=tmp_path)
    with pytest.raises(PxeConfigError, match="apt-get install ipxe"):
        dnsmasq_config(opt)


def test_the_command_writes_the_file_or_says_what_is_wrong(
    tftp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleetcast.conf"
    common = ["--server-url", "http://192.0.2.1:8080", "--interface", "eth1", "--tftp-root"]
    assert main(["pxe", "dnsmasq-config", *common, str(tftp), "--proxy", "192.0.2.0/24",
                 "-o", str(out)]) == 0  # fmt: skip
    assert "192.0.2.1:8080/boot/start.ipxe" in out.read_text()
    assert main(["pxe", "dnsmasq-config", *common, str(tmp_path / "none"), "--proxy",
                 "192.0.2.0/24"]) == 2  # fmt: skip
    assert "install Debian's ipxe package" in capsys.readouterr().err
