"""Group commit's own rules, with batch functions written here.

The batch writer, on real databases: through the server the batches only ever hold
well-formed liquidations; here a batch function can fail on purpose, so the rules that keep
one request's failure its own are exercised: a request whose own outcome is an error fails
alone; an exception that fails the whole batch rolls it back and the batch is rerun request by
request, so only the request at fault fails; a driver error (a real one, from the database)
reruns the batch on a fresh connection; and what the batch wrote lands exactly once.

The front end, on a real port with real gRPC clients: calls that arrive while a batch is
being written are handed over together as the next batch, each call gets its own reply
(a message, or a status with its details), and a batch function that fails answers INTERNAL.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from ledger._alloc import FrontEnd
from ledger.db.session import Database, SqliteWriter
from ledger.errors import Unavailable
from ledger.group_commit import BATCH_ATTEMPTS_MAX, BatchWriter
from ledger.server.status import status_for
from tests.conftest import fresh_database

POISON = "poison"  # fails the whole batch it is in (an unexpected exception)
REFUSED = "refused"  # fails alone (its own outcome is an error)
FLAKY = "flaky"  # its first batch hits a real database error


class Refused(Exception):
    pass


def _outcome(value: str) -> str | Exception:
    return Refused(value) if value.startswith(REFUSED) else value.upper()


VALUES = [f"v{k}" for k in range(20)] + [POISON, f"{REFUSED}-1", FLAKY, f"{REFUSED}-2"]


# --- the batch writer on SQLite: its own connection behind the write gate -------------------


def test_sqlite_writer_keeps_failures_to_their_requests(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'g.db'}")
    with database.write() as session:
        session.execute(text("CREATE TABLE written (value TEXT NOT NULL)"))
    flaky_failed = False
    connections = 0

    def connect() -> SqliteWriter:
        nonlocal connections
        connections += 1
        return SqliteWriter(database)

    def batch(writer: SqliteWriter, requests: Sequence[str]) -> list[str | Exception]:
        nonlocal flaky_failed
        writer.begin()
        for value in requests:
            writer.dbapi_connection.execute("INSERT INTO written (value) VALUES (?)", (value,))
        if POISON in requests:
            raise RuntimeError("a bug that fails the whole batch")
        if FLAKY in requests and not flaky_failed:
            flaky_failed = True
            writer.dbapi_connection.execute("INSERT INTO no_such_table VALUES (1)")
        writer.commit()
        return [_outcome(v) for v in requests]

    writer: BatchWriter[str, str] = BatchWriter(connect, batch)
    outcomes = writer.write(VALUES)
    writer.close()
    with database.read() as session:
        written = sorted(session.scalars(text("SELECT value FROM written")))
    database.dispose()
    assert connections >= 2, "a driver error must discard the connection"
    _check(dict(zip(VALUES, outcomes, strict=True)), written, flaky_failed)


# --- on PostgreSQL: a psycopg connection of its own ----------------------------------------


def test_postgres_writer_keeps_failures_to_their_requests(tmp_path: Path) -> None:
    with fresh_database("postgresql", tmp_path) as url:
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE TABLE written (value TEXT NOT NULL)")
        flaky_failed = False
        connections = 0

        def connect() -> psycopg.Connection[Any]:
            nonlocal connections
            connections += 1
            return psycopg.connect(conninfo)

        def batch(
            connection: psycopg.Connection[Any], requests: Sequence[str]
        ) -> list[str | Exception]:
            nonlocal flaky_failed
            for value in requests:
                connection.execute("INSERT INTO written (value) VALUES (%s)", (value,))
            if POISON in requests:
                raise RuntimeError("a bug that fails the whole batch")
            if FLAKY in requests and not flaky_failed:
                flaky_failed = True
                connection.execute("SELECT 1 / 0")  # a real driver error
            connection.commit()
            return [_outcome(v) for v in requests]

        writer: BatchWriter[str, str] = BatchWriter(connect, batch)
        outcomes = writer.write(VALUES)
        writer.close()
        with psycopg.connect(conninfo) as conn:
            written = sorted(v for (v,) in conn.execute("SELECT value FROM written"))
    assert connections >= 2, "a driver error must discard the connection"
    _check(dict(zip(VALUES, outcomes, strict=True)), written, flaky_failed)


def test_writer_fails_a_batch_the_database_keeps_refusing_as_a_whole() -> None:
    """A database that refuses every attempt is not the requests' fault: the batch is tried
    BATCH_ATTEMPTS_MAX times on fresh connections, not split, and every request is answered
    UNAVAILABLE (nothing was written; the client retries)."""
    connections = 0
    attempts: list[list[str]] = []

    def connect() -> Any:
        nonlocal connections
        connections += 1
        return sqlite3.connect(":memory:")

    def batch(_connection: Any, requests: Sequence[str]) -> list[str | Exception]:
        attempts.append(list(requests))
        raise sqlite3.OperationalError("database is locked")

    writer: BatchWriter[str, str] = BatchWriter(connect, batch)
    outcomes = writer.write(["a", "b", "c"])
    writer.close()
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert status_for(outcomes[0]) == grpc.StatusCode.UNAVAILABLE
    assert "nothing was written" in str(outcomes[0])
    assert attempts == [["a", "b", "c"]] * BATCH_ATTEMPTS_MAX
    assert connections == BATCH_ATTEMPTS_MAX


def test_writer_refuses_batches_once_closed() -> None:
    def never_connect() -> Any:
        raise AssertionError("no batch should run")

    def batch(_connection: Any, _requests: Sequence[str]) -> list[str | Exception]:
        raise AssertionError("no batch should run")

    writer: BatchWriter[str, str] = BatchWriter(never_connect, batch)
    writer.close()
    with pytest.raises(RuntimeError, match="stopping"):
        writer.write(["late"])


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
    committed = sorted(v for v in VALUES if not v.startswith((POISON, REFUSED)))
    assert [v for v in written if not v.startswith(REFUSED)] == committed
    assert POISON not in written


# --- the front end ---------------------------------------------------------------------------

METHOD = "/test.v1.Batch/Record"


def _closed_port() -> int:
    """A loopback port nothing listens on (the front end's backend, for calls it forwards)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _front_end(record: Callable[[list[bytes]], Any]) -> FrontEnd:
    front = FrontEnd("127.0.0.1:0", _closed_port(), METHOD, record)
    front.start()
    return front


def _call(port: int, message: bytes, method: str = METHOD) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return channel.unary_unary(method)(message, timeout=30)  # type: ignore[no-any-return]


def test_front_end_batches_the_calls_that_queue_behind_a_batch() -> None:
    batches: list[list[bytes]] = []
    first_batch_running = threading.Event()
    release_first = threading.Event()

    def record(messages: list[bytes]) -> list[bytes]:
        batches.append(list(messages))
        if len(batches) == 1:
            first_batch_running.set()
            assert release_first.wait(30)
        return [m[::-1] for m in messages]

    front = _front_end(record)
    try:
        with ThreadPoolExecutor(16) as pool:
            first = pool.submit(_call, front.port, b"first")
            assert first_batch_running.wait(30)
            rest = [pool.submit(_call, front.port, f"call-{k}".encode()) for k in range(15)]
            time.sleep(0.5)  # the 15 calls reach the queue while the writer is held
            release_first.set()
            assert first.result() == b"tsrif"
            for k, call in enumerate(rest):
                assert call.result() == f"call-{k}".encode()[::-1]
    finally:
        release_first.set()
        front.stop(5)
    assert batches[0] == [b"first"]
    later = [m for batch in batches[1:] for m in batch]
    assert sorted(later) == sorted(f"call-{k}".encode() for k in range(15))
    assert max(len(b) for b in batches[1:]) > 1, f"no calls were batched: {batches}"


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_front_end_takes_compressed_requests(compression: grpc.Compression) -> None:
    received: list[bytes] = []

    def record(messages: list[bytes]) -> list[bytes]:
        received.extend(messages)
        return [m[::-1] for m in messages]

    front = _front_end(record)
    message = b"liquidation " * 100  # compresses well, so the client does compress it
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            call = channel.unary_unary(METHOD)
            assert call(message, timeout=30, compression=compression) == message[::-1]
    finally:
        front.stop(5)
    assert received == [message]


def test_front_end_answers_each_call_with_its_own_status() -> None:
    def record(messages: list[bytes]) -> list[bytes | tuple[int, str]]:
        return [
            (9, f"cycle {m.decode()!r} is closed: 100% ≥ 90%") if m.startswith(b"bad") else m
            for m in messages
        ]

    front = _front_end(record)
    try:
        assert _call(front.port, b"good") == b"good"
        with pytest.raises(grpc.RpcError) as failure:
            _call(front.port, b"bad-1")
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert failure.value.details() == "cycle 'bad-1' is closed: 100% ≥ 90%"
        assert _call(front.port, b"") == b""  # an empty message is a message
    finally:
        front.stop(5)


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(lambda messages: 1 / 0, id="raises"),
        pytest.param(lambda messages: [], id="wrong-count"),
        pytest.param(lambda messages: [3.5 for _ in messages], id="wrong-type"),
    ],
)
def test_front_end_answers_internal_when_the_batch_fails(
    record: Callable[[list[bytes]], Any],
) -> None:
    front = _front_end(record)
    try:
        with pytest.raises(grpc.RpcError) as failure:
            _call(front.port, b"x")
        assert failure.value.code() == grpc.StatusCode.INTERNAL
        assert "internal error" in (failure.value.details() or "")
    finally:
        front.stop(5)


def test_front_end_reports_an_unreachable_service_for_other_calls() -> None:
    front = _front_end(lambda messages: list(messages))
    try:
        with pytest.raises(grpc.RpcError) as failure:
            _call(front.port, b"x", method="/test.v1.Other/Call")
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _call(front.port, b"still serving") == b"still serving"
    finally:
        front.stop(5)


def test_front_end_refuses_an_address_it_cannot_listen_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            FrontEnd(f"127.0.0.1:{port}", _closed_port(), METHOD, lambda messages: messages)


def test_serve_refuses_a_batch_max_below_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "serve", "--batch-max", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--batch-max must be at least 1 (got 0)" in result.stderr
    assert not (tmp_path / "ledger.db").exists(), "nothing may be created"
