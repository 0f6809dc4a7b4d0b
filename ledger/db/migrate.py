"""Bring a database to the current schema on start: an empty one is created, an older one is
migrated step by step, and one from a newer version is refused. Never silently recreated."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from ledger.db.session import Database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Several server processes may start on one PostgreSQL at once: one migrates, the others wait.
_PG_MIGRATION_LOCK_KEY = 0x1ED6E8


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(database: Database, revision: str = "head") -> None:
    config = alembic_config()
    # SQLite: servers starting at once queue on the write gate, taken before the connection is
    # even opened (its PRAGMAs switch a new file to WAL, which a concurrent opener can refuse
    # with "database is locked" without waiting), then BEGIN IMMEDIATE as everywhere.
    options = {"sqlite_begin": "IMMEDIATE"} if database.is_sqlite else {}
    with (
        database.writers_excluded(),
        database.engine.connect().execution_options(**options) as connection,
        connection.begin(),
    ):
        if database.backend == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK_KEY}
            )
        current = current_revision(connection)
        known = {rev.revision for rev in ScriptDirectory.from_config(config).walk_revisions()}
        if current is not None and current not in known:
            raise RuntimeError(
                f"database is at schema revision {current!r}, unknown to this version "
                "(written by a newer release?); refusing to start"
            )
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
