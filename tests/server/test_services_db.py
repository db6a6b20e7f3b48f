"""The database layer: migrations build exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from apitest import *  # noqa: F403
from sqlalchemy import inspect
from sqlmodel import SQLModel

import server.models  # noqa: F401
from server.config import Settings
from server.db import make_engine, migrate


def test_migrations_create_every_table_and_match_the_models(settings: Settings) -> None:
    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent
        tables = set(inspect(engine).get_table_names())
        assert set(SQLModel.metadata.tables) <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        assert diff == [], f"models and migrations differ; add a migration: {diff}"
    finally:
        engine.dispose()


def test_the_default_database_is_an_sqlite_file_in_the_data_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = Settings(FLEETCAST_DATA=tmp_path)
    assert s.db_url == f"sqlite:///{tmp_path.resolve() / 'fleetcast.db'}"
    assert Settings(FLEETCAST_DATA=tmp_path, database_url="postgresql+psycopg://x/y").db_url == (
        "postgresql+psycopg://x/y"
    )
