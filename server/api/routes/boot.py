"""Network boot: the iPXE script per MAC and the client boot image's files.

Mounted only with ``FLEETCAST_BOOT_ENABLED=true`` (server/main.py). Both routes are public by
necessity: a machine's firmware sends no bearer token. docs/PXE.md says what that exposes.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse

from server.api.deps import ERRORS, BusDep, DbDep, SettingsDep
from server.config import Settings
from server.models import normalize_mac
from server.services import boot as svc
from server.services.errors import Invalid, NotFound

router = APIRouter(prefix="/boot", tags=["boot"], responses=ERRORS)

#: (method, path) of this router's routes: public (no token), like those in deps.PUBLIC_ROUTES.
BOOT_PUBLIC_ROUTES = {
    ("GET", "/boot/start.ipxe"),
    ("GET", "/boot/ipxe"),
    ("GET", "/boot/files/{name}"),
}

Fact = Annotated[str, Query(max_length=128)]
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@router.get("/start.ipxe", response_class=PlainTextResponse)
def start_script(request: Request, settings: SettingsDep) -> PlainTextResponse:
    """What DHCP hands iPXE: a script that asks /boot/ipxe with this machine's MAC."""
    text = svc.start_script(_options(settings, request).base_url)
    return PlainTextResponse(text, headers={"Cache-Control": "no-store"})


@router.get("/ipxe", response_class=PlainTextResponse)
def ipxe_script(
    request: Request,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    mac: Annotated[str, Query(max_length=32, description="the booting NIC's MAC (${net0/mac})")],
    platform: Fact = "",
    arch: Fact = "",
    manufacturer: Fact = "",
    product: Fact = "",
    serial: Fact = "",
    uuid: Fact = "",
    asset: Fact = "",
) -> PlainTextResponse:
    """The iPXE script for the machine with ``mac``: boot the client for a due deployment,
    else boot the local disk (an unknown MAC is registered first, and may get a menu)."""
    try:
        mac = normalize_mac(mac)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    facts = {
        "platform": platform,
        "arch": arch,
        "manufacturer": manufacturer,
        "product": product,
        "serial": serial,
        "uuid": uuid,
        "asset": asset,
    }
    address = request.client.host if request.client else ""
    req = svc.BootRequest(mac=mac, address=address, facts=facts)
    late = settings.catchup_timeout if settings.catchup else None  # issue 9: late machines
    decision = svc.decide(db, bus, req, settings.boot_unknown, late)
    text = svc.render_ipxe(decision, _options(settings, request))
    return PlainTextResponse(text, headers={"Cache-Control": "no-store"})


@router.get("/files/{name}", response_class=FileResponse)
def boot_file(name: str, settings: SettingsDep) -> FileResponse:
    """A file of the client boot image (``vmlinuz``, ``initrd.img``) from the boot dir."""
    root = settings.boot_files_dir
    path = root / name
    if not _FILE_NAME.match(name) or not path.is_file():
        raise NotFound(f"no boot file {name!r} in {root}: build the boot image into it")
    return FileResponse(path, media_type="application/octet-stream")


def _options(settings: Settings, request: Request) -> svc.BootOptions:
    base = settings.boot_server_url or str(request.base_url)
    return svc.BootOptions(
        base_url=base.rstrip("/"),
        enrollment_token=settings.enrollment_token,
        files_dir=settings.boot_files_dir,
        disk_rule=settings.boot_disk,
        after=settings.boot_after,
        kernel_args=settings.boot_kernel_args,
        menu_timeout=settings.boot_menu_timeout,
    )
