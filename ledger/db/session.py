"""Engines and the unit of work: the RPC edge opens one transaction, domain code never commits.

SQLite runs in WAL mode with synchronous=FULL (a commit is durable before the reply) and every
write transaction starts with BEGIN IMMEDIATE, so writers queue on the database lock instead of
failing on an upgrade from a read lock. PostgreSQL runs at READ COMMITTED; rows that guard a
rule (an account's balance) are locked by the writer that moves them (see db/store.py).

Every session waits at most `lock_timeout_s` for a lock (PostgreSQL's lock_timeout; on SQLite
the write gate and busy_timeout), and the liquidation writer's statements are cut off after
`statement_timeout_s` (PostgreSQL's statement_timeout; on SQLite a progress handler), so a
stuck database turns into a retryable UNAVAILABLE instead of calls that hang.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ledger.db.batch import BatchStatements, Insert, Statement
from ledger.errors import Unavailable

log = logging.getLogger("ledger.db")

DEFAULT_SQLITE_FILE = "ledger.db"
LOCK_TIMEOUT_SECONDS_DEFAULT = 5.0
STATEMENT_TIMEOUT_SECONDS_DEFAULT = 30.0
# The pool's sessions also serve bulk statements (a cycle's allocation rows, VerifyLedger);
# their statement timeout is only a backstop against a runaway statement.
BULK_STATEMENT_TIMEOUT_SECONDS = 600.0
WRITER_CONNECT_TIMEOUT_SECONDS = 10
CHECKPOINT_INTERVAL_SECONDS = 0.5
_HANDOVER_WAIT_SECONDS = 0.05  # at most, for another process's writer to take its turn
_SQLITE_PROGRESS_STEPS = 10_000  # VM instructions between two looks at the statement deadline


def default_database_url() -> str:
    return f"sqlite:///{os.path.join(os.getcwd(), DEFAULT_SQLITE_FILE)}"


class Database:
    """One engine per process and the sessions made from it."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 16,
        lock_timeout_s: float = LOCK_TIMEOUT_SECONDS_DEFAULT,
        statement_timeout_s: float = STATEMENT_TIMEOUT_SECONDS_DEFAULT,
    ) -> None:
        parsed = make_url(url)
        self.url = url
        self.backend = parsed.get_backend_name()
        self.lock_timeout_s = lock_timeout_s
        self.statement_timeout_s = statement_timeout_s
        if self.backend == "sqlite":
            self.engine = _sqlite_engine(url, lock_timeout_s)
        elif self.backend == "postgresql":
            if parsed.get_driver_name() != "psycopg":
                raise ValueError(f"database URL {url!r}: use postgresql+psycopg://")
            self.engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                connect_args={
                    "options": _pg_options(
                        parsed.query.get("options"),
                        lock_timeout_s,
                        BULK_STATEMENT_TIMEOUT_SECONDS,
                    )
                },
            )
        else:
            raise ValueError(f"database URL {url!r}: only sqlite:/// and postgresql+psycopg://")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_gate = _WriteGate(parsed.database) if self.backend == "sqlite" else None

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    @property
    def path(self) -> str | None:
        """The SQLite file (None for PostgreSQL or an in-memory database)."""
        database = make_url(self.url).database
        if not self.is_sqlite or not database or database == ":memory:":
            return None
        return database

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: commits on success, rolls back on any exception."""
        if self._write_gate is None:
            with self._sessions() as session, session.begin():
                yield session
            return
        with (
            self._write_gate.held(self.lock_timeout_s),
            self._sessions() as session,
            session.begin(),
        ):
            session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
            yield session

    @contextmanager
    def writers_excluded(self) -> Iterator[None]:
        """Hold the SQLite write gate (all writers of this file, in every process) without a
        transaction and without a time limit (migrations); on PostgreSQL a no-op."""
        if self._write_gate is None:
            yield
            return
        with self._write_gate.held(None):
            yield

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (a consistent snapshot on PostgreSQL)."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only transaction that sees one state of the database throughout
        (PostgreSQL: REPEATABLE READ; SQLite: a WAL read transaction), for reads that span
        many statements (VerifyLedger)."""
        with self._sessions() as session, session.begin():
            if not self.is_sqlite:
                session.connection(
                    execution_options={
                        "isolation_level": "REPEATABLE READ",
                        "postgresql_readonly": True,
                    }
                )
            yield session

    def writer_connection(self) -> WriterConnection:
        """A connection of the liquidation writer's own (not from the pool)."""
        if self._write_gate is not None:
            return SqliteWriter(self)
        return PostgresWriter(self)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._write_gate is not None:
            self._write_gate.close()


class WriterConnection:
    """A writer's own connection: begin() opens a transaction and gives its statements,
    commit() runs the writes and commits durably, rollback() ends it without a trace."""

    def begin(self) -> BatchStatements:
        raise NotImplementedError

    def commit(self, writes: Sequence[Statement | Insert]) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PostgresWriter(WriterConnection):
    """A raw psycopg connection, planned for what it does: every one of its reads looks rows
    up by key in a working set that stays in memory.

    - Custom plans only: the driver prepares the batch's statements, and a generic plan
      made while `liquidations` was small (a fresh database, before autoanalyze) scans the
      whole table for earlier uses of the ids, every batch, as the table grows; measured,
      half the throughput. A custom plan sees the table's size.
    - random_page_cost 1.1 (the usual figure for SSDs and a cached working set): at the
      default of 4 the planner reads 76,000 liquidations whole (9 ms) rather than look up a
      batch's 1,000 ids in their index (0.9 ms), measured.
    """

    def __init__(self, database: Database) -> None:
        url = make_url(database.url).set(drivername="postgresql")
        params = conninfo_to_dict(url.render_as_string(hide_password=False))
        params["options"] = " ".join(
            [
                _pg_options(
                    str(params.get("options") or ""),
                    database.lock_timeout_s,
                    database.statement_timeout_s,
                ),
                "-c plan_cache_mode=force_custom_plan -c random_page_cost=1.1",
            ]
        )
        params.setdefault("connect_timeout", WRITER_CONNECT_TIMEOUT_SECONDS)
        self._connection: psycopg.Connection[Any] = psycopg.connect(make_conninfo("", **params))
        self._db = BatchStatements(self._connection, is_sqlite=False)

    def begin(self) -> BatchStatements:
        return self._db  # psycopg opens the transaction with the first statement

    def commit(self, writes: Sequence[Statement | Insert]) -> None:
        self._db.write_and_commit(writes)

    def rollback(self) -> None:
        self._connection.rollback()

    def close(self) -> None:
        self._connection.close()


class SqliteWriter(WriterConnection):
    """A raw sqlite3 connection (with the engine's pragmas), whose transactions take the
    write gate shared with every other writer of the file, as Database.write() does."""

    def __init__(self, database: Database, *, statement_timeout_s: float | None = None) -> None:
        assert database._write_gate is not None, "SQLite only"
        self._gate = database._write_gate
        self._lock_timeout_s = database.lock_timeout_s
        self._statement_timeout_s = statement_timeout_s or database.statement_timeout_s
        self._raw = database.engine.raw_connection()
        connection: Any = self._raw.dbapi_connection
        self.dbapi_connection = connection
        self._db = BatchStatements(connection, is_sqlite=True)
        self._gate_held = False
        self._deadline = float("inf")
        connection.set_progress_handler(self._past_deadline, _SQLITE_PROGRESS_STEPS)

    def _past_deadline(self) -> int:
        """SQLite's statement timeout: a non-zero answer interrupts the statement."""
        return 1 if time.monotonic() > self._deadline else 0

    def begin(self) -> BatchStatements:
        self._gate.acquire(self._lock_timeout_s)
        self._gate_held = True
        try:
            self._deadline = time.monotonic() + self._statement_timeout_s
            self.dbapi_connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise
        return self._db

    def commit(self, writes: Sequence[Statement | Insert]) -> None:
        self._db.write_together(writes)
        try:
            self.dbapi_connection.execute("COMMIT")
        finally:
            if not self.dbapi_connection.in_transaction:  # else rollback() ends it
                self._release()

    def others_waiting(self) -> bool:
        """Whether another writer waits for the database (see handover)."""
        return self._gate.others_waiting()

    def handover(self) -> None:
        """Commit what the transaction has written, let the writers waiting go first, then
        begin again: how a long writer keeps from stalling the others."""
        self.dbapi_connection.execute("COMMIT")
        self._release()
        self._gate.let_others_in()
        self.begin()

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
        self._deadline = float("inf")
        if self._gate_held:
            self._gate_held = False
            self._gate.release()


class Checkpointer:
    """SQLite: copies the WAL back into the database every `interval_s`, on a connection and
    a thread of its own. A PASSIVE checkpoint takes no lock that a writer waits for, so
    writers go on meanwhile; with it, the WAL stays bounded while no writer checkpoints."""

    def __init__(self, database: Database, interval_s: float = CHECKPOINT_INTERVAL_SECONDS):
        self._database = database
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raw = self._database.engine.raw_connection()
        try:
            while not self._stop.wait(self._interval_s):
                try:
                    raw.dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
                except Exception:
                    log.warning("WAL checkpoint failed", exc_info=True)
        finally:
            raw.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class LockTimeout(Unavailable):
    """The SQLite write gate stayed taken for longer than the lock timeout."""


class _WriteGate:
    """SQLite has one writer at a time. Writers of this process queue here in arrival order,
    then on an advisory lock on `<database>.write-lock` (other processes on the same file),
    and are woken the moment the writer before them is done, instead of polling in SQLite's
    busy handler with sleeps of up to 100 ms. BEGIN IMMEDIATE and busy_timeout stay as the
    backstop for writers outside this gate.

    A long writer (the cycle close) asks `others_waiting()` between two pieces of its work
    and lets them in: this process's waiters are in the queue, and another process's waiter
    holds a shared lock on `<database>.write-wait` while it waits.
    """

    def __init__(self, database_path: str | None) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self._held = False
        self._lock_fd: int | None = None
        self._wait_fd: int | None = None
        self._probe_fd: int | None = None
        if database_path and database_path != ":memory:":
            self._lock_fd = os.open(f"{database_path}.write-lock", os.O_RDWR | os.O_CREAT, 0o644)
            self._wait_fd = os.open(f"{database_path}.write-wait", os.O_RDWR | os.O_CREAT, 0o644)
            self._probe_fd = os.open(f"{database_path}.write-wait", os.O_RDWR)

    def acquire(self, timeout_s: float | None) -> None:
        """Wait at most timeout_s (None: for as long as it takes); LockTimeout past it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        token = object()
        with self._cond:
            self._queue.append(token)
            try:
                while self._held or self._queue[0] is not token:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise LockTimeout(_locked_message(timeout_s))
                    self._cond.wait(remaining)
            except BaseException:
                self._queue.remove(token)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._held = True
        try:
            self._lock_file(deadline, timeout_s)
        except BaseException:
            self._release_local()
            raise

    def _lock_file(self, deadline: float | None, timeout_s: float | None) -> None:
        if self._lock_fd is None or self._wait_fd is None:
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        fcntl.flock(self._wait_fd, fcntl.LOCK_SH)  # another process's writer: say we wait
        try:
            if deadline is None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                return
            pause = 0.0005
            while True:  # flock has no timeout of its own
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeout(_locked_message(timeout_s)) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.01)
        finally:
            fcntl.flock(self._wait_fd, fcntl.LOCK_UN)

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._release_local()

    def _release_local(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def let_others_in(self) -> None:
        """Just released: give another process's waiter the moment it needs to take the
        file lock (this process's waiters are ahead in the queue anyway)."""
        deadline = time.monotonic() + _HANDOVER_WAIT_SECONDS
        while self._remote_waiting() and time.monotonic() < deadline:
            time.sleep(0.0002)

    def others_waiting(self) -> bool:
        """Whether another writer, of this process or another, waits for the gate."""
        with self._cond:
            if self._queue:
                return True
        return self._remote_waiting()

    def _remote_waiting(self) -> bool:
        if self._probe_fd is None:
            return False
        try:
            fcntl.flock(self._probe_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._probe_fd, fcntl.LOCK_UN)
        return False

    @contextmanager
    def held(self, timeout_s: float | None) -> Iterator[None]:
        self.acquire(timeout_s)
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        for name in ("_lock_fd", "_wait_fd", "_probe_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _locked_message(timeout_s: float | None) -> str:
    return (
        f"the database stayed locked by another writer for more than {timeout_s} s; "
        "nothing was written, try again"
    )


def _pg_options(existing: object, lock_timeout_s: float, statement_timeout_s: float) -> str:
    """The URL's own options (a search_path, say) and the timeouts, in milliseconds."""
    timeouts = (
        f"-c lock_timeout={int(lock_timeout_s * 1000)}"
        f" -c statement_timeout={int(statement_timeout_s * 1000)}"
    )
    return " ".join(filter(None, [str(existing or ""), timeouts]))


def _sqlite_engine(url: str, lock_timeout_s: float) -> Engine:
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": max(lock_timeout_s, 1.0)}
    )
    busy_timeout_ms = int(max(lock_timeout_s, 1.0) * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN is ours (SQLAlchemy docs,
        # "Serializable isolation / Savepoints / Transactional DDL" for pysqlite).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # No checkpoint in a committing writer's time (the WAL is copied back into the
        # database by the Checkpointer, beside the writers): the commit that crossed the
        # threshold would otherwise copy and sync the whole WAL while the writers behind it
        # wait (after a cycle close's steps, tens of megabytes).
        cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine
