"""Writing a cycle's reversal: its allocation reversal rows, in bulk, and its record.

The rows are made from the close's own allocation rows, read in the clustered key's order so
that the write only ever appends: each row keeps its allocation's key, pnl and amount, and
takes the entry id at the same rank in the reversal's block. The reversal record, written in
the same transaction, is what makes them count, and is a link of the currency's chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger.db import models
from ledger.db.batch import BatchStatements, Insert
from ledger.db.store import ChainHeads

REVERSALS = models.Base.metadata.tables["cycle_reversals"]

# The reversal record's columns its chain link hashes, in order (after the tag "reversal").
REVERSAL_HASHED_COLUMNS = (
    "currency",
    "cycle_id",
    "version",
    "cycle_pk",
    "reason",
    "reversed_at_us",
    "first_entry_id",
    "allocation_count",
    "allocations_digest",
)


@dataclass(frozen=True, slots=True)
class CloseRow:
    """What a reversal needs of the close it reverses."""

    pk: int
    version: int
    allocation_first_entry_id: int
    allocations_digest: str
    reversed: bool
    allocation_count: int | None  # None: a close made before the count was kept


_CLOSE = (
    "SELECT c.id, c.version, c.allocation_first_entry_id, c.allocations_digest,"
    " EXISTS (SELECT 1 FROM cycle_reversals r WHERE r.cycle_pk = c.id), c.allocation_count"
    " FROM cycles c WHERE c.currency = ? AND c.cycle_id = ? ORDER BY c.version DESC LIMIT 1"
)


def latest_close(db: BatchStatements, currency: str, cycle_id: str) -> CloseRow | None:
    row = db.execute(_CLOSE, (currency, cycle_id)).fetchone()
    if row is None:
        return None
    count = None if row[5] is None else int(row[5])
    return CloseRow(int(row[0]), int(row[1]), int(row[2]), str(row[3]), bool(row[4]), count)


def lock_close(
    db: BatchStatements, currency: str, cycle_id: str, close: CloseRow
) -> CloseRow | None:
    """PostgreSQL: lock the close's cycle row (its reversals take turns on it), then read
    the cycle's latest close again, as it is now."""
    db.execute("SELECT 1 FROM cycles WHERE id = ? FOR UPDATE", (close.pk,)).fetchall()
    return latest_close(db, currency, cycle_id)


def allocation_count(db: BatchStatements, close: CloseRow) -> int:
    """The close's allocation rows: as it kept the count, or counted (an older close)."""
    if close.allocation_count is not None:
        return close.allocation_count
    ((count,),) = db.execute(
        "SELECT count(*) FROM allocations WHERE cycle_pk = ?", (close.pk,)
    ).fetchall()
    return int(count)


_OWN_ENTRIES = (
    "SELECT e.id FROM entries e WHERE e.currency = ? AND e.kind IN (5, 7) AND e.reference = ?"
    " AND e.reverses = 0 AND NOT EXISTS (SELECT 1 FROM entries r WHERE r.currency = e.currency"
    " AND r.kind = e.kind AND r.reference = e.reference AND r.reverses = e.id) ORDER BY e.id"
)


def unreversed_close_entries(db: BatchStatements, currency: str, cycle_id: str) -> list[int]:
    """The ids of the cycle's INSURANCE_COVER and UNCOVERED_LOSS entries not yet reversed:
    those of its close in force (every earlier close's were reversed with it)."""
    return [int(row[0]) for row in db.execute(_OWN_ENTRIES, (currency, cycle_id)).fetchall()]


_COPY_ROWS = (
    "INSERT INTO allocation_reversals (cycle_pk, account_id, position_id, pnl, amount, entry_id)"
    " SELECT cycle_pk, account_id, position_id, pnl, amount, entry_id + ? FROM allocations"
    " WHERE cycle_pk = ? ORDER BY cycle_pk, account_id, position_id"
)


def copy_rows(db: BatchStatements, close: CloseRow, first_entry_id: int) -> None:
    """The close's allocation rows as reversal rows, their entry ids from first_entry_id, by
    the database itself (one INSERT … SELECT: nothing goes through Python)."""
    db.execute(_COPY_ROWS, (first_entry_id - close.allocation_first_entry_id, close.pk))


def write_record(db: BatchStatements, heads: ChainHeads, record: dict[str, Any]) -> None:
    """The reversal's record (`record` holds every column but the link, taken here); the
    caller writes the heads after."""
    row = dict(record)
    row["chain_seq"], row["hash"] = heads.link_cycle(str(row["currency"]), reversal_fields(row))
    db.write_together([Insert(REVERSALS, [[row[column.name] for column in REVERSALS.columns]])])


def reversal_fields(row: dict[str, Any]) -> list[object]:
    """A reversal record's hashed fields, tagged so that no close's fields read the same."""
    return ["reversal", *(row[name] for name in REVERSAL_HASHED_COLUMNS)]
