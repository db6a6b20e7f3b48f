"""Fixtures for the API tests: the real app on a real database (SQLite, and PostgreSQL when
FLEETCAST_TEST_POSTGRES_URL names a server where we may create databases).

Import the fixtures into a test module with ``from apitest import *  # noqa: F403``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.config import Settings
from server.db import db_session, make_engine, migrate
from server.main import create_app
from server.services import users

ENROLL = "enroll-" + "x" * 24
PASSWORD = "correct horse battery"
PG_URL = os.environ.get("FLEETCAST_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgres"] if PG_URL else ["sqlite"]


def _pg_database() -> tuple[str, Callable[[], None]]:
    """A new empty PostgreSQL database on PG_URL's server, and a function that drops it."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(PG_URL)
    name = f"fc_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin_url = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    url = base.set(drivername="postgresql+psycopg", database=name)
    return url.render_as_string(hide_password=False), drop


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleetcast.db'}"
        return
    url, drop = _pg_database()
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        FLEETCAST_DATA=tmp_path / "data",
        database_url=database_url,
        enrollment_token=ENROLL,
        result_grace=5.0,
        compression_level=1,
    )


@dataclass
class Api:
    """The app under test, with an admin's token."""

    client: TestClient
    settings: Settings
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post(path, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self.client.patch(path, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def put(self, path: str, **kw: Any) -> Any:
        return self.client.put(path, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.client.delete(path, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def enroll(self, mac: str, **inventory: Any) -> dict[str, str]:
        """Register an agent with ``mac``; returns its auth header."""
        r = self.client.post(
            "/api/agent/register",
            headers={"Authorization": f"Bearer {ENROLL}"},
            json={"macs": [mac], "hostname": f"pc-{mac[-2:]}", "inventory": inventory},
        )
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['credential']}"}


def add_admin(settings: Settings, username: str = "admin") -> str:
    """Create an admin user in ``settings``' database; return a new API token."""
    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        with db_session(engine) as db:
            user = users.create_user(db, username, PASSWORD)
            return users.create_admin_token(db, user, "test")
    finally:
        engine.dispose()


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    """The real app (lifespan run) on the test database, and an admin token."""
    token = add_admin(settings)
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, token)


def seed_running_session(
    db: Any,
    settings: Settings,
    *,
    machines: int = 3,
    mac_prefix: str = "52:54:00:00:01",
    policy: Any = None,
) -> int:
    """An image row ``win11`` (no store behind it), ``machines`` machines and a session of
    them marked running, in ``db``; returns the session id."""
    from server.models import Image, Machine, SessionCreate, StartPolicy
    from server.services import sessions as svc

    db.add(
        Image(
            name="win11",
            digest="0" * 64,
            image_size=1,
            stored_bytes=1,
            data_bytes=1,
            block_size=1,
            block_count=1,
            data_blocks=1,
            zero_blocks=0,
        )
    )
    ids = []
    for i in range(machines):
        m = Machine(mac=f"{mac_prefix}:{i:02x}")
        db.add(m)
        db.flush()
        ids.append(m.id or 0)
    req = SessionCreate(image="win11", machine_ids=ids, start_policy=policy or StartPolicy())
    s = svc.create_session(db, None, settings, req, "test")
    svc.mark_running(db, None, s, "test")
    return s.id or 0


__all__ = ["Api", "add_admin", "api", "database_url", "seed_running_session", "settings"]
