"""Capture sessions: a machine reads its own disk and uploads it as a new image (issue 10).

A capture session is a ``Session`` of kind ``capture`` with one machine and no multicast
sender; its ``Capture`` row holds the upload's state. The agent asks which blocks the store
lacks (``have``), uploads those (``store_block``: decoded and verified against its SHA-256
before it is stored) and finally sends the manifest (``accept_manifest``): once every data
block it names is in the store, the image is added and registered and the session succeeds.
Every call is idempotent, so an agent resumes after a network drop or a reboot by asking
again. Until the manifest, the capture's blocks are pinned in the store (store.py "pins"),
so a gc in between never removes them; the pin is released when the capture ends.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from sqlalchemy import update
from sqlmodel import Session as DbSession
from sqlmodel import col, select

from protocol.codec import BlockError, decode_block
from protocol.manifest import MAX_BLOCK_SIZE, BlockKind, Manifest, ManifestError
from server.config import Settings
from server.events import EventBus
from server.images.store import ImageExists, ImageStore, StoreError, check_name
from server.models import (
    MACHINE_ACTIVE,
    MACHINE_ENDED,
    SESSION_ACTIVE,
    AgentResult,
    Assignment,
    Image,
    Session,
    SessionMachine,
    image_family,
    utcnow,
)
from server.models_capture import (
    Capture,
    CaptureAccepted,
    CaptureCreate,
    CaptureHaveReply,
    CapturePublic,
)
from server.services import sessions as svc
from server.services.audit import record
from server.services.errors import Conflict, Invalid, NotFound, ServiceError
from server.services.images import image_row
from server.services.machines import get_machine

log = logging.getLogger(__name__)

PIN_PREFIX = "capture-"
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: How many missing blocks a refused manifest names (the count says how many in all).
NAMED_MISSING = 20


class Refused(ServiceError):
    """An uploaded block or manifest is wrong (422): the agent must not retry it as is."""

    status = 422


def pin_key(session_id: int) -> str:
    """The store pin of capture session ``session_id``."""
    return f"{PIN_PREFIX}{session_id}"


# -- creating -----------------------------------------------------------------------------


def create_capture(
    db: DbSession,
    bus: EventBus | None,
    settings: Settings,
    store: ImageStore,
    req: CaptureCreate,
    actor: str,
    *,
    schedule_id: int | None = None,
    run_id: int | None = None,
) -> Session:
    """A new ``pending`` capture session of ``req.machine_id`` into image ``req.target_image``.

    Raises NotFound (machine), Invalid (bad name), Conflict (the name is taken, or the
    machine is in another active session, or another capture writes that name).
    """
    machine = get_machine(db, req.machine_id)
    name = req.target_image
    try:
        check_name(name)
    except StoreError as exc:
        raise Invalid(str(exc)) from None
    if store.exists(name) or db.exec(select(Image).where(Image.name == name)).first():
        raise Conflict(f"an image named {name!r} already exists; pick another name")
    _check_free(db, req.machine_id, name)
    s = Session(
        kind="capture",
        target_image=name,
        image_id=None,
        image_name=name,
        mcast_group="0.0.0.0",
        mcast_port=0,
        wire_session_id=secrets.randbelow(0xFFFFFFFE) + 1,
        key_hex=secrets.token_bytes(32).hex(),
        created_by=actor,
        after=req.after or settings.boot_after,
        disk_rule=req.disk_rule or settings.boot_disk,
    )
    db.add(s)
    db.flush()
    sid = s.id or 0
    db.add(SessionMachine(session_id=sid, machine_id=req.machine_id))
    db.add(
        Capture(
            session_id=sid,
            machine_id=req.machine_id,
            target_image=name,
            level=req.level or settings.compression_level,
            backup=schedule_id is not None,
            schedule_id=schedule_id,
            schedule_run_id=run_id,
        )
    )
    record(
        db,
        bus,
        "session.created",
        actor=actor,
        session_id=sid,
        machine_id=req.machine_id,
        message=f"session {sid}: capture of machine {machine.name or machine.mac} as {name}",
        session_kind="capture",
        image=name,
    )
    return s


def _check_free(db: DbSession, machine_id: int, name: str) -> None:
    busy = svc.busy_target(db, [machine_id])
    if busy is not None:
        raise Conflict(
            f"machine {machine_id} is already a target of active session {busy[1].id}; "
            "wait for it or cancel it"
        )
    same = db.exec(
        select(Session).where(
            Session.kind == "capture",
            Session.target_image == name,
            col(Session.state).in_(SESSION_ACTIVE),
        )
    ).first()
    if same is not None:
        raise Conflict(f"capture session {same.id} is already writing image {name!r}")


def get_capture(db: DbSession, session_id: int) -> Capture:
    cap = db.get(Capture, session_id)
    if cap is None:
        raise NotFound(f"session {session_id} is not a capture session")
    return cap


# -- the agent's side ---------------------------------------------------------------------


def assignment(db: DbSession, s: Session, row: SessionMachine, machine_id: int) -> Assignment:
    """The Assignment of a running capture session for its machine (docs/SERVER.md)."""
    cap = get_capture(db, s.id or 0)
    if row.state == "pending":
        row.assigned_at = utcnow()
        svc._set_machine_state(db, None, row, "assigned", "", f"machine:{machine_id}")
    return Assignment(
        session_id=s.id,
        state=s.state,
        kind="capture",
        image=s.target_image,
        retry_after=0.0,
        after=s.after,
        disk_rule=s.disk_rule,
        block_size=cap.block_size,
        level=cap.level,
    )


def open_capture(
    db: DbSession, machine_id: int, session_id: int
) -> tuple[Session, SessionMachine, Capture]:
    """The capture ``machine_id`` uploads to; Forbidden when it is not that session's
    machine, Conflict when the session is not a running capture any more."""
    s, row = svc.own_row(db, machine_id, session_id)
    if s.kind != "capture":
        raise Conflict(f"session {session_id} is a deployment, not a capture")
    if s.state != "running" or row.state not in MACHINE_ACTIVE:
        why = row.reason or s.reason or "no reason given"
        raise Conflict(f"capture session {session_id} is {s.state} ({why}): stop uploading")
    return s, row, get_capture(db, session_id)


def _digest(text: str) -> bytes:
    if not _HEX64.fullmatch(text):
        raise Refused(f"block {text[:80]!r} is not a SHA-256 digest (64 lowercase hex digits)")
    return bytes.fromhex(text)


def have(
    db: DbSession, store: ImageStore, machine_id: int, session_id: int, digests: list[str]
) -> CaptureHaveReply:
    """Which of ``digests`` the store lacks, and the stored size of the others (pinned for
    this capture until it ends)."""
    open_capture(db, machine_id, session_id)
    wanted = [_digest(d) for d in digests]
    present = store.pin_present(pin_key(session_id), wanted)
    return CaptureHaveReply(
        missing=[d.hex() for d in dict.fromkeys(wanted) if d not in present],
        present={d.hex(): size for d, size in present.items()},
    )


def store_block(
    db: DbSession,
    store: ImageStore,
    machine_id: int,
    session_id: int,
    hex_digest: str,
    raw_length: int,
    payload: bytes,
) -> bool:
    """Verify one uploaded block and store it (pinned); True if it was new to the store.

    Raises Refused naming the block when it does not decode to ``raw_length`` bytes whose
    SHA-256 is ``hex_digest`` or is larger than the capture's block size.
    """
    _, _, cap = open_capture(db, machine_id, session_id)
    digest = _digest(hex_digest)
    if not 1 <= raw_length <= cap.block_size:
        raise Refused(
            f"block {hex_digest}: raw length {raw_length} is not 1..{cap.block_size} "
            "(the capture's block size)"
        )
    try:
        decode_block(payload, raw_length, digest)
    except BlockError as exc:
        raise Refused(f"block {hex_digest} refused: {exc}; read and send it again") from None
    new = store.put_pinned_block(pin_key(session_id), digest, payload)
    if new:
        db.exec(
            update(Capture)
            .where(col(Capture.session_id) == session_id)
            .values(
                uploaded_blocks=col(Capture.uploaded_blocks) + 1,
                uploaded_bytes=col(Capture.uploaded_bytes) + len(payload),
            )
        )
    return new


def max_payload() -> int:
    """The largest block body the upload route reads (a payload never exceeds its block)."""
    return MAX_BLOCK_SIZE


def accept_manifest(
    db: DbSession,
    bus: EventBus | None,
    store: ImageStore,
    machine_id: int,
    session_id: int,
    data: bytes,
) -> CaptureAccepted:
    """Add the uploaded image once every data block it names is stored; the session succeeds.

    Raises Refused for a malformed manifest or one naming blocks the store lacks (listed),
    Conflict when the name was taken meanwhile. A repeat after success answers the same.
    """
    done = _accepted_before(db, machine_id, session_id, data)
    if done is not None:
        return done
    s, row, cap = open_capture(db, machine_id, session_id)
    try:
        manifest = Manifest.from_bytes(data)
    except ManifestError as exc:
        raise Refused(f"manifest refused: {exc}") from None
    _check_blocks(store, manifest)
    name = cap.target_image
    try:
        digest = store.add_image(name, manifest)
    except ImageExists:
        digest = manifest.digest()
        stored, _ = store.load_manifest(name)
        if stored != manifest.to_bytes():  # else: a repeat after a crash before the commit
            raise Conflict(f"an image named {name!r} was added meanwhile; capture again") from None
    except StoreError as exc:
        raise Refused(f"manifest refused: {exc}") from None
    image = _register(db, name, manifest, digest, machine_id, session_id)
    _count(cap, manifest, image)
    s.image_id = image.id
    row.bytes_done = row.bytes_total = max(row.bytes_total, manifest.data_bytes())
    svc._set_machine_state(db, bus, row, "succeeded", "", f"machine:{machine_id}")
    _end(db, bus, store, s, "succeeded", "")
    record(
        db,
        bus,
        "image.added",
        actor=f"machine:{machine_id}",
        session_id=session_id,
        message=f"image {name} (captured from machine {machine_id}: "
        f"{cap.uploaded_blocks} blocks uploaded, {cap.reused_blocks} reused)",
    )
    return CaptureAccepted(image_id=image.id or 0, name=name, digest=digest.hex())


def _register(
    db: DbSession, name: str, manifest: Manifest, digest: bytes, machine_id: int, session_id: int
) -> Image:
    """The Image row of the accepted manifest (the one the startup's store sync registered
    already, if the server died between adding the image and committing)."""
    image = db.exec(select(Image).where(Image.name == name)).first()
    if image is not None and image.digest != digest.hex():
        raise Conflict(f"an image named {name!r} was registered meanwhile; capture again")
    image = image or image_row(name, manifest, digest)
    image.family = image_family(name)
    image.source = {**image.source, "captured_from": machine_id, "session_id": session_id}
    db.add(image)
    db.flush()
    return image


def _accepted_before(
    db: DbSession, machine_id: int, session_id: int, data: bytes
) -> CaptureAccepted | None:
    s, _ = svc.own_row(db, machine_id, session_id)
    cap = db.get(Capture, session_id)
    if cap is None or cap.image_id is None:
        return None
    try:
        same = Manifest.from_bytes(data).digest().hex() == cap.manifest_digest
    except ManifestError:
        same = False
    if not same:
        raise Conflict(f"capture session {s.id} already completed with another manifest")
    return CaptureAccepted(image_id=cap.image_id, name=cap.target_image, digest=cap.manifest_digest)


def _check_blocks(store: ImageStore, manifest: Manifest) -> None:
    """Refused listing the data blocks the store lacks or holds with another size."""
    wrong: dict[bytes, str] = {}
    for i in range(manifest.block_count):
        if manifest.kinds[i] != BlockKind.DATA:
            continue
        d = manifest.digest_of(i)
        if d in wrong:
            continue
        size = store.stored_size(d)
        if size is None:
            wrong[d] = "missing"
        elif size != manifest.stored_sizes[i]:
            wrong[d] = f"stored with {size} bytes, manifest says {manifest.stored_sizes[i]}"
    if wrong:
        named = "; ".join(f"{d.hex()}: {why}" for d, why in list(wrong.items())[:NAMED_MISSING])
        raise Refused(
            f"manifest refused: {len(wrong)} data blocks are not in the store as stated "
            f"({named}); upload them and send the manifest again"
        )


def _count(cap: Capture, manifest: Manifest, image: Image) -> None:
    unique: dict[bytes, int] = {}
    for i in range(manifest.block_count):
        if manifest.kinds[i] == BlockKind.DATA:
            unique.setdefault(manifest.digest_of(i), manifest.stored_sizes[i])
    cap.data_blocks = len(unique)
    cap.reused_blocks = max(0, len(unique) - cap.uploaded_blocks)
    cap.reused_bytes = max(0, sum(unique.values()) - cap.uploaded_bytes)
    cap.image_id = image.id
    cap.manifest_digest = image.digest
    cap.completed_at = utcnow()


def result(
    db: DbSession,
    bus: EventBus | None,
    store: ImageStore | None,
    s: Session,
    row: SessionMachine,
    res: AgentResult,
) -> str:
    """An agent's verdict on a capture: its stats are kept; "verified" without an accepted
    manifest, or any other result, fails the session. Returns the machine's state."""
    cap = get_capture(db, s.id or 0)
    stats: dict[str, Any] = dict(res.stats)
    cap.read_bytes = int(stats.get("read_bytes", 0) or 0)
    s.stats = {**s.stats, "agent": stats}
    db.add(cap)
    db.add(s)
    if row.state in MACHINE_ENDED:  # the manifest already ended it (or a cancel)
        return row.state
    reason = res.reason or f"the agent reported {res.result}"
    if res.result == "verified":
        reason = "the agent reported success but sent no accepted manifest"
    svc._set_machine_state(db, bus, row, "failed", reason, f"machine:{row.machine_id}")
    if s.state in SESSION_ACTIVE:
        _end(db, bus, store, s, "failed", reason)
    return row.state


def _end(
    db: DbSession,
    bus: EventBus | None,
    store: ImageStore | None,
    s: Session,
    state: str,
    reason: str,
) -> None:
    s.ended_at = utcnow()
    svc._set_session_state(db, bus, s, state, reason, "server")
    if store is None:  # released by release_ended_pins
        return
    try:
        store.unpin(pin_key(s.id or 0))
    except OSError as exc:  # the pin is released by release_ended_pins later
        log.warning("session %s: releasing its store pin failed: %s", s.id, exc)


def release_ended_pins(db: DbSession, store: ImageStore) -> int:
    """Release the store pins of capture sessions that are no longer running (cancelled,
    failed, deleted); returns how many."""
    released = 0
    for key in store.pins():
        if not key.startswith(PIN_PREFIX) or not key[len(PIN_PREFIX) :].isdigit():
            continue
        s = db.get(Session, int(key[len(PIN_PREFIX) :]))
        if s is None or s.state not in SESSION_ACTIVE:
            released += store.unpin(key)
    return released


def forget_machine(db: DbSession, machine_id: int) -> None:
    """Drop the capture records of a machine being deleted (its images stay, as images)."""
    for cap in db.exec(select(Capture).where(Capture.machine_id == machine_id)):
        db.delete(cap)
    db.flush()


# -- reading ------------------------------------------------------------------------------


def list_captures(
    db: DbSession,
    *,
    machine_id: int | None = None,
    run_id: int | None = None,
    limit: int = 100,
) -> list[CapturePublic]:
    """Captures, newest first, with their sessions' states."""
    q = select(Capture, Session).join(Session, col(Session.id) == Capture.session_id)
    if machine_id is not None:
        q = q.where(Capture.machine_id == machine_id)
    if run_id is not None:
        q = q.where(Capture.schedule_run_id == run_id)
    out = []
    for cap, s in db.exec(q.order_by(col(Capture.session_id).desc()).limit(limit)):
        pub = CapturePublic.model_validate(cap, from_attributes=True)
        pub.session_state, pub.reason = s.state, s.reason
        out.append(pub)
    return out
