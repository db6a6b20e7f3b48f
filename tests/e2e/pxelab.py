"""Real network boots in a namespace lab: dnsmasq, the fleetcast server and QEMU machines.

Topology (every piece inside the lab's private namespaces, removed with the lab):

    [bridge ns] br0 ── tap-vmN ── QEMU vmN (-boot n, virtio-net, an empty virtio disk)
                 ├──── sender ns: fleetcast server + dnsmasq (proxy DHCP, TFTP)
                 └──── r0 ns: "the site's DHCP server" (a plain dnsmasq with a range)

The machines use QEMU's built-in iPXE ROM, get an address from the site DHCP server and the
boot script URL from fleetcast's proxy DHCP (``fleetcast pxe dnsmasq-config --proxy``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleethelp import ROOT
from serverlab import PORT, ServerLab

from bench.lab import Lab, Node

BUILD = ROOT / "deploy" / "bootimage" / "build"
SERIAL_KEEP = 200_000  #: bytes of a serial log shown when a test fails


def boot_image(cache: Path | None = None) -> Path:
    """Build (or reuse the cached) client boot image; the directory with vmlinuz/initrd.img."""
    cmd = [sys.executable, str(BUILD)]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"deploy/bootimage/build failed:\n{r.stderr[-3000:]}")
    return Path(r.stdout.split()[0])


def missing_tools() -> str | None:
    """Why the PXE lab cannot run here (None when it can)."""
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dnsmasq", "dnsmasq-base"),
        ("syslinux", "syslinux"),
        ("mcopy", "mtools"),
        ("mkfs.fat", "dosfstools"),
        ("sfdisk", "fdisk"),
        ("apt-get", "apt"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is missing: apt-get install {package} (scripts/setup)"
    for path in ("/usr/lib/ipxe/undionly.kpxe", "/usr/lib/syslinux/mbr/mbr.bin", "/bin/busybox"):
        if not Path(path).exists():
            return f"{path} is missing: run scripts/setup (ipxe, syslinux-common, busybox-static)"
    return None


# -- the disk image the machines get: a tiny Linux that prints a marker -----------------------


def marker_disk(path: Path, vmlinuz: Path, marker: str, work: Path, mib: int = 24) -> None:
    """A BIOS-bootable raw disk: MBR (syslinux) + a FAT partition with the kernel and an
    initramfs whose /init prints ``marker`` on the serial console and powers off."""
    root = work / "marker-root"
    for d in ("bin", "dev", "proc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    init = root / "init"
    init.write_text(
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t devtmpfs dev /dev\n"
        f"/bin/busybox echo '{marker}' > /dev/ttyS0\n"
        "/bin/busybox sync\n"
        "/bin/busybox poweroff -f\n"
    )
    init.chmod(0o755)
    names = "\n".join(sorted(str(p.relative_to(root)) for p in root.rglob("*"))) + "\n"
    cpio = subprocess.run(
        ["/bin/busybox", "cpio", "-o", "-H", "newc"],
        cwd=root,
        input=names.encode(),
        capture_output=True,
        check=True,
    ).stdout
    initrd = work / "marker.img"
    import gzip

    initrd.write_bytes(gzip.compress(cpio, 6))
    cfg = work / "syslinux.cfg"
    cfg.write_text(
        "DEFAULT marker\nPROMPT 0\nTIMEOUT 0\nLABEL marker\n  KERNEL vmlinuz\n"
        "  APPEND initrd=marker.img console=ttyS0,115200 quiet panic=-1\n"
    )
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    _run(["sfdisk", "--quiet", str(path)], input="label: dos\nstart=2048, type=e, bootable\n")
    part_kib = (mib << 10) - 1024
    _run(["mkfs.fat", "-F", "16", "-n", "MARKER", "--offset", "2048", str(path), str(part_kib)])
    _run(["syslinux", "--install", "--offset", str(2048 * 512), str(path)])
    img = f"{path}@@{2048 * 512}"
    _run(["mcopy", "-i", img, str(vmlinuz), str(initrd), str(cfg), "::"])
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()[:440]
    with open(path, "r+b") as f:
        f.write(mbr)


def _run(argv: list[str], input: str | None = None) -> None:
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {r.stderr.strip()}")


# -- machines ---------------------------------------------------------------------------------


def accelerator(vmlinuz: Path, work: Path) -> str:
    """``kvm`` when /dev/kvm really boots a guest (the kernel prints within 8 s), else ``tcg``.

    Some hosts' /dev/kvm opens but cannot run a BIOS guest, so opening it proves nothing.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    log = work / "kvm-probe.log"
    probe = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-accel",
            "kvm",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(vmlinuz),
            "-append",
            "console=ttyS0 panic=-1",
            "-serial",
            f"file:{log}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and probe.poll() is None:
            if log.exists() and b"Linux version" in log.read_bytes():
                return "kvm"
            time.sleep(0.2)
        return "tcg"
    finally:
        if probe.poll() is None:
            probe.kill()
        probe.wait(timeout=10)


@dataclass
class Machine:
    """A QEMU virtual PC on the lab's bridge."""

    name: str
    mac: str
    disk: Path
    serial: Path
    proc: subprocess.Popen[bytes] | None = None

    def console(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""


@dataclass
class PxeLab:
    """The fleetcast server, proxy DHCP, a site DHCP server and QEMU machines in ``lab``."""

    lab: Lab
    server: ServerLab
    work: Path
    accel: str = "tcg"
    machines: list[Machine] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def bridge(self) -> Node:
        return Node("bridge", self.lab.bridge_ns, "", "")

    @property
    def site_dhcp(self) -> Node:
        return self.lab.receivers[0]

    def start_dhcp(self) -> str:
        """The site's DHCP server (r0) and fleetcast's proxy DHCP (sender); returns the
        generated fleetcast configuration."""
        sub = self.lab.subnet
        site = self.work / "site-dhcp.conf"
        site.write_text(
            f"port=0\ninterface=lab0\nbind-interfaces\ndhcp-range={sub}.100,{sub}.150,1h\n"
            f"dhcp-option=option:router,{sub}.1\nenable-ra\n"
            f"dhcp-range=::,constructor:lab0,ra-only\n"
        )
        conf = self.work / "fleetcast-dnsmasq.conf"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fleetcast",
                "pxe",
                "dnsmasq-config",
                "--server-url",
                self.server.url,
                "--interface",
                "lab0",
                "--proxy",
                f"{sub}.0/24",
                "--log-dhcp",
                "-o",
                str(conf),
            ],
            check=True,
            cwd=ROOT,
            timeout=60,
        )
        # IPv6 on r0's lab0 (router advertisements: iPXE stops waiting for IPv6 at once)
        self.lab.run(
            self.site_dhcp,
            ["sh", "-ec", "echo 0 > /proc/sys/net/ipv6/conf/lab0/disable_ipv6"],
        )
        self.lab.run(self.site_dhcp, ["ip", "addr", "add", "fd5e:f1ee:7ca5::1/64", "dev", "lab0"])
        self._dnsmasq(self.site_dhcp, site, "site-dhcp")
        self._dnsmasq(self.lab.sender, conf, "proxy-dhcp")
        return conf.read_text()

    def _dnsmasq(self, node: Node, conf: Path, name: str) -> None:
        argv = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=" + str(conf), "--pid-file=",
            "--user=root", "--group=root", f"--dhcp-leasefile={self.work / name}.leases",
            f"--log-facility={self.work / name}.log",
        ]  # fmt: skip
        self.procs.append(self.lab.popen(node, argv, stdout=subprocess.DEVNULL))

    def add_machine(self, name: str, disk_mib: int) -> Machine:
        """A machine with an empty disk, on a tap port of the bridge (not started)."""
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        disk = self.work / f"{name}.disk"
        with open(disk, "wb") as f:
            f.truncate(disk_mib << 20)
        tap = f"tap-{name}"
        self.lab.run(self.bridge, ["ip", "tuntap", "add", tap, "mode", "tap"])
        self.lab.run(self.bridge, ["ip", "link", "set", tap, "master", "br0", "up"])
        m = Machine(name, mac, disk, self.work / f"{name}.serial")
        self.machines.append(m)
        return m

    def start_machine(self, m: Machine) -> None:
        """Power on ``m``: network boot first; a failed boot retries after 2 s."""
        argv = [
            "qemu-system-x86_64", "-accel", self.accel, "-m", "384", "-smp", "1",
            "-nodefaults", "-display", "none", "-vga", "none",
            "-boot", "order=n,reboot-timeout=2000",
            "-netdev", f"tap,id=n0,ifname=tap-{m.name},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={m.mac}",
            "-drive", f"file={m.disk},format=raw,if=virtio,cache=unsafe",
            "-serial", f"file:{m.serial}", "-monitor", "none",
            # SeaBIOS copies the BIOS and iPXE screen output to the serial port
            "-fw_cfg", f"name=etc/sercon-port,file={self._sercon()}",
        ]  # fmt: skip
        log = open(self.work / f"{m.name}.qemu.log", "wb")  # noqa: SIM115 (the child keeps it)
        try:
            m.proc = self.lab.popen(self.bridge, argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def _sercon(self) -> Path:
        path = self.work / "sercon-port"
        path.write_bytes((0x3F8).to_bytes(2, "little"))
        return path

    def report(self) -> str:
        """Every log, for a failing assertion."""
        parts = []
        for m in self.machines:
            parts.append(f"--- {m.name} serial\n{m.console()[-SERIAL_KEEP:]}")
            qlog = self.work / f"{m.name}.qemu.log"
            if qlog.exists():
                parts.append(f"--- {m.name} qemu\n{qlog.read_text(errors='replace')[-2000:]}")
        for name in ("site-dhcp", "proxy-dhcp"):
            log = self.work / f"{name}.log"
            if log.exists():
                parts.append(f"--- {name}\n{log.read_text(errors='replace')[-6000:]}")
        parts.append(f"--- server\n{self.server.log('server')[-8000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for m in self.machines:
            if m.proc is not None:
                self.lab.kill(m.proc)
        for p in self.procs:
            self.lab.kill(p)
        self.server.close()


class BootServerLab(ServerLab):
    """The server with network boot enabled, serving ``boot_dir``."""

    boot_dir: Path = Path()

    @property
    def env(self) -> dict[str, str]:
        return {
            **super().env,
            "FLEETCAST_BOOT_ENABLED": "true",
            "FLEETCAST_BOOT_DIR": str(self.boot_dir),
            "FLEETCAST_BOOT_SERVER_URL": f"http://{self.lab.sender.address}:{PORT}",
            "FLEETCAST_BOOT_KERNEL_ARGS": "console=ttyS0,115200",
            "FLEETCAST_PROGRESS_INTERVAL": "2",
        }
