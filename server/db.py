"""The database: one SQLAlchemy engine per app, sessions per request, Alembic migrations.

SQLite (the default, a file in the data directory) runs in WAL mode with foreign keys on and
a busy timeout, so the API's worker threads and the session runners can write concurrently;
PostgreSQL is used as is. ``migrate(url)`` brings any database to the newest schema
(server/migrations); the server runs it at startup and ``fleetcast admin migrate`` by hand.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session as DbSession
from sqlmodel import create_engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, foreign keys and a 30 s busy timeout."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # As many connections as the API has worker threads (40) plus the session runners:
        # SQLite connections are cheap, and a request must never wait for the pool.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=16,
            max_overflow=48,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        _WRITE_LOCKS[engine] = threading.Lock()
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)


#: One writer at a time per SQLite engine, queued on a Python lock. SQLite allows a single
#: writer; left to its busy handler, waiting writers sleep and retry (up to 100 ms a try)
#: while the holder, one of 40 API threads, waits for the GIL: under load a convoy of
#: seconds. A session takes the lock at its first flush and drops it at commit/rollback.
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


@event.listens_for(DbSession, "before_flush")
def _take_write_lock(session: DbSession, _ctx: Any, _instances: Any) -> None:
    bind = session.get_bind()
    lock = _WRITE_LOCKS.get(bind) if isinstance(bind, Engine) else None
    if lock is not None and "write_lock" not in session.info:
        lock.acquire()
        session.info["write_lock"] = lock


@event.listens_for(DbSession, "after_commit")
@event.listens_for(DbSession, "after_soft_rollback")
def _drop_write_lock(session: DbSession, *_args: Any) -> None:
    lock = session.info.pop("write_lock", None)
    if lock is not None:
        lock.release()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def alembic_config(url: str) -> Config:
    """Alembic's configuration for ``url`` (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Apply every pending migration to ``engine``'s database."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.info("database schema is up to date (%s)", engine.url.render_as_string())


@contextmanager
def db_session(engine: Engine) -> Iterator[DbSession]:
    """A session that commits on success and rolls back on error."""
    with DbSession(engine, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
