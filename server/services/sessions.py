"""Deployment sessions: creation, state changes, agents' assignments, progress and results.

Every session state change goes through ``_set_session_state`` and every per-machine one
through ``_set_machine_state``: each writes an audit Event and a live update. The sender
itself is run by server/services/runner.py, which calls ``mark_running`` and ``finalize``.
A machine is ``succeeded`` only when its agent reported every data block verified against
the manifest the session was created with.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session as DbSession
from sqlmodel import col, select

from server.config import Settings
from server.events import EventBus
from server.images.store import ImageStore, StoreError
from server.models import (
    MACHINE_ACTIVE,
    MACHINE_ENDED,
    SESSION_ACTIVE,
    AgentProgress,
    AgentProgressReply,
    AgentResult,
    Assignment,
    Image,
    Machine,
    Session,
    SessionCreate,
    SessionDetail,
    SessionMachine,
    SessionMachinePublic,
    SessionPublic,
    StartPolicy,
    utcnow,
)
from server.services import delta
from server.services.audit import record
from server.services.errors import Conflict, Forbidden, Invalid, NotFound
from server.services.images import image_by_name
from server.services.machines import get_group, get_machine, group_member_ids
from server.services.progress import Pending, ProgressBuffer
from server.services.progress import apply as apply_progress

#: Agent results -> machine states.
_RESULT_STATE = {
    "verified": "succeeded",
    "failed": "failed",
    "refused": "failed",
    "evicted": "evicted",
    "aborted": "failed",
}


# -- reading ------------------------------------------------------------------------------


def get_session(db: DbSession, session_id: int) -> Session:
    s = db.get(Session, session_id)
    if s is None:
        raise NotFound(f"no session with id {session_id}")
    return s


def session_machines(db: DbSession, session_id: int) -> list[SessionMachine]:
    q = select(SessionMachine).where(SessionMachine.session_id == session_id)
    return list(db.exec(q.order_by(col(SessionMachine.machine_id))))


def counts(rows: list[SessionMachine]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.state] = out.get(r.state, 0) + 1
    return out


def public(db: DbSession, s: Session) -> SessionPublic:
    out = SessionPublic.model_validate(s, from_attributes=True)
    out.counts = counts(session_machines(db, s.id or 0))
    return out


def detail(db: DbSession, s: Session) -> SessionDetail:
    rows = session_machines(db, s.id or 0)
    machines = {
        m.id: m
        for m in db.exec(select(Machine).where(col(Machine.id).in_([r.machine_id for r in rows])))
    }
    out = SessionDetail.model_validate(s, from_attributes=True)
    out.counts = counts(rows)
    for r in rows:
        pm = SessionMachinePublic.model_validate(r, from_attributes=True)
        m = machines.get(r.machine_id)
        if m is not None:
            pm.machine_name, pm.mac = m.name, m.mac
        out.machines.append(pm)
    return out


def list_sessions(
    db: DbSession, *, state: str | None = None, image_id: int | None = None, limit: int = 100
) -> list[Session]:
    q = select(Session).order_by(col(Session.id).desc()).limit(limit)
    if state:
        q = q.where(Session.state == state)
    if image_id is not None:
        q = q.where(Session.image_id == image_id)
    return list(db.exec(q))


# -- creating and steering ----------------------------------------------------------------


def busy_target(db: DbSession, machine_ids: list[int]) -> tuple[SessionMachine, Session] | None:
    """The first of ``machine_ids`` still an active target of an active session, with it."""
    row = db.exec(
        select(SessionMachine, Session)
        .join(Session, col(Session.id) == SessionMachine.session_id)
        .where(col(SessionMachine.machine_id).in_(machine_ids))
        .where(col(Session.state).in_(SESSION_ACTIVE))
        .where(col(SessionMachine.state).in_(MACHINE_ACTIVE))
    ).first()
    return None if row is None else (row[0], row[1])


def create_session(
    db: DbSession,
    bus: EventBus | None,
    settings: Settings,
    req: SessionCreate,
    actor: str,
    *,
    rerun_of: int | None = None,
) -> Session:
    """A new ``pending`` session of ``req.image`` to the group's machines plus ``machine_ids``.

    Raises NotFound (image, group, machine), Invalid (no targets), Conflict (a target is in
    another active session).
    """
    image = image_by_name(db, req.image)
    targets: list[int] = []
    if req.group_id is not None:
        get_group(db, req.group_id)
        targets += group_member_ids(db, req.group_id)
    for mid in req.machine_ids:
        get_machine(db, mid)
        if mid not in targets:
            targets.append(mid)
    if not targets:
        raise Invalid("the session has no target machines: give a non-empty group or machine_ids")
    busy = busy_target(db, targets)
    if busy is not None:
        raise Conflict(
            f"machine {busy[0].machine_id} is already a target of active session {busy[1].id}; "
            "cancel that session or leave the machine out"
        )
    s = Session(
        image_id=image.id or 0,
        image_name=image.name,
        group_id=req.group_id,
        start_policy=req.start_policy.model_dump(mode="json"),
        rate_bps=req.rate_bps,
        mcast_group="0.0.0.0",
        mcast_port=0,
        wire_session_id=secrets.randbelow(0xFFFFFFFE) + 1,
        key_hex=secrets.token_bytes(32).hex(),
        created_by=actor,
        rerun_of=rerun_of,
        after=req.after or settings.boot_after,
        disk_rule=req.disk_rule or settings.boot_disk,
        delta=req.delta,
    )
    db.add(s)
    db.flush()
    sid = s.id or 0
    n = sid % 65000 + 1
    s.mcast_group = f"239.{settings.multicast_prefix}.{n >> 8}.{n & 255}"
    s.mcast_port = settings.multicast_base_port + 2 * (sid % 10000)
    for mid in targets:
        db.add(SessionMachine(session_id=sid, machine_id=mid, bytes_total=image.data_bytes))
    record(
        db,
        bus,
        "session.created",
        actor=actor,
        session_id=sid,
        message=f"session {sid}: image {image.name} to {len(targets)} machines",
        image=image.name,
        targets=targets,
    )
    return s


def mark_running(db: DbSession, bus: EventBus | None, s: Session, actor: str) -> None:
    """``pending`` -> ``running`` (the runner starts the sender next)."""
    if s.state != "pending":
        raise Conflict(f"session {s.id} is {s.state}: only a pending session can start")
    s.started_at = utcnow()
    _set_session_state(db, bus, s, "running", "", actor)


def cancel(db: DbSession, bus: EventBus | None, s: Session, actor: str, reason: str = "") -> None:
    """End ``s`` as cancelled; its unfinished machines too. The runner stops the sender."""
    if s.state not in SESSION_ACTIVE:
        raise Conflict(f"session {s.id} has ended already ({s.state})")
    why = reason or f"cancelled by {actor}"
    for row in session_machines(db, s.id or 0):
        if row.state in MACHINE_ACTIVE:
            _set_machine_state(db, bus, row, "cancelled", f"session {why}", actor)
    s.ended_at = utcnow()
    _set_session_state(db, bus, s, "cancelled", why, actor)


def transfer_started(db: DbSession, bus: EventBus | None, session_id: int, why: str) -> None:
    """The start policy released the transfer: machines that never fetched their assignment
    are ``no-show``; the session goes on with those present."""
    s = get_session(db, session_id)
    if s.state != "running" or s.transfer_started_at is not None:
        return
    s.transfer_started_at = utcnow()
    db.add(s)
    for row in session_machines(db, session_id):
        if row.state == "pending":
            reason = "did not join before the transfer started"
            _set_machine_state(db, bus, row, "no-show", reason, "server")
    record(
        db,
        bus,
        "session.transfer-started",
        actor="server",
        session_id=session_id,
        message=f"session {session_id}: transfer started: {why}",
    )


def not_started(db: DbSession, bus: EventBus | None, session_id: int, reason: str) -> None:
    """End a running session whose transfer never began as ``not-started`` with ``reason``."""
    s = get_session(db, session_id)
    if s.state != "running":
        return
    for row in session_machines(db, session_id):
        if row.state == "pending":
            _set_machine_state(db, bus, row, "no-show", "never joined the session", "server")
        elif row.state in MACHINE_ACTIVE:
            _set_machine_state(db, bus, row, "cancelled", f"not started: {reason}", "server")
    s.ended_at = utcnow()
    _set_session_state(db, bus, s, "not-started", reason, "server")


def rerun_failed(
    db: DbSession, bus: EventBus | None, settings: Settings, s: Session, actor: str
) -> Session:
    """A new session of the same image and policy to the machines of ``s`` that did not
    succeed; Conflict while ``s`` is active, Invalid when every machine succeeded."""
    if s.state in SESSION_ACTIVE:
        raise Conflict(f"session {s.id} is still {s.state}: wait for it or cancel it first")
    if s.kind == "capture":
        raise Invalid(f"session {s.id} is a capture: start a new capture of the machine")
    failed = [r.machine_id for r in session_machines(db, s.id or 0) if r.state != "succeeded"]
    if not failed:
        raise Invalid(f"every machine of session {s.id} succeeded: nothing to re-run")
    image = db.get(Image, s.image_id)
    if image is None or image.source.get("deleted"):
        raise Conflict(f"the image of session {s.id} was deleted")
    policy = StartPolicy.model_validate(
        {**s.start_policy, "start": "now", "at": None, "not_after": None}
    )
    req = SessionCreate(
        image=image.name,
        machine_ids=failed,
        start_policy=policy,
        rate_bps=s.rate_bps,
        after=s.after,  # type: ignore[arg-type]  # validated when ``s`` was created
        disk_rule=s.disk_rule,
        delta=s.delta,  # type: ignore[arg-type]  # validated when ``s`` was created
    )
    return create_session(db, bus, settings, req, actor, rerun_of=s.id)


def finalize(
    db: DbSession,
    bus: EventBus | None,
    s: Session,
    engine_states: dict[int, tuple[str, str]],
    stats: dict[str, Any],
    reason: str = "",
) -> None:
    """The sender has ended: settle every unfinished machine, then the session's verdict.

    ``engine_states`` maps receiver ids to the sender's view (state, reason); a machine
    without an agent result ends as evicted when the engine evicted it, ``no-show`` when it
    never joined, else failed.
    """
    s.stats = stats
    rows = session_machines(db, s.id or 0)
    for row in rows:
        if row.state not in MACHINE_ACTIVE:
            continue
        engine = engine_states.get(row.receiver_id or -1)
        if row.state == "catchup":
            why = reason or delta.UNFINISHED_REASON
            _set_machine_state(db, bus, row, "failed", why, "server")
        elif engine is not None and engine[0] == "evicted":
            _set_machine_state(db, bus, row, "evicted", engine[1], "server")
        elif row.state == "pending" or (row.state == "assigned" and engine is None):
            _set_machine_state(db, bus, row, "no-show", "never joined the session", "server")
        else:
            why = engine[1] if engine and engine[1] else reason or "no result from its agent"
            _set_machine_state(db, bus, row, "failed", why, "server")
    if s.state != "running":  # cancelled meanwhile: the verdict stands
        db.add(s)
        return
    c = counts(rows)
    ok = c.get("succeeded", 0)
    state = "succeeded" if ok == len(rows) else ("partial" if ok else "failed")
    if not reason and state != "succeeded":
        reason = f"{ok} of {len(rows)} machines succeeded"
    s.ended_at = utcnow()
    _set_session_state(db, bus, s, state, reason, "server")


def fail_interrupted(db: DbSession, bus: EventBus | None, reason: str) -> list[int]:
    """Every session left ``running`` (server restart, kill -9) ends as failed with ``reason``.

    The multicast engine keeps its receivers' state in the sender's memory only, so a new
    server process cannot continue a session; the operator re-runs it (POST .../rerun).
    """
    ended = []
    # a capture session keeps no state in memory: its agent resumes the upload (issue 10)
    q = select(Session).where(Session.state == "running", Session.kind != "capture")
    for s in db.exec(q):
        finalize(db, bus, s, {}, s.stats, reason)
        ended.append(s.id or 0)
    return ended


# -- agents -------------------------------------------------------------------------------


def assignment(
    db: DbSession,
    store: ImageStore,
    machine_id: int,
    settings: Settings | None = None,
    bus: EventBus | None = None,
    reopened: list[int] | None = None,
) -> Assignment:
    """The running session ``machine_id`` is a target of, or an empty Assignment.

    With catch-up on (``settings.catchup``), a machine that missed the transfer (no-show)
    or was evicted gets its session with mode "catchup" (services/delta.py); one that
    missed a session whose verdict came less than ``catchup_timeout`` ago reopens it (its
    id goes to ``reopened``: the caller has SessionManager.watch_catchup settle it again)."""
    catchup_on = settings is None or settings.catchup
    row = db.exec(
        select(SessionMachine)
        .join(Session, col(Session.id) == SessionMachine.session_id)
        .where(SessionMachine.machine_id == machine_id, Session.state == "running")
        .where(col(SessionMachine.state).in_(MACHINE_ACTIVE))
        .order_by(col(Session.id).desc())
    ).first()
    if row is None and catchup_on:
        row = delta.late_row(db, machine_id, settings.catchup_timeout if settings else 0.0)
    if row is None:
        return Assignment()
    s = get_session(db, row.session_id)
    if s.kind == "capture":  # issue 10: the machine uploads its disk instead
        from server.services import capture

        return capture.assignment(db, s, row, machine_id)
    try:
        manifest_bytes, manifest = store.load_manifest(s.image_name)
    except StoreError as exc:
        raise Conflict(f"session {s.id}: its image cannot be read: {exc}") from None
    wants_delta = delta.wants_delta(db, s, row)
    mode, why = delta.assignment_mode(s, row, catchup_on)
    row.assigned_at = row.assigned_at or utcnow()
    if why and s.state != "running":
        _reopen(db, bus, s, machine_id)
        if reopened is not None:
            reopened.append(s.id or 0)
    if why:
        _set_machine_state(db, bus, row, "catchup", why, f"machine:{machine_id}")
    elif row.state == "pending":
        _set_machine_state(db, None, row, "assigned", "", f"machine:{machine_id}")
    return Assignment(
        session_id=s.id,
        state=s.state,
        group=s.mcast_group,
        port=s.mcast_port,
        key=s.key_hex,
        image=s.image_name,
        manifest_digest=manifest.digest().hex(),
        manifest=base64.b64encode(manifest_bytes).decode(),
        retry_after=0.0,
        after=s.after,
        disk_rule=s.disk_rule,
        mode=mode,
        delta=wants_delta,
        image_id=s.image_id,
    )


def _reopen(db: DbSession, bus: EventBus | None, s: Session, machine_id: int) -> None:
    """A target arrived after ``s``'s verdict and catches up: ``s`` runs again (without a
    sender) until its catch-ups end, then gets a new verdict."""
    why = f"machine {machine_id} arrived after the verdict ({s.state}): catching up over HTTP"
    s.ended_at = None
    _set_session_state(db, bus, s, "running", why, f"machine:{machine_id}")


def own_row(db: DbSession, machine_id: int, session_id: int) -> tuple[Session, SessionMachine]:
    row = db.exec(
        select(SessionMachine).where(
            SessionMachine.session_id == session_id, SessionMachine.machine_id == machine_id
        )
    ).first()
    if row is None:
        raise Forbidden(f"machine {machine_id} is not a target of session {session_id}")
    return get_session(db, session_id), row


def progress(
    db: DbSession,
    bus: EventBus | None,
    machine_id: int,
    report: AgentProgress,
    buffer: ProgressBuffer | None = None,
    catchup: bool = True,
) -> AgentProgressReply:
    """Record the newest of an agent's batched samples; tells it to stop if it should.

    The first report moves the machine to ``receiving`` (or ``catchup``, when its phase
    says so: delta.progress_target) at once; later ones go to ``buffer`` (written once a
    second by its flush) when one is given.
    """
    s, row = own_row(db, machine_id, report.session_id)
    if s.state != "running" or row.state not in MACHINE_ACTIVE:
        why = row.reason or s.reason or f"session {s.id} is {s.state}"
        return AgentProgressReply(cancel=True, reason=why)
    pending = progress_pending(report)
    target = delta.progress_target(row.state, report.phase, catchup)
    if row.state == target and buffer is not None:
        buffer.put(row.session_id, machine_id, pending)
    else:
        apply_progress(row, pending)
        if row.state != target:
            row.started_at = row.started_at or pending.at
            why = delta.EVICTED_REASON if target == "catchup" else ""
            _set_machine_state(db, bus, row, target, why, f"machine:{machine_id}")
        else:
            db.add(row)
    if bus is not None:
        fields = delta.progress_fields(report)
        bus.publish("machine.progress", session_id=s.id, machine_id=machine_id, **fields)
    return AgentProgressReply()


def progress_pending(report: AgentProgress) -> Pending:
    """The Pending sample of a report: its newest sample, phase and held counters."""
    return Pending(
        report.receiver_id,
        report.samples[-1],
        utcnow(),
        report.phase,
        report.held_blocks,
        report.held_bytes,
    )


def result(
    db: DbSession,
    bus: EventBus | None,
    machine_id: int,
    res: AgentResult,
    buffer: ProgressBuffer | None = None,
    store: ImageStore | None = None,
    catchup: bool = True,
) -> str:
    """Record an agent's verdict; returns the machine's new state. Conflict if it ended
    (an evicted machine's catch-up result still counts while the session runs)."""
    s, row = own_row(db, machine_id, res.session_id)
    if s.kind == "capture":  # issue 10: services/capture.py settles a capture
        from server.services import capture

        return capture.result(db, bus, store, s, row, res)
    if row.state in MACHINE_ENDED and not delta.late_result_ok(s, row, res, catchup):
        raise Conflict(f"machine {machine_id} ended in session {s.id} already ({row.state})")
    pending = buffer.take(res.session_id, machine_id) if buffer is not None else None
    if pending is not None:
        apply_progress(row, pending)
    image = db.get(Image, s.image_id)
    state, reason = _RESULT_STATE[res.result], res.reason
    if state == "succeeded" and image is not None:
        problem = delta.verified_problem(res, image)
        state, reason = ("failed", problem) if problem else (state, reason)
    delta.apply_result(row, res)
    row.started_at = row.started_at or row.assigned_at or utcnow()
    if state == "succeeded":
        row.bytes_done = res.bytes_done
        row.blocks_done = res.blocks_done
        seconds = (utcnow() - _aware(row.started_at)).total_seconds()
        row.rate_bps = res.bytes_done * 8 / seconds if seconds > 0 else 0.0  # the average
    actor = f"machine:{machine_id}"
    _set_machine_state(db, bus, row, state, reason, actor, stats=res.stats, via=res.via)
    if state == "succeeded" and row.held_bytes and image is not None:
        record(db, bus, "machine.spared", actor=actor, **delta.spared_event(row, image))
    m = db.get(Machine, machine_id)
    if m is not None:
        m.last_seen_at = utcnow()
        m.last_outcome = state
        if state == "succeeded":
            m.last_image_id, m.last_deployed_at = s.image_id, utcnow()
        db.add(m)
    return state


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# -- the one place states change ----------------------------------------------------------


def _set_session_state(
    db: DbSession, bus: EventBus | None, s: Session, state: str, reason: str, actor: str
) -> None:
    old, s.state, s.reason = s.state, state, reason[:2048]
    db.add(s)
    record(
        db,
        bus,
        f"session.{state}",
        actor=actor,
        session_id=s.id,
        message=f"session {s.id}: {old} -> {state}" + (f": {reason}" if reason else ""),
        previous=old,
    )


def _set_machine_state(
    db: DbSession,
    bus: EventBus | None,
    row: SessionMachine,
    state: str,
    reason: str,
    actor: str,
    **data: Any,
) -> None:
    old, row.state, row.reason = row.state, state, reason[:2048]
    now = utcnow()
    row.updated_at = now
    if state in MACHINE_ENDED:
        row.ended_at = now
    db.add(row)
    record(
        db,
        bus,
        f"machine.{state}",
        actor=actor,
        session_id=row.session_id,
        machine_id=row.machine_id,
        message=f"machine {row.machine_id}: {old} -> {state}" + (f": {reason}" if reason else ""),
        previous=old,
        **data,
    )
