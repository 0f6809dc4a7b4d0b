"""The group committers' own rules, on real databases, with batch functions written here.

Through the server the batches only ever hold well-formed liquidations; here a batch function
can fail on purpose, so the rules that keep one request's failure its own are exercised:
a request whose own outcome is an error fails alone; an exception that fails the whole batch
rolls it back and the batch is rerun request by request, so only the request at fault fails;
a driver error (a real one, from the database) reruns the batch; and what the batch wrote
lands exactly once. On SQLite (its loop writer) and on PostgreSQL (an asyncio connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from ledger.db.session import Database, SqliteLoopWriter
from ledger.group_commit import GroupCommitter
from tests.conftest import fresh_database

POISON = "poison"  # fails the whole batch it is in (an unexpected exception)
REFUSED = "refused"  # fails alone (its own outcome is an error)
FLAKY = "flaky"  # its first batch hits a real database error


class Refused(Exception):
    pass


def _outcome(value: str) -> str | Exception:
    return Refused(value) if value.startswith(REFUSED) else value.upper()


def _expected(values: Sequence[str]) -> list[str]:
    return sorted(v for v in values if not v.startswith((POISON, REFUSED)))


VALUES = [f"v{k}" for k in range(20)] + [POISON, f"{REFUSED}-1", FLAKY, f"{REFUSED}-2"]


# --- on SQLite: statements on the loop, the lock and the commit on the writer's pool ---------


def test_sqlite_committer_keeps_failures_to_their_requests(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'g.db'}")
    with database.write() as session:
        session.execute(text("CREATE TABLE written (value TEXT NOT NULL)"))
    pool = ThreadPoolExecutor(1)
    try:
        results, flaky_failed = asyncio.run(_run_sqlite_committer(database, pool))
    finally:
        pool.shutdown()
    with database.read() as session:
        written = sorted(session.scalars(text("SELECT value FROM written")))
    database.dispose()
    _check(results, written, flaky_failed)


async def _run_sqlite_committer(
    database: Database, pool: ThreadPoolExecutor
) -> tuple[dict[str, Any], bool]:
    flaky_failed = False
    writers = 0

    async def connect() -> SqliteLoopWriter:
        nonlocal writers
        writers += 1
        return SqliteLoopWriter(database, pool)

    async def batch(writer: SqliteLoopWriter, requests: Sequence[str]) -> list[str | Exception]:
        nonlocal flaky_failed
        await writer.begin()
        for value in requests:
            writer.dbapi_connection.execute("INSERT INTO written (value) VALUES (?)", (value,))
        if POISON in requests:
            raise RuntimeError("a bug that fails the whole batch")
        if FLAKY in requests and not flaky_failed:
            flaky_failed = True
            writer.dbapi_connection.execute("INSERT INTO no_such_table VALUES (1)")
        await writer.commit()
        return [_outcome(v) for v in requests]

    committer: GroupCommitter[str, str] = GroupCommitter(connect, batch)
    outcomes = await asyncio.gather(*(committer.submit(v) for v in VALUES), return_exceptions=True)
    await committer.close()
    assert writers >= 2, "a driver error must discard the connection"
    return dict(zip(VALUES, outcomes, strict=True)), flaky_failed


# --- on PostgreSQL: an asyncio connection --------------------------------------------------


def test_task_committer_keeps_failures_to_their_requests(tmp_path: Path) -> None:
    with fresh_database("postgresql", tmp_path) as url:
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE TABLE written (value TEXT NOT NULL)")
        results, flaky_failed = asyncio.run(_run_task_committer(conninfo))
        with psycopg.connect(conninfo) as conn:
            written = sorted(v for (v,) in conn.execute("SELECT value FROM written"))
    _check(results, written, flaky_failed)


async def _run_task_committer(conninfo: str) -> tuple[dict[str, Any], bool]:
    flaky_failed = False
    connections = 0

    async def connect() -> psycopg.AsyncConnection[Any]:
        nonlocal connections
        connections += 1
        return await psycopg.AsyncConnection.connect(conninfo)

    async def batch(
        connection: psycopg.AsyncConnection[Any], requests: Sequence[str]
    ) -> list[str | Exception]:
        nonlocal flaky_failed
        for value in requests:
            await connection.execute("INSERT INTO written (value) VALUES (%s)", (value,))
        if POISON in requests:
            raise RuntimeError("a bug that fails the whole batch")
        if FLAKY in requests and not flaky_failed:
            flaky_failed = True
            await connection.execute("SELECT 1 / 0")  # a real driver error
        await connection.commit()
        return [_outcome(v) for v in requests]

    committer: GroupCommitter[str, str] = GroupCommitter(connect, batch)
    outcomes = await asyncio.gather(*(committer.submit(v) for v in VALUES), return_exceptions=True)
    await committer.close()
    assert connections >= 2, "a driver error must discard the connection"
    return dict(zip(VALUES, outcomes, strict=True)), flaky_failed


def test_task_committer_refuses_calls_once_closed() -> None:
    async def run() -> None:
        async def never_connect() -> Any:
            raise AssertionError("no batch should run")

        async def batch(_connection: Any, _requests: Sequence[str]) -> list[str | Exception]:
            raise AssertionError("no batch should run")

        committer: GroupCommitter[str, str] = GroupCommitter(never_connect, batch)
        await committer.close()
        with pytest.raises(RuntimeError, match="stopping"):
            await committer.submit("late")

    asyncio.run(run())


def _check(results: dict[str, Any], written: list[str], flaky_failed: bool) -> None:
    assert flaky_failed, "the flaky request's first batch must have hit the database error"
    assert set(results) == set(VALUES)
    for value in VALUES:
        outcome = results[value]
        if value == POISON:
            assert isinstance(outcome, RuntimeError), outcome
        elif value.startswith(REFUSED):
            assert isinstance(outcome, Refused) and str(outcome) == value, outcome
        else:
            assert outcome == value.upper(), (value, outcome)
    # Failed batches rolled back; every batch that committed wrote each of its values once,
    # and the batch that failed as a whole wrote nothing (the poison reran alone, and failed).
    committed = _expected(VALUES)
    assert [v for v in written if not v.startswith(REFUSED)] == committed
    assert POISON not in written
