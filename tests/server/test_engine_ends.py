"""The engine's evictions and failures are recorded on the machine at once (real database).

A receiver is tied to a machine by the receiver id its agent reported (in the database, or
in a progress sample not flushed yet); an end nobody claimed waits for a claim.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from apitest import *  # noqa: F403
from apitest import Api
from sqlmodel import select

from server.db import db_session
from server.events import EventBus
from server.images.capture import CaptureOptions, capture_image
from server.images.store import ImageStore
from server.models import ProgressSample, SessionMachine, utcnow
from server.multicast.run import ReceiverRecord
from server.services.engine_ends import EngineEnds
from server.services.progress import Pending, ProgressBuffer

MIB = 1 << 20


def _session_of_three(api: Api) -> tuple[int, list[int]]:
    disk = api.settings.data_dir.parent / "golden.img"
    disk.write_bytes(os.urandom(MIB) + bytes(MIB))
    store = ImageStore(api.settings.image_root)
    capture_image(store, "golden", disk, CaptureOptions(level=1, used_only=False, progress=False))
    assert api.post("/api/images", json={"name": "golden", "mode": "existing"}).status_code == 201
    ids = [
        api.post("/api/machines", json={"mac": f"52:54:00:ee:00:0{i}"}).json()["id"]
        for i in range(1, 4)
    ]
    r = api.post(
        "/api/sessions",
        json={"image": "golden", "machine_ids": ids, "start_policy": {"start": "manual"}},
    )
    assert r.status_code == 201, r.text
    return int(r.json()["id"]), ids


async def test_an_eviction_is_recorded_on_the_machine_that_claimed_the_receiver(api: Api) -> None:
    sid, (claimed, buffered, silent) = _session_of_three(api)
    engine = api.client.app.state.engine  # type: ignore[attr-defined]
    with db_session(engine) as db:
        row = db.exec(select(SessionMachine).where(SessionMachine.machine_id == claimed)).one()
        row.receiver_id, row.state = 0xA1, "receiving"
        db.add(row)
    buffer = ProgressBuffer()  # machine `buffered` claimed 0xB2 in a sample not yet flushed
    sample = ProgressSample(bytes_done=4096, bytes_total=MIB, loss=0.03)
    buffer.put(sid, buffered, Pending(0xB2, sample, utcnow()))
    bus = EventBus()
    bus.bind(asyncio.get_running_loop())
    sub = bus.subscribe()
    ends = EngineEnds(engine, bus, buffer)
    hook = ends.hook(sid)

    hook(ReceiverRecord(0xA1, state="evicted", reason="silent: nothing heard for 5.0 s"))
    hook(ReceiverRecord(0xB2, state="failed", reason="receiver failed: disk write error"))
    hook(ReceiverRecord(0xC3, state="evicted", reason="silent: nothing heard for 5.1 s"))
    hook(ReceiverRecord(0xD4, state="completed"))  # not a verdict the server takes from it
    await ends.flush(sid)

    detail = api.get(f"/api/sessions/{sid}").json()
    rows = {m["machine_id"]: m for m in detail["machines"]}
    assert detail["state"] == "pending"  # the session itself goes on
    assert (rows[claimed]["state"], rows[claimed]["reason"]) == (
        "evicted",
        "silent: nothing heard for 5.0 s",
    )
    assert rows[claimed]["ended_at"] is not None
    assert (rows[buffered]["state"], rows[buffered]["reason"]) == (
        "failed",
        "receiver failed: disk write error",
    )
    assert (rows[buffered]["bytes_done"], rows[buffered]["loss"]) == (4096, 0.03)
    assert len(buffer) == 0  # its sample was taken, not lost
    assert rows[silent]["state"] == "pending"  # nobody claimed 0xC3 yet
    assert [e.session_id for e in ends.unclaimed[sid]] == [sid]

    live: list[dict[str, Any]] = []
    while not sub.queue.empty():
        live.append(sub.queue.get_nowait())
    assert {(m["kind"], m["machine_id"]) for m in live if m["kind"].startswith("machine.")} == {
        ("machine.evicted", claimed),
        ("machine.failed", buffered),
    }

    # the silent machine's agent reports 0xC3 at last: the next retry records it
    with db_session(engine) as db:
        row = db.exec(select(SessionMachine).where(SessionMachine.machine_id == silent)).one()
        row.receiver_id = 0xC3
        db.add(row)
    await ends.retry(sid)
    assert sid not in ends.unclaimed
    hook(ReceiverRecord(0xA1, state="evicted", reason="again"))  # ended already: no change
    await ends.settle(sid)
    rows = {m["machine_id"]: m for m in api.get(f"/api/sessions/{sid}").json()["machines"]}
    assert rows[silent]["state"] == "evicted"
    assert rows[claimed]["reason"] == "silent: nothing heard for 5.0 s"
    events = api.get("/api/events", params={"session_id": sid}).json()
    assert [e["actor"] for e in events if e["kind"] == "machine.evicted"] == ["server"] * 2
