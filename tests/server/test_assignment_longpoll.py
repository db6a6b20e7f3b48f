"""GET /api/agent/assignment?wait=S: an idle agent's request waits for its assignment.

The request is answered as soon as a session for the machine appears (the event bus wakes
it), or after S seconds with nothing (``retry_after`` 0: ask again at once). ``wait=0`` (the
default) answers at once, as before the long poll.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from apitest import *  # noqa: F403
from apitest import Api
from capturetest import enrolled, start_capture

from server.db import db_session, make_engine
from server.images.capture import CaptureOptions, capture_image
from server.images.store import ImageStore
from server.models import Session
from server.services import sessions as svc
from server.services.assignwait import waits_for


class LongPoll(threading.Thread):
    """One agent's assignment request, running while the test changes the server."""

    def __init__(self, api: Api, headers: dict[str, str], wait: float) -> None:
        super().__init__(daemon=True)
        self.api, self.headers, self.wait = api, headers, wait
        self.reply: dict[str, Any] = {}
        self.status = 0
        self.took = 0.0

    def run(self) -> None:
        started = time.monotonic()
        r = self.api.client.get(
            "/api/agent/assignment", params={"wait": self.wait}, headers=self.headers
        )
        self.took = time.monotonic() - started
        self.status, self.reply = r.status_code, r.json()

    def until_waiting(self, machine_id: int) -> None:
        """Return once the request waits on the server (bounded)."""
        waits = waits_for(self.api.client.app.state)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not waits.waiting(machine_id):
            assert self.is_alive() and time.monotonic() < deadline, "the request did not wait"
            time.sleep(0.01)

    def answer(self) -> dict[str, Any]:
        self.join(timeout=40)
        assert not self.is_alive(), "the long poll never answered"
        assert self.status == 200, self.reply
        return self.reply


def _no_recheck(api: Api) -> None:
    """Only an event can wake a waiter now (the periodic look is 10 minutes apart)."""
    waits_for(api.client.app.state).recheck = 600.0  # type: ignore[attr-defined]


def test_a_capture_created_during_the_wait_is_answered_at_once(api: Api) -> None:
    agent = enrolled(api, "52:54:00:1c:00:01")
    _no_recheck(api)
    poll = LongPoll(api, agent.headers, wait=20)
    poll.start()
    poll.until_waiting(agent.machine_id)
    s = start_capture(api, agent, "golden-lp")
    reply = poll.answer()
    assert reply["session_id"] == s["id"] and reply["kind"] == "capture"
    assert poll.took < 20  # woken by the event, not by the end of the wait


def test_a_session_started_during_the_wait_is_answered_at_once(api: Api) -> None:
    """A deploy session marked running (its event published before its commit, as the
    routes do) reaches the waiting agent of one of its machines."""
    agent = enrolled(api, "52:54:00:1c:00:02")
    sid = _pending_session(api, agent.machine_id)
    _no_recheck(api)
    poll = LongPoll(api, agent.headers, wait=20)
    poll.start()
    poll.until_waiting(agent.machine_id)
    _mark_running(api, sid, publish=True)
    reply = poll.answer()
    assert reply["session_id"] == sid and reply["kind"] == "deploy"
    assert reply["manifest_digest"] and poll.took < 20


def test_a_change_without_an_event_is_found_by_the_periodic_look(api: Api) -> None:
    agent = enrolled(api, "52:54:00:1c:00:03")
    sid = _pending_session(api, agent.machine_id)
    waits_for(api.client.app.state).recheck = 0.2  # type: ignore[attr-defined]
    poll = LongPoll(api, agent.headers, wait=20)
    poll.start()
    poll.until_waiting(agent.machine_id)
    _mark_running(api, sid, publish=False)  # as another process writing the database would
    assert poll.answer()["session_id"] == sid


def test_an_empty_long_poll_answers_after_the_wait_with_retry_after_0(api: Api) -> None:
    agent = enrolled(api, "52:54:00:1c:00:04")
    other = enrolled(api, "52:54:00:1c:00:05")
    poll = LongPoll(api, agent.headers, wait=1.5)
    poll.start()
    poll.until_waiting(agent.machine_id)
    start_capture(api, other, "not-for-this-machine")  # wakes it: still nothing for it
    reply = poll.answer()
    assert reply["session_id"] is None and reply["retry_after"] == 0
    assert poll.took >= 1.4  # it waited out the wait


def test_wait_0_answers_at_once_as_before(api: Api) -> None:
    agent = enrolled(api, "52:54:00:1c:00:06")
    for params in ({}, {"wait": 0}):
        r = api.client.get("/api/agent/assignment", params=params, headers=agent.headers)
        assert r.status_code == 200 and r.json()["session_id"] is None
        assert r.json()["retry_after"] == 2.0  # the agent pauses before it asks again
    s = start_capture(api, agent, "golden-now")
    r = api.client.get("/api/agent/assignment", params={"wait": 5}, headers=agent.headers)
    assert r.json()["session_id"] == s["id"]  # found by the first look, without waiting


def test_a_wait_out_of_range_is_a_422_and_the_credential_is_checked_first(api: Api) -> None:
    agent = enrolled(api, "52:54:00:1c:00:07")
    for bad in ("-1", "25.5", "nan", "inf", "soon"):
        r = api.client.get("/api/agent/assignment", params={"wait": bad}, headers=agent.headers)
        assert r.status_code == 422, (bad, r.text)
    r = api.client.get("/api/agent/assignment", params={"wait": 25})
    assert r.status_code == 401
    r = api.get("/api/agent/assignment", params={"wait": 25})  # an admin's token
    assert r.status_code == 403 and "machine credential" in r.json()["detail"]


def test_closing_answers_every_waiter_with_a_pause(api: Api) -> None:
    """What a stopping server does (server/admin.py): the agents pause, then ask again."""
    agent = enrolled(api, "52:54:00:1c:00:08")
    poll = LongPoll(api, agent.headers, wait=20)
    poll.start()
    poll.until_waiting(agent.machine_id)
    waits = waits_for(api.client.app.state)  # type: ignore[attr-defined]
    api.client.portal.call(_close, waits)  # type: ignore[union-attr]
    reply = poll.answer()
    assert reply["session_id"] is None and reply["retry_after"] > 0
    assert poll.took < 20 and waits.waiting() == 0


async def _close(waits: Any) -> None:
    waits.close()


def _pending_session(api: Api, machine_id: int) -> int:
    """A manual-start session of a real (tiny) image to ``machine_id``."""
    _golden(api)
    body = {"image": "golden", "machine_ids": [machine_id], "start_policy": {"start": "manual"}}
    r = api.post("/api/sessions", json=body)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _golden(api: Api) -> None:
    disk = api.settings.data_dir.parent / "golden.img"
    disk.write_bytes((b"fleetcast " * 100_000).ljust(2 << 20, b"\0"))
    opts = CaptureOptions(level=1, used_only=False, progress=False)
    capture_image(ImageStore(api.settings.image_root), "golden", disk, opts)
    r = api.post("/api/images", json={"name": "golden", "mode": "existing"})
    assert r.status_code == 201, r.text


def _mark_running(api: Api, session_id: int, *, publish: bool) -> None:
    """Mark the session running without a sender (the control plane alone); with
    ``publish``, on the app's event bus, which delivers before this commit."""
    bus = api.client.app.state.bus if publish else None  # type: ignore[attr-defined]
    engine = make_engine(api.settings.db_url)
    try:
        with db_session(engine) as db:
            s = db.get(Session, session_id)
            assert s is not None
            svc.mark_running(db, bus, s, "test")
            time.sleep(0.02)  # the event is out before the commit
    finally:
        engine.dispose()
