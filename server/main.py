"""The control plane's ASGI app: ``create_app(settings)``; ``fleetcast server`` serves it.

The lifespan opens the database (migrating it unless told not to), ends sessions a previous
process left ``running`` (restart or kill -9: the engine cannot continue them), registers
images captured outside the API, starts the session manager and stops every sender on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError

from fleetcast import __version__
from server.api.routes import (
    agent,
    auth,
    boot,
    captures,
    events,
    groups,
    images,
    machines,
    schedules,
    sessions,
    system,
)
from server.config import Settings
from server.db import db_session, make_engine, migrate
from server.events import EventBus
from server.images.store import ImageStore
from server.metrics import Metrics
from server.services.agentcache import AgentCache
from server.services.errors import ServiceError
from server.services.images import sync_store
from server.services.progress import ProgressBuffer
from server.services.runner import SessionManager
from server.services.scheduler import Scheduler
from server.services.sessions import fail_interrupted
from server.web import install as install_dashboard

log = logging.getLogger(__name__)

#: Seconds between writes of the agents' buffered progress.
PROGRESS_FLUSH = 1.0
RESTART_REASON = (
    "the server stopped while this session was running (restart or crash) and a multicast "
    "session cannot continue in a new server process; re-run it for the machines that did "
    "not finish (POST /api/sessions/{id}/rerun)"
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = make_engine(settings.db_url)
    if settings.migrate_on_start:
        await asyncio.to_thread(migrate, engine)
    store = ImageStore(settings.image_root)
    bus = EventBus(queue_size=settings.event_queue_size)
    metrics = Metrics(engine)
    progress = ProgressBuffer()
    agent_cache = AgentCache()
    bus.listeners.append(agent_cache.on_event)
    app.state.agent_cache = agent_cache
    manager = SessionManager(engine, store, settings, bus, metrics, progress)
    loop = asyncio.get_running_loop()
    bus.bind(loop)
    manager.bind(loop)
    app.state.engine, app.state.store, app.state.bus = engine, store, bus
    app.state.metrics, app.state.manager, app.state.progress = metrics, manager, progress

    def recover() -> None:
        with db_session(engine) as db:
            ended = fail_interrupted(db, bus, RESTART_REASON)
            added = sync_store(db, store)
        if ended:
            log.warning(
                "sessions %s were left running by a previous server: ended as failed", ended
            )
        if added:
            log.info("registered %d images found in the store", added)

    await asyncio.to_thread(recover)
    flusher = loop.create_task(_flush_progress(engine, progress))
    scheduler = Scheduler(engine, settings, bus, manager.launch)
    app.state.scheduler = scheduler
    ticker = loop.create_task(scheduler.run()) if settings.scheduler_enabled else None
    try:
        yield
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await manager.shutdown()
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await asyncio.to_thread(_flush_once, engine, progress)
        engine.dispose()


def _flush_once(engine: Engine, progress: ProgressBuffer) -> None:
    with db_session(engine) as db:
        progress.flush(db)


async def _flush_progress(engine: Engine, progress: ProgressBuffer) -> None:
    """Write the agents' buffered progress once a second (services/progress.py)."""
    while True:
        await asyncio.sleep(PROGRESS_FLUSH)
        if len(progress):
            try:
                await asyncio.to_thread(_flush_once, engine, progress)
            except Exception:  # a failed flush loses one second of progress, not the server
                log.exception("writing the agents' progress failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API app for ``settings`` (default: from the environment)."""
    app = FastAPI(
        title="fleetcast",
        version=__version__,
        description="Multicast deployment of golden disk images to labs of identical PCs. "
        "Authenticate with `Authorization: Bearer TOKEN` (POST /api/auth/login, or "
        "`fleetcast admin token`). Agents use /api/agent/* with their own credentials.",
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings()
    for router in (system, auth, images, machines, groups, sessions, agent, events, schedules):
        app.include_router(router.router)
    app.include_router(captures.router)  # capture sessions, backups, restore (issue 10)
    app.include_router(schedules.wake_router)
    if app.state.settings.boot_enabled:  # public routes: only where machines network-boot
        app.include_router(boot.router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    install_dashboard(app, _service_error)  # the web pages under /ui (issue 6)
    return app


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


async def _integrity_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "the change clashes with existing data (a duplicate or a missing reference)"},
        status_code=409,
    )


async def _data_error(_request: Request, exc: Exception) -> JSONResponse:
    """The database refused a value as data (PostgreSQL: a NUL in text, a number out of its
    column's range): the request was bad, nothing was written (the transaction rolls back)."""
    assert isinstance(exc, DataError)
    reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "invalid value"
    return JSONResponse(
        {"detail": f"the request holds a value the database cannot store: {reason}"},
        status_code=400,
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)
