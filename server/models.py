"""The control plane's data: SQLModel tables and the API's request/response models.

Families as in the FastAPI full-stack template: ``ThingBase`` (shared, validated fields) ->
``ThingCreate``/``ThingUpdate`` (what a client sends) / ``Thing(table=True)`` (the row) /
``ThingPublic`` (what the API returns). Secrets (password hashes, token hashes, session keys)
live only on table models, never on a Public one.

States (one table each, changed only through server/services/sessions.py):

- Session: ``pending`` (created, waiting for start) -> ``running`` -> ``succeeded`` |
  ``partial`` | ``failed`` | ``cancelled`` | ``not-started`` (its start policy's maximum
  wait or its maintenance window ended before the transfer started).
- SessionMachine: ``pending`` -> ``assigned`` (its agent fetched the assignment) ->
  ``receiving`` -> ``succeeded`` | ``failed`` | ``evicted`` | ``cancelled`` | ``no-show``;
  with catch-up on (issue 9), an evicted machine, or one that arrives after the transfer,
  goes to ``catchup`` (fetching blocks over HTTP, server/services/catchup.py) ->
  ``succeeded`` | ``failed``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import field_validator
from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

#: Ids are 1..2^31-1 everywhere (PostgreSQL's integer); larger ones are refused with a 422.
MAX_ID = 2**31 - 1
DbId = Annotated[int, Ge(1), Le(MAX_ID)]

SESSION_ACTIVE = ("pending", "running")
SESSION_ENDED = ("succeeded", "partial", "failed", "cancelled", "not-started")
SESSION_STATES = SESSION_ACTIVE + SESSION_ENDED
MACHINE_ACTIVE = ("pending", "assigned", "receiving", "catchup")
MACHINE_ENDED = ("succeeded", "failed", "evicted", "cancelled", "no-show")
MACHINE_STATES = MACHINE_ACTIVE + MACHINE_ENDED

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,62}$")


def utcnow() -> datetime:
    """Now, in UTC (every timestamp the server stores)."""
    return datetime.now(UTC)


def normalize_mac(text: str) -> str:
    """``AA-BB-CC-DD-EE-FF`` / ``aabb.ccdd.eeff`` / ``aa:bb:..`` -> ``aa:bb:cc:dd:ee:ff``.

    Raises ValueError with the offending text when it is not a MAC address.
    """
    hexdigits = re.sub(r"[^0-9a-fA-F]", "", text)
    if len(hexdigits) != 12 or not re.fullmatch(r"[0-9a-fA-F:.\- ]+", text.strip()):
        raise ValueError(f"{text!r} is not a MAC address (like 52:54:00:12:34:56)")
    mac = ":".join(hexdigits[i : i + 2] for i in range(0, 12, 2)).lower()
    assert _MAC_RE.match(mac)
    return mac


def check_name(text: str, what: str = "name") -> str:
    """A display name: 1-63 of letters, digits, ``._ -``, starting with a letter or digit."""
    if not _NAME_RE.match(text):
        raise ValueError(
            f"{what} {text!r} must be 1-63 letters, digits, '.', '_', '-' or spaces, "
            "starting with a letter or digit"
        )
    return text


def image_family(name: str) -> str:
    """An image's default family: its name up to the last ``/`` if any, else the name."""
    head, sep, _ = name.rpartition("/")
    return head if sep and head else name


def json_column() -> Any:
    """A JSON column (TEXT on SQLite, JSON on PostgreSQL)."""
    return Column(JSON, nullable=False)


# -- users and tokens -------------------------------------------------------------------------


class User(SQLModel, table=True):
    """An administrator. ``password_hash`` is argon2id (server/security.py)."""

    __tablename__ = "app_user"
    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(index=True, unique=True, max_length=64)
    password_hash: str
    is_active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class UserPublic(SQLModel):
    id: int
    username: str
    is_active: bool
    created_at: datetime


class ApiToken(SQLModel, table=True):
    """A bearer credential: an admin's API token (user_id) or a machine's (machine_id).

    Only the SHA-256 of the token is stored; the token itself is shown once.
    """

    __tablename__ = "api_token"
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(index=True, unique=True, max_length=64)
    kind: str = Field(max_length=16)  #: "admin" or "machine"
    name: str = Field(default="", max_length=128)
    user_id: int | None = Field(default=None, foreign_key="app_user.id", index=True)
    machine_id: int | None = Field(default=None, foreign_key="machine.id", index=True)
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    revoked: bool = False


class LoginRequest(SQLModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    token_name: str = Field(default="login", max_length=128)


class TokenPublic(SQLModel):
    token: str
    kind: str
    name: str


# -- images -----------------------------------------------------------------------------------


class Image(SQLModel, table=True):
    """An image of the store, as the database knows it (the store holds the blocks)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    digest: str = Field(max_length=64)  #: SHA-256 of the canonical manifest, hex
    image_size: int = Field(sa_type=BigInteger)
    stored_bytes: int = Field(sa_type=BigInteger)
    data_bytes: int = Field(sa_type=BigInteger)
    block_size: int
    block_count: int
    data_blocks: int
    zero_blocks: int
    partition_table: str = Field(default="none", max_length=16)
    source: dict[str, Any] = Field(default_factory=dict, sa_column=json_column())
    created_at: datetime = Field(default_factory=utcnow)
    #: images of one family are versions of one system (delta re-imaging, schema 0004);
    #: default: the name up to its last "/" (``win11/2026-11`` -> ``win11``), else the name
    family: str = Field(default="", index=True, max_length=128)


class ImagePublic(SQLModel):
    id: int
    name: str
    digest: str
    image_size: int
    stored_bytes: int
    data_bytes: int
    block_size: int
    block_count: int
    data_blocks: int
    zero_blocks: int
    partition_table: str
    source: dict[str, Any]
    created_at: datetime
    family: str = ""


class ImageRegister(SQLModel):
    """Register an image from a path on the server: a raw disk/device (capture) or a
    qcow2/VMDK/VHD(X) file (import); ``existing`` registers an image already in the store."""

    name: str = Field(min_length=1, max_length=128)
    path: str = Field(default="", max_length=4096)
    mode: Literal["capture", "import", "existing"] = "capture"
    level: int | None = Field(default=None, ge=1, le=19)
    all_blocks: bool = False
    #: the image family (delta re-imaging); "": derived from the name (image_family)
    family: str = Field(default="", max_length=128)


# -- groups and machines ----------------------------------------------------------------------


class GroupBase(SQLModel):
    name: str = Field(max_length=63)
    description: str = Field(default="", max_length=1024)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "group name")


class Group(GroupBase, table=True):
    __tablename__ = "machine_group"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=63)
    created_at: datetime = Field(default_factory=utcnow)
    #: Wake-on-LAN: the lab's broadcast address and UDP port ("" / None: the server's)
    wol_broadcast: str = Field(default="", max_length=45)
    wol_port: int | None = None


class GroupCreate(GroupBase):
    pass


class GroupUpdate(SQLModel):
    name: str | None = Field(default=None, max_length=63)
    description: str | None = Field(default=None, max_length=1024)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "group name")


class GroupPublic(GroupBase):
    id: int
    created_at: datetime
    wol_broadcast: str = ""
    wol_port: int | None = None
    machine_ids: list[int] = []


class GroupMembers(SQLModel):
    machine_ids: list[DbId] = Field(max_length=10_000)


class Machine(SQLModel, table=True):
    """A PC of a lab, known by its primary MAC (the one its agent or PXE request came from)."""

    id: int | None = Field(default=None, primary_key=True)
    mac: str = Field(index=True, unique=True, max_length=17)
    macs: list[str] = Field(default_factory=list, sa_column=json_column())
    name: str = Field(default="", max_length=63)
    group_id: int | None = Field(default=None, foreign_key="machine_group.id", index=True)
    #: what the agent reported: {"disks": [{name, model, serial, size}], "cpu": {model, cores},
    #: "ram_bytes": N, "nics": [{name, mac, speed_mbps}], "hostname": ...}
    inventory: dict[str, Any] = Field(default_factory=dict, sa_column=json_column())
    address: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    last_seen_at: datetime | None = None
    last_image_id: int | None = Field(default=None, foreign_key="image.id")
    last_deployed_at: datetime | None = None
    last_outcome: str = Field(default="", max_length=16)


class MachinePublic(SQLModel):
    id: int
    mac: str
    macs: list[str]
    name: str
    group_id: int | None
    inventory: dict[str, Any]
    address: str
    created_at: datetime
    last_seen_at: datetime | None
    last_image_id: int | None
    last_deployed_at: datetime | None
    last_outcome: str


class MachineCreate(SQLModel):
    mac: str = Field(max_length=32)
    name: str = Field(default="", max_length=63)
    group_id: DbId | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        return normalize_mac(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return v if v == "" else check_name(v, "machine name")


class MachineUpdate(SQLModel):
    name: str | None = Field(default=None, max_length=63)
    group_id: DbId | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return v if not v else check_name(v, "machine name")


class CsvImportResult(SQLModel):
    created: int
    updated: int
    groups_created: int


# -- sessions ---------------------------------------------------------------------------------

#: A session's target-disk rule (client/boot.py ``pick_disk``): ``auto``, ``largest``,
#: ``smallest``, ``model:TEXT``, ``serial:TEXT`` or a device name (``sda``, ``/dev/nvme0n1``);
#: only characters a kernel command line carries unquoted.
DISK_RULE = (
    r"^(auto|largest|smallest|(model|serial):[A-Za-z0-9._~+=:@%-]+"
    r"|(/dev/)?[A-Za-z0-9][A-Za-z0-9._-]*)$"
)


class StartPolicy(SQLModel):
    """When the session opens, and when its transfer starts (server/services/policy.py).

    ``start``: "now" (the sender opens when the session is created) or "manual" (on
    POST /sessions/{id}/start). Once open, agents join and the transfer starts at the first
    of: ``min_receivers`` joined (default: every target); the time ``at``; ``quiet_period``
    seconds after the last join; the operator's POST /sessions/{id}/start; ``max_wait``
    seconds after opening (then with those present if at least ``minimum`` joined, else the
    session ends ``not-started``). ``not_after``: the maintenance window's end; a transfer
    not started by then never starts, and one running then is cancelled when
    ``at_window_end`` is "cancel" (else it runs on).
    """

    start: Literal["now", "manual"] = "now"
    min_receivers: int | None = Field(default=None, ge=1, le=10_000)
    max_wait: float = Field(default=300.0, ge=0.0, le=86_400.0)
    minimum: int = Field(default=1, ge=1, le=10_000)
    at: datetime | None = None
    quiet_period: float | None = Field(default=None, ge=0.0, le=86_400.0)
    not_after: datetime | None = None
    at_window_end: Literal["run-on", "cancel"] = "run-on"

    @field_validator("at", "not_after")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        """A time without a zone is UTC."""
        return v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v


class SessionCreate(SQLModel):
    image: str = Field(min_length=1, max_length=128)
    group_id: DbId | None = None
    machine_ids: list[DbId] = Field(default_factory=list, max_length=10_000)
    start_policy: StartPolicy = Field(default_factory=StartPolicy)
    #: bits per second cap; None: automatic (follows the receivers)
    rate_bps: int | None = Field(default=None, ge=8192, le=100_000_000_000)
    #: what a network-booted client does after the deployment; None: FLEETCAST_BOOT_AFTER
    after: Literal["reboot", "poweroff", "none"] | None = None
    #: which disk the client writes (docs/PXE.md); None: FLEETCAST_BOOT_DISK
    disk_rule: str | None = Field(default=None, max_length=128)
    #: delta re-imaging (skip blocks the disk holds): "auto" when the disk holds an image of
    #: the same family or resumes this session, "always", "never" (services/catchup.py)
    delta: Literal["auto", "always", "never"] = "auto"

    @field_validator("disk_rule")
    @classmethod
    def _disk_rule(cls, v: str | None) -> str | None:
        if v is not None and not re.match(DISK_RULE, v):
            raise ValueError(
                f"disk_rule {v!r} is not a disk rule: use auto, largest, smallest, "
                "model:TEXT, serial:TEXT or a device name such as sda (letters, digits, ._-)"
            )
        return v


class Session(SQLModel, table=True):
    """A deployment of one image to a set of machines by one multicast sender."""

    __tablename__ = "deploy_session"
    id: int | None = Field(default=None, primary_key=True)
    #: None for a capture session until its image is complete (schema 0005)
    image_id: int | None = Field(default=None, foreign_key="image.id", index=True)
    image_name: str = Field(max_length=128)
    group_id: int | None = Field(default=None, foreign_key="machine_group.id")
    start_policy: dict[str, Any] = Field(default_factory=dict, sa_column=json_column())
    rate_bps: int | None = Field(default=None, sa_type=BigInteger)
    mcast_group: str = Field(max_length=15)
    mcast_port: int
    wire_session_id: int = Field(sa_type=BigInteger)  #: the protocol's 32-bit session id
    key_hex: str = Field(max_length=64)  #: the session key (secret: only agents get it)
    state: str = Field(default="pending", index=True, max_length=16)
    reason: str = Field(default="", max_length=2048)
    created_by: str = Field(default="", max_length=64)
    rerun_of: int | None = Field(default=None, foreign_key="deploy_session.id")
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    #: when the transfer began (the start policy's decision); None while the sender waits
    transfer_started_at: datetime | None = None
    ended_at: datetime | None = None
    #: counters of the sender at the end (bytes/datagrams sent, retransmissions, NAKs ...)
    stats: dict[str, Any] = Field(default_factory=dict, sa_column=json_column())
    #: after the deployment the client does this: reboot, poweroff or none (schema 0003)
    after: str = Field(default="reboot", max_length=16)
    #: the client's target-disk rule (DISK_RULE), e.g. auto, sda, model:TEXT (schema 0003)
    disk_rule: str = Field(default="auto", max_length=128)
    #: delta re-imaging: auto | always | never (schema 0004)
    delta: str = Field(default="auto", max_length=8)
    #: when the multicast sender ended; later arrivals and evicted machines catch up over
    #: HTTP until the verdict (schema 0004)
    transfer_ended_at: datetime | None = None
    #: "deploy" (multicast an image) or "capture" (one machine uploads its disk as image
    #: ``target_image``; server/services/capture.py, models_capture.Capture) (schema 0005)
    kind: str = Field(default="deploy", max_length=8)
    target_image: str = Field(default="", max_length=128)


class SessionMachine(SQLModel, table=True):
    """One target machine of a session, and how it is doing."""

    __tablename__ = "session_machine"
    __table_args__ = (UniqueConstraint("session_id", "machine_id"),)
    id: int | None = Field(default=None, primary_key=True)
    session_id: int = Field(foreign_key="deploy_session.id", index=True)
    machine_id: int = Field(foreign_key="machine.id", index=True)
    state: str = Field(default="pending", max_length=16)
    reason: str = Field(default="", max_length=2048)
    receiver_id: int | None = Field(default=None, sa_type=BigInteger)
    bytes_done: int = Field(default=0, sa_type=BigInteger)  #: received and verified
    bytes_total: int = Field(default=0, sa_type=BigInteger)
    blocks_done: int = 0
    blocks_total: int = 0
    rate_bps: float = 0.0  #: write rate the agent measured
    loss: float = 0.0
    naks: int = 0
    assigned_at: datetime | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    ended_at: datetime | None = None
    #: what the agent does now: hashing | multicast | catchup | verifying (schema 0004)
    phase: str = Field(default="", max_length=16)
    #: data blocks/raw bytes already on the disk, verified, not transferred ("spared")
    held_blocks: int = 0
    held_bytes: int = Field(default=0, sa_type=BigInteger)
    #: data blocks/raw bytes fetched over HTTP by catch-up (the agent's result stats)
    catchup_blocks: int = 0
    catchup_bytes: int = Field(default=0, sa_type=BigInteger)
    #: how its result came: "multicast" | "catchup" ("" before a result)
    via: str = Field(default="", max_length=16)


class SessionMachinePublic(SQLModel):
    machine_id: int
    machine_name: str = ""
    mac: str = ""
    state: str
    reason: str
    bytes_done: int
    bytes_total: int
    blocks_done: int
    blocks_total: int
    rate_bps: float
    loss: float
    naks: int
    assigned_at: datetime | None
    started_at: datetime | None
    updated_at: datetime | None
    ended_at: datetime | None
    phase: str = ""
    held_blocks: int = 0
    held_bytes: int = 0
    catchup_blocks: int = 0
    catchup_bytes: int = 0
    via: str = ""


class SessionPublic(SQLModel):
    id: int
    image_id: int | None
    image_name: str
    group_id: int | None
    start_policy: dict[str, Any]
    rate_bps: int | None
    mcast_group: str
    mcast_port: int
    state: str
    reason: str
    created_by: str
    rerun_of: int | None
    created_at: datetime
    started_at: datetime | None
    transfer_started_at: datetime | None = None
    ended_at: datetime | None
    stats: dict[str, Any]
    counts: dict[str, int] = {}
    after: str = "reboot"
    disk_rule: str = "auto"
    delta: str = "auto"
    transfer_ended_at: datetime | None = None
    kind: str = "deploy"
    target_image: str = ""


class SessionDetail(SessionPublic):
    machines: list[SessionMachinePublic] = []


# -- schedules (issue 5, server/services/scheduler.py) --------------------------------------

SCHEDULE_RUN_STATES = ("waking", "started", "missed", "failed")


class Retention(SQLModel):
    """How many backups of a machine a backup schedule keeps: the newest of each of the
    last ``daily`` days, ``weekly`` ISO weeks and ``monthly`` months that have one (the
    union; the newest backup is always kept). server/services/backups.py"""

    daily: int = Field(default=7, ge=0, le=1000)
    weekly: int = Field(default=4, ge=0, le=1000)
    monthly: int = Field(default=6, ge=0, le=1000)


class ScheduleBase(SQLModel):
    """A deployment to run at a date and time (``once``), by a cron expression (``cron``) or
    on weekdays at a time (``weekly``), in the IANA time zone ``timezone``."""

    name: str = Field(max_length=63)
    #: the image to deploy ("" for a backup schedule)
    image: str = Field(default="", max_length=128)
    group_id: DbId | None = None
    machine_ids: list[DbId] = Field(default_factory=list, max_length=10_000)
    #: "deploy" the image, or "backup": capture each machine as ``<machine>/<date>`` and
    #: prune its backups by ``retention`` (issue 10, server/services/backups.py)
    action: Literal["deploy", "backup"] = "deploy"
    retention: Retention = Field(default_factory=lambda: Retention())
    #: the sessions' start policy; the schedule sets its window end (not_after)
    start_policy: StartPolicy = Field(default_factory=StartPolicy)
    rate_bps: int | None = Field(default=None, ge=8192, le=100_000_000_000)
    kind: Literal["once", "cron", "weekly"] = "weekly"
    #: once: local date and time, ``2026-11-29T02:00``
    once_at: str = Field(default="", max_length=32)
    #: cron: five fields, ``0 2 * * sun``
    cron: str = Field(default="", max_length=128)
    #: weekly: 0 = Monday .. 6 = Sunday, at ``time`` (HH:MM)
    weekdays: list[Annotated[int, Ge(0), Le(6)]] = Field(default_factory=list, max_length=7)
    time: str = Field(default="", max_length=5)
    timezone: str = Field(default="UTC", max_length=64)
    #: maintenance window end, local HH:MM (the first such time after a run's start); "": none
    window_end: str = Field(default="", max_length=5)
    #: a session still running at the window end: "run-on" or "cancel"
    on_window_end: Literal["run-on", "cancel"] = "run-on"
    #: seconds before a run at which the machines are woken (0: no Wake-on-LAN)
    wake_lead: float = Field(default=0.0, ge=0.0, le=7200.0)
    #: a run missed while the server was down still runs this many seconds late; else missed
    grace: float = Field(default=900.0, ge=0.0, le=86_400.0)
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "schedule name")


class Schedule(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=63)
    image: str = Field(max_length=128)
    group_id: int | None = Field(default=None, foreign_key="machine_group.id")
    machine_ids: list[int] = Field(default_factory=list, sa_column=json_column())
    action: str = Field(default="deploy", max_length=8)  #: schema 0005
    retention: dict[str, Any] = Field(default_factory=dict, sa_column=json_column())
    start_policy: dict[str, Any] = Field(default_factory=dict, sa_column=json_column())
    rate_bps: int | None = Field(default=None, sa_type=BigInteger)
    kind: str = Field(max_length=8)
    once_at: str = Field(default="", max_length=32)
    cron: str = Field(default="", max_length=128)
    weekdays: list[int] = Field(default_factory=list, sa_column=json_column())
    time: str = Field(default="", max_length=5)
    timezone: str = Field(default="UTC", max_length=64)
    window_end: str = Field(default="", max_length=5)
    on_window_end: str = Field(default="run-on", max_length=8)
    wake_lead: float = 0.0
    grace: float = 900.0
    enabled: bool = True
    next_run_at: datetime | None = None  #: UTC; None: no run to come
    created_by: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class ScheduleCreate(ScheduleBase):
    pass


class SchedulePublic(ScheduleBase):
    id: int
    next_run_at: datetime | None
    created_by: str
    created_at: datetime


class ScheduleRun(SQLModel, table=True):
    """One due time of a schedule, and what became of it (the schedule's history)."""

    __tablename__ = "schedule_run"
    id: int | None = Field(default=None, primary_key=True)
    schedule_id: int = Field(foreign_key="schedule.id", index=True)
    due_at: datetime  #: UTC
    state: str = Field(max_length=16)  #: SCHEDULE_RUN_STATES
    reason: str = Field(default="", max_length=2048)
    session_id: int | None = Field(default=None, foreign_key="deploy_session.id")
    woken: int = 0  #: machines sent magic packets
    created_at: datetime = Field(default_factory=utcnow)


class ScheduleRunPublic(SQLModel):
    id: int
    schedule_id: int
    due_at: datetime
    state: str
    reason: str
    session_id: int | None
    woken: int
    created_at: datetime
    session_state: str = ""


class GroupWake(SQLModel):
    """A group's Wake-on-LAN target: broadcast address ("" : the server's) and UDP port."""

    wol_broadcast: str = Field(default="", max_length=45)
    wol_port: int | None = Field(default=None, ge=1, le=65535)


# -- agents -----------------------------------------------------------------------------------


class AgentRegister(SQLModel):
    macs: list[str] = Field(min_length=1, max_length=64)
    hostname: str = Field(default="", max_length=255)
    inventory: dict[str, Any] = Field(default_factory=dict)

    @field_validator("macs")
    @classmethod
    def _macs(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for m in v:
            mac = normalize_mac(m)
            if mac not in out:
                out.append(mac)
        return out


class AgentCredential(SQLModel):
    machine_id: int
    credential: str
    progress_interval: float


class Assignment(SQLModel):
    """What an agent is to do now; ``session_id`` None means nothing (poll again)."""

    session_id: int | None = None
    state: str = ""
    group: str = ""
    port: int = 0
    key: str = ""  #: hex
    image: str = ""
    manifest_digest: str = ""  #: hex; the agent checks the manifest it receives against it
    manifest: str = ""  #: base64 of the canonical manifest bytes
    retry_after: float = 2.0
    #: the session's post-deployment action (reboot | poweroff | none) and target-disk rule
    after: str = ""
    disk_rule: str = ""
    #: "multicast" (join the transfer) or "catchup" (the transfer is over or this machine was
    #: evicted: fetch GET /api/agent/sessions/{id}/blocks/{index}); issue 9
    mode: str = "multicast"
    #: hash the target disk first and skip the blocks it holds (services/catchup.py)
    delta: bool = False
    image_id: int = 0
    #: "deploy" or "capture" (read disk_rule's disk, upload it as ``image``; issue 10) with
    #: the store's block size and the zstd level to compress with
    kind: str = "deploy"
    block_size: int = 0
    level: int = 0


class ProgressSample(SQLModel):
    bytes_done: int = Field(ge=0, le=1 << 50)
    bytes_total: int = Field(ge=0, le=1 << 50)
    blocks_done: int = Field(default=0, ge=0, le=1 << 32)
    blocks_total: int = Field(default=0, ge=0, le=1 << 32)
    rate_bps: float = Field(default=0.0, ge=0.0, le=1e12)
    loss: float = Field(default=0.0, ge=0.0, le=1.0)
    naks: int = Field(default=0, ge=0, le=1 << 40)


class AgentProgress(SQLModel):
    session_id: DbId
    receiver_id: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)
    samples: list[ProgressSample] = Field(min_length=1, max_length=64)
    #: hashing | multicast | catchup | verifying ("": not said, an older agent)
    phase: Literal["", "hashing", "multicast", "catchup", "verifying", "reading", "uploading"] = ""
    #: data blocks/raw bytes already on the disk and verified (delta: not transferred)
    held_blocks: int = Field(default=0, ge=0, le=1 << 32)
    held_bytes: int = Field(default=0, ge=0, le=1 << 50)


class AgentProgressReply(SQLModel):
    cancel: bool = False
    reason: str = ""


class AgentResult(SQLModel):
    session_id: DbId
    result: Literal["verified", "failed", "evicted", "aborted", "refused"]
    reason: str = Field(default="", max_length=2048)
    bytes_done: int = Field(default=0, ge=0, le=1 << 50)
    blocks_done: int = Field(default=0, ge=0, le=1 << 32)
    manifest_digest: str = Field(default="", max_length=64)
    stats: dict[str, Any] = Field(default_factory=dict)
    #: how the blocks came: the multicast transfer or catch-up over HTTP (issue 9)
    via: Literal["multicast", "catchup"] = "multicast"


# -- audit log --------------------------------------------------------------------------------


class Event(SQLModel, table=True):
    """One line of the audit log: who (actor) did what (kind), to which session/machine."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(default="", max_length=80)  #: "user:NAME", "machine:ID", "server"
    kind: str = Field(max_length=48, index=True)  #: e.g. "session.created", "machine.succeeded"
    session_id: int | None = Field(default=None, index=True)
    machine_id: int | None = Field(default=None, index=True)
    message: str = Field(default="", max_length=4096)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=json_column())


class EventPublic(SQLModel):
    id: int
    at: datetime
    actor: str
    kind: str
    session_id: int | None
    machine_id: int | None
    message: str
    data: dict[str, Any]


# Capture sessions and backups (issue 10) keep their tables in their own module.
from server import models_capture  # noqa: E402,F401
