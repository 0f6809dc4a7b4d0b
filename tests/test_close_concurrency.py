"""A cycle close never stalls liquidations, and what they race with stays consistent.

Proves, on SQLite and PostgreSQL, that liquidations posted while a large cycle closes, in the
same currency (its next cycle) and in another one, all complete while the close writes its
rows, and that the ledger's invariants hold afterwards: the close's summary and allocations
are those of the independent reference over the fund it started from, the closed cycle's
system loss nets to zero, every cached balance equals its postings. A liquidation of the
closing cycle itself either counts in its loss or is refused as closed, never half.

And, on SQLite, where the close writes its rows in steps and lets waiting writers in between
(so some of its rows are committed before the cycle is), that a SIGKILL in the middle of
that leaves no counted half: after a restart the cycle is not closed, no allocation row is
left, every balance equals its postings, and closing it again gives the reference's result.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from fractions import Fraction
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ledger.api.v1 import insurance_pb2 as pb
from tests import cycle_streams as cs
from tests.alloc_reference import allocate_reference
from tests.conftest import Client
from tests.cycle_streams import Positions
from tests.ledger_db import balances_from_journal, cached_balances
from tests.test_cycle import JPY, KRW, deposit, fields, get_cycle, market
from tests.test_cycle_crash import ledger_process

POSITIONS = 400_000
FUND = 10**12  # far above the fund's share, so the close pays its share whatever flows in
LOSS = 3 * POSITIONS


def positions(count: int = POSITIONS) -> Positions:
    ids = np.arange(1, count + 1, dtype=np.uint64)
    pnl = (np.random.default_rng(5).integers(1, 2_000, size=count)).astype(np.int64)
    pnl[ids % np.uint64(7) == 0] *= -1
    return Positions(ids, ids % np.uint64(10_007), pnl)


def request(lid: str, cycle_id: str, symbol: str, result: int) -> pb.RecordLiquidationRequest:
    """A liquidation whose engine result is `result` (scale 0, multiplier 1)."""
    return pb.RecordLiquidationRequest(
        liquidation_id=lid,
        cycle_id=cycle_id,
        symbol=symbol,
        account_id=1,
        position_id=1,
        side=pb.SIDE_LONG,
        quantity=str(abs(result)),
        takeover_price="2",
        close_price="1" if result < 0 else "3",
    )


class Poster:
    """Liquidations from a thread, one after the other, until stopped; records each outcome
    and its latency."""

    def __init__(self, client: Client, name: str, cycle_id: str, symbol: str) -> None:
        self.ok: dict[str, int] = {}  # liquidation_id → engine result
        self.refused: dict[str, grpc.StatusCode] = {}
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(client, name, cycle_id, symbol), daemon=True
        )

    def _run(self, client: Client, name: str, cycle_id: str, symbol: str) -> None:
        n = 0
        while not self._stop.is_set():
            lid, result = f"{name}-{n}", (-1 - n % 5 if n % 3 else 2 + n % 7)
            started = time.perf_counter()
            try:
                client.clearing.RecordLiquidation(
                    request(lid, cycle_id, symbol, result), timeout=60
                )
                self.ok[lid] = result
            except grpc.RpcError as error:
                self.refused[lid] = error.code()
            self.latencies.append(time.perf_counter() - started)
            n += 1

    def start(self) -> Poster:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def journal_sums(database_url: str, currency: str, cycle_id: str) -> int:
    """The cycle's recorded system loss, by SQL: the positive sum of its losses."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            total = conn.execute(
                text(
                    "SELECT coalesce(sum(engine_result), 0) FROM liquidations "
                    "WHERE currency = :c AND cycle_id = :k AND outcome = 2"
                ),
                {"c": currency, "k": cycle_id},
            ).scalar_one()
    finally:
        engine.dispose()
    return -int(total)


def liquidation_ids(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text("SELECT liquidation_id FROM liquidations")).scalars())
    finally:
        engine.dispose()


def assert_balanced(database_url: str) -> None:
    journal = balances_from_journal(database_url)
    cached = cached_balances(database_url)
    for key in {k for k in journal if not k[1].startswith("user:")} | set(cached):
        assert cached.get(key, 0) == journal.get(key, 0), key
    assert all(b >= 0 for (_, name), b in cached.items() if name == "insurance_fund")


@pytest.mark.slow
def test_liquidations_during_a_close_all_complete(client: Client, database_url: str) -> None:
    market(client)
    deposit(client, "d1", FUND)
    deposit(client, "d2", FUND, KRW)
    client.clearing.RecordLiquidation(request("loss-c1", "c1", "XJPY", -LOSS))
    cycle = positions()
    posters = [
        Poster(client, "next", "c2", "XJPY").start(),  # the same currency, its next cycle
        Poster(client, "krw", "c1", "XKRW").start(),  # another currency
        Poster(client, "late", "c1", "XJPY").start(),  # the closing cycle itself
    ]
    time.sleep(0.3)
    try:
        summary = cs.close(client.channel, "c1", JPY, cycle, timeout=300)
        time.sleep(0.3)  # liquidations after the close too
    finally:
        for poster in posters:
            poster.stop()
    next_cycle, other, late = posters
    assert not next_cycle.refused and not other.refused, (next_cycle.refused, other.refused)
    assert len(next_cycle.ok) > 10 and len(other.ok) > 10
    # Each liquidation of the closing cycle counts in its loss or was refused as closed.
    assert set(late.refused.values()) <= {grpc.StatusCode.FAILED_PRECONDITION}
    assert late.refused, "no liquidation of c1 arrived after its close"
    loss = LOSS + sum(-r for r in late.ok.values() if r < 0)
    assert summary.loss_total == loss == journal_sums(database_url, JPY, "c1")

    # The summary is the reference's over the fund the close started from.
    assert summary.fund_balance_before >= FUND
    ref = allocate_reference(loss, summary.fund_balance_before, "0.2", "0.9", cycle.rows())
    got = fields(summary)
    for name in ("fund_share", "fund_paid", "user_due", "allocated_total", "uncovered"):
        assert got[name] == getattr(ref, name), name
    assert got["participant_count"] == ref.participant_count
    assert get_cycle(client, "c1") == summary
    allocated = cs.stream_allocations(client.query, "c1", JPY).rows
    assert allocated == [row for row in ref.rows if row[3]]

    journal = balances_from_journal(database_url)
    next_loss = sum(-r for r in next_cycle.ok.values() if r < 0)
    assert journal[(JPY, "system_loss")] == -next_loss  # c1 nets to zero; c2 is open
    assert journal[(KRW, "system_loss")] == -sum(-r for r in other.ok.values() if r < 0)
    assert_balanced(database_url)


def attempts_committed(path: str) -> int:
    lite = sqlite3.connect(path, timeout=60)
    try:
        return int(lite.execute("SELECT count(*) FROM close_attempts").fetchone()[0])
    finally:
        lite.close()


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigkill_between_steps_leaves_no_counted_half(database_url: str, tmp_path: Path) -> None:
    path = str(make_url(database_url).database)
    cycle = positions(2_000_000)
    loss = 3 * len(cycle)
    with ledger_process(database_url, tmp_path) as (client, process):
        market(client)
        deposit(client, "d1", FUND)
        client.clearing.RecordLiquidation(request("loss-c1", "c1", "XJPY", -loss))
        poster = Poster(client, "next", "c2", "XJPY").start()  # writers the close lets in
        outcome: list[object] = []

        def close() -> None:
            try:
                outcome.append(cs.close(client.channel, "c1", JPY, cycle, timeout=300))
            except grpc.RpcError as error:
                outcome.append(error)

        closing = threading.Thread(target=close)
        closing.start()
        deadline = time.monotonic() + 120
        while attempts_committed(path) == 0:  # some of its rows are committed now
            assert not outcome, f"the close ended before it let a writer in: {outcome}"
            assert time.monotonic() < deadline, "the close never let a writer in"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        closing.join(60)
        poster.stop()
        assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError)

    with ledger_process(database_url, tmp_path) as (client, _):
        with pytest.raises(grpc.RpcError) as error:
            get_cycle(client, "c1")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        lite = sqlite3.connect(path)
        try:
            left = lite.execute("SELECT count(*) FROM allocations").fetchone()[0]
            attempts = lite.execute("SELECT count(*) FROM close_attempts").fetchone()[0]
        finally:
            lite.close()
        assert (left, attempts) == (0, 0), "the killed close's rows were not removed at start"
        assert_balanced(database_url)
        assert not list(Path(path).parent.glob("*.close-*.lock")), "a lease file was left"

        summary = cs.close(client.channel, "c1", JPY, cycle.shuffled(3), timeout=300)
        share = int(Fraction(loss, 5) + Fraction(1, 2))
        assert (summary.loss_total, summary.fund_paid) == (loss, share)
        assert summary.allocated_total == loss - share
    c2_loss = journal_sums(database_url, JPY, "c2")  # acknowledged or not, wholly there
    assert set(poster.ok) <= liquidation_ids(database_url)
    assert balances_from_journal(database_url)[(JPY, "system_loss")] == -c2_loss
    assert_balanced(database_url)
    assert os.path.exists(path)
