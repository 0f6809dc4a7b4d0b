"""Writing a cycle close without stalling the liquidation path.

A close writes up to millions of allocation rows. The currency's account rows, which every
liquidation of the currency locks, are taken only by the close's last, short step (`finish`):
it checks that what the allocation was computed from still holds (else Stale: the caller
computes again), posts the fund's cover and the uncovered rest, moves system_loss by the
allocated total, and writes the cycle row, which is what makes the allocation rows count.

- PostgreSQL: one transaction. The rows go in by binary COPY first, holding no lock that a
  liquidation needs; `finish` then locks the currency's rows and commits. A crash or a
  cancel at any point rolls it all back; no reader ever sees uncommitted rows.
- SQLite has one writer at a time, so a close in one transaction would stop every other
  writer for its whole length. It writes its rows in steps and, whenever another writer
  waits, commits what it has and lets that writer in (`SqliteWriter.handover`), then goes
  on. Rows committed so far carry the id of a `close_attempts` row as their cycle_pk and
  count for nothing until `finish` writes the cycle row with that id (in the same
  transaction that removes the attempt). The attempt holds a lease (an flock on
  `<database>.close-<id>.lock`) while its process lives; an attempt that crashed, lost a
  race or was cancelled leaves rows that nothing counts, and they are removed: by the close
  itself when it gives up, by `remove_abandoned` when a server starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from ledger.alloc import Ranking
from ledger.db import bulk, models, reversals, store
from ledger.db.batch import BatchStatements, Insert, Query
from ledger.db.liquidations import cycle_loss_total
from ledger.db.session import BULK_STATEMENT_TIMEOUT_SECONDS, Database, SqliteWriter
from ledger.errors import Cancelled
from ledger.journal import INSURANCE_FUND, SYSTEM_LOSS, UNCOVERED_LOSS, Transfer

log = logging.getLogger("ledger.cycle")

CYCLES = models.Base.metadata.tables["cycles"]
FINISH_ACCOUNTS = (SYSTEM_LOSS, INSURANCE_FUND, UNCOVERED_LOSS)
ROWS_PER_DELETE = 1 << 16  # rows of an abandoned attempt removed per transaction


class Stale(Exception):
    """The cycle's loss, the policy or the fund moved since the allocation was computed."""


class ClosedMeanwhile(Exception):
    """Another close of the same cycle committed first."""


@dataclass(frozen=True, slots=True)
class Basis:
    """What an allocation was computed from."""

    loss_total: int
    fund_balance: int
    policy_version: int
    insurance_share: str
    coverage_ratio: str
    ranking: Ranking = Ranking.POSITION
    version: int = 1  # the close's version: one more than the cycle's latest (reversed) close


@dataclass(frozen=True, slots=True)
class ClosePlan:
    """Everything a close writes, computed before anything is written."""

    currency: str
    cycle_id: str
    basis: Basis
    fund_paid: int
    transfers: list[Transfer]  # the fund's cover and the uncovered rest, as they apply
    allocated_total: int
    cycle_row: dict[str, object]  # the cycle's columns but id and allocation_first_entry_id
    closed_at_us: int
    allocations: bulk.AllocationRows  # sorted for the table, not yet placed
    allocations_digest: str  # alloc.allocations_digest, taken before any lock

    @property
    def allocation_count(self) -> int:
        return len(self.allocations)

    def rows(self, cycle_pk: int, first_entry_id: int) -> bulk.AllocationRows:
        return self.allocations.placed(cycle_pk, first_entry_id)


IsActive = Callable[[], bool]


def lock(db: BatchStatements, currency: str) -> store.Accounts:
    """The currency's rows that a close moves, in the lock order."""
    return store.lock_accounts(db, FINISH_ACCOUNTS, store.currency_keys([currency]))


def write(database: Database, plan: ClosePlan, is_active: IsActive) -> None:
    """Write the close without holding the currency's rows until its last step."""
    if database.is_sqlite:
        _write_sqlite(database, plan, is_active)
    else:
        _write_postgres(database, plan, is_active)


def write_holding_locks(
    database: Database, session: Session, plan: ClosePlan, is_active: IsActive
) -> None:
    """Write the close in the session's transaction, which already holds the currency's rows
    (the last resort when the inputs kept moving: nothing can move them now)."""
    db = BatchStatements.of_session(session)
    if database.is_sqlite:
        count = plan.allocation_count
        first_id = store.reserve_entry_block(db, count) if count else 0
        cycle_pk = _new_attempt(db, plan)
    else:
        first_id = _reserve_block(database, plan.allocation_count)
        cycle_pk = _next_cycle_pk(db)
    bulk.write_allocations(session, plan.rows(cycle_pk, first_id))
    _check_active(is_active, plan)
    finish(db, plan, cycle_pk, first_id)


def _write_postgres(database: Database, plan: ClosePlan, is_active: IsActive) -> None:
    first_id = _reserve_block(database, plan.allocation_count)
    with database.write() as session:
        db = BatchStatements.of_session(session)
        cycle_pk = _next_cycle_pk(db)
        bulk.copy_allocations(bulk.driver_connection(session), plan.rows(cycle_pk, first_id))
        _check_active(is_active, plan)
        finish(db, plan, cycle_pk, first_id)
        # A client that gave up (cancel, deadline) gets no close: grpcio may even end the
        # request stream early as if complete when a cancel races the last read, so the
        # check is here too, after the work and before the commit, and it rolls all back.
        _check_active(is_active, plan)


def _write_sqlite(database: Database, plan: ClosePlan, is_active: IsActive) -> None:
    writer = SqliteWriter(database, statement_timeout_s=BULK_STATEMENT_TIMEOUT_SECONDS)
    handed_over = False
    attempt: int | None = None
    try:
        db = writer.begin()
        count = plan.allocation_count
        first_id = store.reserve_entry_block(db, count) if count else 0
        attempt = _new_attempt(db, plan)
        with _lease(database, attempt, wait=False) as leased:
            assert leased, f"close attempt {attempt} is new, yet its lease is taken"

            def between() -> None:
                nonlocal handed_over
                _check_active(is_active, plan)
                if writer.others_waiting():
                    writer.handover()
                    handed_over = True

            bulk.insert_allocations(writer.dbapi_connection, plan.rows(attempt, first_id), between)
            _check_active(is_active, plan)
            finish(db, plan, attempt, first_id)
            _check_active(is_active, plan)
            writer.commit([])
    except BaseException:
        writer.rollback()
        if handed_over and attempt is not None:
            _remove_attempt(database, attempt)
        raise
    finally:
        writer.close()


def finish(db: BatchStatements, plan: ClosePlan, cycle_pk: int, first_entry_id: int) -> None:
    """The close's last step, in its transaction: lock the currency's rows, check that the
    inputs still hold, post the cover and the uncovered rest, and write the cycle row."""
    accounts = lock(db, plan.currency)
    latest = reversals.latest_close(db, plan.currency, plan.cycle_id)
    if latest is not None and not latest.reversed:
        raise ClosedMeanwhile(plan.cycle_id)
    if (0 if latest is None else latest.version) + 1 != plan.basis.version:
        raise Stale(f"cycle {plan.cycle_id!r} of {plan.currency} was closed and reversed meanwhile")
    loss = cycle_loss_total(db, plan.currency, plan.cycle_id)
    ((version,),) = db.execute(
        "SELECT max(version) FROM policies WHERE currency = ?", (plan.currency,)
    ).fetchall()
    fund = accounts[(plan.currency, INSURANCE_FUND)].balance
    basis = plan.basis
    # The fund must still hold what it pays. Inflows meanwhile (liquidations of the next
    # cycle flow in all through a close) leave the close as computed, even when the fund paid
    # all it had: it pays what it held at the close's snapshot, and the journal, in commit
    # order, stays consistent. Computing again at each inflow would never finish without the
    # locks, and holding them stalls the liquidations the close must not stall.
    if loss != basis.loss_total or version != basis.policy_version or fund < plan.fund_paid:
        raise Stale(
            f"cycle {plan.cycle_id!r} of {plan.currency}: loss {basis.loss_total} → {loss}, "
            f"policy {basis.policy_version} → {version}, fund {basis.fund_balance} → {fund}"
        )
    for transfer in plan.transfers:
        refused = store.move(accounts, transfer)
        if refused is not None:
            raise refused
    if plan.allocated_total:  # the users' side has no rows (see models.Account)
        refused = store.move_amount(
            accounts, plan.currency, None, SYSTEM_LOSS, plan.allocated_total
        )
        if refused is not None:
            raise refused
    heads = store.read_heads(db, [plan.currency])
    store.append(db, accounts, heads, plan.transfers, plan.closed_at_us)
    row = dict(
        plan.cycle_row,
        id=cycle_pk,
        allocation_first_entry_id=first_entry_id,
        allocations_digest=plan.allocations_digest,
        allocation_count=plan.allocation_count,
    )
    row["chain_seq"], row["hash"] = heads.link_cycle(plan.currency, cycle_fields(row))
    statements: list[Any] = [
        Insert(CYCLES, [[row[column.name] for column in CYCLES.columns]]),
        *heads.writes(),
    ]
    if db.is_sqlite:
        statements.append(("DELETE FROM close_attempts WHERE id = ?", (cycle_pk,)))
    db.write_together(statements)


# The cycle columns its chain link hashes, in order.
CYCLE_HASHED_COLUMNS = (
    "currency",
    "cycle_id",
    "loss_total",
    "fund_balance_before",
    "fund_share",
    "fund_paid",
    "user_due",
    "allocated_total",
    "uncovered",
    "positions_total",
    "profitable_count",
    "profit_total",
    "participant_count",
    "participant_profit",
    "cutoff_pnl",
    "widened",
    "input_digest",
    "insurance_share",
    "coverage_ratio",
    "policy_version",
    "allocation_first_entry_id",
    "closed_at_us",
    "allocations_digest",
)


def cycle_fields(row: dict[str, Any]) -> list[object]:
    """A cycle row's hashed fields (widened as a bool: SQLite stores it as 0 or 1), then its
    ranking unless it ranked positions, and ranking and version for a close after the first:
    the links written before rankings and versions existed stay valid, a ranking or version
    changed either way changes the link, and the field counts tell the three forms apart."""
    fields = [bool(row[n]) if n == "widened" else row[n] for n in CYCLE_HASHED_COLUMNS]
    ranking = int(row.get("ranking", Ranking.POSITION))
    version = int(row.get("version", 1))
    if version != 1:
        return [*fields, ranking, version]
    return fields if ranking == Ranking.POSITION else [*fields, ranking]


def _check_active(is_active: IsActive, plan: ClosePlan) -> None:
    if not is_active():
        raise Cancelled(
            f"close of cycle {plan.cycle_id!r} of {plan.currency} cancelled by the client"
        )


def _reserve_block(database: Database, count: int) -> int:
    """PostgreSQL: the allocation rows' entry ids, in a transaction of their own, committed at
    once (unused ids after a failure are only a gap)."""
    if not count:
        return 0
    with database.write() as session:
        return store.reserve_entry_block(BatchStatements.of_session(session), count)


def _next_cycle_pk(db: BatchStatements) -> int:
    return int(db.execute("SELECT nextval(pg_get_serial_sequence('cycles', 'id'))").fetchone()[0])


def _new_attempt(db: BatchStatements, plan: ClosePlan) -> int:
    """SQLite: the attempt row whose id the allocation rows carry until the cycle row."""
    cursor = db.execute(
        "INSERT INTO close_attempts (currency, cycle_id, started_at_us) VALUES (?, ?, ?)"
        " RETURNING id",
        (plan.currency, plan.cycle_id, plan.closed_at_us),
    )
    return int(cursor.fetchone()[0])


@contextlib.contextmanager
def _lease(database: Database, attempt: int, *, wait: bool) -> Iterator[bool]:
    """Hold the attempt's lease (yields whether it was had). A free lease means its close
    is over: finished, given up, or its process is gone. The file goes with the lease."""
    path = database.path
    if path is None:  # an in-memory database lives and dies with its one process
        yield True
        return
    lease_path = f"{path}.close-{attempt}.lock"
    fd = os.open(lease_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lease_path)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# Only while the attempt row is there: the transaction that writes its cycle row removes it,
# and from then on the rows are the cycle's.
_DELETE_ROWS = (
    "DELETE FROM allocations WHERE cycle_pk = ? AND (account_id, position_id) IN"
    " (SELECT account_id, position_id FROM allocations WHERE cycle_pk = ?"
    "  AND EXISTS (SELECT 1 FROM close_attempts WHERE id = ?)"
    "  AND NOT EXISTS (SELECT 1 FROM cycles WHERE id = ?) LIMIT ?)"
)


def _remove_attempt(database: Database, attempt: int) -> int:
    """Remove an attempt's rows, a bounded number per transaction (other writers go in
    between), then the attempt itself; returns the rows removed."""
    removed = 0
    while True:
        with database.write() as session:
            db = BatchStatements.of_session(session)
            cursor = db.execute(_DELETE_ROWS, (attempt, attempt, attempt, attempt, ROWS_PER_DELETE))
            count = int(cursor.rowcount)
            if count < ROWS_PER_DELETE:
                db.execute("DELETE FROM close_attempts WHERE id = ?", (attempt,))
        removed += count
        if count < ROWS_PER_DELETE:
            return removed


def remove_abandoned(database: Database) -> int:
    """Remove what closes that did not finish left behind (SQLite; PostgreSQL rolls them back
    itself): every attempt whose lease is free. Returns the rows removed."""
    if not database.is_sqlite:
        return 0
    with database.read() as session:
        attempts = [
            int(row[0])
            for row in BatchStatements.of_session(session).rows(
                Query("SELECT id FROM close_attempts ORDER BY id")
            )
        ]
    removed = 0
    for attempt in attempts:
        with _lease(database, attempt, wait=False) as free:
            if free:
                rows = _remove_attempt(database, attempt)
                log.info("removed %d rows of close attempt %d, which did not finish", rows, attempt)
                removed += rows
    return removed
