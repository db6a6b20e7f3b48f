"""Network boot: what a PXE-booting machine does next, and the iPXE script that says so.

iPXE (chained from dnsmasq, docs/PXE.md) asks ``GET /boot/ipxe?mac=...``. The decision:

- the machine is a target of a pending or running session and has not finished it: boot the
  fleetcast client (kernel + initramfs over HTTP) with the server URL, the enrollment token
  and the machine id on the kernel command line;
- any other known machine (including one whose deployment just succeeded): boot its disk;
- an unknown MAC: register the machine (inventory from what iPXE tells), then boot its disk
  or show a short menu, as ``boot_unknown`` says.

No FastAPI here: ``decide`` works on a database session, ``render_ipxe`` is pure text.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session as DbSession
from sqlmodel import col, select

from server.events import EventBus
from server.models import (
    MACHINE_ACTIVE,
    SESSION_ACTIVE,
    Session,
    SessionMachine,
)
from server.services import delta
from server.services.audit import record
from server.services.machines import enroll, machine_by_mac

log = logging.getLogger(__name__)

#: The client boot image's files, as ``deploy/bootimage/build`` names them.
KERNEL = "vmlinuz"
INITRD = "initrd.img"
#: Values that go on the kernel command line or into an iPXE script unquoted: no spaces,
#: no iPXE ``${...}`` expansion, nothing a shell or the kernel would split.
_SAFE_ARG = re.compile(r"^[A-Za-z0-9._~+/=:@%-]*$")
#: What iPXE may tell about the machine (``${manufacturer}`` ...), kept in its inventory.
PXE_FIELDS = ("platform", "arch", "manufacturer", "product", "serial", "uuid", "asset")

DEPLOY, LOCAL, MENU = "deploy", "local", "menu"


@dataclass(frozen=True)
class BootRequest:
    """What a booting machine's iPXE told us: its MAC (normalised) and hardware strings."""

    mac: str
    address: str = ""
    facts: dict[str, str] = field(default_factory=dict)  #: PXE_FIELDS iPXE filled in


@dataclass(frozen=True)
class BootDecision:
    """What the machine is to do: ``deploy`` (boot the client), ``local`` or ``menu``."""

    action: str
    machine_id: int
    mac: str
    session_id: int | None = None
    image: str = ""
    registered: bool = False  #: the machine was unknown and has just been created
    reason: str = ""
    #: the deployment's own post-deployment action and disk rule ("": the server's defaults)
    after: str = ""
    disk_rule: str = ""


@dataclass(frozen=True)
class BootOptions:
    """How scripts are rendered (from Settings, plus the URL the machines reach us at)."""

    base_url: str  #: e.g. http://10.0.0.1:8080 (no trailing slash)
    enrollment_token: str
    files_dir: Path  #: holds KERNEL and INITRD
    disk_rule: str = "auto"
    after: str = "reboot"
    kernel_args: str = ""
    menu_timeout: float = 5.0


def decide(
    db: DbSession,
    bus: EventBus | None,
    req: BootRequest,
    unknown: str,
    late_window: float | None = None,
) -> BootDecision:
    """The decision for ``req``; registers an unknown machine. ``unknown``: "local"/"menu".

    ``late_window`` (catch-up on, issue 9): a machine that missed its deployment's transfer
    (no-show) boots the client too, to catch up, while the session runs or up to that many
    seconds after its verdict (services/delta.py ``late_row``); None: it boots locally."""
    known = machine_by_mac(db, [req.mac]) is not None
    facts = {k: v[:128] for k, v in req.facts.items() if k in PXE_FIELDS and v}
    m = enroll(db, bus, [req.mac], {"pxe": facts} if facts else {}, req.address)
    mid = m.id or 0
    row = db.exec(
        select(SessionMachine, Session)
        .join(Session, col(Session.id) == SessionMachine.session_id)
        .where(SessionMachine.machine_id == mid)
        .where(col(Session.state).in_(SESSION_ACTIVE))
        .where(col(SessionMachine.state).in_(MACHINE_ACTIVE))
        .order_by(col(Session.id).desc())
    ).first()
    late = delta.late_row(db, mid, late_window) if row is None and late_window is not None else None
    if late is not None:
        row = (late, db.get(Session, late.session_id))
    if row is not None and row[1] is not None:
        s = row[1]
        d = BootDecision(
            DEPLOY,
            mid,
            m.mac,
            s.id,
            s.image_name,
            not known,
            "deployment due" if late is None else "deployment due (late: catch-up over HTTP)",
            after=s.after,
            disk_rule=s.disk_rule,
        )
    elif not known:
        d = BootDecision(
            MENU if unknown == MENU else LOCAL, mid, m.mac, registered=True, reason="registered"
        )
    else:
        d = BootDecision(LOCAL, mid, m.mac, reason="no deployment due")
    record(
        db,
        bus,
        "machine.boot",
        actor=f"machine:{mid}",
        machine_id=mid,
        session_id=d.session_id,
        message=f"machine {m.mac} network-booted from {req.address or '?'}: {d.action} "
        f"({d.reason})",
        action=d.action,
    )
    log.info("boot: machine %d (%s): %s (%s)", mid, m.mac, d.action, d.reason)
    return d


# -- iPXE scripts ---------------------------------------------------------------------------------

#: Boot the first disk: UEFI firmware goes on to its next boot entry on ``exit``; a BIOS boots
#: drive 0x80 (``exit`` alone may leave a BIOS with nothing else to try).
LOCAL_BOOT = """\
iseq ${platform} efi && exit ||
sanboot --no-describe --drive 0x80 || exit
"""


def start_script(base_url: str) -> str:
    """The script DHCP points iPXE at: it asks ``/boot/ipxe`` with this machine's MAC and
    what the firmware tells. The URL is absolute: a script fetched through a PXE boot menu
    has no base URI iPXE can resolve a relative one against."""
    query = "&".join(
        [
            "mac=${netX/mac}",
            "platform=${platform}",
            "arch=${buildarch}",
            "manufacturer=${manufacturer:uristring}",
            "product=${product:uristring}",
            "serial=${serial:uristring}",
            "uuid=${uuid}",
            "asset=${asset:uristring}",
        ]
    )
    return (
        "#!ipxe\n"
        f"chain --autofree {base_url}/boot/ipxe?{query} ||\n"
        "echo fleetcast: the server gave no boot script; booting from the local disk\n"
        "sleep 5\n" + LOCAL_BOOT
    )


def render_ipxe(d: BootDecision, opt: BootOptions) -> str:
    """The iPXE script for decision ``d`` (always a valid script: problems are echoed and
    the machine boots its disk instead)."""
    head = f"#!ipxe\necho fleetcast: machine {d.machine_id} ({d.mac}): {d.reason}\n"
    if d.action == LOCAL:
        return head + "echo fleetcast: booting from the local disk\n" + LOCAL_BOOT
    problem = client_problem(opt)
    if problem:
        log.error("boot: machine %d cannot boot the client: %s", d.machine_id, problem)
        return head + f"echo fleetcast: cannot boot the client: {problem}\nsleep 5\n" + LOCAL_BOOT
    if d.action == DEPLOY:
        return (
            head
            + f"echo fleetcast: session {d.session_id} (image {_clean(d.image)}): "
            + "starting the fleetcast client\n"
            + _client_lines(d, opt)
            + "echo fleetcast: the client did not boot; booting from the local disk\n"
            + "sleep 5\n"
            + LOCAL_BOOT
        )
    timeout_ms = int(opt.menu_timeout * 1000)
    return (
        head
        + f"menu fleetcast: machine {d.machine_id} ({d.mac}) is registered\n"
        + "item local Boot from the local disk\n"
        + "item client Start the fleetcast client (inventory; waits for a deployment)\n"
        + f"choose --timeout {timeout_ms} --default local target && goto ${{target}} || "
        + "goto local\n"
        + ":client\n"
        + _client_lines(d, opt)
        + ":local\n"
        + LOCAL_BOOT
    )


def client_problem(opt: BootOptions) -> str:
    """Why the client cannot be booted with ``opt`` ("" when it can)."""
    if not opt.enrollment_token:
        return "enrollment is closed: set FLEETCAST_ENROLLMENT_TOKEN on the server"
    for what, value in (
        ("FLEETCAST_ENROLLMENT_TOKEN", opt.enrollment_token),
        ("the server URL", opt.base_url),
        ("FLEETCAST_BOOT_DISK", opt.disk_rule),
    ):
        if not _SAFE_ARG.match(value):
            return f"{what} has characters a kernel command line cannot carry: use [A-Za-z0-9._-]"
    for name in (KERNEL, INITRD):
        if not (opt.files_dir / name).is_file():
            return (
                f"{opt.files_dir / name} is missing: build the client boot image "
                "(deploy/bootimage/build --out FLEETCAST_BOOT_DIR)"
            )
    return ""


def kernel_command_line(d: BootDecision, opt: BootOptions) -> str:
    """The client kernel's arguments (parsed by client/boot.py); the session's ``after``
    and ``disk_rule`` win over the server-wide defaults in ``opt``."""
    disk = d.disk_rule if d.disk_rule and _SAFE_ARG.match(d.disk_rule) else opt.disk_rule
    args = [
        f"initrd={INITRD}",
        f"fleetcast.server={opt.base_url}",
        f"fleetcast.token={opt.enrollment_token}",
        f"fleetcast.machine={d.machine_id}",
        f"fleetcast.disk={disk}",
        f"fleetcast.after={d.after or opt.after}",
        f"BOOTIF=01-{d.mac.replace(':', '-')}",
    ]
    if d.session_id is not None:
        args.append(f"fleetcast.session={d.session_id}")
    return " ".join(args + opt.kernel_args.split())


def _client_lines(d: BootDecision, opt: BootOptions) -> str:
    files = f"{opt.base_url}/boot/files"
    return (
        f"kernel {files}/{KERNEL} {kernel_command_line(d, opt)}\ninitrd {files}/{INITRD}\nboot ||\n"
    )


def _clean(text: str) -> str:
    """``text`` safe inside an iPXE ``echo`` (no setting expansion)."""
    return re.sub(r"[^A-Za-z0-9._ :-]", "_", text)
