"""The statements of a liquidation batch: what it reads under its locks, and what it writes.

Two round trips to the database whatever the batch size: one locks the accounts the batch
moves (the store's lock order) and then reads contracts, earlier uses of its ids, closed
cycles and its entry ids; one writes (accounts, entries, liquidations) and, on the writer's
own connection, commits. Every decision in between is made in memory (ledger.liquidation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ledger.db import models, store
from ledger.db.batch import BatchStatements, Insert, Query, Statement
from ledger.journal import INSURANCE_FUND, LIQUIDATION_ENGINE, SYSTEM_LOSS

LIQUIDATIONS = models.Base.metadata.tables["liquidations"]
ACCOUNT_NAMES = (SYSTEM_LOSS, INSURANCE_FUND, LIQUIDATION_ENGINE)
OUTCOME_SYSTEM_LOSS = 2  # insurance.v1.Outcome.SYSTEM_LOSS, as stored

_CURRENCIES_OF_SYMBOLS = "SELECT margin_currency FROM contracts WHERE symbol {}"
_SELECT_CONTRACTS = (
    "SELECT contracts.symbol, contracts.margin_currency, contracts.kind, contracts.multiplier,"
    " currencies.scale FROM contracts"
    " JOIN currencies ON currencies.code = contracts.margin_currency"
    " WHERE contracts.symbol {}"
)
_SELECT_PREVIOUS = (
    "SELECT liquidation_id, request_hash, currency, engine_result, outcome, fund_balance_after,"
    " entry_id FROM liquidations WHERE liquidation_id {}"
)
# A cycle is closed while a close of it is in force: one that has no reversal.
_IN_FORCE = "NOT EXISTS (SELECT 1 FROM cycle_reversals r WHERE r.cycle_pk = c.id)"
_SELECT_CLOSED = (
    f"SELECT c.currency, c.cycle_id FROM cycles c WHERE {_IN_FORCE} AND c.cycle_id {{}}"
)


@dataclass(frozen=True, slots=True)
class BatchRows:
    """What a batch depends on, read under its locks."""

    accounts: store.Accounts
    contracts: list[tuple[Any, ...]]  # symbol, currency, kind, multiplier, scale
    previous: list[tuple[Any, ...]]  # id, request_hash, currency, result, outcome, fund, entry
    closed: set[tuple[str, str]]  # (currency, cycle_id)
    entry_ids: store.EntryIds
    heads: store.ChainHeads


def read(
    db: BatchStatements,
    symbols: set[str],
    liquidation_ids: set[str],
    cycle_ids: set[str],
    requests: int,
) -> BatchRows:
    """Lock the accounts of the symbols' currencies, then read the rest (each statement of
    PostgreSQL's pipeline reads its own snapshot, so these see what the locks waited for),
    with an entry id for each of the batch's `requests`."""
    lock = store.lock_accounts_query(db, ACCOUNT_NAMES, Query(_CURRENCIES_OF_SYMBOLS, symbols))
    account_rows, contracts, previous, closed, ids, heads = db.select_together(
        [lock],
        [
            Query(_SELECT_CONTRACTS, symbols),
            Query(_SELECT_PREVIOUS, liquidation_ids),
            Query(_SELECT_CLOSED, cycle_ids),
            store.entry_ids_query(db, requests),
            store.chain_heads_query(Query(_CURRENCIES_OF_SYMBOLS, symbols)),
        ],
    )
    return BatchRows(
        store.accounts_of(account_rows),
        contracts,
        previous,
        {(currency, cycle_id) for currency, cycle_id in closed},
        store.entry_ids_of(db, ids),
        store.heads_of(heads),
    )


def writes(
    rows: BatchRows,
    entry_rows: Sequence[Sequence[object]],
    liquidation_rows: Sequence[Sequence[object]],
) -> list[Statement | Insert]:
    """The batch's writes, in an order valid for one statement of WITH clauses."""
    if not liquidation_rows:
        return []
    statements: list[Statement | Insert] = [*store.account_writes(rows.accounts)]
    if entry_rows:
        statements += [
            *rows.entry_ids.writes(),
            *rows.heads.writes(),
            Insert(store.ENTRIES, entry_rows),
        ]
    return [*statements, Insert(LIQUIDATIONS, liquidation_rows)]


_LOSS_TOTAL = (
    "SELECT coalesce(sum(engine_result), 0) FROM liquidations"
    f" WHERE currency = ? AND cycle_id = ? AND outcome = {OUTCOME_SYSTEM_LOSS}"
    " AND reversal_entry_id IS NULL"
)


def cycle_loss_total(db: BatchStatements, currency: str, cycle_id: str) -> int:
    """The cycle's system loss so far: the sum of its SYSTEM_LOSS liquidations, positive."""
    ((total,),) = db.execute(_LOSS_TOTAL, (currency, cycle_id)).fetchall()
    return -int(total or 0)


_SELECT_ONE = (
    "SELECT liquidation_id, cycle_id, symbol, account_id, position_id, side, quantity,"
    " takeover_price, close_price, remaining_margin, currency, engine_result, outcome,"
    " fund_balance_after, entry_id, created_at_us, reversal_entry_id FROM liquidations"
    " WHERE liquidation_id = ?"
)


def liquidation_row(db: BatchStatements, liquidation_id: str) -> tuple[Any, ...] | None:
    """A recorded liquidation as stored (see _SELECT_ONE for the columns)."""
    row = db.execute(_SELECT_ONE, (liquidation_id,)).fetchone()
    return None if row is None else tuple(row)


# A reversed liquidation stays recorded in its cycle (counted, its times too) but its loss
# no longer counts.
_OPEN_CYCLES = (
    "SELECT l.currency, l.cycle_id,"
    f" coalesce(sum(CASE WHEN l.outcome = {OUTCOME_SYSTEM_LOSS}"
    " AND l.reversal_entry_id IS NULL THEN -l.engine_result ELSE 0 END), 0),"
    " count(*), min(l.created_at_us), max(l.created_at_us)"
    " FROM liquidations l WHERE {} AND NOT EXISTS"
    " (SELECT 1 FROM cycles c"
    f" WHERE c.currency = l.currency AND c.cycle_id = l.cycle_id AND {_IN_FORCE})"
    " GROUP BY l.currency, l.cycle_id ORDER BY l.currency, min(l.created_at_us), l.cycle_id"
)


def open_cycles(db: BatchStatements, currency: str) -> list[tuple[Any, ...]]:
    """Every cycle with liquidations and no close in force: (currency, cycle_id, loss_total,
    liquidations_count, first_recorded_at_us, last_recorded_at_us)."""
    if currency:
        rows = db.execute(_OPEN_CYCLES.format("l.currency = ?"), (currency,)).fetchall()
    else:
        rows = db.execute(_OPEN_CYCLES.format("1 = 1")).fetchall()
    return [tuple(row) for row in rows]


def set_reversed(db: BatchStatements, liquidation_id: str, reversal_entry_id: int) -> None:
    db.execute(
        "UPDATE liquidations SET reversal_entry_id = ? WHERE liquidation_id = ?",
        (reversal_entry_id, liquidation_id),
    )


def is_closed(db: BatchStatements, currency: str, cycle_id: str) -> bool:
    row = db.execute(
        f"SELECT 1 FROM cycles c WHERE c.currency = ? AND c.cycle_id = ? AND {_IN_FORCE}",
        (currency, cycle_id),
    ).fetchone()
    return row is not None


def has_liquidations(db: BatchStatements, currency: str, cycle_id: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM liquidations WHERE currency = ? AND cycle_id = ? LIMIT 1",
        (currency, cycle_id),
    ).fetchone()
    return row is not None
