"""Machines and groups: CRUD, membership, CSV import, and agents' first contact by MAC."""

from __future__ import annotations

import csv
import io
from typing import Any

from sqlmodel import Session as DbSession
from sqlmodel import col, select

from server.events import EventBus
from server.models import (
    MACHINE_ACTIVE,
    CsvImportResult,
    Group,
    Machine,
    Session,
    SessionMachine,
    check_name,
    normalize_mac,
    utcnow,
)
from server.services.audit import record
from server.services.errors import Conflict, Invalid, NotFound

#: CSV imports larger than this many rows are refused.
MAX_CSV_ROWS = 20_000


def get_machine(db: DbSession, machine_id: int) -> Machine:
    m = db.get(Machine, machine_id)
    if m is None:
        raise NotFound(f"no machine with id {machine_id}")
    return m


def get_group(db: DbSession, group_id: int) -> Group:
    g = db.get(Group, group_id)
    if g is None:
        raise NotFound(f"no group with id {group_id}")
    return g


def list_machines(db: DbSession, group_id: int | None = None) -> list[Machine]:
    q = select(Machine).order_by(col(Machine.id))
    if group_id is not None:
        q = q.where(Machine.group_id == group_id)
    return list(db.exec(q))


def machine_by_mac(db: DbSession, macs: list[str]) -> Machine | None:
    """The machine whose primary MAC is one of ``macs`` (normalised)."""
    return db.exec(select(Machine).where(col(Machine.mac).in_(macs))).first()


def create_machine(db: DbSession, mac: str, name: str = "", group_id: int | None = None) -> Machine:
    """A new machine; Conflict when the MAC is known already."""
    if machine_by_mac(db, [mac]) is not None:
        raise Conflict(f"a machine with MAC {mac} exists already")
    if group_id is not None:
        get_group(db, group_id)
    m = Machine(mac=mac, macs=[mac], name=name, group_id=group_id)
    db.add(m)
    db.flush()
    return m


def update_machine(db: DbSession, m: Machine, changes: dict[str, Any]) -> Machine:
    """Apply ``name``/``group_id`` changes (group None: no group)."""
    if "group_id" in changes and changes["group_id"] is not None:
        get_group(db, changes["group_id"])
    for key in ("name", "group_id"):
        if key in changes:
            setattr(m, key, changes[key] if key != "name" else (changes[key] or ""))
    db.add(m)
    return m


def delete_machine(db: DbSession, m: Machine) -> None:
    """Delete ``m`` unless an active session targets it; its history rows go with it."""
    active = db.exec(
        select(SessionMachine).where(
            SessionMachine.machine_id == m.id, col(SessionMachine.state).in_(MACHINE_ACTIVE)
        )
    ).first()
    if active is not None:
        raise Conflict(f"machine {m.id} is a target of active session {active.session_id}")
    from server.models import ApiToken

    for row in db.exec(select(SessionMachine).where(SessionMachine.machine_id == m.id)):
        db.delete(row)
    for tok in db.exec(select(ApiToken).where(ApiToken.machine_id == m.id)):
        db.delete(tok)
    from server.services.capture import forget_machine

    forget_machine(db, m.id or 0)  # its captured images stay, as images
    db.delete(m)


def enroll(
    db: DbSession,
    bus: EventBus | None,
    macs: list[str],
    inventory: dict[str, Any],
    address: str,
) -> Machine:
    """The machine an agent with ``macs`` is: found by MAC, or created on first contact."""
    m = machine_by_mac(db, macs)
    created = m is None
    if m is None:
        m = Machine(mac=macs[0], macs=list(macs), name=str(inventory.get("hostname", ""))[:63])
    else:
        m.macs = sorted(set(m.macs) | set(macs))
    m.inventory = {**m.inventory, **inventory}  # a partial report keeps what is known
    m.address = address[:64]
    m.last_seen_at = utcnow()
    db.add(m)
    db.flush()
    if created:
        record(
            db,
            bus,
            "machine.created",
            actor="server",
            machine_id=m.id,
            message=f"machine {m.mac} enrolled on first contact from {address}",
        )
    return m


# -- groups -------------------------------------------------------------------------------


def list_groups(db: DbSession) -> list[Group]:
    return list(db.exec(select(Group).order_by(col(Group.name))))


def group_member_ids(db: DbSession, group_id: int) -> list[int]:
    q = select(Machine.id).where(Machine.group_id == group_id).order_by(col(Machine.id))
    return [i for i in db.exec(q) if i is not None]


def create_group(db: DbSession, name: str, description: str = "") -> Group:
    if db.exec(select(Group).where(Group.name == name)).first() is not None:
        raise Conflict(f"a group named {name!r} exists already")
    g = Group(name=name, description=description)
    db.add(g)
    db.flush()
    return g


def update_group(db: DbSession, g: Group, changes: dict[str, Any]) -> Group:
    name = changes.get("name")
    if name is not None and name != g.name:
        if db.exec(select(Group).where(Group.name == name)).first() is not None:
            raise Conflict(f"a group named {name!r} exists already")
        g.name = name
    if changes.get("description") is not None:
        g.description = changes["description"]
    db.add(g)
    return g


def delete_group(db: DbSession, g: Group) -> None:
    """Delete ``g``; its machines stay, without a group. Conflict while a session uses it."""
    used = db.exec(select(Session).where(Session.group_id == g.id)).first()
    if used is not None:
        raise Conflict(f"group {g.name!r} is used by session {used.id}; it keeps the history")
    for m in db.exec(select(Machine).where(Machine.group_id == g.id)):
        m.group_id = None
        db.add(m)
    db.delete(g)


def set_members(db: DbSession, g: Group, machine_ids: list[int], *, add_only: bool) -> None:
    """Make ``machine_ids`` members of ``g`` (and, unless add_only, only them)."""
    wanted = set(machine_ids)
    for mid in wanted:
        get_machine(db, mid)
    if not add_only:
        for m in db.exec(select(Machine).where(Machine.group_id == g.id)):
            if m.id not in wanted:
                m.group_id = None
                db.add(m)
    for mid in wanted:
        m = get_machine(db, mid)
        m.group_id = g.id
        db.add(m)


# -- CSV import ---------------------------------------------------------------------------


def import_csv(db: DbSession, text: str) -> CsvImportResult:
    """Rows ``MAC,name,group`` (a header row is allowed): create or rename machines, creating
    groups as needed. All or nothing: one bad row refuses the whole file with its line number.
    """
    rows = _parse_csv(text)
    groups = {g.name: g for g in db.exec(select(Group))}
    created = updated = groups_created = 0
    for mac, name, group_name in rows:
        group_id = None
        if group_name:
            if group_name not in groups:
                groups[group_name] = create_group(db, group_name)
                groups_created += 1
            group_id = groups[group_name].id
        m = machine_by_mac(db, [mac])
        if m is None:
            db.add(Machine(mac=mac, macs=[mac], name=name, group_id=group_id))
            created += 1
        else:
            m.name = name or m.name
            m.group_id = group_id if group_name else m.group_id
            db.add(m)
            updated += 1
    db.flush()
    return CsvImportResult(created=created, updated=updated, groups_created=groups_created)


def _parse_csv(text: str) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    seen: dict[str, int] = {}
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise Invalid(f"not a CSV file of MAC,name,group lines: {exc}") from None
    for lineno, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if lineno == 1 and cells[0].lower() == "mac":
            continue
        if len(cells) > 3:
            raise Invalid(f"line {lineno}: expected MAC,name,group, got {len(cells)} columns")
        cells += [""] * (3 - len(cells))
        try:
            mac = normalize_mac(cells[0])
            name = check_name(cells[1], "machine name") if cells[1] else ""
            group = check_name(cells[2], "group name") if cells[2] else ""
        except ValueError as exc:
            raise Invalid(f"line {lineno}: {exc}") from None
        if mac in seen:
            raise Invalid(f"line {lineno}: MAC {mac} is on line {seen[mac]} already")
        seen[mac] = lineno
        out.append((mac, name, group))
        if len(out) > MAX_CSV_ROWS:
            raise Invalid(f"more than {MAX_CSV_ROWS} rows: split the file")
    if not out:
        raise Invalid("no machines in the CSV: expected lines of MAC,name,group")
    return out
