"""Images: the database's view of the image store (server/images/), kept in step with it.

Capture, import and upload run the store's own code (capture_image / import_image) in a
worker thread; the database row is written only once the store holds the complete image.
An upload is streamed to a temp file in the store's tmp/ directory chunk by chunk (never
held in memory), then captured and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session as DbSession
from sqlmodel import col, select

from protocol.manifest import BlockKind, Manifest
from server.db import db_session
from server.events import EventBus
from server.images.capture import CaptureOptions, capture_image
from server.images.importer import import_image
from server.images.store import ImageNotFound, ImageStore, StoreError, check_name
from server.models import SESSION_ACTIVE, Image, Session, image_family
from server.services.audit import record
from server.services.errors import Conflict, Invalid, NotFound

log = logging.getLogger(__name__)

#: Uploads larger than this are refused (a disk image of 16 TiB is already absurd).
MAX_UPLOAD = 16 << 40


def image_row(name: str, manifest: Manifest, digest: bytes, family: str = "") -> Image:
    """A new Image row describing ``manifest``; ``family`` "": derived from the name."""
    return Image(
        name=name,
        family=family or image_family(name),
        digest=digest.hex(),
        image_size=manifest.image_size,
        stored_bytes=manifest.stored_bytes,
        data_bytes=manifest.data_bytes(),
        block_size=manifest.block_size,
        block_count=manifest.block_count,
        data_blocks=manifest.count(BlockKind.DATA),
        zero_blocks=manifest.count(BlockKind.ZERO),
        partition_table=manifest.partition_table,
        source=dict(manifest.source),
    )


def get_image(db: DbSession, image_id: int) -> Image:
    image = db.get(Image, image_id)
    if image is None:
        raise NotFound(f"no image with id {image_id}")
    return image


def image_by_name(db: DbSession, name: str) -> Image:
    image = db.exec(select(Image).where(Image.name == name)).first()
    if image is None:
        raise NotFound(f"no image named {name!r}; see GET /api/images")
    return image


def list_images(db: DbSession) -> list[Image]:
    return list(db.exec(select(Image).order_by(col(Image.name))))


def sync_store(db: DbSession, store: ImageStore) -> int:
    """Register every image the store holds that the database does not know; returns how many.

    Images captured with ``fleetcast image capture`` appear in the API this way.
    """
    known = {i.name for i in db.exec(select(Image))}
    added = 0
    for info in store.list_images():
        if info.name not in known:
            db.add(image_row(info.name, info.manifest, info.digest))
            added += 1
    return added


def register_existing(db: DbSession, store: ImageStore, name: str, family: str = "") -> Image:
    """Add the store's image ``name`` to the database (of ``family``, "": from the name)."""
    if db.exec(select(Image).where(Image.name == name)).first() is not None:
        raise Conflict(f"image {name!r} is registered already")
    try:
        data, manifest = store.load_manifest(name)
    except ImageNotFound as exc:
        raise NotFound(str(exc)) from None
    except StoreError as exc:
        raise Invalid(str(exc)) from None

    row = image_row(name, manifest, hashlib.sha256(data).digest(), family)
    db.add(row)
    db.flush()
    return row


def capture_into_store(
    store: ImageStore, name: str, path: Path, *, mode: str, level: int, all_blocks: bool
) -> None:
    """Capture (raw disk/device) or import (qcow2/VMDK/VHD(X)) ``path`` as image ``name``.

    Blocking: call it in a worker thread. Raises Invalid/Conflict with the store's message.
    """
    try:
        check_name(name)
    except StoreError as exc:
        raise Invalid(str(exc)) from None
    if store.exists(name):
        raise Conflict(f"an image named {name!r} already exists; pick another name")
    if not path.is_absolute():
        raise Invalid(f"path {str(path)!r} must be absolute (a path on the server)")
    opts = CaptureOptions(level=level, used_only=False if all_blocks else None, progress=False)
    try:
        if mode == "import":
            import_image(store, name, path, opts)
        else:
            capture_image(store, name, path, opts)
    except StoreError as exc:
        raise Invalid(str(exc)) from None
    except OSError as exc:
        raise Invalid(f"cannot read {path}: {exc.strerror or exc}") from None


async def receive_upload(store: ImageStore, chunks: AsyncIterator[bytes]) -> Path:
    """Write an upload to a new temp file in the store's tmp/ and return its path.

    The caller captures it and then removes it. Raises Invalid when it is empty or too big.
    """
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    path = store.tmp_dir / f"{os.getpid()}-upload-{secrets.token_hex(6)}.tmp"
    size = 0
    try:
        with open(path, "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > MAX_UPLOAD:
                    raise Invalid(f"upload larger than {MAX_UPLOAD >> 40} TiB refused")
                f.write(chunk)
        if size == 0:
            raise Invalid("the upload is empty: send the raw disk image as the request body")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return path


async def upload_image(
    engine: Engine,
    store: ImageStore,
    bus: EventBus,
    name: str,
    chunks: AsyncIterator[bytes],
    *,
    level: int,
    actor: str,
    family: str = "",
) -> Image:
    """Stream an upload to a temporary file, capture it, register it and log it.

    The body never sits in memory (receive_upload writes it as it comes); the raw file is
    captured with every block kept and removed afterwards. Raises Invalid for a bad name,
    Conflict for a taken one, and the store's errors for a capture that fails.
    """
    try:
        check_name(name)
    except StoreError as exc:
        raise Invalid(str(exc)) from None
    if store.exists(name):
        raise Conflict(f"an image named {name!r} already exists; pick another name")
    path = await receive_upload(store, chunks)
    try:
        await asyncio.to_thread(
            capture_into_store, store, name, path, mode="capture", level=level, all_blocks=True
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def register() -> Image:
        with db_session(engine) as db:
            image = register_existing(db, store, name, family)
            record(db, bus, "image.added", actor=actor, message=f"image {name} (upload)")
            return image

    return await asyncio.to_thread(register)


def delete_image(db: DbSession, store: ImageStore, image: Image) -> None:
    """Delete ``image`` from the store and the database; Conflict while a session uses it."""
    busy = db.exec(
        select(Session).where(Session.image_id == image.id, col(Session.state).in_(SESSION_ACTIVE))
    ).first()
    if busy is not None:
        raise Conflict(
            f"image {image.name!r} is used by session {busy.id} ({busy.state}); "
            "cancel or wait for it first"
        )
    used = db.exec(select(Session).where(Session.image_id == image.id)).first()
    try:
        store.delete_image(image.name)
    except ImageNotFound:
        log.warning("image %s was already gone from the store", image.name)
    except StoreError as exc:
        raise Conflict(str(exc)) from None
    if used is None:
        db.delete(image)
    else:  # past sessions keep their history: the row stays, marked deleted
        image.name = f"{image.name}@deleted-{image.id}"
        image.source = {**image.source, "deleted": True}
        db.add(image)
