"""VerifyLedger through a real server, on SQLite and PostgreSQL (issue item 4).

Proves that a clean ledger (deposits, withdrawals, liquidation profits and losses by unary
calls and RecordLiquidations batches in two currencies, a closed cycle of a few thousand
positions in each) verifies: ok, no problem, and entries_checked equal to the entries rows
plus the allocation rows, counted here with plain SQL, per currency and for all; that an
unknown currency is NOT_FOUND and a malformed one INVALID_ARGUMENT; that every tampering
done with raw SQL behind the server's back (a changed, deleted or inserted entry, a forged
cached balance or total, a changed, deleted or inserted allocation row, an allocation above
its pnl, a changed cycle summary, a liquidation whose entry is gone, a withdrawal taking the
fund below zero) makes the report not ok with a problem naming the row and what is wrong,
while the other currency still verifies; that a liquidation row left naming no entry, or
whose result no longer matches its entry's flow, is named too; that each broken row is named
once; and that VerifyLedger writes nothing.

The expected problems are derived from the rows as read here with SQL (ids, chain links,
pnl), never from the server's code.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from sqlalchemy import Connection, create_engine, text

from ledger.api.v1 import insurance_pb2 as pb
from tests import cycle_streams as cs
from tests.conftest import Client
from tests.ledger_db import snapshot
from tests.test_cycle import JPY, KRW, market, mixed, random_positions

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
U64 = 2**64
JPY_POSITIONS = 3000
KRW_POSITIONS = 300

# --- the ledger ------------------------------------------------------------------------------


def fund_transfer(
    client: Client, tid: str, amount: int, currency: str, memo: str = "", withdraw: bool = False
) -> None:
    direction = pb.TRANSFER_DIRECTION_WITHDRAW if withdraw else pb.TRANSFER_DIRECTION_DEPOSIT
    client.admin.TransferFund(
        pb.TransferFundRequest(
            transfer_id=tid, currency=currency, direction=direction, amount=amount, memo=memo
        )
    )


def liquidation(lid: str, cycle_id: str, result: int, symbol: str) -> pb.RecordLiquidationRequest:
    """A LONG of |result| taken over at 2 and closed at 1 (a loss of |result|) or at 3 (a
    profit of |result|), no margin left."""
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
        remaining_margin=0,
    )


def record(client: Client, symbol: str, cycle_id: str, results: dict[str, int]) -> None:
    """One RecordLiquidations batch; every item must go through with its engine result."""
    reply = client.clearing.RecordLiquidations(
        pb.RecordLiquidationsRequest(
            liquidations=[liquidation(lid, cycle_id, r, symbol) for lid, r in results.items()]
        ),
        timeout=60,
    )
    assert [(o.code, o.result.engine_result) for o in reply.outcomes] == [
        (0, r) for r in results.values()
    ], reply


def build(client: Client) -> None:
    """The ledger every test starts from. JPY: deposits, a unary profit, a batch of losses
    and a profit, a withdrawal, the close of c1 (3,000 positions, the fund pays its share),
    then a batch in the open cycle c2 and a last withdrawal. KRW: the same kinds of flows and
    a close of k1 whose loss is beyond what its users can cover (an uncovered rest)."""
    market(client)
    fund_transfer(client, "d1", 5_000_000, JPY, memo="seed")
    fund_transfer(client, "k-d1", 100_000, KRW)
    client.clearing.RecordLiquidation(liquidation("P1", "c1", 777, "XJPY"))
    record(client, "XJPY", "c1", {"L1": -400_000, "L2": -300_000, "L3": -200_000, "P2": 1_500})
    record(client, "XKRW", "k1", {"K1": -50_000, "K2": -80_000, "KP1": 3_000})
    fund_transfer(client, "d2", 20_000, JPY, memo="top-up")
    fund_transfer(client, "w1", 3_000, JPY, memo="payout", withdraw=True)
    fund_transfer(client, "k-w1", 10_000, KRW, withdraw=True)
    rng = random.Random("verify")
    jpy = cs.close(client.channel, "c1", JPY, random_positions(rng, JPY_POSITIONS, mixed))
    krw = cs.close(
        client.channel, "k1", KRW, random_positions(rng, KRW_POSITIONS, lambda r: r.randint(-9, 9))
    )
    assert jpy.fund_paid > 0 and jpy.allocated_total > 0 and jpy.uncovered == 0, jpy
    assert krw.fund_paid > 0 and krw.allocated_total > 0 and krw.uncovered > 0, krw
    record(client, "XJPY", "c2", {"L4": -5_000, "P3": 2_000})
    fund_transfer(client, "k-d2", 500, KRW)
    fund_transfer(client, "w2", 1_000, JPY, withdraw=True)


def verify(client: Client, currency: str = "") -> pb.VerifyReport:
    report: pb.VerifyReport = client.query.VerifyLedger(
        pb.VerifyLedgerRequest(currency=currency), timeout=60
    )
    return report


@contextmanager
def connect(database_url: str) -> Iterator[Connection]:
    """One transaction of raw SQL behind the server's back, committed at the end."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def rows_checked(database_url: str, currency: str | None = None) -> int:
    """Entries rows + allocation rows (of the currency, or all), counted with plain SQL."""
    where = "" if currency is None else " WHERE currency = :c"
    join = "" if currency is None else " AND c.currency = :c"
    with connect(database_url) as conn:
        entries = conn.execute(text(f"SELECT count(*) FROM entries{where}"), {"c": currency})
        allocations = conn.execute(
            text(f"SELECT count(*) FROM allocations a JOIN cycles c ON c.id = a.cycle_pk{join}"),
            {"c": currency},
        )
        return int(entries.scalar_one()) + int(allocations.scalar_one())


def mentions(problem: str, word: str) -> bool:
    """`word` is in the problem, not as the start of a longer number ("entry 12" ≠ "entry 123")."""
    return re.search(re.escape(word) + r"(?![0-9])", problem) is not None


def naming(problems: Sequence[str], *words: str) -> list[str]:
    return [p for p in problems if all(mentions(p, w) for w in words)]


def assert_reported(report: pb.VerifyReport, expected: Sequence[tuple[str, ...]]) -> None:
    assert not report.ok
    problems = list(report.problems)
    for words in expected:
        assert naming(problems, *words), f"no problem names {words}: {problems}"


# --- SQL looks at the rows -------------------------------------------------------------------


def scalar(conn: Connection, sql: str, **params: Any) -> Any:
    return conn.execute(text(sql), params).scalar_one()


def execute(conn: Connection, sql: str, **params: Any) -> None:
    result = conn.execute(text(sql), params)
    assert result.rowcount >= 1, f"{sql} {params} changed no row"


def entry(conn: Connection, reference: str, currency: str = JPY) -> tuple[int, int]:
    """(id, chain_seq) of the one entry with this reference."""
    row = conn.execute(
        text("SELECT id, chain_seq FROM entries WHERE currency = :c AND reference = :r"),
        {"c": currency, "r": reference},
    ).one()
    return int(row[0]), int(row[1])


def link_name(conn: Connection, seq: int, currency: str = JPY) -> str:
    """How a report names the link at `seq`: "entry <id>" or "cycle '<id>'"."""
    found = conn.execute(
        text("SELECT id FROM entries WHERE currency = :c AND chain_seq = :s"),
        {"c": currency, "s": seq},
    ).all()
    if found:
        return f"entry {found[0][0]}"
    cycle_id = scalar(
        conn,
        "SELECT cycle_id FROM cycles WHERE currency = :c AND chain_seq = :s",
        c=currency,
        s=seq,
    )
    return f"cycle {cycle_id!r}"


def new_entry_id(conn: Connection) -> int:
    """An id used by no entry and no allocation row."""
    entries = scalar(conn, "SELECT max(id) FROM entries")
    allocations = scalar(conn, "SELECT max(entry_id) FROM allocations")
    return max(int(entries), int(allocations)) + 1000


def cycle_pk(conn: Connection, cycle_id: str = "c1", currency: str = JPY) -> int:
    return int(
        scalar(
            conn,
            "SELECT id FROM cycles WHERE currency = :c AND cycle_id = :i",
            c=currency,
            i=cycle_id,
        )
    )


def an_allocation(conn: Connection, condition: str = "1 = 1") -> tuple[int, int, int, int]:
    """(stored position_id, account_id, pnl, amount) of one allocation row of JPY's c1."""
    row = conn.execute(
        text(
            "SELECT position_id, account_id, pnl, amount FROM allocations"
            f" WHERE cycle_pk = :pk AND {condition} ORDER BY position_id LIMIT 1"
        ),
        {"pk": cycle_pk(conn)},
    ).one()
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def set_allocation(conn: Connection, position_id: int, account_id: int, amount: int) -> None:
    execute(
        conn,
        "UPDATE allocations SET amount = :a WHERE cycle_pk = :pk AND position_id = :p"
        " AND account_id = :acc",
        a=amount,
        pk=cycle_pk(conn),
        p=position_id,
        acc=account_id,
    )


def account(conn: Connection, name: str, column: str, currency: str = JPY) -> int:
    return int(
        scalar(
            conn,
            f"SELECT {column} FROM accounts WHERE currency = :c AND name = :n",
            c=currency,
            n=name,
        )
    )


# --- the tamperings --------------------------------------------------------------------------
#
# Each changes the ledger with raw SQL and returns the problems the report must hold: each a
# tuple of words that one problem must all contain (the row's name among them).

Expected = list[tuple[str, ...]]
CACHED_FUND = ("account insurance_fund", "cached balance")


def change_amount(conn: Connection) -> Expected:
    entry_id, _ = entry(conn, "d2")
    execute(conn, "UPDATE entries SET amount = amount + 1 WHERE id = :i", i=entry_id)
    return [(f"entry {entry_id}", "hash"), CACHED_FUND]


def change_reference(conn: Connection) -> Expected:
    entry_id, _ = entry(conn, "d2")
    execute(conn, "UPDATE entries SET reference = 'd2-forged' WHERE id = :i", i=entry_id)
    return [(f"entry {entry_id}", "hash")]


def change_memo(conn: Connection) -> Expected:
    entry_id, _ = entry(conn, "d2")
    execute(conn, "UPDATE entries SET memo = 'top-up!' WHERE id = :i", i=entry_id)
    return [(f"entry {entry_id}", "hash")]


def change_created_at(conn: Connection) -> Expected:
    entry_id, _ = entry(conn, "w1")
    execute(conn, "UPDATE entries SET created_at_us = created_at_us - 1 WHERE id = :i", i=entry_id)
    return [(f"entry {entry_id}", "hash")]


def swap_accounts(conn: Connection) -> Expected:
    entry_id, _ = entry(conn, "w1")
    execute(
        conn,
        "UPDATE entries SET debit_account = credit_account, credit_account = debit_account"
        " WHERE id = :i",
        i=entry_id,
    )
    return [(f"entry {entry_id}", "hash"), CACHED_FUND]


def delete_middle(conn: Connection) -> Expected:
    entry_id, seq = entry(conn, "w1")
    before, after = link_name(conn, seq - 1), link_name(conn, seq + 1)
    execute(conn, "DELETE FROM transfers WHERE transfer_id = 'w1'")
    execute(conn, "DELETE FROM entries WHERE id = :i", i=entry_id)
    return [
        ("missing", before, after, f"links {seq} to {seq}"),
        (after, "hash"),  # its link was made over the removed one's hash
        CACHED_FUND,
    ]


def delete_last(conn: Connection) -> Expected:
    entry_id, seq = entry(conn, "w2")
    assert seq == scalar(conn, "SELECT seq FROM chain_heads WHERE currency = :c", c=JPY)
    before = link_name(conn, seq - 1)
    execute(conn, "DELETE FROM transfers WHERE transfer_id = 'w2'")
    execute(conn, "DELETE FROM entries WHERE id = :i", i=entry_id)
    return [("head", before, f"link {seq - 1}", f"link {seq}"), CACHED_FUND]


_ENTRY_COLUMNS = (
    "currency, kind, reference, debit_account, credit_account, amount, memo, created_at_us"
)


def insert_unlinked(conn: Connection) -> Expected:
    new = new_entry_id(conn)
    execute(
        conn,
        f"INSERT INTO entries (id, {_ENTRY_COLUMNS}) SELECT :n, currency, kind, 'forged',"
        " debit_account, credit_account, 1234, memo, created_at_us FROM entries WHERE id = :i",
        n=new,
        i=entry(conn, "d2")[0],
    )
    return [(f"entry {new}", "not in the chain"), CACHED_FUND]


def insert_copied_link(conn: Connection) -> Expected:
    new = new_entry_id(conn)
    entry_id, seq = entry(conn, "d2")
    execute(
        conn,
        f"INSERT INTO entries (id, {_ENTRY_COLUMNS}, chain_seq, hash) SELECT :n, {_ENTRY_COLUMNS},"
        " chain_seq, hash FROM entries WHERE id = :i",
        n=new,
        i=entry_id,
    )
    return [(f"entry {new}", "repeats", f"link {seq}"), CACHED_FUND]


def change_cached_balance(conn: Connection) -> Expected:
    forged = account(conn, "insurance_fund", "balance") + 1
    execute(
        conn,
        "UPDATE accounts SET balance = :b WHERE currency = :c AND name = 'insurance_fund'",
        b=forged,
        c=JPY,
    )
    return [(*CACHED_FUND, f"cached balance {forged}")]


def change_credit_total(conn: Connection) -> Expected:
    forged = account(conn, "liquidation_engine", "credit_total") + 1
    execute(
        conn,
        "UPDATE accounts SET credit_total = :t WHERE currency = :c AND name = 'liquidation_engine'",
        t=forged,
        c=JPY,
    )
    return [("account liquidation_engine", "cached balance", f"credits {forged}")]


C1 = "cycle 'c1'"
C1_DIGEST = (C1, "digest")
C1_SUM = (C1, "sum to")
CACHED_LOSS = ("account system_loss", "cached balance")


def change_allocation(conn: Connection) -> Expected:
    position, account_id, _, amount = an_allocation(conn, "amount > 1")
    set_allocation(conn, position, account_id, amount - 1)
    return [C1_DIGEST, C1_SUM, CACHED_LOSS]


def delete_allocation(conn: Connection) -> Expected:
    position, account_id, _, _ = an_allocation(conn)
    execute(
        conn,
        "DELETE FROM allocations WHERE cycle_pk = :pk AND position_id = :p AND account_id = :a",
        pk=cycle_pk(conn),
        p=position,
        a=account_id,
    )
    return [C1_DIGEST, C1_SUM, CACHED_LOSS]


def insert_allocation(conn: Connection) -> Expected:
    """A row for a new position, 2**64 − 1 (last in position order), with the next entry id
    of the cycle's block: it looks like the others but for the digest and the total."""
    pk = cycle_pk(conn)
    assert scalar(conn, "SELECT count(*) FROM allocations WHERE position_id = -1") == 0
    next_id = scalar(conn, "SELECT max(entry_id) + 1 FROM allocations WHERE cycle_pk = :pk", pk=pk)
    execute(
        conn,
        "INSERT INTO allocations (cycle_pk, account_id, position_id, pnl, amount, entry_id)"
        " VALUES (:pk, 4242, -1, 1000, 10, :e)",
        pk=pk,
        e=next_id,
    )
    return [C1_DIGEST, C1_SUM, CACHED_LOSS]


def allocation_above_pnl(conn: Connection) -> Expected:
    """One allocation set to its pnl + 1, nothing else adjusted; its position is from 2**63 up
    (stored negative), and the report names it as the u64 it is."""
    position, account_id, pnl, _ = an_allocation(conn, "position_id < 0")
    set_allocation(conn, position, account_id, pnl + 1)
    return [(C1, f"position {position + U64}", f"(0, its pnl {pnl}]"), C1_DIGEST, C1_SUM]


def change_fund_paid(conn: Connection) -> Expected:
    execute(conn, "UPDATE cycles SET fund_paid = fund_paid + 1 WHERE id = :pk", pk=cycle_pk(conn))
    return [(C1, "hash"), (C1, "net to zero")]


def change_allocated_total(conn: Connection) -> Expected:
    execute(
        conn,
        "UPDATE cycles SET allocated_total = allocated_total - 1 WHERE id = :pk",
        pk=cycle_pk(conn),
    )
    return [(C1, "hash"), C1_SUM, (C1, "net to zero")]


def delete_liquidation_entry(conn: Connection) -> Expected:
    entry_id = int(scalar(conn, "SELECT entry_id FROM liquidations WHERE liquidation_id = 'L2'"))
    seq = int(scalar(conn, "SELECT chain_seq FROM entries WHERE id = :i", i=entry_id))
    execute(conn, "DELETE FROM entries WHERE id = :i", i=entry_id)
    return [
        ("liquidation 'L2'", f"entry {entry_id}", "missing"),
        ("missing", f"links {seq} to {seq}"),
        (C1, "liquidations lost"),
    ]


def withdraw_below_zero(conn: Connection) -> Expected:
    entry_id, _ = entry(conn, "w1")
    execute(conn, "UPDATE entries SET amount = 1000000000000 WHERE id = :i", i=entry_id)
    return [(f"entry {entry_id}", "below zero"), (f"entry {entry_id}", "hash")]


TAMPERINGS: list[Callable[[Connection], Expected]] = [
    change_amount,
    change_reference,
    change_memo,
    change_created_at,
    swap_accounts,
    delete_middle,
    delete_last,
    insert_unlinked,
    insert_copied_link,
    change_cached_balance,
    change_credit_total,
    change_allocation,
    delete_allocation,
    insert_allocation,
    allocation_above_pnl,
    change_fund_paid,
    change_allocated_total,
    delete_liquidation_entry,
    withdraw_below_zero,
]


def liquidation_entry_unnamed(conn: Connection) -> Expected:
    """P3 (a profit of 2,000 into the fund, open cycle c2) is left naming no entry: only a
    break-even liquidation has none."""
    execute(conn, "UPDATE liquidations SET entry_id = NULL WHERE liquidation_id = 'P3'")
    return [("liquidation 'P3'",)]


def liquidation_result_flipped(conn: Connection) -> Expected:
    """L4 (a loss of 5,000, open cycle c2) now says a profit of 5,000 into the fund; its entry
    is still a LIQUIDATION_LOSS to system_loss of the same amount."""
    execute(
        conn,
        "UPDATE liquidations SET engine_result = -engine_result, outcome = :inflow"
        " WHERE liquidation_id = 'L4' AND engine_result = -5000",
        inflow=pb.OUTCOME_FUND_INFLOW,
    )
    return [("liquidation 'L4'",)]


LIQUIDATION_MISMATCHES: list[Callable[[Connection], Expected]] = [
    liquidation_entry_unnamed,
    liquidation_result_flipped,
]


# --- the tests -------------------------------------------------------------------------------


def assert_clean(client: Client, database_url: str) -> None:
    for currency, count in (
        ("", rows_checked(database_url)),
        (JPY, rows_checked(database_url, JPY)),
        (KRW, rows_checked(database_url, KRW)),
    ):
        report = verify(client, currency)
        assert list(report.problems) == [], currency
        assert report.ok, currency
        assert report.entries_checked == count, currency


def test_clean_ledger_verifies(client: Client, database_url: str) -> None:
    build(client)
    jpy, krw = rows_checked(database_url, JPY), rows_checked(database_url, KRW)
    assert jpy > JPY_POSITIONS // 4 and krw > KRW_POSITIONS // 10  # the allocation rows count
    assert rows_checked(database_url) == jpy + krw
    assert_clean(client, database_url)

    with pytest.raises(grpc.RpcError) as unknown:
        verify(client, "EUR")
    assert unknown.value.code() == NOT_FOUND, unknown.value.details()
    assert "EUR" in (unknown.value.details() or "")
    for malformed in ("usd", "US D", "X" * 17):
        with pytest.raises(grpc.RpcError) as invalid:
            verify(client, malformed)
        assert invalid.value.code() == INVALID, (malformed, invalid.value.details())
        assert "currency" in (invalid.value.details() or ""), invalid.value.details()


def test_empty_ledger_verifies(client: Client, database_url: str) -> None:
    """A currency without a single entry: its chain is at the start, nothing to check."""
    report = verify(client)
    assert (report.ok, report.entries_checked, list(report.problems)) == (True, 0, [])
    market(client)
    for currency in ("", JPY, KRW):
        report = verify(client, currency)
        assert (report.ok, report.entries_checked, list(report.problems)) == (True, 0, [])


def assert_tampering_named(
    client: Client, database_url: str, tamper: Callable[[Connection], Expected]
) -> None:
    build(client)
    assert verify(client).ok
    with connect(database_url) as conn:
        expected = tamper(conn)

    jpy = verify(client, JPY)
    assert_reported(jpy, [(*words, JPY) for words in expected])
    assert jpy.entries_checked == rows_checked(database_url, JPY)
    every = verify(client)
    assert not every.ok
    assert list(every.problems) == list(jpy.problems)  # KRW adds none
    krw = verify(client, KRW)
    assert (krw.ok, list(krw.problems)) == (True, [])
    assert krw.entries_checked == rows_checked(database_url, KRW)


@pytest.mark.parametrize("tamper", TAMPERINGS, ids=lambda f: f.__name__)
def test_tampering_is_named(
    client: Client, database_url: str, tamper: Callable[[Connection], Expected]
) -> None:
    assert_tampering_named(client, database_url, tamper)


@pytest.mark.parametrize("tamper", LIQUIDATION_MISMATCHES, ids=lambda f: f.__name__)
def test_liquidation_not_matching_its_entry_is_named(
    client: Client, database_url: str, tamper: Callable[[Connection], Expected]
) -> None:
    """A liquidation row whose money moved names its entry, and the entry is its flow: its
    kind (profit or loss) and amount are the liquidation's result. (Beyond the issue's list:
    VerifyLedger's own rule "every liquidation names its entry".)"""
    assert_tampering_named(client, database_url, tamper)


def test_each_broken_row_named_once(client: Client, database_url: str) -> None:
    """Three rows changed in their hashed content only (nothing else breaks): three problems,
    one naming each row, in the currency's report and in the report of all."""
    build(client)
    with connect(database_url) as conn:
        d2, _ = entry(conn, "d2")
        w1, _ = entry(conn, "w1")
        kw1, _ = entry(conn, "k-w1", KRW)
        execute(conn, "UPDATE entries SET memo = 'changed' WHERE id = :i", i=d2)
        execute(conn, "UPDATE entries SET reference = 'w1-forged' WHERE id = :i", i=w1)
        execute(conn, "UPDATE entries SET created_at_us = created_at_us + 1 WHERE id = :i", i=kw1)

    names = {JPY: [f"entry {d2}", f"entry {w1}"], KRW: [f"entry {kw1}"]}
    for currency, rows in (*names.items(), ("", [*names[JPY], *names[KRW]])):
        report = verify(client, currency)
        assert not report.ok
        for name in rows:
            assert len(naming(report.problems, name, "hash")) == 1, (name, report.problems)
            assert len(naming(report.problems, name)) == 1, (name, report.problems)
        assert len(report.problems) == len(rows), report.problems


def test_rows_of_an_unknown_currency_are_named(client: Client, database_url: str) -> None:
    """Entries and liquidations keep no foreign key to their currency (migration 0007): the
    whole ledger's report names a row whose currency is none, and nothing else."""
    build(client)
    with connect(database_url) as conn:
        d2, _ = entry(conn, "d2")
        execute(conn, "UPDATE entries SET currency = 'XXX' WHERE id = :i", i=d2)
        execute(conn, "UPDATE liquidations SET currency = 'XXX' WHERE liquidation_id = 'L4'")
    every = verify(client)
    assert not every.ok
    unknown = [p for p in every.problems if "'XXX'" in p]
    assert unknown == [
        f"entry {d2} names currency 'XXX', which is not a currency",
        "liquidation L4 names currency 'XXX', which is not a currency",
    ], every.problems


def tables_behind(database_url: str) -> dict[str, object]:
    """snapshot() and what it leaves out: the chain heads, every entry's and cycle's link,
    the allocation rows' sum, leftover close attempts."""
    with connect(database_url) as conn:
        extra = {
            "heads": sorted(map(tuple, conn.execute(text("SELECT * FROM chain_heads")).all())),
            "entries": conn.execute(
                text("SELECT id, chain_seq, hash, amount FROM entries ORDER BY id")
            ).all(),
            "cycles": conn.execute(
                text("SELECT id, chain_seq, hash, allocations_digest FROM cycles ORDER BY id")
            ).all(),
            "allocations": conn.execute(
                text("SELECT count(*), sum(amount), sum(pnl) FROM allocations")
            ).all(),
            "attempts": scalar(conn, "SELECT count(*) FROM close_attempts"),
        }
    return {**snapshot(database_url), **extra}


def test_verify_writes_nothing(client: Client, database_url: str) -> None:
    """Neither on a clean ledger nor on a broken one (a "repair" would be a write)."""
    build(client)
    before = tables_behind(database_url)
    assert_clean(client, database_url)
    assert tables_behind(database_url) == before

    with connect(database_url) as conn:
        delete_middle(conn)
        change_cached_balance(conn)
        change_allocation(conn)
    before = tables_behind(database_url)
    for currency in ("", JPY, KRW):
        verify(client, currency)
    assert not verify(client).ok
    assert tables_behind(database_url) == before
