"""The live grid with 500 machines in one session, in a real browser: every row is updated in
place from the event stream, sorting and the laggard filter work, and rendering stays cheap
(the render times are printed for docs/DASHBOARD.md, never asserted)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from browser import browser_page, screenshot
from sqlmodel import select

from server.config import Settings
from server.db import db_session, make_engine, migrate
from server.images.store import ImageStore
from server.main import create_app
from server.models import (
    ProgressSample,
    Session,
    SessionCreate,
    SessionMachine,
    StartPolicy,
    utcnow,
)
from server.services import machines as machines_svc
from server.services import sessions as session_svc
from server.services import users
from server.services.images import sync_store
from server.services.progress import Pending

pytestmark = [pytest.mark.slow]
MACHINES = 500
PASSWORD = "grid-password-1"
GB8 = 8_000_000_000


def _seed(settings: Settings, image: str) -> int:
    """An admin, 500 machines in one group, a pending session of ``image`` to them."""
    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        with db_session(engine) as db:
            users.create_user(db, "admin", PASSWORD)
            lines = [
                f"52:54:00:02:{i // 256:02x}:{i % 256:02x},pc-{i:03d},hall" for i in range(MACHINES)
            ]
            machines_svc.import_csv(db, "\n".join(lines))
            sync_store(db, ImageStore(settings.image_root))
            group = machines_svc.list_groups(db)[0]
            body = SessionCreate(
                image=image, group_id=group.id, start_policy=StartPolicy(start="manual")
            )
            s = session_svc.create_session(db, None, settings, body, "user:admin")
            db.flush()
            for row in db.exec(select(SessionMachine).where(SessionMachine.session_id == s.id)):
                row.state, row.bytes_total = "receiving", GB8
            return int(s.id or 0)
    finally:
        engine.dispose()


@pytest.fixture
def live_server(tmp_path: Path, small_image) -> Iterator[tuple[str, object, int]]:  # type: ignore[no-untyped-def]
    """The real app under uvicorn on a loopback port (in this process, so the test can
    publish progress on its event bus), with 500 machines in one session."""
    settings = Settings(
        FLEETCAST_DATA=small_image.data_dir,
        database_url=f"sqlite:///{tmp_path / 'fleetcast.db'}",
        event_queue_size=8192,
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
    try:
        yield f"http://127.0.0.1:{port}", app, sid
    finally:
        server.should_exit = True
        thread.join(30)


def _progress(app: object, sid: int, rnd: int) -> None:
    """One report from every machine, as the agents' progress route records and publishes
    them: machine i is at (rnd * 10 + i % 10)% (i % 10 from 0 to 9) of 8 GB at 100 MB/s,
    except every 50th machine, stuck at 1% at 1 MB/s."""
    state = app.state  # type: ignore[attr-defined]
    for mid in range(1, MACHINES + 1):
        stuck = mid % 50 == 0
        sample = ProgressSample(
            bytes_done=GB8 // 100 if stuck else min(GB8, GB8 * (rnd * 10 + mid % 10) // 100),
            bytes_total=GB8,
            rate_bps=8e6 if stuck else 8e8,
            loss=0.001 * (mid % 3),
            naks=mid % 5,
        )
        state.progress.put(sid, mid, Pending(None, sample, utcnow()))  # flushed each second
        state.bus.publish(
            "machine.progress",
            session_id=sid,
            machine_id=mid,
            **sample.model_dump(exclude={"blocks_done", "blocks_total"}),
        )


def test_a_500_machine_grid_updates_in_place_sorts_and_filters_laggards(
    live_server: tuple[str, object, int], tmp_path: Path
) -> None:
    url, app, sid = live_server
    with browser_page(tmp_path) as page:
        page.goto(f"{url}/ui/sessions/{sid}")
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", PASSWORD)
        page.click("main button[type=submit]")
        page.wait_for_url(f"{url}/ui/sessions/{sid}")
        page.wait_for_function(f"() => document.querySelectorAll('#rows tr').length === {MACHINES}")
        page.evaluate(
            "() => document.querySelectorAll('#rows tr').forEach(tr => tr.dataset.keep = 1)"
        )
        page.wait_for_timeout(500)  # the event stream is open
        for rnd in range(1, 6):
            _progress(app, sid, rnd)
            time.sleep(0.2)
        # Round 5: machine 1 at 51%, machine 9 at 59%, every 50th at 1%.
        page.wait_for_function(
            """() => { const r = window.fleetcastGrid.rows;
                 return r.get(1).tr.cells[2].textContent === '51.0' &&
                        r.get(9).tr.cells[2].textContent === '59.0' &&
                        r.get(50).tr.cells[2].textContent === '1.0'; }"""
        )
        kept = page.evaluate("() => document.querySelectorAll('#rows tr[data-keep]').length")
        assert kept == MACHINES, "rows must be updated in place, not rebuilt"
        assert page.inner_text("#t-slowest") == "1.0%"
        assert page.inner_text("#t-fastest") == "59.0%"
        page.check("#laggards-only")
        page.wait_for_function(
            "() => document.getElementById('shown').textContent.startsWith('10 of 500')"
        )
        visible = page.evaluate(
            "() => [...document.querySelectorAll('#rows tr:not([hidden])')]"
            ".map(tr => +tr.dataset.id)"
        )
        assert sorted(visible) == list(range(50, MACHINES + 1, 50))
        screenshot(page, "session-500-laggards", tmp_path)
        page.uncheck("#laggards-only")
        page.click("#grid th[data-key=pct]")
        page.click("#grid th[data-key=pct]")  # descending
        page.wait_for_timeout(600)
        top = page.evaluate("() => +document.querySelector('#rows tr').cells[2].textContent")
        assert top == 59.0
        perf = page.evaluate("() => window.fleetcastGrid.perf")
        print(
            f"\n500-row grid: {perf['renders']} renders, last {perf['lastMs']:.1f} ms, "
            f"max {perf['maxMs']:.1f} ms"
        )
