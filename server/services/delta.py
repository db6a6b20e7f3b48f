"""Resume, catch-up and delta re-imaging: the server's decisions (issue 9, docs/SERVER.md).

Pure rules over rows, with no state change of their own (services/sessions.py applies
them through its one ``_set_machine_state``; services/catchup.py runs the lifecycle):

- ``assignment_mode``: "multicast" (join the transfer) or "catchup" (fetch the blocks over
  HTTP: the machine was evicted, or it arrived after the transfer started or ended).
- ``wants_delta``: should the agent hash its disk first and skip what it holds? The
  session's ``delta`` option: "always", "never", or "auto" — yes when the machine's last
  verified image is of the session image's family, or when the machine resumes this
  session (or one it re-runs).
- ``progress_target``: the machine state an agent's progress report (its ``phase``) implies.
- ``verified_problem``: why a "verified" result does not count (a catch-up must name the
  session's manifest digest; every data byte verified, received or already held).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session as DbSession
from sqlmodel import col, select

from server.models import (
    AgentProgress,
    AgentResult,
    Image,
    Machine,
    Session,
    SessionMachine,
    SessionMachinePublic,
    utcnow,
)

MULTICAST = "multicast"
CATCHUP = "catchup"
#: How far back a re-run chain is followed for the resume case.
RERUN_DEPTH = 32
#: Reasons a machine is moved to catch-up.
EVICTED_REASON = "evicted from the multicast transfer: catching up over HTTP"
LATE_REASON = "arrived after the multicast transfer started: catching up over HTTP"
ENDED_REASON = "the multicast transfer is over: catching up over HTTP"
AFTER_VERDICT_REASON = "arrived after the session's verdict: catching up over HTTP"
#: Session verdicts a late machine may reopen (not a cancel, not a session never started).
REOPENABLE = ("partial", "failed")
UNFINISHED_REASON = "its catch-up had not finished when the session ended"


def assignment_mode(s: Session, row: SessionMachine, catchup: bool) -> tuple[str, str]:
    """``(mode, reason)``: the agent's mode, and the reason to move its row to ``catchup``
    ("" when the row stays as it is). ``catchup`` False: always multicast."""
    if not catchup:
        return MULTICAST, ""
    if row.state == CATCHUP:
        return CATCHUP, ""
    if row.state == "no-show":
        return CATCHUP, LATE_REASON if s.state == "running" else AFTER_VERDICT_REASON
    if s.transfer_ended_at is not None and row.state in ("pending", "assigned", "receiving"):
        return CATCHUP, ENDED_REASON
    return MULTICAST, ""


def late_row(
    db: DbSession, machine_id: int, window: float = 0.0, now: datetime | None = None
) -> SessionMachine | None:
    """The machine's ``no-show`` row of a deployment it may still catch up in: a running
    session (it booted after the transfer started), else one whose verdict (partial or
    failed) came less than ``window`` seconds before ``now`` (the session is reopened)."""
    q = (
        select(SessionMachine)
        .join(Session, col(Session.id) == SessionMachine.session_id)
        .where(SessionMachine.machine_id == machine_id, SessionMachine.state == "no-show")
        .where(Session.kind == "deploy")
        .order_by(col(Session.id).desc())
    )
    row = db.exec(q.where(Session.state == "running")).first()
    if row is None and window > 0:
        since = (now or utcnow()) - timedelta(seconds=window)
        q = q.where(col(Session.state).in_(REOPENABLE), col(Session.ended_at) >= since)
        row = db.exec(q.where(col(Session.transfer_started_at).is_not(None))).first()
    return row


def resumes(db: DbSession, s: Session, row: SessionMachine) -> bool:
    """True when the machine already started this session, or a session this one re-runs
    (its disk holds part of the image)."""
    if row.started_at is not None or row.state in ("receiving", CATCHUP):
        return True
    earlier, seen = s.rerun_of, 0
    while earlier is not None and seen < RERUN_DEPTH:
        seen += 1
        before = db.exec(
            select(SessionMachine).where(
                SessionMachine.session_id == earlier,
                SessionMachine.machine_id == row.machine_id,
            )
        ).first()
        if before is not None and before.started_at is not None:
            return True
        prev = db.get(Session, earlier)
        earlier = prev.rerun_of if prev is not None else None
    return False


def wants_delta(db: DbSession, s: Session, row: SessionMachine) -> bool:
    """The Assignment's ``delta``: the session's option, "auto" decided by family or resume."""
    if s.delta == "always":
        return True
    if s.delta == "never":
        return False
    machine = db.get(Machine, row.machine_id)
    if machine is not None and machine.last_image_id is not None:
        last, image = db.get(Image, machine.last_image_id), db.get(Image, s.image_id)
        if last is not None and image is not None and last.family == image.family:
            return True
    return resumes(db, s, row)


def progress_target(state: str, phase: str, catchup: bool) -> str:
    """The state a progress report moves an active machine to: ``catchup`` when the agent
    says it catches up (and the server allows it), ``receiving`` when it says multicast (a
    rejoin), else ``catchup`` stays and anything else becomes ``receiving``."""
    if phase == CATCHUP and catchup:
        return CATCHUP
    if phase == MULTICAST:
        return "receiving"
    return CATCHUP if state == CATCHUP else "receiving"


def late_result_ok(s: Session, row: SessionMachine, res: AgentResult, catchup: bool) -> bool:
    """An evicted machine's catch-up result still counts while its session runs."""
    return catchup and s.state == "running" and row.state == "evicted" and res.via == CATCHUP


def stat_int(stats: dict[str, Any], key: str) -> int:
    """A non-negative integer from an agent's free-form stats (0 when absent or bad)."""
    v = stats.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return 0
    return max(0, min(int(v), 1 << 50))


def verified_problem(res: AgentResult, image: Image) -> str:
    """Why a "verified" result of ``image`` does not count as succeeded ("" if it does)."""
    if res.via == CATCHUP and not res.manifest_digest:
        return "the catch-up result names no manifest digest: it cannot be checked"
    if res.manifest_digest and res.manifest_digest != image.digest:
        return "the agent verified a different manifest than the session's"
    held = stat_int(res.stats, "held_bytes")
    if res.bytes_done != image.data_bytes and res.bytes_done + held != image.data_bytes:
        return f"the agent verified {res.bytes_done} of {image.data_bytes} data bytes" + (
            f" (plus {held} held)" if held else ""
        )
    return ""


def apply_result(row: SessionMachine, res: AgentResult) -> None:
    """Copy a result's ``via`` and its held/catch-up counters onto ``row``."""
    row.via = res.via
    for key in ("held_blocks", "held_bytes", "catchup_blocks", "catchup_bytes"):
        if key in res.stats:
            setattr(row, key, stat_int(res.stats, key))


def progress_fields(report: AgentProgress) -> dict[str, Any]:
    """The ``machine.progress`` live update of a report (the dashboard's grid)."""
    last = report.samples[-1]
    return {
        "bytes_done": last.bytes_done,
        "bytes_total": last.bytes_total,
        "rate_bps": last.rate_bps,
        "loss": last.loss,
        "naks": last.naks,
        "phase": report.phase,
        "held_blocks": report.held_blocks,
        "held_bytes": report.held_bytes,
    }


def spared(rows: Sequence[SessionMachine | SessionMachinePublic]) -> dict[str, int]:
    """A session's totals: raw bytes/blocks spared (already held), of the data bytes its
    machines had to hold, machines finished by catch-up, and raw bytes fetched by it."""
    return {
        "held_bytes": sum(r.held_bytes for r in rows),
        "held_blocks": sum(r.held_blocks for r in rows),
        "data_bytes": sum(r.bytes_total for r in rows),
        "by_catchup": sum(1 for r in rows if r.state == "succeeded" and r.via == CATCHUP),
        "catching_up": sum(1 for r in rows if r.state == CATCHUP),
        "catchup_bytes": sum(r.catchup_bytes for r in rows),
    }


def spared_event(row: SessionMachine, image: Image) -> dict[str, Any]:
    """The ``machine.spared`` audit event's fields: how much of the image the disk held."""
    pct = 100 * row.held_bytes / image.data_bytes if image.data_bytes else 0.0
    gib = row.held_bytes / (1 << 30)
    return {
        "session_id": row.session_id,
        "machine_id": row.machine_id,
        "message": (
            f"machine {row.machine_id}: spared {pct:.0f}% ({gib:.2f} GiB, {row.held_blocks} "
            "blocks already on its disk)"
        ),
        "held_bytes": row.held_bytes,
        "held_blocks": row.held_blocks,
        "percent": round(pct, 1),
    }
