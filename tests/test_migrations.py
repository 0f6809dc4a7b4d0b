"""The schema is Alembic's to manage, on SQLite and PostgreSQL.

Proves that a server starting on an empty database migrates it to the head revision; that
starting again on a migrated database changes nothing and finds every row; that the models
and the migrations describe the same schema (autogenerate finds no difference); that several
servers starting at once on one empty database all come up; and that a database stamped with
a revision this version does not know is refused, never recreated.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from ledger.api.v1 import insurance_pb2 as pb
from ledger.db.migrate import head_revision
from ledger.db.models import Base
from ledger.server.app import LedgerServer, Settings
from tests.conftest import Client
from tests.ledger_db import TABLES, snapshot
from tests.test_admin import DEPOSIT, WITHDRAW, transfer, usd


def revision_and_tables(database_url: str) -> tuple[str | None, set[str]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            revision = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    return revision, tables


def start(database_url: str) -> tuple[LedgerServer, Client]:
    server = LedgerServer(Settings(listen="127.0.0.1:0", database_url=database_url))
    server.start()
    return server, Client.connect(f"127.0.0.1:{server.port}")


def stop(server: LedgerServer, client: Client) -> None:
    client.channel.close()
    server.stop(grace_seconds=1)


def test_empty_database_is_migrated_on_start(database_url: str) -> None:
    assert revision_and_tables(database_url) == (None, set())
    server, client = start(database_url)
    try:
        revision, tables = revision_and_tables(database_url)
        assert revision == head_revision()
        assert set(TABLES) | {"alembic_version", "counters"} <= tables
        assert client.admin.ListCurrencies(pb.ListCurrenciesRequest()).currencies == []
    finally:
        stop(server, client)


def test_start_again_keeps_every_row(database_url: str) -> None:
    server, client = start(database_url)
    try:
        usd(client)
        client.admin.SetPolicy(
            pb.SetPolicyRequest(currency="USD", insurance_share="0.3", coverage_ratio="0.8")
        )
        posted = [transfer(client, "d", DEPOSIT, 900), transfer(client, "w", WITHDRAW, 400)]
    finally:
        stop(server, client)
    before = snapshot(database_url)

    server, client = start(database_url)
    try:
        assert snapshot(database_url) == before
        listed = client.query.ListEntries(
            pb.ListEntriesRequest(currency="USD", account="insurance_fund")
        )
        assert list(listed.entries) == posted[::-1]
        assert client.query.GetFund(pb.GetFundRequest(currency="USD")).balance == 500
        # The id counter carried over too: a new entry follows the old ones.
        assert transfer(client, "d2", DEPOSIT, 1).entry_id > posted[-1].entry_id
    finally:
        stop(server, client)


def test_models_match_the_migrations(database_url: str) -> None:
    server, client = start(database_url)
    stop(server, client)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


# Alembic keeps its migration context in module globals, so concurrent starts are processes.
MIGRATE_WHEN_TOLD = """
import pathlib, sys, time
from ledger.db.migrate import upgrade
from ledger.db.session import Database
database = Database(sys.argv[1], pool_size=1)
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
try:
    upgrade(database)
finally:
    database.dispose()
"""


def test_servers_starting_at_once_on_an_empty_database(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    go = tmp_path / "go"
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE_WHEN_TOLD, database_url, str(go)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(1.0)  # let every process get past its imports
    go.touch()
    failures = []
    for starter in starters:
        _, stderr = starter.communicate(timeout=60)
        if starter.returncode != 0:
            failures.append(stderr.strip().splitlines()[-1])
    assert failures == []
    assert revision_and_tables(database_url)[0] == head_revision()


def test_unknown_revision_is_refused_and_nothing_is_recreated(
    database_url: str, tmp_path: Path
) -> None:
    server, client = start(database_url)
    try:
        usd(client)
        transfer(client, "d", DEPOSIT, 900)
    finally:
        stop(server, client)
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed0042'"))
    finally:
        engine.dispose()
    before = snapshot(database_url)

    # Through the real console script: it must stop with an error naming the revision.
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "serve", "--listen", "127.0.0.1:0"],
        cwd=workdir,
        env={**os.environ, "LEDGER_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "f00dfeed0042" in done.stderr
    assert snapshot(database_url) == before
    assert revision_and_tables(database_url)[0] == "f00dfeed0042"
