"""What VerifyLedger reads: the raw rows of the journal, straight from the tables.

Nothing here trusts a cached value: the chain's links, the entries, every cycle's summary
and allocation rows, and the cached balances are read as stored, to be checked against each
other (ledger.verify). Entries come in pages in chain order, so that a journal of millions
is never in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from sqlalchemy.orm import Session

from ledger.db import bulk
from ledger.db.batch import BatchStatements
from ledger.db.closes import CYCLE_HASHED_COLUMNS
from ledger.db.reversals import REVERSAL_HASHED_COLUMNS

ENTRIES_PER_PAGE = 50_000


class EntryRow(NamedTuple):
    entry_id: int
    chain_seq: int
    hash: str
    kind: int
    reference: str
    debit: str
    credit: str
    amount: int
    memo: str
    created_at_us: int
    reverses: int


def currencies(db: BatchStatements, only: str | None) -> list[str]:
    if only:
        rows = db.execute("SELECT code FROM currencies WHERE code = ?", (only,)).fetchall()
    else:
        rows = db.execute("SELECT code FROM currencies ORDER BY code").fetchall()
    return [str(row[0]) for row in rows]


_UNKNOWN_CURRENCY = (
    "SELECT 'entry', CAST(id AS TEXT), currency FROM entries"
    " WHERE currency NOT IN (SELECT code FROM currencies)"
    " UNION ALL SELECT 'liquidation', liquidation_id, currency FROM liquidations"
    " WHERE currency NOT IN (SELECT code FROM currencies)"
    " ORDER BY 1, 2 LIMIT ?"
)


def unknown_currencies(db: BatchStatements, limit: int) -> list[tuple[str, str, str]]:
    """Entries and liquidations naming no known currency, as (kind, id, currency): these
    tables keep no foreign key to their currency (migration 0007), so it is checked here."""
    rows = db.execute(_UNKNOWN_CURRENCY, (limit,)).fetchall()
    return [(str(kind), str(key), str(code)) for kind, key, code in rows]


def head(db: BatchStatements, currency: str) -> tuple[int, str] | None:
    row = db.execute("SELECT seq, hash FROM chain_heads WHERE currency = ?", (currency,)).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def entries(db: BatchStatements, currency: str) -> Iterator[EntryRow]:
    """The currency's entries in id order, in pages by the primary key. Within a currency
    that is chain order: every writer takes its entry ids after the currency's locks, so a
    currency's ids ascend as its links do (VerifyLedger checks that they do)."""
    after = -1
    while True:
        rows = db.execute(
            "SELECT id, chain_seq, hash, kind, reference, debit_account, credit_account, amount,"
            " memo, created_at_us, reverses FROM entries WHERE currency = ? AND id > ?"
            f" ORDER BY id LIMIT {ENTRIES_PER_PAGE}",
            (currency, after),
        ).fetchall()
        for row in rows:
            yield EntryRow(*row)
        if len(rows) < ENTRIES_PER_PAGE:
            return
        after = int(rows[-1][0])


def cycles(db: BatchStatements, currency: str) -> list[dict[str, Any]]:
    """The currency's closed cycles with every column the checks need, in chain order."""
    names = (
        "id",
        "chain_seq",
        "hash",
        *CYCLE_HASHED_COLUMNS,
        "ranking",
        "version",
        "allocation_count",
    )
    rows = db.execute(
        f"SELECT {', '.join(names)} FROM cycles WHERE currency = ? ORDER BY chain_seq, id",
        (currency,),
    ).fetchall()
    return [dict(zip(names, row, strict=True)) for row in rows]


def reversals(db: BatchStatements, currency: str) -> list[dict[str, Any]]:
    """The currency's cycle reversals with every column, in chain order."""
    names = ("cycle_pk", "chain_seq", "hash", *REVERSAL_HASHED_COLUMNS)
    rows = db.execute(
        f"SELECT {', '.join(names)} FROM cycle_reversals WHERE currency = ?"
        " ORDER BY chain_seq, cycle_pk",
        (currency,),
    ).fetchall()
    return [dict(zip(names, row, strict=True)) for row in rows]


def allocations(session: Session, cycle_pk: int) -> bulk.AllocationTable:
    return bulk.read_allocation_table(session, cycle_pk)


def allocation_reversals(session: Session, cycle_pk: int) -> bulk.AllocationTable:
    return bulk.read_allocation_table(session, cycle_pk, table="allocation_reversals")


def cycle_loss(db: BatchStatements, currency: str, cycle_id: str) -> int:
    """The cycle's LIQUIDATION_LOSS entries, summed from the journal (not the liquidations)."""
    row = db.execute(
        "SELECT coalesce(sum(e.amount), 0) FROM liquidations l JOIN entries e"
        " ON e.id = l.entry_id WHERE l.currency = ? AND l.cycle_id = ? AND l.outcome = 2"
        " AND l.reversal_entry_id IS NULL",
        (currency, cycle_id),
    ).fetchone()
    return int(row[0])


class CloseEntry(NamedTuple):
    entry_id: int
    kind: int
    amount: int
    debit: str
    credit: str
    reverses: int


def cycle_entries(db: BatchStatements, currency: str, cycle_id: str) -> list[CloseEntry]:
    """The entries of the cycle's closes and reversals: its covers and uncovered rests, and
    their reversals, in id order."""
    rows = db.execute(
        "SELECT id, kind, amount, debit_account, credit_account, reverses FROM entries"
        " WHERE currency = ? AND reference = ? AND kind IN (5, 7) ORDER BY id",
        (currency, cycle_id),
    ).fetchall()
    return [CloseEntry(int(a), int(b), int(c), str(d), str(e), int(f)) for a, b, c, d, e, f in rows]


def cached_accounts(db: BatchStatements, currency: str) -> list[tuple[str, int, int, int]]:
    rows = db.execute(
        "SELECT name, balance, credit_total, debit_total FROM accounts WHERE currency = ?"
        " ORDER BY name",
        (currency,),
    ).fetchall()
    return [(str(n), int(b), int(c), int(d)) for n, b, c, d in rows]


def broken_liquidations(db: BatchStatements, currency: str) -> list[tuple[str, str]]:
    """Liquidations that do not match their entry: (liquidation_id, what is wrong). A profit
    is an entry liquidation_engine → insurance_fund, a loss system_loss → liquidation_engine,
    each of the engine result's size and naming the liquidation; a break-even has none."""
    rows = db.execute(
        "SELECT l.liquidation_id, l.engine_result, l.outcome, l.entry_id, e.id, e.kind,"
        " e.reference, e.debit_account, e.credit_account, e.amount, l.reversal_entry_id"
        " FROM liquidations l LEFT JOIN entries e ON e.id = l.entry_id"
        " LEFT JOIN entries r ON r.id = l.reversal_entry_id"
        " WHERE l.currency = ? AND (NOT coalesce(("
        "  (l.engine_result = 0 AND l.outcome = 3 AND l.entry_id IS NULL)"
        "  OR (l.engine_result > 0 AND l.outcome = 1 AND e.kind = 3"
        "      AND e.debit_account = 'liquidation_engine' AND e.credit_account = 'insurance_fund'"
        "      AND e.amount = l.engine_result AND e.reference = l.liquidation_id"
        "      AND e.currency = l.currency)"
        "  OR (l.engine_result < 0 AND l.outcome = 2 AND e.kind = 4"
        "      AND e.debit_account = 'system_loss' AND e.credit_account = 'liquidation_engine'"
        "      AND e.amount = -l.engine_result AND e.reference = l.liquidation_id"
        "      AND e.currency = l.currency)), false)"  # a missing entry compares as NULL
        " OR (l.reversal_entry_id IS NOT NULL AND NOT coalesce((r.reverses = e.id"
        "      AND r.kind = e.kind AND r.debit_account = e.credit_account"
        "      AND r.credit_account = e.debit_account AND r.amount = e.amount"
        "      AND r.reference = l.liquidation_id), false)))",
        (currency,),
    ).fetchall()
    problems = []
    for lid, result, outcome, entry_id, found, kind, reference, debit, credit, amount, rev in rows:
        if rev is not None and found is not None:
            what = f"its reversal entry {rev} is missing or does not reverse entry {entry_id}"
        elif entry_id is None:
            what = f"engine result {result} (outcome {outcome}) but no entry"
        elif found is None:
            what = f"its entry {entry_id} is missing"
        else:
            what = (
                f"engine result {result} (outcome {outcome}) does not match its entry "
                f"{entry_id} ({amount} from {debit} to {credit}, kind {kind}, for {reference!r})"
            )
        problems.append((str(lid), what))
    return problems


def orphan_liquidation_entries(db: BatchStatements, currency: str) -> list[tuple[int, str]]:
    """LIQUIDATION_PROFIT/LOSS entries whose liquidation is not there: (entry id, reference).
    The liquidation is looked up by its key, the entry's reference (an OR join on its two
    entry columns would compare every entry with every liquidation)."""
    rows = db.execute(
        "SELECT e.id, e.reference FROM entries e WHERE e.currency = ? AND e.kind IN (3, 4)"
        " AND NOT EXISTS (SELECT 1 FROM liquidations l WHERE l.liquidation_id = e.reference"
        " AND (l.entry_id = e.id OR l.reversal_entry_id = e.id)) ORDER BY e.id",
        (currency,),
    ).fetchall()
    return [(int(a), str(b)) for a, b in rows]
