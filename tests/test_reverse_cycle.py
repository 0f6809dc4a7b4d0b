"""ReverseCycle through a real server, on SQLite and PostgreSQL (issue 13, item 2).

Proves that a reversal posts, as new entries, the reversal of the fund's cover, of the
uncovered rest and of every allocation flow (each user's reversal naming that user's
allocation, both in the user's ListEntries), and brings the fund, system_loss and every user
back to where they were before the close; that the cycle is then open again (ListOpenCycles,
liquidations recorded and reversed in it) and closes again as version 2, with GetCycle by
version and ListCycles showing both closes; that after a reversal and a second close every
user's balance is the second close's allocation alone, against the Fraction reference, and
VerifyLedger holds (positions and accounts ranking, random cycles); that a repeat returns the
same summary and writes nothing, concurrent reversals make one; that each refusal has its
status, names what is wrong and writes nothing; and that tampering with a reversal's rows
or record behind the server's back is named by VerifyLedger.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
from collections import defaultdict
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, text

from ledger.api.v1 import insurance_pb2 as pb
from ledger.db import closes
from ledger.db import reversals as reversal_rows
from ledger.errors import Unavailable
from tests import cycle_streams as cs
from tests import test_cycle as tc
from tests import test_verify as tv
from tests.alloc_reference import allocate_by_account_reference, allocate_reference
from tests.conftest import Client
from tests.ledger_db import balances_from_journal, cached_balances

JPY = tc.JPY
FAILED = grpc.StatusCode.FAILED_PRECONDITION


def reverse(client: Client, cycle_id: str, reason: str = "wrong positions file") -> pb.CycleSummary:
    summary: pb.CycleSummary = client.admin.ReverseCycle(
        pb.ReverseCycleRequest(cycle_id=cycle_id, currency=JPY, reason=reason), timeout=120
    )
    return summary


def get_version(client: Client, cycle_id: str, version: int) -> pb.CycleSummary:
    summary: pb.CycleSummary = client.query.GetCycle(
        pb.GetCycleRequest(cycle_id=cycle_id, currency=JPY, version=version)
    )
    return summary


def user_balances(database_url: str) -> dict[int, int]:
    """Every JPY user's balance from the raw rows (allocations and their reversals)."""
    return {
        int(name.removeprefix("user:")): balance
        for (currency, name), balance in balances_from_journal(database_url).items()
        if currency == JPY and name.startswith("user:") and balance
    }


def assert_invariants(client: Client, database_url: str) -> None:
    """VerifyLedger passes, the cached balances are the journal's, and every entry of the
    system accounts and of the users sums to zero."""
    report = tv.verify(client)
    assert (report.ok, list(report.problems)) == (True, [])
    journal = balances_from_journal(database_url)
    cached = cached_balances(database_url)
    for key in {k for k in journal if not k[1].startswith("user:")} | set(cached):
        assert cached.get(key, 0) == journal.get(key, 0), key
    for account in tc.SYSTEM_ACCOUNTS:
        for entry in tc.list_entries(client, account):
            assert sum(p.amount for p in entry.postings) == 0, entry


def summary_fields(summary: pb.CycleSummary) -> dict[str, object]:
    """The fields of a close that a reversal leaves as they were."""
    out = tc.fields(summary)
    for name in ("state", "version"):
        out.pop(name, None)
    return out


# --- the worked example --------------------------------------------------------------------

WORKED = [(1, 1001, 500), (2, 1002, 300), (3, 1003, 150), (4, 1004, 50), (5, 1005, -80)]


def test_reversal_gives_everything_back(client: Client, database_url: str) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    tc.liquidate(client, "L1", "c1", -1_000)
    before = balances_from_journal(database_url)
    closed = cs.close(client.channel, "c1", JPY, cs.Positions.of(WORKED))
    assert (closed.state, closed.version) == (pb.CYCLE_STATE_CLOSED, 1)
    assert (closed.fund_paid, closed.allocated_total, closed.uncovered) == (200, 800, 0)
    allocations = {e.position_id: e for e in tc.list_entries(client, "user:1002")}
    assert set(allocations) == {2}

    reversed_ = reverse(client, "c1", "positions file of the wrong day")
    assert (reversed_.state, reversed_.version) == (pb.CYCLE_STATE_REVERSED, 1)
    assert summary_fields(reversed_) == summary_fields(closed)
    assert tc.get_cycle(client, "c1") == reversed_
    assert get_version(client, "c1", 1) == reversed_

    # Everyone is back where they were before the close.
    after = balances_from_journal(database_url)
    assert {k: v for k, v in after.items() if v} == {k: v for k, v in before.items() if v}
    assert tc.fund_balance(client) == 10_000
    assert user_balances(database_url) == {}

    # The cover is reversed by a new entry naming it.
    covers = tc.list_entries(client, "insurance_fund", pb.ENTRY_KIND_INSURANCE_COVER)
    assert len(covers) == 2
    back, cover = covers  # newest first
    assert tc.postings(cover) == {"insurance_fund": -200, "system_loss": 200}
    assert tc.postings(back) == {"insurance_fund": 200, "system_loss": -200}
    assert (back.reverses, back.reference, back.memo) == (
        cover.entry_id,
        "c1",
        "positions file of the wrong day",
    )
    assert back.entry_id > cover.entry_id and cover.reverses == 0

    # Each user sees the allocation and its reversal, which names it.
    for position_id, account_id, pnl in [r for r in WORKED if r[2] >= 150]:
        entries = tc.list_entries(client, f"user:{account_id}")
        assert len(entries) == 2, entries
        undo, allocation = entries
        assert allocation.kind == undo.kind == pb.ENTRY_KIND_ALLOCATION
        amount = -tc.postings(allocation)[f"user:{account_id}"]
        assert amount > 0 and allocation.reverses == 0
        assert tc.postings(undo) == {f"user:{account_id}": amount, "system_loss": -amount}
        assert undo.reverses == allocation.entry_id
        assert (undo.position_id, undo.pnl, undo.reference) == (position_id, pnl, "c1")
        assert undo.memo == "positions file of the wrong day"
        assert undo.entry_id > allocation.entry_id
    kinds = tc.list_entries(client, "user:1001", pb.ENTRY_KIND_ALLOCATION)
    assert len(kinds) == 2
    loss_side = tc.list_entries(client, "system_loss", pb.ENTRY_KIND_ALLOCATION)
    assert len(loss_side) == 6  # three allocations, three reversals
    assert sum(tc.postings(e)["system_loss"] for e in loss_side) == 0

    # The cycle is open again, with its whole loss.
    (open_cycle,) = client.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency=JPY)).cycles
    assert (open_cycle.cycle_id, open_cycle.loss_total, open_cycle.liquidations_count) == (
        "c1",
        1_000,
        1,
    )
    assert_invariants(client, database_url)


def test_a_reversed_cycle_takes_liquidations_and_closes_again(
    client: Client, database_url: str
) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    tc.liquidate(client, "L1", "c1", -1_000)
    tc.liquidate(client, "L2", "c1", -500)
    first = cs.close(client.channel, "c1", JPY, cs.Positions.of(WORKED))
    tc.assert_rejected(lambda: tc.liquidate(client, "L3", "c1", -300), FAILED, "c1")
    reverse(client, "c1")

    tc.liquidate(client, "L3", "c1", -300)  # taken again
    client.admin.ReverseLiquidation(pb.ReverseLiquidationRequest(liquidation_id="L2"))
    loss = 1_000 + 300
    fund = tc.fund_balance(client)
    assert fund == 10_000
    rows = [(1, 1001, 40), (6, 2006, 900), (7, 2007, 600), (8, 1002, 10)]
    second = cs.close(client.channel, "c1", JPY, cs.Positions.of(rows))
    ref = allocate_reference(loss, fund, "0.2", "0.9", rows)
    assert (second.state, second.version) == (pb.CYCLE_STATE_CLOSED, 2)
    assert (second.loss_total, second.fund_paid, second.allocated_total) == (
        loss,
        ref.fund_paid,
        ref.allocated_total,
    )
    assert second.input_digest != first.input_digest

    # Each user's balance is the second close's allocation alone.
    assert user_balances(database_url) == {a: -amount for _, a, _, amount in ref.rows if amount}
    assert tc.fund_balance(client) == fund - ref.fund_paid

    # Both closes can be read, by version and in the list, newest first.
    assert tc.get_cycle(client, "c1") == second == get_version(client, "c1", 2)
    one = get_version(client, "c1", 1)
    assert (one.state, one.version, one.input_digest) == (
        pb.CYCLE_STATE_REVERSED,
        1,
        first.input_digest,
    )
    tc.assert_rejected(lambda: get_version(client, "c1", 3), tc.NOT_FOUND, "version 3")
    listed = client.query.ListCycles(pb.ListCyclesRequest(currency=JPY)).cycles
    assert [(c.version, c.state) for c in listed] == [
        (2, pb.CYCLE_STATE_CLOSED),
        (1, pb.CYCLE_STATE_REVERSED),
    ]
    streamed = cs.stream_allocations(client.query, "c1", JPY).rows
    assert streamed == [r for r in ref.rows if r[3]]
    assert client.query.ListOpenCycles(pb.ListOpenCyclesRequest(currency=JPY)).cycles == []
    tc.assert_rejected(lambda: tc.liquidate(client, "L4", "c1", -300), FAILED, "c1")

    # The second close can be reversed too, and the cycle closed a third time.
    assert reverse(client, "c1").version == 2
    assert user_balances(database_url) == {}
    third = cs.close(client.channel, "c1", JPY, cs.Positions.of(rows))
    assert (third.version, third.allocated_total) == (3, ref.allocated_total)
    assert_invariants(client, database_url)


def test_a_repeat_returns_the_same_summary_and_writes_nothing(
    client: Client, database_url: str
) -> None:
    tc.market(client)
    tc.liquidate(client, "L1", "c1", -1_000)
    cs.close(client.channel, "c1", JPY, cs.Positions.of(WORKED))
    first = reverse(client, "c1", "first")
    before = tv.tables_behind(database_url)
    assert reverse(client, "c1", "first") == first
    assert reverse(client, "c1", "a retry with another reason") == first
    assert tv.tables_behind(database_url) == before


def test_concurrent_reversals_make_one(client: Client, database_url: str) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    tc.liquidate(client, "L1", "c1", -1_000)
    rows = tc.random_positions(random.Random(7), 5_000, tc.mixed)
    cs.close(client.channel, "c1", JPY, rows)
    replies: list[pb.CycleSummary] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            replies.append(reverse(client, "c1"))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({r.SerializeToString() for r in replies}) == 1
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            reversals = conn.execute(text("SELECT count(*) FROM cycle_reversals")).scalar_one()
            rows_back = conn.execute(text("SELECT count(*) FROM allocation_reversals")).scalar_one()
            allocated = conn.execute(text("SELECT count(*) FROM allocations")).scalar_one()
            covers = conn.execute(
                text("SELECT count(*) FROM entries WHERE kind = 5 AND reverses <> 0")
            ).scalar_one()
    finally:
        engine.dispose()
    assert (reversals, rows_back, covers) == (1, allocated, 1)
    assert user_balances(database_url) == {}
    assert_invariants(client, database_url)


# --- rows written over several connections, and rows left behind --------------------------


@pytest.fixture
def rows_in_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL, every reversal writes its rows over several connections in many ranges
    of account ids (db/reversals.write_rows), however small (SQLite has one writer)."""
    monkeypatch.setattr(reversal_rows, "PARALLEL_ROWS_MIN", 1)
    monkeypatch.setattr(reversal_rows, "RUNS", 7)


def closed_cycle(client: Client, rng: random.Random, positions: int) -> pb.CycleSummary:
    """Cycle c1 with a loss of 1,000,000 over a fund of 10,000, closed with random positions."""
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    tc.liquidate(client, "L1", "c1", -1_000_000)
    return cs.close(client.channel, "c1", JPY, tc.random_positions(rng, positions, tc.mixed))


def assert_still_closed(client: Client, database_url: str, closed: pb.CycleSummary) -> None:
    """No reversal counts (whatever rows of one are left): the close is in force, as it was."""
    assert tc.get_cycle(client, "c1") == closed
    assert tc.fund_balance(client) == 10_000 - closed.fund_paid
    assert all(e.reverses == 0 for e in tc.list_entries(client, "system_loss"))
    assert_invariants(client, database_url)


def allocation_and_reversal_rows(database_url: str) -> tuple[int, int, int]:
    """(allocation rows, reversal rows, transactions that wrote the reversal rows: on
    PostgreSQL their distinct xmin, on SQLite 1)."""
    with tv.connect(database_url) as conn:
        allocated = tv.scalar(conn, "SELECT count(*) FROM allocations")
        rows_back = tv.scalar(conn, "SELECT count(*) FROM allocation_reversals")
        writers = 1
        if conn.dialect.name == "postgresql":
            writers = tv.scalar(conn, "SELECT count(DISTINCT xmin::text) FROM allocation_reversals")
    return allocated, rows_back, writers


@pytest.mark.usefixtures("rows_in_parallel")
def test_rows_written_over_several_connections_give_back_the_close(
    client: Client, database_url: str
) -> None:
    """Four concurrent reversals, each writing in ranges over two connections, make one whose
    rows are the close's, every one at its entry id (VerifyLedger checks both); the cycle
    closed again with new input and reversed again does the same."""
    rng = random.Random(17)
    closed_cycle(client, rng, 3_000)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: reverse(client, "c1"), range(4)))
    assert len({r.SerializeToString() for r in replies}) == 1
    assert replies[0].state == pb.CYCLE_STATE_REVERSED
    allocated, rows_back, writers = allocation_and_reversal_rows(database_url)
    assert rows_back == allocated > 1_000
    assert writers == (1 if database_url.startswith("sqlite") else reversal_rows.ROW_WRITERS)
    assert user_balances(database_url) == {}
    assert_invariants(client, database_url)

    cs.close(client.channel, "c1", JPY, tc.random_positions(rng, 2_000, tc.heavy))
    assert reverse(client, "c1").version == 2
    allocated, rows_back, _ = allocation_and_reversal_rows(database_url)
    assert rows_back == allocated
    assert user_balances(database_url) == {}
    assert tc.fund_balance(client) == 10_000
    assert_invariants(client, database_url)


@pytest.mark.usefixtures("rows_in_parallel")
def test_rows_left_behind_by_an_attempt_that_died_are_replaced(
    client: Client, database_url: str
) -> None:
    """An attempt that committed some of its rows and died before its record (PostgreSQL's
    other connections commit their ranges first) leaves rows that nothing counts; the next
    reversal removes them and writes its own, each at its own entry id."""
    closed = closed_cycle(client, random.Random(23), 2_000)
    stale = 10**12  # entry ids no reversal of this ledger has
    with tv.connect(database_url) as conn:
        tv.execute(
            conn,
            "INSERT INTO allocation_reversals"
            " (cycle_pk, account_id, position_id, pnl, amount, entry_id)"
            " SELECT cycle_pk, account_id, position_id, pnl, amount, entry_id + :stale"
            " FROM allocations WHERE account_id % 2 = 0",
            stale=stale,
        )
    assert_still_closed(client, database_url, closed)  # nothing counts them yet

    assert reverse(client, "c1").state == pb.CYCLE_STATE_REVERSED
    allocated, rows_back, _ = allocation_and_reversal_rows(database_url)
    assert rows_back == allocated
    with tv.connect(database_url) as conn:
        assert tv.scalar(conn, "SELECT max(entry_id) FROM allocation_reversals") < stale
    assert user_balances(database_url) == {}
    assert_invariants(client, database_url)


@pytest.mark.usefixtures("rows_in_parallel")
def test_a_reversal_that_fails_after_its_rows_is_replaced_by_the_next(
    client: Client, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The currency's rows cannot be had (a lock timeout) once the rows are written: the
    reversal fails UNAVAILABLE; on PostgreSQL the other connection's committed ranges stay
    behind, counted by nothing; the next reversal replaces them."""
    closed = closed_cycle(client, random.Random(29), 2_000)

    def locked(*_: object) -> object:
        raise Unavailable("the currency's accounts are locked (injected)")

    lock = closes.lock
    monkeypatch.setattr(closes, "lock", locked)
    tc.assert_rejected(lambda: reverse(client, "c1"), grpc.StatusCode.UNAVAILABLE, "injected")
    monkeypatch.setattr(closes, "lock", lock)  # (undo() would end rows_in_parallel too)
    allocated, rows_back, _ = allocation_and_reversal_rows(database_url)
    if database_url.startswith("sqlite"):
        assert rows_back == 0  # one transaction, rolled back
    else:
        assert 0 < rows_back < allocated
    assert_still_closed(client, database_url, closed)

    assert reverse(client, "c1").state == pb.CYCLE_STATE_REVERSED
    assert allocation_and_reversal_rows(database_url)[:2] == (allocated, allocated)
    assert tc.fund_balance(client) == 10_000
    assert_invariants(client, database_url)


@pytest.mark.usefixtures("rows_in_parallel")
def test_a_share_that_fails_rolls_back_the_other_connections(
    client: Client, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reversal's own share of the rows fails: the other connection rolls its ranges
    back instead of committing them, and nothing is left behind."""
    closed = closed_cycle(client, random.Random(29), 2_000)
    copy_rows = reversal_rows.copy_rows

    def failing_on_the_reversal_s_own_connection(*args: Any, **kwargs: Any) -> None:
        if not threading.current_thread().name.startswith("reversal-rows"):
            raise Unavailable("the reversal's statement was cut off (injected)")
        copy_rows(*args, **kwargs)

    monkeypatch.setattr(reversal_rows, "copy_rows", failing_on_the_reversal_s_own_connection)
    tc.assert_rejected(lambda: reverse(client, "c1"), grpc.StatusCode.UNAVAILABLE, "injected")
    monkeypatch.setattr(reversal_rows, "copy_rows", copy_rows)
    assert allocation_and_reversal_rows(database_url)[1] == 0
    assert_still_closed(client, database_url, closed)
    assert reverse(client, "c1").state == pb.CYCLE_STATE_REVERSED
    assert_invariants(client, database_url)


# --- refusals ------------------------------------------------------------------------------


def test_refusals_name_what_is_wrong_and_write_nothing(client: Client, database_url: str) -> None:
    tc.market(client)
    tc.liquidate(client, "L1", "c1", -100)
    tc.liquidate(client, "L2", "open", -100)
    cs.close(client.channel, "c1", JPY, cs.Positions.of([(7, 1, 500)]))
    cases = [
        ("c1", "usd", "", tc.INVALID, ["currency", "usd"]),
        ("", JPY, "", tc.INVALID, ["cycle_id"]),
        ("c" * 129, JPY, "", tc.INVALID, ["cycle_id"]),
        ("c1", JPY, "x" * 1025, tc.INVALID, ["reason"]),
        ("c1", "EUR", "", tc.NOT_FOUND, ["EUR"]),
        ("never", JPY, "", tc.NOT_FOUND, ["never", "not been closed"]),
        ("open", JPY, "", FAILED, ["open", "no close"]),
    ]
    before = tv.tables_behind(database_url)
    for cycle_id, currency, reason, code, words in cases:
        error = tc.assert_rejected(
            lambda c=cycle_id, cur=currency, r=reason: client.admin.ReverseCycle(
                pb.ReverseCycleRequest(cycle_id=c, currency=cur, reason=r)
            ),
            code,
            *words,
        )
        assert error.details(), (cycle_id, currency)
    assert tv.tables_behind(database_url) == before
    assert tc.get_cycle(client, "c1").state == pb.CYCLE_STATE_CLOSED


# --- random cycles against the reference ---------------------------------------------------


@pytest.mark.parametrize("by_account", [False, True], ids=["positions", "accounts"])
def test_random_reversed_and_closed_again(
    client: Client, database_url: str, by_account: bool
) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 30_000)
    if by_account:
        client.admin.SetPolicy(
            pb.SetPolicyRequest(
                currency=JPY, insurance_share="0.2", coverage_ratio="0.9", ranking=2
            )
        )
    reference_of = allocate_by_account_reference if by_account else allocate_reference
    rng = random.Random(1300 + by_account)
    expected: defaultdict[int, int] = defaultdict(int)
    for number in range(3):
        cycle_id = f"c{number}"
        tc.liquidate(client, f"L{number}", cycle_id, -rng.choice([2_000, 50_000, 10**6]))
        for attempt in range(rng.randint(1, 3)):
            rows = [
                (rng.getrandbits(64), rng.randint(1, 30), rng.randint(-500, 2_000))
                for _ in range(rng.randint(20, 400))
            ]
            rows = list({r[0]: r for r in rows}.values())
            fund = tc.fund_balance(client)
            summary = cs.close(client.channel, cycle_id, JPY, cs.Positions.of(rows).shuffled(5))
            ref = reference_of(summary.loss_total, fund, "0.2", "0.9", rows)
            assert summary.version == attempt + 1
            assert (summary.fund_paid, summary.allocated_total, summary.uncovered) == (
                ref.fund_paid,
                ref.allocated_total,
                ref.uncovered,
            )
            last = attempt + 1 == 3 or rng.random() < 0.4
            if last:
                for _, account_id, _, amount in ref.rows:
                    expected[account_id] -= amount
                break
            assert reverse(client, cycle_id, f"attempt {attempt}").state == 3
            assert tc.fund_balance(client) == fund
        assert user_balances(database_url) == {a: b for a, b in expected.items() if b}
    assert_invariants(client, database_url)


# --- tampering with a reversal -------------------------------------------------------------


def reversed_ledger(client: Client) -> None:
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    tc.liquidate(client, "L1", "c1", -1_000)
    cs.close(client.channel, "c1", JPY, tc.random_positions(random.Random(3), 500, tc.mixed))
    reverse(client, "c1", "wrong file")
    cs.close(client.channel, "c1", JPY, cs.Positions.of(WORKED))


def reversal_row(database_url: str) -> tuple[int, int, int]:
    with tv.connect(database_url) as conn:
        row = conn.execute(
            text(
                "SELECT cycle_pk, account_id, position_id FROM allocation_reversals"
                " WHERE amount > 1 ORDER BY position_id LIMIT 1"
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


TAMPERINGS = {
    "a reversal row's amount changed": (
        "UPDATE allocation_reversals SET amount = amount - 1"
        " WHERE cycle_pk = :pk AND account_id = :a AND position_id = :p",
        ["do not give back", "account system_loss"],
    ),
    "a reversal row removed": (
        "DELETE FROM allocation_reversals"
        " WHERE cycle_pk = :pk AND account_id = :a AND position_id = :p",
        ["do not give back", "account system_loss"],
    ),
    "a reversal's reason changed": (
        "UPDATE cycle_reversals SET reason = 'forged' WHERE cycle_pk = :pk",
        ["the reversal of cycle 'c1'", "hash"],
    ),
    "a reversal's record removed": (
        "DELETE FROM cycle_reversals WHERE cycle_pk = :pk",
        ["missing", "not reversed"],
    ),
    "a close's count of rows changed": (
        "UPDATE cycles SET allocation_count = allocation_count + 1 WHERE id = :pk",
        ["its close wrote"],
    ),
    "a reversal entry's amount changed": (
        "UPDATE entries SET amount = amount + 1 WHERE kind = 5 AND reverses <> 0",
        ["does not reverse", "hash"],
    ),
}


@pytest.mark.parametrize("what", list(TAMPERINGS), ids=lambda w: w.replace(" ", "-"))
def test_tampering_with_a_reversal_is_named(client: Client, database_url: str, what: str) -> None:
    reversed_ledger(client)
    assert_invariants(client, database_url)
    pk, account_id, position_id = reversal_row(database_url)
    sql, words = TAMPERINGS[what]
    with tv.connect(database_url) as conn:
        tv.execute(conn, sql, pk=pk, a=account_id, p=position_id)
    report = tv.verify(client, JPY)
    assert not report.ok
    for word in words:
        assert any(word in p for p in report.problems), (word, list(report.problems))


def test_the_readme_example(client: Client, database_url: str) -> None:
    """The README's example, worked by hand there: the second close's numbers, and each
    user's balance that close's alone."""
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    tc.liquidate(client, "L1", "c1", -1_000)
    cs.close(client.channel, "c1", JPY, cs.Positions.of(WORKED))
    assert user_balances(database_url) == {1001: -421, 1002: -253, 1003: -126}
    reverse(client, "c1")
    assert tc.fund_balance(client) == 10_000 and user_balances(database_url) == {}
    tc.liquidate(client, "L2", "c1", -300)
    second = cs.close(
        client.channel, "c1", JPY, cs.Positions.of([(6, 2006, 900), (7, 2007, 600), (1, 1001, 40)])
    )
    assert (second.loss_total, second.fund_paid, second.user_due, second.cutoff_pnl) == (
        1_300,
        260,
        1_040,
        600,
    )
    assert user_balances(database_url) == {2006: -624, 2007: -416}
    assert tc.fund_balance(client) == 10_000 - 260


def test_a_close_that_moved_nothing_is_reversed_too(client: Client, database_url: str) -> None:
    """A close of a cycle without loss (no cover, no allocation): its reversal posts no entry
    but is still a link of the chain, and the cycle closes again as version 2."""
    tc.market(client)
    tc.liquidate(client, "P1", "c1", 500)  # a profit: the fund's, no loss in the cycle
    first = cs.close(client.channel, "c1", JPY, cs.Positions.of(WORKED))
    assert (first.loss_total, first.allocated_total) == (0, 0)
    entries_before = len(tc.list_entries(client, "insurance_fund"))
    reversed_ = reverse(client, "c1")
    assert (reversed_.state, reversed_.version) == (pb.CYCLE_STATE_REVERSED, 1)
    assert len(tc.list_entries(client, "insurance_fund")) == entries_before
    assert cs.close(client.channel, "c1", JPY, cs.Positions.of([])).version == 2
    assert_invariants(client, database_url)


def test_a_version_beyond_any_close_is_not_found(client: Client) -> None:
    """Up to the uint32's largest (beyond the column's range on PostgreSQL: found by the
    fuzz test)."""
    tc.market(client)
    tc.liquidate(client, "L1", "c1", -100)
    cs.close(client.channel, "c1", JPY, cs.Positions.of(WORKED))
    for version in (2, 2**31 - 1, 2**31, 2**32 - 1):
        tc.assert_rejected(
            lambda v=version: get_version(client, "c1", v), tc.NOT_FOUND, f"version {version}"
        )
    assert get_version(client, "c1", 1).version == 1


def test_a_close_from_before_the_count_was_kept_is_reversed(
    client: Client, database_url: str
) -> None:
    """Closes made before migration 0006 have no allocation_count: the reversal counts their
    rows."""
    tc.market(client)
    tc.deposit(client, "d1", 10_000)
    tc.liquidate(client, "L1", "c1", -1_000)
    cs.close(client.channel, "c1", JPY, cs.Positions.of(WORKED))
    with tv.connect(database_url) as conn:
        tv.execute(conn, "UPDATE cycles SET allocation_count = NULL")
    assert reverse(client, "c1").state == pb.CYCLE_STATE_REVERSED
    assert user_balances(database_url) == {}
    with tv.connect(database_url) as conn:
        assert tv.scalar(conn, "SELECT count(*) FROM allocation_reversals") == 3
    assert_invariants(client, database_url)
