"""Agent endpoints: enroll with the enrollment token, then act with the machine credential."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from sqlmodel import select

from server.api.deps import (
    ERRORS,
    BearerDep,
    BusDep,
    DbDep,
    Id,
    MachineDep,
    MetricsDep,
    SettingsDep,
    require_machine,
)
from server.db import db_session
from server.models import (
    AgentCredential,
    AgentProgress,
    AgentProgressReply,
    AgentRegister,
    AgentResult,
    ApiToken,
    Assignment,
)
from server.security import MACHINE_PREFIX, new_token, same_secret, token_hash
from server.services import sessions as svc
from server.services.agentcache import AgentCache
from server.services.assignwait import MAX_WAIT, waits_for
from server.services.blocks import BlockReader, RangeNotSatisfiable, WouldBlock, reader_for
from server.services.delta import progress_fields, progress_target
from server.services.errors import Forbidden, Unauthorized
from server.services.machines import enroll
from server.services.progress import ProgressBuffer
from server.services.users import resolve_token

router = APIRouter(prefix="/api/agent", tags=["agent"], responses=ERRORS)


@router.post("/register", response_model=AgentCredential)
def register(
    body: AgentRegister,
    request: Request,
    creds: BearerDep,
    db: DbDep,
    bus: BusDep,
    settings: SettingsDep,
) -> AgentCredential:
    """Enroll (``Authorization: Bearer ENROLLMENT_TOKEN``) with MACs and inventory; returns
    this machine's own credential for the other agent endpoints (earlier ones are revoked)."""
    if not settings.enrollment_token:
        raise Forbidden("enrollment is closed: set FLEETCAST_ENROLLMENT_TOKEN on the server")
    if creds is None or not same_secret(creds.credentials, settings.enrollment_token):
        raise Unauthorized("wrong or missing enrollment token (Authorization: Bearer TOKEN)")
    inventory = {**body.inventory, "hostname": body.hostname}
    address = request.client.host if request.client else ""
    m = enroll(db, bus, body.macs, inventory, address)
    for old in db.exec(select(ApiToken).where(ApiToken.machine_id == m.id)):
        old.revoked = True
        db.add(old)
    bus.publish("machine.enrolled", machine_id=m.id)  # cached older credentials drop
    token, digest = new_token(MACHINE_PREFIX)
    db.add(ApiToken(token_hash=digest, kind="machine", name=m.mac, machine_id=m.id))
    return AgentCredential(
        machine_id=m.id or 0, credential=token, progress_interval=settings.progress_interval
    )


@router.get("/assignment", response_model=Assignment)
async def get_assignment(
    request: Request,
    creds: BearerDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT,
            allow_inf_nan=False,
            description="seconds to wait for an assignment when there is none yet (long poll; "
            "0 = answer at once)",
        ),
    ] = 0.0,
) -> Assignment:
    """The session this machine is to receive now (empty ``session_id``: ask again after
    ``retry_after`` seconds). With ``wait``, an empty answer comes only after up to ``wait``
    seconds without one (services/assignwait.py), with ``retry_after`` 0."""
    waits = waits_for(request.app.state) if wait > 0 else None
    since = waits.events if waits is not None else 0
    machine_id, found = await asyncio.to_thread(_look_assignment, request, creds, None)
    if waits is None or found.session_id is not None:
        return found

    async def look() -> Assignment:
        return (await asyncio.to_thread(_look_assignment, request, creds, machine_id))[1]

    return await waits.wait(machine_id, wait, look, since)


def _look_assignment(
    request: Request, creds: HTTPAuthorizationCredentials | None, machine_id: int | None
) -> tuple[int, Assignment]:
    """One look, in its own database session (nothing is held between looks); checks the
    credential first when ``machine_id`` is not known yet."""
    state = request.app.state
    with db_session(state.engine) as db:
        if machine_id is None:
            machine_id = require_machine(db, creds).machine_id or 0
        reopened: list[int] = []
        a = svc.assignment(db, state.store, machine_id, state.settings, state.bus, reopened)
        if reopened:  # a late machine reopened an ended session: settle it again (issue 9)
            db.commit()
            state.manager.watch_catchup(reopened[0])
    return machine_id, a


def _resolve_machine(request: Request, token: str) -> int:
    with db_session(request.app.state.engine) as db:
        who = resolve_token(db, token)
    if who.kind != "machine" or who.machine_id is None:
        raise Forbidden("this route is for agents: use the machine credential from register")
    return who.machine_id


async def cached_machine(request: Request, creds: BearerDep) -> int:
    """The calling machine's id, from the AgentCache when it knows the credential."""
    if creds is None or not creds.credentials:
        raise Unauthorized("this route needs a bearer token (Authorization: Bearer TOKEN)")
    cache: AgentCache = request.app.state.agent_cache
    digest = token_hash(creds.credentials)
    machine_id = cache.machine(digest)
    if machine_id is None:
        machine_id = await asyncio.to_thread(_resolve_machine, request, creds.credentials)
        cache.remember_machine(digest, machine_id)
    return machine_id


@router.post("/progress", response_model=AgentProgressReply)
async def post_progress(
    request: Request,
    body: AgentProgress,
    machine_id: Annotated[int, Depends(cached_machine)],
    bus: BusDep,
    metrics: MetricsDep,
) -> AgentProgressReply:
    """Batched progress samples (the newest counts); the reply may tell the agent to stop.

    The hot path: with the credential and the machine's row in the AgentCache, it touches
    no database (the sample is written by the once-a-second flush)."""
    metrics.agent_reports.labels("progress").inc()
    cache: AgentCache = request.app.state.agent_cache
    row = cache.row(body.session_id, machine_id)
    catchup_on = request.app.state.settings.catchup
    if row is None or row.machine_state != progress_target(
        row.machine_state, body.phase, catchup_on
    ):
        return await asyncio.to_thread(_progress_slow, request, machine_id, body)
    if row.session_state != "running":
        why = row.reason or f"session {body.session_id} is {row.session_state}"
        return AgentProgressReply(cancel=True, reason=why)
    buffer: ProgressBuffer = request.app.state.progress
    buffer.put(body.session_id, machine_id, svc.progress_pending(body))
    fields = progress_fields(body)
    bus.publish("machine.progress", session_id=body.session_id, machine_id=machine_id, **fields)
    return AgentProgressReply()


def _progress_slow(request: Request, machine_id: int, body: AgentProgress) -> AgentProgressReply:
    """The progress route through the database; fills the AgentCache for the next report."""
    state = request.app.state
    with db_session(state.engine) as db:
        reply = svc.progress(
            db, state.bus, machine_id, body, state.progress, catchup=state.settings.catchup
        )
        s, row = svc.own_row(db, machine_id, body.session_id)
        cache: AgentCache = state.agent_cache
        cache.remember_row(s.id or 0, machine_id, s.state, row.state, row.reason or s.reason)
    return reply


@router.post("/result", status_code=status.HTTP_200_OK)
def post_result(
    request: Request,
    body: AgentResult,
    who: MachineDep,
    db: DbDep,
    bus: BusDep,
    metrics: MetricsDep,
) -> dict[str, str]:
    """The agent's verdict for its session."""
    metrics.agent_reports.labels("result").inc()
    state = request.app.state
    mid, on = who.machine_id or 0, state.settings.catchup
    return {"state": svc.result(db, bus, mid, body, state.progress, store=state.store, catchup=on)}


# -- catch-up: one stored block over HTTP (issue 9, server/services/blocks.py) ----------------


@router.get(
    "/sessions/{session_id}/blocks/{index}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the stored block"},
        206: {"description": "the asked byte range of it"},
        416: {"description": "a Range outside the block"},
    },
)
async def get_block(
    request: Request,
    session_id: Id,
    index: Annotated[int, PathParam(ge=0, le=1 << 32)],
    machine_id: Annotated[int, Depends(cached_machine)],
    range_header: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
) -> Response:
    """Block ``index`` of the session's image as stored (zstd frame, or raw iff its length is
    the block's), ``X-Fleetcast-Digest`` = hex SHA-256 of its raw content; ``Range``: 206.
    For a target machine of the session (its credential); ZERO/UNUSED blocks are 404."""
    state = request.app.state
    if not state.settings.catchup:
        raise Forbidden("catch-up is off on this server (FLEETCAST_CATCHUP=false)")
    reader = reader_for(state)
    image = reader.granted(session_id, machine_id)
    if image is None:
        image = await asyncio.to_thread(_grant_blocks, request, reader, session_id, machine_id)
    try:
        try:  # from the page cache in the loop; from the disk in a worker thread
            block = reader.read(image, index, range_header, nowait=True)
        except WouldBlock:
            block = await asyncio.to_thread(reader.read, image, index, range_header)
    except RangeNotSatisfiable as exc:
        headers = {"Content-Range": f"bytes */{exc.size}"}
        return JSONResponse({"detail": str(exc)}, status_code=416, headers=headers)
    return Response(block.data, status_code=206 if block.partial else 200, headers=block.headers())


def _grant_blocks(request: Request, reader: BlockReader, session_id: int, machine_id: int) -> str:
    with db_session(request.app.state.engine) as db:
        return reader.grant(db, session_id, machine_id)
