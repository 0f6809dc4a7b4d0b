"""Writing a cycle's reversal: its allocation reversal rows, in bulk, and its record.

The rows are made from the close's own allocation rows, read in the clustered key's order so
that the write only ever appends: each row keeps its allocation's key, pnl and amount, and
takes the entry id at the same rank in the reversal's block. The reversal record, written in
the same transaction, is what makes them count, and is a link of the currency's chain.

On PostgreSQL a big reversal writes its rows over several connections at once (see
write_rows): one INSERT … SELECT is one backend's work, and two halves at once take about
two thirds of its time (measured, 860k rows on 2 cores: 2.9–3.5 s alone, 2.0–2.4 s).
"""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ledger.db import models
from ledger.db.batch import BatchStatements, Insert
from ledger.db.session import Database
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


# A PostgreSQL reversal of at least this many rows writes them over ROW_WRITERS connections,
# in RUNS ranges of account ids taken in turn (so that uneven ranges even out).
PARALLEL_ROWS_MIN = 100_000
ROW_WRITERS = 2
RUNS = 16

_COPY_ROWS = (
    "INSERT INTO allocation_reversals (cycle_pk, account_id, position_id, pnl, amount, entry_id)"
    " SELECT cycle_pk, account_id, position_id, pnl, amount, entry_id + ? FROM allocations"
    " WHERE cycle_pk = ?{range} ORDER BY cycle_pk, account_id, position_id"
)

Run = tuple[int | None, int | None]  # account ids (as stored) from, and before; None: no bound


def copy_rows(
    db: BatchStatements, close: CloseRow, first_entry_id: int, run: Run = (None, None)
) -> None:
    """The close's allocation rows (those of the accounts in `run`, or all) as reversal rows,
    their entry ids from first_entry_id, by the database itself (one INSERT … SELECT:
    nothing goes through Python)."""
    where, params = "", [first_entry_id - close.allocation_first_entry_id, close.pk]
    start, stop = run
    if start is not None:
        where, params = where + " AND account_id >= ?", [*params, start]
    if stop is not None:
        where, params = where + " AND account_id < ?", [*params, stop]
    db.execute(_COPY_ROWS.format(range=where), params)


def write_rows(
    database: Database, db: BatchStatements, close: CloseRow, first_entry_id: int, count: int
) -> None:
    """The close's rows as reversal rows, in the transaction that will write the reversal
    record (on PostgreSQL, holding the close's cycle row: lock_close).

    On PostgreSQL, from PARALLEL_ROWS_MIN rows on, the span of account ids is cut into RUNS
    ranges, which this transaction and ROW_WRITERS - 1 others, each on a connection of its
    own, take in turn; each other one commits once no range is left (or rolls back if this
    one's share failed). Committed rows count only once this transaction writes the record;
    if it never does (it failed later, or its process died), they stay behind, counted by
    nothing, and the next reversal of the close removes them and writes its own in one
    statement. A writer that had not committed when its process died never commits
    (PostgreSQL rolls back a transaction whose client has gone), and the table's key keeps
    any two writers of the same row apart, so no reversal ever holds another attempt's
    rows. The other connections take no lock this transaction holds: allocation_reversals
    has no foreign key to cycles, whose row this one holds FOR UPDATE.
    """
    if _left_behind(db, close):
        db.execute("DELETE FROM allocation_reversals WHERE cycle_pk = ?", (close.pk,))
        copy_rows(db, close, first_entry_id)
        return
    if db.is_sqlite or count < PARALLEL_ROWS_MIN:
        copy_rows(db, close, first_entry_id)
        return
    runs = _runs(db, close)
    todo: queue.SimpleQueue[Run] = queue.SimpleQueue()
    for run in runs[ROW_WRITERS:]:
        todo.put(run)

    def take(writer: BatchStatements, first: Run) -> None:
        """The writer's own first range, then any left, as they come."""
        run = first
        while True:
            copy_rows(writer, close, first_entry_id, run)
            try:
                run = todo.get_nowait()
            except queue.Empty:
                return

    failed = threading.Event()  # this transaction's share failed: the others roll back

    def take_and_commit(first: Run) -> None:
        with database.write() as session:
            take(BatchStatements.of_session(session), first)
            if failed.is_set():
                raise _Abandoned

    with ThreadPoolExecutor(ROW_WRITERS - 1, thread_name_prefix="reversal-rows") as pool:
        others = [pool.submit(take_and_commit, run) for run in runs[1:ROW_WRITERS]]  # if any
        try:
            take(db, runs[0])
        except BaseException:
            failed.set()
            while not todo.empty():  # the others stop after the range they are writing
                todo.get_nowait()
            raise
        for other in others:
            other.result()


class _Abandoned(Exception):
    """Rolls back another connection's ranges: the reversal's own transaction failed."""


def _left_behind(db: BatchStatements, close: CloseRow) -> bool:
    """Whether an attempt that never wrote its record left reversal rows of the close."""
    found = db.execute(
        "SELECT EXISTS (SELECT 1 FROM allocation_reversals WHERE cycle_pk = ?)", (close.pk,)
    ).fetchone()
    return bool(found[0])


def _runs(db: BatchStatements, close: CloseRow) -> list[Run]:
    """RUNS ranges of equal width over the close's account ids (two descents of the key's
    index), covering every id (fewer if there are fewer ids)."""
    low, high = db.execute(
        "SELECT min(account_id), max(account_id) FROM allocations WHERE cycle_pk = ?",
        (close.pk,),
    ).fetchone()
    if low is None:
        return [(None, None)]
    low, span = int(low), int(high) - int(low)
    cuts = sorted({low + span * part // RUNS for part in range(1, RUNS)} - {low})
    bounds: list[int | None] = [None, *cuts, None]
    return list(itertools.pairwise(bounds))


def write_record(db: BatchStatements, heads: ChainHeads, record: dict[str, Any]) -> None:
    """The reversal's record (`record` holds every column but the link, taken here); the
    caller writes the heads after."""
    row = dict(record)
    row["chain_seq"], row["hash"] = heads.link_cycle(str(row["currency"]), reversal_fields(row))
    db.write_together([Insert(REVERSALS, [[row[column.name] for column in REVERSALS.columns]])])


def reversal_fields(row: dict[str, Any]) -> list[object]:
    """A reversal record's hashed fields, tagged so that no close's fields read the same."""
    return ["reversal", *(row[name] for name in REVERSAL_HASHED_COLUMNS)]
