"""Agent endpoints: enroll with the enrollment token, then act with the machine credential."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from sqlmodel import select

from server.api.deps import (
    ERRORS,
    BearerDep,
    BusDep,
    DbDep,
    MachineDep,
    MetricsDep,
    SettingsDep,
    StoreDep,
)
from server.models import (
    AgentCredential,
    AgentProgress,
    AgentProgressReply,
    AgentRegister,
    AgentResult,
    ApiToken,
    Assignment,
)
from server.security import MACHINE_PREFIX, new_token, same_secret
from server.services import sessions as svc
from server.services.errors import Forbidden, Unauthorized
from server.services.machines import enroll

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
    token, digest = new_token(MACHINE_PREFIX)
    db.add(ApiToken(token_hash=digest, kind="machine", name=m.mac, machine_id=m.id))
    return AgentCredential(
        machine_id=m.id or 0, credential=token, progress_interval=settings.progress_interval
    )


@router.get("/assignment", response_model=Assignment)
def get_assignment(who: MachineDep, db: DbDep, store: StoreDep) -> Assignment:
    """The session this machine is to receive now (empty ``session_id``: poll again)."""
    return svc.assignment(db, store, who.machine_id or 0)


@router.post("/progress", response_model=AgentProgressReply)
def post_progress(
    body: AgentProgress, who: MachineDep, db: DbDep, bus: BusDep, metrics: MetricsDep
) -> AgentProgressReply:
    """Batched progress samples (the newest counts); the reply may tell the agent to stop."""
    metrics.agent_reports.labels("progress").inc()
    return svc.progress(db, bus, who.machine_id or 0, body)


@router.post("/result", status_code=status.HTTP_200_OK)
def post_result(
    body: AgentResult, who: MachineDep, db: DbDep, bus: BusDep, metrics: MetricsDep
) -> dict[str, str]:
    """The agent's verdict for its session."""
    metrics.agent_reports.labels("result").inc()
    return {"state": svc.result(db, bus, who.machine_id or 0, body)}
