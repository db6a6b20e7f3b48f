"""Machines: list, detail, create, edit name/group, delete, CSV import."""

from __future__ import annotations

from fastapi import APIRouter, Body, status

from server.api.deps import ERRORS, AdminDep, BusDep, DbDep, Id, OptId
from server.models import CsvImportResult, Machine, MachineCreate, MachinePublic, MachineUpdate
from server.services import machines as svc
from server.services.audit import record

router = APIRouter(prefix="/api/machines", tags=["machines"], responses=ERRORS)


@router.get("", response_model=list[MachinePublic])
def list_machines(_who: AdminDep, db: DbDep, group_id: OptId = None) -> list[Machine]:
    return svc.list_machines(db, group_id)


@router.get("/{machine_id}", response_model=MachinePublic)
def get_machine(machine_id: Id, _who: AdminDep, db: DbDep) -> Machine:
    return svc.get_machine(db, machine_id)


@router.post("", response_model=MachinePublic, status_code=status.HTTP_201_CREATED)
def create_machine(body: MachineCreate, who: AdminDep, db: DbDep, bus: BusDep) -> Machine:
    m = svc.create_machine(db, body.mac, body.name, body.group_id)
    record(db, bus, "machine.added", actor=who.actor, machine_id=m.id, message=f"{m.mac}")
    return m


@router.patch("/{machine_id}", response_model=MachinePublic)
def update_machine(
    machine_id: Id, body: MachineUpdate, who: AdminDep, db: DbDep, bus: BusDep
) -> Machine:
    m = svc.update_machine(db, svc.get_machine(db, machine_id), body.model_dump(exclude_unset=True))
    record(
        db,
        bus,
        "machine.edited",
        actor=who.actor,
        machine_id=machine_id,
        **body.model_dump(exclude_unset=True),
    )
    return m


@router.delete("/{machine_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_machine(machine_id: Id, who: AdminDep, db: DbDep, bus: BusDep) -> None:
    svc.delete_machine(db, svc.get_machine(db, machine_id))
    record(db, bus, "machine.deleted", actor=who.actor, machine_id=machine_id)


@router.post("/import", response_model=CsvImportResult)
def import_csv(
    who: AdminDep,
    db: DbDep,
    bus: BusDep,
    body: str = Body(media_type="text/csv", max_length=4 << 20),
) -> CsvImportResult:
    """Lines ``MAC,name,group`` (header optional); groups are created as needed."""
    result = svc.import_csv(db, body)
    record(db, bus, "machine.imported", actor=who.actor, **result.model_dump())
    return result
