"""The live grid's issue-9 columns in a real browser: each machine's phase and how much its
disk spared, a machine moving to catch-up from its progress alone, one done by catch-up, and
the session's totals — all from the event stream and state.json, without a reload."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from browser import browser_page
from sqlmodel import select

from server.config import Settings
from server.db import db_session, make_engine, migrate
from server.images.store import ImageStore
from server.main import create_app
from server.models import (
    Machine,
    ProgressSample,
    Session,
    SessionCreate,
    SessionMachine,
    StartPolicy,
    utcnow,
)
from server.services import sessions as session_svc
from server.services import users
from server.services.images import sync_store
from server.services.progress import Pending

pytestmark = [pytest.mark.slow]
PASSWORD = "catchup-password-1"
GIB2 = 2 << 30


def _seed(settings: Settings, image: str) -> int:
    """An admin, three machines and a pending session of ``image`` to them."""
    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        with db_session(engine) as db:
            users.create_user(db, "admin", PASSWORD)
            sync_store(db, ImageStore(settings.image_root))
            ids = []
            for i in range(3):
                m = Machine(mac=f"52:54:00:03:00:{i:02x}", name=f"pc-{i}")
                db.add(m)
                db.flush()
                ids.append(m.id or 0)
            policy = StartPolicy(start="manual")
            body = SessionCreate(image=image, machine_ids=ids, start_policy=policy)
            s = session_svc.create_session(db, None, settings, body, "user:admin")
            return int(s.id or 0)
    finally:
        engine.dispose()


@pytest.fixture
def live_server(tmp_path: Path, small_image: Any) -> Iterator[tuple[str, Any, int]]:
    """The real app under uvicorn on a loopback port, in this process (the test publishes
    the agents' progress on its event bus)."""
    settings = Settings(
        FLEETCAST_DATA=small_image.data_dir, database_url=f"sqlite:///{tmp_path / 'fc.db'}"
    )
    sid = _seed(settings, small_image.name)
    app = create_app(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    with db_session(app.state.engine) as db:  # as if started (no sender: the test plays agents)
        db.get(Session, sid).state = "running"  # type: ignore[union-attr]
        for row in db.exec(select(SessionMachine).where(SessionMachine.session_id == sid)):
            row.state, row.bytes_total = "receiving", GIB2
            db.add(row)
    try:
        yield f"http://127.0.0.1:{port}", app, sid
    finally:
        server.should_exit = True
        thread.join(30)


def _report(app: Any, sid: int, mid: int, done: int, phase: str, held: int) -> None:
    """One progress report as the agents' route records and publishes it."""
    sample = ProgressSample(bytes_done=done, bytes_total=GIB2, rate_bps=8e8)
    app.state.progress.put(sid, mid, Pending(None, sample, utcnow(), phase, held >> 20, held))
    app.state.bus.publish(
        "machine.progress",
        session_id=sid,
        machine_id=mid,
        **sample.model_dump(exclude={"blocks_done", "blocks_total"}),
        phase=phase,
        held_blocks=held >> 20,
        held_bytes=held,
    )


def _row(app: Any, sid: int, mid: int) -> SessionMachine:
    with db_session(app.state.engine) as db:
        row = db.exec(
            select(SessionMachine).where(
                SessionMachine.session_id == sid, SessionMachine.machine_id == mid
            )
        ).one()
        db.expunge(row)
        return row


def _cells(page: Any, mid: int) -> list[str]:
    return list(
        page.evaluate(
            f"() => [...document.querySelector('#rows tr[data-id=\"{mid}\"]').cells]"
            ".map(c => c.textContent)"
        )
    )


def _wait_cell(page: Any, mid: int, index: int, text: str) -> None:
    page.wait_for_function(
        f"() => {{ const tr = document.querySelector('#rows tr[data-id=\"{mid}\"]');"
        f" return tr && tr.cells[{index}].textContent === {text!r}; }}",
        timeout=15_000,
    )


def test_the_grid_shows_phase_spared_and_catch_up(
    live_server: tuple[str, Any, int], tmp_path: Path
) -> None:
    url, app, sid = live_server
    bus = app.state.bus
    with browser_page(tmp_path) as page:
        page.goto(f"{url}/ui/sessions/{sid}")
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", PASSWORD)
        page.click("main button[type=submit]")
        page.wait_for_url(f"{url}/ui/sessions/{sid}")
        page.wait_for_function("() => document.querySelectorAll('#rows tr').length === 3")
        held = GIB2 * 95 // 100
        _report(app, sid, 1, held, "multicast", held)
        _report(app, sid, 2, GIB2 // 2, "catchup", 0)
        _wait_cell(page, 1, 7, "multicast")
        assert _cells(page, 1)[8] == "spared 95% · 1.9 GiB"
        _wait_cell(page, 2, 7, "catch-up")
        assert _cells(page, 2)[1] == "catchup" and _cells(page, 2)[8] == "\u2013"  # nothing spared

        deadline = time.monotonic() + 10  # the buffered progress reaches the row
        while _row(app, sid, 1).held_bytes != held:
            assert time.monotonic() < deadline, "machine 1's held bytes were never written"
            time.sleep(0.1)
        with db_session(app.state.engine) as db:  # machine 2 finished by catch-up
            row = db.exec(
                select(SessionMachine).where(
                    SessionMachine.session_id == sid, SessionMachine.machine_id == 2
                )
            ).one()
            row.state, row.via, row.bytes_done = "succeeded", "catchup", GIB2
            db.add(row)
            assert db.get(Session, sid) is not None
        bus.publish("machine.succeeded", session_id=sid, machine_id=2)
        _wait_cell(page, 2, 7, "done by catch-up")
        totals = "spared 1.9 GiB (32%) · 1 by catch-up"  # of three machines' 6 GiB
        page.wait_for_function(
            f"() => document.getElementById('t-spared').textContent === {totals!r}",
            timeout=15_000,
        )
        page.select_option("#state-filter", "catchup")
        page.wait_for_function(
            "() => document.getElementById('shown').textContent === '0 of 3 machines shown'"
        )
