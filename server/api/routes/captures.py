"""Capture sessions, their agents' upload API, backups and restore (issue 10).

Admin routes: ``POST /api/captures`` (start a capture of one machine), ``GET /api/captures``,
``GET /api/machines/{id}/backups``, ``POST /api/machines/{id}/restore``. Agent routes (the
machine credential of the capture's machine): ``have``, ``blocks/{digest}`` and ``manifest``
under ``/api/agent/captures/{session_id}/`` (docs/SERVER.md "Capture"). Block and manifest
bodies are read as they stream in, bounded, and verified in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, status
from fastapi.responses import JSONResponse

from protocol.manifest import MAX_BLOCK_SIZE, MAX_MANIFEST_BYTES
from server.api.deps import (
    ERRORS,
    AdminDep,
    BusDep,
    DbDep,
    Id,
    MachineDep,
    ManagerDep,
    OptId,
    SettingsDep,
    StoreDep,
)
from server.api.routes.agent import cached_machine
from server.db import db_session
from server.models import SessionDetail
from server.models_capture import (
    BackupPublic,
    CaptureAccepted,
    CaptureCreate,
    CaptureHave,
    CaptureHaveReply,
    CapturePublic,
    RestoreRequest,
)
from server.services import backups
from server.services import capture as cap
from server.services import sessions as svc

log = logging.getLogger(__name__)
router = APIRouter(tags=["captures"], responses=ERRORS)
MachineId = Annotated[int, Depends(cached_machine)]


# -- admins -------------------------------------------------------------------------------


@router.post("/api/captures", response_model=SessionDetail, status_code=status.HTTP_201_CREATED)
def create_capture(
    body: CaptureCreate,
    who: AdminDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    store: StoreDep,
) -> SessionDetail:
    """Capture one machine's disk as a new image: a capture session, running at once (the
    machine network-boots into the client, which reads and uploads its disk)."""
    cap.release_ended_pins(db, store)
    s = cap.create_capture(db, bus, settings, store, body, who.actor)
    svc.mark_running(db, bus, s, who.actor)
    db.commit()
    return svc.detail(db, s)


@router.get("/api/captures", response_model=list[CapturePublic])
def list_captures(
    _who: AdminDep,
    db: DbDep,
    machine_id: OptId = None,
    schedule_run_id: OptId = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[CapturePublic]:
    """Captures newest first, with what each uploaded and reused (a backup run's captures
    with ``schedule_run_id``)."""
    return cap.list_captures(db, machine_id=machine_id, run_id=schedule_run_id, limit=limit)


@router.get("/api/machines/{machine_id}/backups", response_model=list[BackupPublic])
def list_backups(machine_id: Id, _who: AdminDep, db: DbDep) -> list[BackupPublic]:
    """The images captured from this machine (backups and captures), newest first."""
    return backups.backups_public(db, machine_id)


@router.post(
    "/api/machines/{machine_id}/restore",
    response_model=SessionDetail,
    status_code=status.HTTP_201_CREATED,
)
def restore_machine(
    machine_id: Id,
    body: RestoreRequest,
    who: AdminDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
    manager: ManagerDep,
) -> SessionDetail:
    """Deploy image ``image_id`` (e.g. one of its backups) to this machine alone, now."""
    s = backups.restore(db, bus, settings, machine_id, body, who.actor)
    db.commit()
    manager.launch(s.id or 0)
    return svc.detail(db, s)


# -- the capturing agent ------------------------------------------------------------------


@router.post("/api/agent/captures/{session_id}/have", response_model=CaptureHaveReply)
def post_have(
    session_id: Id, body: CaptureHave, who: MachineDep, db: DbDep, store: StoreDep
) -> CaptureHaveReply:
    """Which of these block digests the store lacks (upload those), and the stored size of
    each it has."""
    return cap.have(db, store, who.machine_id or 0, session_id, body.digests)


async def _read_body(chunks: AsyncIterator[bytes], limit: int, what: str) -> bytes:
    """The request body, refused (422) as soon as it exceeds ``limit`` bytes."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise cap.Refused(f"{what} refused: the body is larger than {limit} bytes")
    return bytes(body)


@router.put("/api/agent/captures/{session_id}/blocks/{digest}")
async def put_block(
    request: Request,
    session_id: Id,
    digest: str,
    machine_id: MachineId,
    raw_length: Annotated[int, Header(alias="X-Fleetcast-Raw-Length", ge=1, le=MAX_BLOCK_SIZE)],
) -> JSONResponse:
    """One block's payload (zstd frame, or raw iff its length is the raw length): 201 stored,
    200 already there, 422 refused (the detail names the block and why)."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > raw_length:
        raise cap.Refused(
            f"block {digest[:64]} refused: the body is larger than its raw length "
            f"({declared} > {raw_length} bytes)"
        )
    payload = await _read_body(request.stream(), raw_length, f"block {digest[:64]}")
    engine, store = request.app.state.engine, request.app.state.store

    def work() -> bool:
        with db_session(engine) as db:
            return cap.store_block(db, store, machine_id, session_id, digest, raw_length, payload)

    new = await asyncio.to_thread(work)
    code = status.HTTP_201_CREATED if new else status.HTTP_200_OK
    return JSONResponse({"digest": digest, "stored": new}, status_code=code)


@router.post("/api/agent/captures/{session_id}/manifest", response_model=CaptureAccepted)
async def post_manifest(request: Request, session_id: Id, machine_id: MachineId) -> CaptureAccepted:
    """The capture's canonical manifest: once every data block it names is stored, the image
    is added and listed, and the session succeeds (a backup's retention runs then)."""
    data = await _read_body(request.stream(), MAX_MANIFEST_BYTES, "manifest")
    state = request.app.state

    def work() -> CaptureAccepted:
        with db_session(state.engine) as db:
            accepted = cap.accept_manifest(db, state.bus, state.store, machine_id, session_id, data)
        try:
            with db_session(state.engine) as db:
                backups.after_capture(db, state.bus, state.store, session_id)
        except Exception:  # the image is in: retention runs again after the next backup
            log.exception("session %s: pruning the machine's backups failed", session_id)
        return accepted

    return await asyncio.to_thread(work)
