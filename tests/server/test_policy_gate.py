"""The runner's start gate on a real database: it holds the engine, releases it when the
start policy decides, ends a session ``not-started``, cancels one at its window end.

The sender is stood in for by a runner whose receivers the test adds (the gate only reads
``report.receivers`` and sets the engine's start threshold); the clock is injected.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from apitest import *  # noqa: F403
from apitest import seed_running_session

from server.config import Settings
from server.db import db_session, make_engine, migrate
from server.events import EventBus
from server.images.store import ImageStore
from server.metrics import Metrics
from server.models import Session as DeploySession
from server.models import StartPolicy
from server.services import sessions as svc
from server.services.runner import SessionManager

T0 = datetime(2026, 11, 29, 2, 0, tzinfo=UTC).timestamp()


class HeldEngine:
    """Stands in for the engine's SenderSession: records start_transfer (PROTOCOL.md §3.2)."""

    def __init__(self) -> None:
        self.started = False

    def start_transfer(self, now: float) -> bool:
        self.started = True
        return True


class Gate:
    """A running session of 3 machines, a manager with a fake clock, a stand-in runner."""

    def __init__(self, settings: Settings, policy: StartPolicy) -> None:
        self.engine = make_engine(settings.db_url)
        migrate(self.engine)
        with db_session(self.engine) as db:
            self.sid = seed_running_session(db, settings, policy=policy)
            self.rows = [r.id for r in svc.session_machines(db, self.sid)]
        self.manager = SessionManager(
            self.engine, ImageStore(settings.image_root), settings, EventBus(), Metrics(self.engine)
        )
        self.now = T0
        self.manager.clock = lambda: self.now
        self.runner: Any = SimpleNamespace(
            report=SimpleNamespace(receivers={}), session=HeldEngine()
        )
        self.policy = policy

    def join(self, n: int) -> None:
        for _ in range(n):
            self.runner.report.receivers[len(self.runner.report.receivers) + 1] = object()

    def assign(self, index: int) -> None:
        with db_session(self.engine) as db:
            row = svc.session_machines(db, self.sid)[index]
            row.state = "assigned"
            db.add(row)

    def session(self) -> DeploySession:
        with db_session(self.engine) as db:
            s = db.get(DeploySession, self.sid)
            assert s is not None
            return s

    def states(self) -> list[str]:
        with db_session(self.engine) as db:
            return [r.state for r in svc.session_machines(db, self.sid)]


async def _start(g: Gate) -> tuple[asyncio.Task[None], asyncio.Task[Any]]:
    g.manager.bind(asyncio.get_running_loop())
    run_task: asyncio.Task[Any] = asyncio.create_task(asyncio.sleep(3600))
    gate = asyncio.create_task(g.manager._gate(g.sid, g.runner, run_task, g.policy, 3))
    await asyncio.sleep(0.05)
    return gate, run_task


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the gate did not act in time")


@pytest.mark.asyncio
async def test_quiet_period_releases_the_engine_and_absent_machines_are_no_show(
    settings: Settings,
) -> None:
    g = Gate(settings, StartPolicy(quiet_period=30, max_wait=600))
    g.assign(0)
    g.assign(1)
    gate, run_task = await _start(g)
    g.join(2)
    await asyncio.sleep(0.5)
    assert not g.runner.session.started  # held: the quiet period runs
    g.now = T0 + 31
    await _until(lambda: gate.done())
    assert g.runner.session.started
    assert g.session().transfer_started_at is not None
    assert g.states() == ["assigned", "assigned", "no-show"]
    run_task.cancel()


@pytest.mark.asyncio
async def test_max_wait_below_the_minimum_ends_the_session_not_started(
    settings: Settings,
) -> None:
    g = Gate(settings, StartPolicy(max_wait=60, minimum=2))
    g.assign(0)
    gate, run_task = await _start(g)
    g.join(1)
    g.now = T0 + 60
    await _until(lambda: run_task.cancelled())
    verdict = g.manager._verdicts[g.sid]
    assert verdict[0] == "not-started" and "only 1 of 3 machines joined" in verdict[1]
    with db_session(g.engine) as db:
        g.manager._finalize(db, g.sid, None, "gate")
    s = g.session()
    assert (s.state, s.transfer_started_at) == ("not-started", None)
    assert "2 needed" in s.reason
    assert g.states() == ["cancelled", "no-show", "no-show"]
    assert gate.done()


@pytest.mark.asyncio
async def test_the_operator_starts_now_with_those_present(settings: Settings) -> None:
    g = Gate(settings, StartPolicy(max_wait=3600))
    gate, run_task = await _start(g)
    g.join(1)
    await asyncio.sleep(0.5)
    assert not gate.done()
    g.manager.force_start(g.sid)
    await _until(lambda: gate.done())
    assert g.runner.session.started
    run_task.cancel()


@pytest.mark.asyncio
async def test_a_running_session_is_cancelled_at_the_window_end_when_the_schedule_says(
    settings: Settings,
) -> None:
    end = datetime.fromtimestamp(T0 + 3600, UTC)
    g = Gate(settings, StartPolicy(not_after=end, at_window_end="cancel"))
    gate, run_task = await _start(g)
    g.join(3)
    await _until(lambda: g.runner.session.started)
    g.now = T0 + 3599
    await asyncio.sleep(0.3)
    assert not run_task.done()
    g.now = T0 + 3600
    await _until(lambda: run_task.cancelled())
    with db_session(g.engine) as db:
        g.manager._finalize(db, g.sid, None, "gate")
    s = g.session()
    assert s.state == "cancelled" and "maintenance window" in s.reason
    assert gate.done()


@pytest.mark.asyncio
async def test_a_running_session_runs_on_past_the_window_end_by_default(
    settings: Settings,
) -> None:
    end = datetime.fromtimestamp(T0 + 10, UTC)
    g = Gate(settings, StartPolicy(not_after=end))
    gate, run_task = await _start(g)
    g.join(3)
    await _until(lambda: gate.done())
    g.now = T0 + timedelta(hours=5).total_seconds()
    await asyncio.sleep(0.3)
    assert not run_task.done()
    run_task.cancel()
