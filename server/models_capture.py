"""Network capture and backups (issue 10): tables and API models.

A capture session is a ``Session`` of kind ``capture`` (models.py) with exactly one
machine; its upload state lives in one ``Capture`` row (same id as the session). A backup
is a capture a schedule of action ``backup`` made (``Capture.backup``); retention prunes a
machine's backups (server/services/backups.py). Imported by models.py, so its tables are
part of the metadata the migrations are checked against.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import field_validator
from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel

from server.models import DISK_RULE, DbId, utcnow


def check_disk_rule(v: str | None) -> str | None:
    """``v`` if it is None or a disk rule (models.DISK_RULE), else ValueError saying so."""
    if v is not None and not re.match(DISK_RULE, v):
        raise ValueError(
            f"disk_rule {v!r} is not a disk rule: use auto, largest, smallest, "
            "model:TEXT, serial:TEXT or a device name such as sda"
        )
    return v


class Capture(SQLModel, table=True):
    """The upload state of one capture session (session kind ``capture``)."""

    __tablename__ = "capture"
    session_id: int = Field(primary_key=True, foreign_key="deploy_session.id")
    machine_id: int = Field(foreign_key="machine.id", index=True)
    target_image: str = Field(max_length=128)
    level: int = 3  #: the zstd level the client compresses with
    block_size: int = 1 << 20
    #: a scheduled backup (retention applies to the machine's backups)
    backup: bool = False
    schedule_id: int | None = Field(default=None, foreign_key="schedule.id", index=True)
    schedule_run_id: int | None = Field(default=None, foreign_key="schedule_run.id", index=True)
    #: blocks (and their payload bytes) this capture wrote into the store; the rest of its
    #: data blocks the store had already (reused), counted when its manifest is accepted
    uploaded_blocks: int = 0
    uploaded_bytes: int = Field(default=0, sa_type=BigInteger)
    reused_blocks: int = 0
    reused_bytes: int = Field(default=0, sa_type=BigInteger)
    data_blocks: int = 0
    read_bytes: int = Field(default=0, sa_type=BigInteger)  #: raw bytes the client read
    #: the image the accepted manifest became (None until then)
    image_id: int | None = Field(default=None, foreign_key="image.id", index=True)
    manifest_digest: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    completed_at: datetime | None = None


class CapturePublic(SQLModel):
    session_id: int
    machine_id: int
    target_image: str
    level: int
    block_size: int
    backup: bool
    schedule_id: int | None
    schedule_run_id: int | None
    uploaded_blocks: int
    uploaded_bytes: int
    reused_blocks: int
    reused_bytes: int
    data_blocks: int
    read_bytes: int
    image_id: int | None
    manifest_digest: str
    created_at: datetime
    completed_at: datetime | None
    session_state: str = ""
    reason: str = ""


class CaptureCreate(SQLModel):
    """``POST /api/captures``: capture ``machine_id``'s disk as image ``target_image``."""

    machine_id: DbId
    target_image: str = Field(min_length=1, max_length=128)
    #: which disk the client reads (models.DISK_RULE); None: FLEETCAST_BOOT_DISK
    disk_rule: str | None = Field(default=None, max_length=128)
    #: what the client does after the capture; None: FLEETCAST_BOOT_AFTER
    after: Literal["reboot", "poweroff", "none"] | None = None
    #: the zstd level the client compresses with; None: FLEETCAST_COMPRESSION_LEVEL
    level: int | None = Field(default=None, ge=1, le=19)

    @field_validator("disk_rule")
    @classmethod
    def _disk_rule(cls, v: str | None) -> str | None:
        return check_disk_rule(v)


class CaptureHave(SQLModel):
    """``POST /api/agent/captures/{id}/have``: raw-content SHA-256 digests, hex."""

    digests: list[str] = Field(max_length=16384)


class CaptureHaveReply(SQLModel):
    missing: list[str]
    present: dict[str, int]


class CaptureAccepted(SQLModel):
    image_id: int
    name: str
    digest: str


class RestoreRequest(SQLModel):
    """``POST /api/machines/{id}/restore``: deploy this image to that one machine."""

    image_id: DbId
    after: Literal["reboot", "poweroff", "none"] | None = None
    disk_rule: str | None = Field(default=None, max_length=128)

    @field_validator("disk_rule")
    @classmethod
    def _disk_rule(cls, v: str | None) -> str | None:
        return check_disk_rule(v)


class BackupPublic(SQLModel):
    """One backup (or capture) image of a machine."""

    image_id: int
    name: str
    created_at: datetime
    data_bytes: int
    stored_bytes: int
    session_id: int
    backup: bool
    uploaded_bytes: int
    reused_bytes: int
