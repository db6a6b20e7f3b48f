"""The client boot image's program: ``python3 -m client.boot`` (run by its /init).

The network is up (DHCP on every wired NIC, deploy/bootimage/init). This reads the kernel
command line the server's iPXE script set (server/services/boot.py)::

    fleetcast.server=URL fleetcast.token=T fleetcast.machine=ID [fleetcast.session=ID]
    fleetcast.disk=RULE fleetcast.after=reboot|poweroff|none

then enrolls, finds the target disk by RULE (refusing ambiguity on the console and to the
server), receives the assigned image with progress lines on the console, and reboots or
powers off. Only the stdlib, protocol/ and the client's own modules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.agent import Agent, AgentError, AgentOptions, ProgressReporter
from client.receive import Receiver

log = logging.getLogger("fleetcast")

#: Block devices that are never a target: loop, RAM, zram, device-mapper, md, optical, floppy.
_NOT_DISKS = ("loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd")
AFTER = ("reboot", "poweroff", "none")  #: none: stay up (the boot image's /init opens a shell)
#: How long enrollment is retried (the server may be restarting; the network settling).
ENROLL_FOR = 120.0
#: Seconds a failure stays on screen before the machine reboots or powers off.
SHOW_FAILURE = 30.0


class BootError(Exception):
    """The client cannot go on; the message says what went wrong and what to do."""


@dataclass(frozen=True)
class BootParams:
    """What the server put on the kernel command line."""

    server: str
    token: str
    machine: int = 0
    session: int = 0
    disk: str = "auto"
    after: str = "reboot"


def parse_cmdline(text: str) -> BootParams:
    """The ``fleetcast.*`` arguments of a kernel command line; raises BootError."""
    args: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("fleetcast."):
            args[key.removeprefix("fleetcast.")] = value
    missing = [k for k in ("server", "token") if not args.get(k)]
    if missing:
        raise BootError(
            f"the kernel command line has no fleetcast.{missing[0]}=: boot this image through "
            "the fleetcast server's iPXE script (docs/PXE.md), which sets it"
        )
    after = args.get("after", "reboot")
    if after not in AFTER:
        raise BootError(f"fleetcast.after={after!r}: expected reboot, poweroff or none")
    try:
        machine, session = int(args.get("machine") or 0), int(args.get("session") or 0)
    except ValueError:
        raise BootError("fleetcast.machine= and fleetcast.session= must be numbers") from None
    return BootParams(
        server=args["server"],
        token=args["token"],
        machine=machine,
        session=session,
        disk=args.get("disk") or "auto",
        after=after,
    )


# -- the target disk --------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    """A block device of this machine, as /sys/block describes it."""

    name: str
    size: int  #: bytes
    model: str = ""
    serial: str = ""
    removable: bool = False
    usb: bool = False

    def describe(self) -> str:
        what = " ".join(x for x in (self.model, self.serial) if x) or "no model"
        return f"/dev/{self.name} ({self.size / 1e9:.1f} GB, {what})"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def list_disks(sys_block: Path = Path("/sys/block")) -> list[Disk]:
    """Every whole disk with a size (partitions, loop, RAM, optical ... left out)."""
    out = []
    for dev in sorted(sys_block.iterdir()) if sys_block.is_dir() else []:
        sectors = _read(dev / "size")
        if dev.name.startswith(_NOT_DISKS) or not sectors.isdigit() or int(sectors) == 0:
            continue
        target = str(dev.resolve()) if dev.is_symlink() else ""
        out.append(
            Disk(
                name=dev.name,
                size=int(sectors) * 512,
                model=_read(dev / "device" / "model"),
                serial=_read(dev / "device" / "serial") or _read(dev / "serial"),
                removable=_read(dev / "removable") == "1",
                usb="/usb" in target,
            )
        )
    return out


def pick_disk(rule: str, disks: list[Disk]) -> Disk:
    """The disk ``rule`` names among ``disks``; raises BootError when none or several match.

    Rules: ``auto`` (the only fixed disk: not removable, not USB), a device (``sda``,
    ``/dev/nvme0n1``), ``model:TEXT`` / ``serial:TEXT`` (substring, among fixed disks),
    ``largest`` / ``smallest`` (among fixed disks; a tie is ambiguous).
    """
    fixed = [d for d in disks if not d.removable and not d.usb]
    listing = "; ".join(d.describe() for d in disks) or "none"
    if rule in ("largest", "smallest"):
        if not fixed:
            raise BootError(f"no fixed disk to write (disks: {listing})")
        best = (max if rule == "largest" else min)(d.size for d in fixed)
        matches = [d for d in fixed if d.size == best]
    elif rule.startswith(("model:", "serial:")):
        field, _, text = rule.partition(":")
        matches = [d for d in fixed if text.lower() in getattr(d, field).lower()]
    elif rule == "auto":
        matches = fixed
    else:
        matches = [d for d in disks if d.name == rule.removeprefix("/dev/")]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise BootError(f"no disk matches fleetcast.disk={rule} (disks: {listing})")
    raise BootError(
        f"{len(matches)} disks match fleetcast.disk={rule}: "
        + "; ".join(d.describe() for d in matches)
        + ". Refusing to guess which one to overwrite: set FLEETCAST_BOOT_DISK on the server "
        "to a device, model:TEXT or serial:TEXT"
    )


# -- the run ----------------------------------------------------------------------------------


class ConsoleAgent(Agent):
    """The agent, also printing a progress line on the console with every report."""

    def _progress(
        self, session_id: int, receiver: Receiver, reporter: ProgressReporter
    ) -> dict[str, Any]:
        sample = reporter.sample({})
        if reporter.total:
            say(
                f"session {session_id}: {100 * reporter.done / reporter.total:5.1f}%  "
                f"{reporter.done / 2**20:,.0f} of {reporter.total / 2**20:,.0f} MiB  "
                f"{sample['rate_bps'] / 8e6:.1f} MB/s"
            )
        return super()._progress(session_id, receiver, reporter)


def say(text: str) -> None:
    """One line on the console."""
    print(f"fleetcast: {text}", flush=True)


def enroll(agent: Agent, params: BootParams) -> None:
    """Register, retrying for ENROLL_FOR seconds; raises BootError."""
    deadline = time.monotonic() + ENROLL_FOR
    while True:
        try:
            mid = agent.register()
            break
        except AgentError as exc:
            if time.monotonic() >= deadline:
                raise BootError(f"cannot enroll with {params.server}: {exc}") from None
            say(f"enrollment failed ({exc}); retrying")
            time.sleep(5)
    if params.machine and mid != params.machine:
        say(f"note: the server now knows this machine as {mid}, not {params.machine}")
    say(f"enrolled with {params.server} as machine {mid}")


def refuse(agent: Agent, session_id: int, reason: str) -> None:
    """Tell the server this machine refuses ``session_id`` (0: the one assigned, if any
    within a minute): the machine ends ``failed`` with ``reason`` in its session."""
    assert agent.api is not None
    try:
        if not session_id:
            agent.options.wait = 60.0
            session_id = int(agent.wait_assignment()["session_id"])
        body = {"session_id": session_id, "result": "refused", "reason": reason[:2048]}
        status, reply = agent.api.call("POST", "/api/agent/result", body)
        say(f"told the server (HTTP {status}: {reply})")
    except AgentError as exc:
        say(f"could not tell the server: {exc}")


def deploy(params: BootParams, sys_block: Path = Path("/sys/block")) -> bool:
    """Enroll, find the disk, receive; True when the server recorded success."""
    agent = ConsoleAgent(AgentOptions(server=params.server, token=params.token, target=""))
    enroll(agent, params)
    try:
        disk = pick_disk(params.disk, list_disks(sys_block))
    except BootError as exc:
        say(f"REFUSED: {exc}")
        refuse(agent, params.session, str(exc))
        return False
    agent.options.target = f"/dev/{disk.name}"
    say(f"target disk {disk.describe()}; waiting for a deployment or capture")
    verdict = asyncio.run(agent.run_once())
    ok = verdict.get("state") == "succeeded"
    what, done = (
        ("capture", "image stored and verified")
        if verdict.get("kind") == "capture"
        else ("deployment", "all blocks verified")
    )
    say(f"{what} {verdict.get('state')}: {verdict.get('reason') or done}")
    return ok


def finish(after: str) -> None:
    """Flush the disks and reboot or power off now (busybox, forced: we are the init);
    ``none`` only flushes: the machine stays up for whoever is at its console."""
    os.sync()
    if after == "none":
        say("staying up as the session says (fleetcast.after=none)")
        return
    say(f"{after} now")
    subprocess.run(["/bin/busybox", after, "-f"], check=False)


def main() -> int:
    """Run the boot-time client; reboots/powers off, or returns a status when it cannot."""
    logging.basicConfig(level=logging.INFO, format="fleetcast: %(message)s", stream=sys.stdout)
    try:
        params = parse_cmdline(_read(Path("/proc/cmdline")))
    except BootError as exc:
        say(str(exc))
        return 2
    try:
        ok = deploy(params)
    except (BootError, AgentError) as exc:
        say(f"FAILED: {exc}")
        ok = False
    if not ok and params.after != "none":
        say(f"{params.after} in {SHOW_FAILURE:.0f} s")
        time.sleep(SHOW_FAILURE)
    finish(params.after)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
