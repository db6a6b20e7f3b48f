"""Groups (labs): CRUD and membership."""

from __future__ import annotations

from fastapi import APIRouter, status

from server.api.deps import ERRORS, AdminDep, BusDep, DbDep, Id
from server.models import Group, GroupCreate, GroupMembers, GroupPublic, GroupUpdate
from server.services import machines as svc
from server.services.audit import record

router = APIRouter(prefix="/api/groups", tags=["groups"], responses=ERRORS)


def _public(db: DbDep, g: Group) -> GroupPublic:
    out = GroupPublic.model_validate(g, from_attributes=True)
    out.machine_ids = svc.group_member_ids(db, g.id or 0)
    return out


@router.get("", response_model=list[GroupPublic])
def list_groups(_who: AdminDep, db: DbDep) -> list[GroupPublic]:
    return [_public(db, g) for g in svc.list_groups(db)]


@router.post("", response_model=GroupPublic, status_code=status.HTTP_201_CREATED)
def create_group(body: GroupCreate, who: AdminDep, db: DbDep, bus: BusDep) -> GroupPublic:
    g = svc.create_group(db, body.name, body.description)
    record(db, bus, "group.created", actor=who.actor, message=g.name)
    return _public(db, g)


@router.get("/{group_id}", response_model=GroupPublic)
def get_group(group_id: Id, _who: AdminDep, db: DbDep) -> GroupPublic:
    return _public(db, svc.get_group(db, group_id))


@router.patch("/{group_id}", response_model=GroupPublic)
def update_group(
    group_id: Id, body: GroupUpdate, who: AdminDep, db: DbDep, bus: BusDep
) -> GroupPublic:
    g = svc.update_group(db, svc.get_group(db, group_id), body.model_dump(exclude_unset=True))
    record(db, bus, "group.edited", actor=who.actor, message=g.name)
    return _public(db, g)


@router.delete("/{group_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_group(group_id: Id, who: AdminDep, db: DbDep, bus: BusDep) -> None:
    g = svc.get_group(db, group_id)
    name = g.name
    svc.delete_group(db, g)
    record(db, bus, "group.deleted", actor=who.actor, message=name)


@router.put("/{group_id}/machines", response_model=GroupPublic)
def set_members(
    group_id: Id, body: GroupMembers, who: AdminDep, db: DbDep, bus: BusDep
) -> GroupPublic:
    """Make exactly these machines the group's members."""
    g = svc.get_group(db, group_id)
    svc.set_members(db, g, body.machine_ids, add_only=False)
    record(db, bus, "group.members", actor=who.actor, message=g.name, machine_ids=body.machine_ids)
    db.flush()
    return _public(db, g)


@router.post("/{group_id}/machines", response_model=GroupPublic)
def add_members(
    group_id: Id, body: GroupMembers, who: AdminDep, db: DbDep, bus: BusDep
) -> GroupPublic:
    """Add these machines to the group (moving them from any other group)."""
    g = svc.get_group(db, group_id)
    svc.set_members(db, g, body.machine_ids, add_only=True)
    record(db, bus, "group.members", actor=who.actor, message=g.name, added=body.machine_ids)
    db.flush()
    return _public(db, g)
