"""A cycle close survives a SIGKILL of the server in its write phase, on SQLite and PostgreSQL.

A `ledger serve` process closes a cycle of 2.5 million positions, nearly all profitable, so
that writing the allocation rows takes a while; the test watches the database until that write
is under way (PostgreSQL: the COPY in pg_stat_activity; SQLite: the -wal file growing) and
kills the server there. Proves that, after a restart on the same database, the cycle is either
wholly closed (summary, every allocation row, the cover, system loss netted to zero) or not
at all (NOT_FOUND, no allocation row, every table and balance as before); and that closing it
again then works and gives the expected summary.

With every profitable pnl equal, the expected outcome is known without the code under test:
each participant gets user_due // profitable, and the user_due % profitable smallest ids one
unit more (equal remainders, equal pnl: smaller id first).

A ReverseCycle survives the same: killed while it writes its reversal rows (on PostgreSQL
over two connections, so a range may be committed without the reversal's record), the close
is afterwards either wholly reversed or still wholly in force, and reversing it again works.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ledger.api.v1 import insurance_pb2 as pb
from tests import cycle_streams as cs
from tests import test_verify as tv
from tests.conftest import Client
from tests.cycle_streams import Positions
from tests.ledger_db import balances_from_journal, snapshot
from tests.test_cycle import (
    JPY,
    WriteWatch,
    deposit,
    fields,
    fund_balance,
    get_cycle,
    liquidate,
    market,
    published,
)
from tests.test_server_process import free_port, wait_serving

POSITIONS = 2_500_000
LOSING_EVERY = 100  # one position in a hundred lost money in the cycle
PNL = 1_000
LOSS = 7 * POSITIONS + 12_345
FUND = 50_000
WRITE_SEEN_TIMEOUT_SECONDS = 60


@contextmanager
def ledger_process(
    database_url: str, directory: Path
) -> Iterator[tuple[Client, subprocess.Popen[bytes]]]:
    port = free_port()
    log = directory / f"server-{port}.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ledger.cli",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--database-url",
                database_url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_serving(process, port, log)
        client = Client.connect(f"127.0.0.1:{port}")
        try:
            yield client, process
        finally:
            client.channel.close()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(30)


def positions() -> Positions:
    ids = np.random.default_rng(1).permutation(np.arange(1, POSITIONS + 1, dtype=np.uint64))
    pnl = np.full(POSITIONS, PNL, dtype=np.int64)
    pnl[ids % LOSING_EVERY == 0] = -500
    return Positions(ids, ids % np.uint64(50_000), pnl)


PROFITABLE = POSITIONS - POSITIONS // LOSING_EVERY
FUND_SHARE = int(Fraction(LOSS, 5) + Fraction(1, 2))  # 0.2 × loss, halves up
FUND_PAID = min(FUND_SHARE, FUND)
USER_DUE = LOSS - FUND_PAID


def expected(digest: str) -> dict[str, object]:
    profitable, fund_share, fund_paid, user_due = PROFITABLE, FUND_SHARE, FUND_PAID, USER_DUE
    assert user_due < profitable * PNL
    return {
        "cycle_id": "c1",
        "currency": JPY,
        "state": pb.CYCLE_STATE_CLOSED,
        "loss_total": LOSS,
        "fund_balance_before": FUND,
        "fund_share": fund_share,
        "fund_paid": fund_paid,
        "user_due": user_due,
        "allocated_total": user_due,
        "uncovered": 0,
        "positions_total": POSITIONS,
        "profitable_count": profitable,
        "profit_total": profitable * PNL,
        "participant_count": profitable,  # all tied with the cutoff
        "participant_profit": profitable * PNL,
        "cutoff_pnl": PNL,
        "widened": False,
        "input_digest": digest,
        "insurance_share": "0.2",
        "coverage_ratio": "0.9",
        **published(user_due, profitable * PNL),
    }


def scalars(database_url: str, **queries: str) -> dict[str, int]:
    """Each query's one integer (NULL as 0), by plain SQL."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return {
                name: int(conn.execute(text(sql)).scalar_one() or 0)
                for name, sql in queries.items()
            }
    finally:
        engine.dispose()


def ledger_state(database_url: str) -> dict[str, int]:
    """What the ledger holds of cycle c1, by plain SQL (no Python loop over 2.5M rows)."""
    state = scalars(
        database_url,
        cycles="SELECT count(*) FROM cycles",
        allocations="SELECT count(*) FROM allocations",
        allocated="SELECT sum(amount) FROM allocations",
        covers="SELECT count(*) FROM entries WHERE reference = 'c1'",
        # system_loss from the journal: credits − debits of entries, + allocations.
        system_loss="SELECT coalesce(sum(CASE WHEN credit_account = 'system_loss' THEN amount "
        "ELSE -amount END), 0) FROM entries "
        "WHERE 'system_loss' IN (credit_account, debit_account)",
        system_loss_cached="SELECT balance FROM accounts "
        "WHERE currency = 'JPY' AND name = 'system_loss'",
    )
    state["system_loss"] += state["allocated"]
    return state


def assert_allocations_exact(database_url: str) -> None:
    """Every participant gets base or base + 1; the + 1s are the smallest ids."""
    profitable = PROFITABLE
    base, extra = divmod(USER_DUE, profitable)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT amount, count(*), min(position_id), max(position_id), sum(pnl) "
                    "FROM allocations GROUP BY amount ORDER BY amount"
                )
            ).all()
    finally:
        engine.dispose()
    by_amount = {int(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}
    assert set(by_amount) == {base, base + 1}
    assert by_amount[base][0] == profitable - extra
    assert by_amount[base + 1][0] == extra
    assert by_amount[base + 1][2] < by_amount[base][1]
    assert by_amount[base][3] + by_amount[base + 1][3] == profitable * PNL


@pytest.mark.slow
def test_sigkill_in_write_phase_leaves_all_or_nothing(database_url: str, tmp_path: Path) -> None:
    cycle = positions()
    digest = cs.input_digest(cycle)
    want = expected(digest)

    with ledger_process(database_url, tmp_path) as (client, process):
        market(client)
        deposit(client, "d1", FUND)
        liquidate(client, "L1", "c1", -LOSS)
        before = snapshot(database_url)
        watch = WriteWatch(database_url)
        outcome: list[object] = []

        def close() -> None:
            try:
                outcome.append(cs.close(client.channel, "c1", JPY, cycle, timeout=120))
            except grpc.RpcError as error:
                outcome.append(error)

        closing = threading.Thread(target=close)
        closing.start()
        deadline = time.monotonic() + WRITE_SEEN_TIMEOUT_SECONDS
        while not watch.in_write_phase():
            assert not outcome, f"the close ended before its write phase was seen: {outcome}"
            assert time.monotonic() < deadline, "the write phase was never seen"
            time.sleep(0.01)
        if not watch.sqlite:
            time.sleep(0.2)  # into the COPY
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        closing.join(60)
        assert len(outcome) == 1
        reply = outcome[0]
        assert isinstance(reply, grpc.RpcError), "the close finished before the kill"

    state = ledger_state(database_url)
    if state["cycles"]:  # wholly closed: everything the close writes is there
        assert state["allocations"] == want["participant_count"]
        assert state["allocated"] == want["allocated_total"]
        assert state["covers"] == 1
        assert state["system_loss"] == state["system_loss_cached"] == 0
    else:  # not at all: nothing of it
        assert state["allocations"] == state["covers"] == 0
        assert snapshot(database_url) == before

    with ledger_process(database_url, tmp_path) as (client, _):
        if not state["cycles"]:
            with pytest.raises(grpc.RpcError) as error:
                get_cycle(client, "c1")
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        summary = cs.close(client.channel, "c1", JPY, cycle.shuffled(2), timeout=120)
        assert fields(summary) == want
        assert get_cycle(client, "c1") == summary

    state = ledger_state(database_url)
    assert state["allocations"] == want["participant_count"]
    assert state["allocated"] == want["allocated_total"]
    assert state["system_loss"] == state["system_loss_cached"] == 0
    assert_allocations_exact(database_url)


REVERSED_POSITIONS = 600_000


class ReversalWatch:
    """Polls the database until the reversal is writing: on SQLite while a writer holds the
    database (nothing else writes here); on PostgreSQL while its INSERT runs, and then tells
    whether a range of the rows is committed (a big reversal writes over two connections)."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        self.sqlite_path = str(url.database) if url.get_backend_name() == "sqlite" else None
        self.pg: psycopg.Connection[Any] | None = None
        self.pids: set[int] = set()  # PostgreSQL: the connections seen writing the rows
        if self.sqlite_path is None:
            libpq = url.set(drivername="postgresql").render_as_string(False)
            self.pg = psycopg.connect(libpq, autocommit=True)

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()

    def in_write_phase(self) -> bool:
        if self.pg is None:
            lite = sqlite3.connect(str(self.sqlite_path), timeout=0, isolation_level=None)
            try:
                lite.execute("BEGIN IMMEDIATE")
                lite.execute("ROLLBACK")
                return False
            except sqlite3.OperationalError:  # locked: the reversal's transaction
                return True
            finally:
                lite.close()
        return bool(self._writers())

    def _writers(self) -> dict[int, str]:
        """PostgreSQL: the state of each connection seen running the reversal's INSERT."""
        assert self.pg is not None
        for (pid,) in self.pg.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND query ILIKE 'INSERT INTO allocation_reversals%'"
        ).fetchall():
            self.pids.add(int(pid))
        return {
            int(pid): str(state)
            for pid, state in self.pg.execute(
                "SELECT pid, state FROM pg_stat_activity WHERE pid = ANY(%s)", (list(self.pids),)
            ).fetchall()
        }

    def kill_point(self) -> bool:
        """SQLite: a moment into the write. PostgreSQL: as soon as one connection that ran
        the INSERT is idle, out of its transaction (the other connection, which has just
        committed its ranges before the reversal's record: measured, about 300,000 rows are
        left behind), or mid-write if that is not seen within five seconds."""
        if self.pg is None:
            time.sleep(0.05)
            return False
        until = time.monotonic() + 5
        while time.monotonic() < until:
            if "idle" in self._writers().values():
                return True
            time.sleep(0.001)
        return False


def reversal_state(database_url: str) -> dict[str, int]:
    return scalars(
        database_url,
        reversals="SELECT count(*) FROM cycle_reversals",
        allocations="SELECT count(*) FROM allocations",
        rows_back="SELECT count(*) FROM allocation_reversals",
    )


@pytest.mark.slow
def test_sigkill_while_reversing_leaves_all_or_nothing(database_url: str, tmp_path: Path) -> None:
    ids = np.random.default_rng(2).permutation(
        np.arange(1, REVERSED_POSITIONS + 1, dtype=np.uint64)
    )
    cycle = Positions(ids, ids % np.uint64(70_001), np.full(REVERSED_POSITIONS, PNL, np.int64))
    with ledger_process(database_url, tmp_path) as (client, process):
        market(client)
        deposit(client, "d1", FUND)
        liquidate(client, "L1", "c1", -(3 * REVERSED_POSITIONS))
        before_close = balances_from_journal(database_url)
        closed = cs.close(client.channel, "c1", JPY, cycle, timeout=120)
        assert closed.participant_count == REVERSED_POSITIONS
        watch = ReversalWatch(database_url)
        outcome: list[object] = []

        def reverse() -> None:
            try:
                outcome.append(
                    client.admin.ReverseCycle(
                        pb.ReverseCycleRequest(cycle_id="c1", currency=JPY, reason="crash"),
                        timeout=120,
                    )
                )
            except grpc.RpcError as error:
                outcome.append(error)

        reversing = threading.Thread(target=reverse)
        reversing.start()
        try:
            deadline = time.monotonic() + WRITE_SEEN_TIMEOUT_SECONDS
            while not watch.in_write_phase():
                assert not outcome, f"the reversal ended before its write was seen: {outcome}"
                assert time.monotonic() < deadline, "the reversal's write was never seen"
                time.sleep(0.002)
            committed = watch.kill_point()
            os.kill(process.pid, signal.SIGKILL)
        finally:
            watch.close()
        process.wait(30)
        reversing.join(60)
        assert len(outcome) == 1
        replied = not isinstance(outcome[0], grpc.RpcError)  # rarely: in the last few ms

    state = reversal_state(database_url)
    assert state["allocations"] == closed.participant_count
    if replied:
        assert state["reversals"] == 1
    elif committed and not state["reversals"]:  # the case this test is for
        assert 0 < state["rows_back"] < state["allocations"]
    with ledger_process(database_url, tmp_path) as (client, _):
        report = tv.verify(client)
        assert (report.ok, list(report.problems)) == (True, [])
        if state["reversals"]:  # wholly reversed
            assert state["rows_back"] == state["allocations"]
            assert get_cycle(client, "c1").state == pb.CYCLE_STATE_REVERSED
            assert fund_balance(client) == FUND
        else:  # still wholly in force, whatever rows of it a dead attempt left
            assert get_cycle(client, "c1") == closed
            assert fund_balance(client) == FUND - closed.fund_paid
            reversed_ = client.admin.ReverseCycle(
                pb.ReverseCycleRequest(cycle_id="c1", currency=JPY, reason="again"), timeout=120
            )
            assert reversed_.state == pb.CYCLE_STATE_REVERSED
        assert fund_balance(client) == FUND
        report = tv.verify(client)
        assert (report.ok, list(report.problems)) == (True, [])
    state = reversal_state(database_url)
    assert state["reversals"] == 1
    assert state["rows_back"] == state["allocations"]
    # Everyone is back where they were before the close.
    after = balances_from_journal(database_url)
    assert {k: v for k, v in after.items() if v} == {k: v for k, v in before_close.items() if v}
