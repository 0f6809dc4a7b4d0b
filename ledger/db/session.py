"""Engines and the unit of work: the RPC edge opens one transaction, domain code never commits.

SQLite runs in WAL mode with synchronous=FULL (a commit is durable before the reply) and every
write transaction starts with BEGIN IMMEDIATE, so writers queue on the database lock instead of
failing on an upgrade from a read lock. PostgreSQL runs at READ COMMITTED; rows that guard a
rule (an account's balance, the id counter) are locked by the UPDATE that changes them.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 60_000
DEFAULT_SQLITE_FILE = "ledger.db"


def default_database_url() -> str:
    return f"sqlite:///{os.path.join(os.getcwd(), DEFAULT_SQLITE_FILE)}"


class Database:
    """One engine per process and the sessions made from it."""

    def __init__(self, url: str, *, pool_size: int = 16) -> None:
        parsed = make_url(url)
        self.url = url
        self.backend = parsed.get_backend_name()
        if self.backend == "sqlite":
            self.engine = _sqlite_engine(url)
        elif self.backend == "postgresql":
            if parsed.get_driver_name() != "psycopg":
                raise ValueError(f"database URL {url!r}: use postgresql+psycopg://")
            self.engine = create_engine(
                url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
        else:
            raise ValueError(f"database URL {url!r}: only sqlite:/// and postgresql+psycopg://")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_gate = _WriteGate(parsed.database) if self.backend == "sqlite" else None

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: commits on success, rolls back on any exception."""
        if self._write_gate is None:
            with self._sessions() as session, session.begin():
                yield session
            return
        with self._write_gate, self._sessions() as session, session.begin():
            session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
            yield session

    @contextmanager
    def writers_excluded(self) -> Iterator[None]:
        """Hold the SQLite write gate (all writers of this file, in every process) without a
        transaction; on PostgreSQL a no-op (its writers are ordered by row and advisory locks)."""
        if self._write_gate is None:
            yield
            return
        with self._write_gate:
            yield

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (a consistent snapshot on PostgreSQL)."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
        if self._write_gate is not None:
            self._write_gate.close()


class SqliteWriter:
    """The SQLite connection of a group commit's writer thread: its own raw connection (with
    the engine's pragmas), whose transactions take the write gate shared with every other
    writer of the file, as Database.write() does. Duck-typed like a psycopg connection for
    the BatchWriter: rollback() and close()."""

    def __init__(self, database: Database) -> None:
        assert database._write_gate is not None, "SQLite only"
        self._gate = database._write_gate
        self._raw = database.engine.raw_connection()
        self.dbapi_connection: Any = self._raw.dbapi_connection
        self._gate_held = False

    def begin(self) -> None:
        self._gate.__enter__()
        self._gate_held = True
        try:
            self.dbapi_connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise

    def commit(self) -> None:
        try:
            self.dbapi_connection.execute("COMMIT")
        finally:
            if not self.dbapi_connection.in_transaction:  # else rollback() ends it
                self._release()

    def rollback(self) -> None:
        try:
            if self.dbapi_connection.in_transaction:
                self.dbapi_connection.execute("ROLLBACK")
        finally:
            self._release()

    def close(self) -> None:
        self.rollback()
        self._raw.close()

    def _release(self) -> None:
        if self._gate_held:
            self._gate_held = False
            self._gate.__exit__()


class _WriteGate:
    """SQLite has one writer at a time. Waiting writers queue here, on a thread lock and an
    advisory lock on `<database>.write-lock` (other processes on the same file), and are woken
    the moment the writer before them is done, instead of polling in SQLite's busy handler
    with sleeps of up to 100 ms. BEGIN IMMEDIATE and busy_timeout stay as the backstop for
    writers outside this gate."""

    def __init__(self, database_path: str | None) -> None:
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        if database_path and database_path != ":memory:":
            self._fd = os.open(f"{database_path}.write-lock", os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise

    def __exit__(self, *_exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN is ours (SQLAlchemy docs,
        # "Serializable isolation / Savepoints / Transactional DDL" for pysqlite).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine
