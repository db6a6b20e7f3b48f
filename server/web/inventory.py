"""Images (register, upload, delete) and machines and groups (edit, CSV import)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from sqlmodel import col, func, select

from server.api.deps import (
    WEB_PREFIX,
    BusDep,
    DbDep,
    Id,
    SettingsDep,
    StoreDep,
    WebDep,
)
from server.images.store import StoreError
from server.models import GroupCreate, GroupUpdate, Machine, MachineUpdate, Session
from server.services import images as svc
from server.services import machines as machines_svc
from server.services import wol
from server.services.audit import record
from server.services.errors import Invalid, ServiceError
from server.web.common import Csrf, check_post, page, see_other

router = APIRouter(prefix=WEB_PREFIX, include_in_schema=False)


def _images_page(
    request: Request, user: Any, db: Any, status: int = 200, **ctx: Any
) -> HTMLResponse:
    uses = dict(
        db.exec(select(col(Session.image_id), func.count()).group_by(col(Session.image_id))).all()
    )
    ctx.setdefault("error", "")
    ctx.setdefault("form", {})
    return page(request, "images.html", user, status, images=svc.list_images(db), uses=uses, **ctx)


@router.get("/images", response_class=HTMLResponse)
def images(request: Request, user: WebDep, db: DbDep) -> HTMLResponse:
    """Every image: sizes, ratio, block kinds, partition table, sessions using it."""
    return _images_page(request, user, db)


@router.post("/images", response_model=None)
def register_image(
    request: Request,
    user: WebDep,
    db: DbDep,
    store: StoreDep,
    settings: SettingsDep,
    bus: BusDep,
    name: Annotated[str, Form(max_length=128)] = "",
    path: Annotated[str, Form(max_length=4096)] = "",
    mode: Annotated[str, Form(max_length=16)] = "capture",
    csrf: Csrf = "",
) -> Response:
    """Capture/import a file on the server, or register one already in the store."""
    check_post(request, user, csrf)
    form = {"name": name, "path": path, "mode": mode}
    try:
        if mode not in ("capture", "import", "existing"):
            raise Invalid("mode must be capture, import or existing")
        if not name.strip():
            raise Invalid("give the image a name")
        if mode != "existing":
            if not path.strip():
                raise Invalid("give the path of a disk, device or image file on the server")
            svc.capture_into_store(
                store,
                name.strip(),
                Path(path.strip()),
                mode=mode,
                level=settings.compression_level,
                all_blocks=False,
            )
        svc.register_existing(db, store, name.strip())
        record(db, bus, "image.added", actor=user.who.actor, message=f"image {name} ({mode})")
    except (ServiceError, StoreError, OSError, ValueError) as exc:
        db.rollback()
        return _images_page(request, user, db, 400, error=str(exc), form=form)
    return see_other(f"{WEB_PREFIX}/images")


@router.post("/images/upload")
async def upload_image(
    request: Request,
    user: WebDep,
    store: StoreDep,
    settings: SettingsDep,
    bus: BusDep,
    name: Annotated[str, Query(min_length=1, max_length=128)],
) -> Response:
    """A raw disk image as the body (the page's script sends the file with X-CSRF-Token)."""
    check_post(request, user)
    await svc.upload_image(
        request.app.state.engine,
        store,
        bus,
        name,
        request.stream(),
        level=settings.compression_level,
        actor=user.who.actor,
    )
    return Response(status_code=204)


@router.post("/images/{image_id}/delete")
def delete_image(
    request: Request,
    image_id: Id,
    user: WebDep,
    db: DbDep,
    store: StoreDep,
    bus: BusDep,
    csrf: Csrf = "",
) -> Response:
    check_post(request, user, csrf)
    image = svc.get_image(db, image_id)
    name = image.name
    try:
        svc.delete_image(db, store, image)
    except ServiceError as exc:
        db.rollback()
        return _images_page(request, user, db, exc.status, error=str(exc))
    record(db, bus, "image.deleted", actor=user.who.actor, message=f"image {name} deleted")
    return see_other(f"{WEB_PREFIX}/images")


# -- machines and groups ----------------------------------------------------------------------


def _machines_page(
    request: Request, user: Any, db: Any, status: int = 200, **ctx: Any
) -> HTMLResponse:
    groups = machines_svc.list_groups(db)
    ctx.setdefault("error", "")
    ctx.setdefault("notice", "")
    return page(
        request,
        "machines.html",
        user,
        status,
        machines=machines_svc.list_machines(db),
        groups=groups,
        group_names={g.id: g.name for g in groups},
        image_names={i.id: i.name for i in svc.list_images(db)},
        **ctx,
    )


@router.get("/machines", response_class=HTMLResponse)
def machines(request: Request, user: WebDep, db: DbDep) -> HTMLResponse:
    """Inventory, group, last deployment and its outcome."""
    return _machines_page(request, user, db)


@router.post("/machines/{machine_id}", response_model=None)
def edit_machine(
    request: Request,
    machine_id: Id,
    user: WebDep,
    db: DbDep,
    name: Annotated[str, Form(max_length=63)] = "",
    group_id: Annotated[str, Form(max_length=32)] = "",
    csrf: Csrf = "",
) -> Response:
    """Rename a machine or move it to another group ('' = no group)."""
    check_post(request, user, csrf)
    m: Machine = machines_svc.get_machine(db, machine_id)
    try:
        gid = int(group_id) if group_id else None
        changes = MachineUpdate.model_validate({"name": name, "group_id": gid})
        machines_svc.update_machine(db, m, changes.model_dump(exclude_unset=True))
        db.commit()
    except (ServiceError, ValueError) as exc:
        db.rollback()
        return _machines_page(request, user, db, 400, error=f"machine {machine_id}: {exc}")
    return see_other(f"{WEB_PREFIX}/machines")


@router.post("/machines-import", response_model=None)
def import_machines(
    request: Request,
    user: WebDep,
    db: DbDep,
    csv_text: Annotated[str, Form(max_length=5_000_000)] = "",
    csrf: Csrf = "",
) -> Response:
    """CSV lines ``MAC,name,group``: all or nothing, the error names the line."""
    check_post(request, user, csrf)
    try:
        r = machines_svc.import_csv(db, csv_text)
        db.commit()
    except ServiceError as exc:
        db.rollback()
        return _machines_page(request, user, db, 400, error=str(exc), csv_text=csv_text)
    notice = f"{r.created} created, {r.updated} updated, {r.groups_created} groups created"
    return _machines_page(request, user, db, notice=notice)


@router.post("/groups", response_model=None)
def create_group(
    request: Request,
    user: WebDep,
    db: DbDep,
    name: Annotated[str, Form(max_length=63)] = "",
    description: Annotated[str, Form(max_length=1024)] = "",
    csrf: Csrf = "",
) -> Response:
    check_post(request, user, csrf)
    try:
        body = GroupCreate.model_validate({"name": name.strip(), "description": description})
        machines_svc.create_group(db, body.name, body.description)
        db.commit()
    except (ServiceError, ValidationError) as exc:
        db.rollback()
        return _machines_page(request, user, db, 400, error=f"group {name!r}: {exc}")
    return see_other(f"{WEB_PREFIX}/machines")


@router.post("/groups/{group_id}", response_model=None)
def edit_group(
    request: Request,
    group_id: Id,
    user: WebDep,
    db: DbDep,
    name: Annotated[str, Form(max_length=63)] = "",
    description: Annotated[str, Form(max_length=1024)] = "",
    wol_broadcast: Annotated[str, Form(max_length=45)] = "",
    wol_port: Annotated[str, Form(max_length=8)] = "",
    csrf: Csrf = "",
) -> Response:
    """Rename a group, change its description and its Wake-on-LAN target."""
    check_post(request, user, csrf)
    g = machines_svc.get_group(db, group_id)
    try:
        changes = GroupUpdate.model_validate({"name": name.strip(), "description": description})
        port = int(wol_port) if wol_port.strip() else None
        if wol_broadcast.strip():
            wol.check_target(wol_broadcast.strip(), port or 9)
        machines_svc.update_group(db, g, changes.model_dump(exclude_unset=True))
        g.wol_broadcast, g.wol_port = wol_broadcast.strip(), port
        db.add(g)
        db.commit()
    except (ServiceError, ValidationError, ValueError) as exc:
        db.rollback()
        return _machines_page(request, user, db, 400, error=f"group {group_id}: {exc}")
    return see_other(f"{WEB_PREFIX}/machines")


@router.post("/groups/{group_id}/delete", response_model=None)
def delete_group(
    request: Request, group_id: Id, user: WebDep, db: DbDep, csrf: Csrf = ""
) -> Response:
    """Delete a group (its machines stay, without a group); refused while a session uses it."""
    check_post(request, user, csrf)
    try:
        machines_svc.delete_group(db, machines_svc.get_group(db, group_id))
        db.commit()
    except ServiceError as exc:
        db.rollback()
        return _machines_page(request, user, db, exc.status, error=str(exc))
    return see_other(f"{WEB_PREFIX}/machines")
