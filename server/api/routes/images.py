"""Images: list, detail, register from a server path, upload as a stream, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from server.api.deps import ERRORS, AdminDep, BusDep, DbDep, Id, SettingsDep, StoreDep
from server.models import Image, ImagePublic, ImageRegister
from server.services import images as svc
from server.services.audit import record

router = APIRouter(prefix="/api/images", tags=["images"], responses=ERRORS)
NameQuery = Annotated[str, Query(min_length=1, max_length=128)]


@router.get("", response_model=list[ImagePublic])
def list_images(_who: AdminDep, db: DbDep) -> list[Image]:
    return svc.list_images(db)


@router.get("/{image_id}", response_model=ImagePublic)
def get_image(image_id: Id, _who: AdminDep, db: DbDep) -> Image:
    return svc.get_image(db, image_id)


@router.post("", response_model=ImagePublic, status_code=status.HTTP_201_CREATED)
def register_image(
    body: ImageRegister,
    who: AdminDep,
    db: DbDep,
    store: StoreDep,
    settings: SettingsDep,
    bus: BusDep,
) -> Image:
    """Capture a raw disk or device, import a qcow2/VMDK/VHD(X) file, or register an image
    already in the store. Blocks until the capture has finished."""
    if body.mode != "existing":
        if not body.path:
            from server.services.errors import Invalid

            raise Invalid("give the path of a disk, device or image file on the server")
        svc.capture_into_store(
            store,
            body.name,
            Path(body.path),
            mode=body.mode,
            level=body.level or settings.compression_level,
            all_blocks=body.all_blocks,
        )
    image = svc.register_existing(db, store, body.name, body.family)
    record(db, bus, "image.added", actor=who.actor, message=f"image {body.name} ({body.mode})")
    return image


@router.put(
    "/upload",
    response_model=ImagePublic,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload_image(
    request: Request,
    name: NameQuery,
    who: AdminDep,
    store: StoreDep,
    settings: SettingsDep,
    bus: BusDep,
    family: Annotated[str, Query(max_length=128)] = "",
) -> Image:
    """Upload a raw disk image as the request body (streamed to disk, then captured);
    ``family``: its image family (default: the name up to its last "/")."""
    return await svc.upload_image(
        request.app.state.engine,
        store,
        bus,
        name,
        request.stream(),
        level=settings.compression_level,
        actor=who.actor,
        family=family,
    )


@router.delete("/{image_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_image(image_id: Id, who: AdminDep, db: DbDep, store: StoreDep, bus: BusDep) -> None:
    """Delete the image and its unshared blocks; refused while a session uses it."""
    image = svc.get_image(db, image_id)
    name = image.name
    svc.delete_image(db, store, image)
    record(db, bus, "image.deleted", actor=who.actor, message=f"image {name} deleted")
