"""Shared fixtures: a real server on a free port, a real channel, a fresh database per test.

Every server test runs once per backend: SQLite (a file in the test's temp dir) and PostgreSQL
(a fresh database on the server named by LEDGER_TEST_POSTGRES_URL, which scripts/dev.sh test
starts). Without that variable the PostgreSQL cases fail instead of being skipped, unless
LEDGER_TEST_BACKENDS=sqlite says so explicitly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from sqlalchemy.engine import make_url

from ledger.api.v1 import insurance_pb2_grpc as pb_grpc
from ledger.server.app import LedgerServer, Settings

BACKENDS = [b for b in os.environ.get("LEDGER_TEST_BACKENDS", "sqlite,postgresql").split(",") if b]


def _pg_admin_url() -> str:
    url = os.environ.get("LEDGER_TEST_POSTGRES_URL")
    if not url:
        pytest.fail(
            "LEDGER_TEST_POSTGRES_URL is not set: run the tests with scripts/dev.sh test "
            "(or set LEDGER_TEST_BACKENDS=sqlite to leave PostgreSQL out on purpose)"
        )
    return url


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def fresh_database(backend: str, directory: Path) -> Iterator[str]:
    """The URL of a new, empty database of the backend; a PostgreSQL one is dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'ledger.db'}"
        return
    admin = _pg_admin_url()
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(admin), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


@dataclass
class Client:
    """Stubs of the three services over one real channel."""

    channel: grpc.Channel
    admin: pb_grpc.AdminStub
    clearing: pb_grpc.ClearingStub
    query: pb_grpc.QueryStub
    target: str = ""

    @classmethod
    def connect(cls, target: str) -> Client:
        channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        grpc.channel_ready_future(channel).result(timeout=10)
        return cls(
            channel,
            pb_grpc.AdminStub(channel),
            pb_grpc.ClearingStub(channel),
            pb_grpc.QueryStub(channel),
            target,
        )


@pytest.fixture
def server(database_url: str) -> Iterator[LedgerServer]:
    ledger_server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=database_url))
    ledger_server.start()
    try:
        yield ledger_server
    finally:
        ledger_server.stop(grace_seconds=5)


@pytest.fixture
def client(server: LedgerServer) -> Iterator[Client]:
    c = Client.connect(f"127.0.0.1:{server.port}")
    try:
        yield c
    finally:
        c.channel.close()
