"""The cycle close: cover the cycle's system loss from the fund and the profitable positions.

The clearing system streams every position's profit for the cycle; the Rust core ranks, cuts
and splits (ledger.alloc). This module reads what the allocation depends on (the cycle's
loss, the fund, the policy), computes it with no lock held, and has the store write it
(ledger.db.closes): the fund's cover, one ALLOCATION flow per allocated position, the
uncovered rest and the closed cycle's summary, all or nothing, without holding up the
currency's liquidations while the rows are written. If the loss, the policy or the fund
moved meanwhile so that the allocation no longer holds, it is computed again; after
CLOSE_ATTEMPTS_MAX tries the last one holds the currency's rows from the start.

The close is the one use case that runs several transactions (see db/closes.py), so it is
given the Database rather than a session.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from ledger import journal, money
from ledger.alloc import AllocationResult, CycleInputDecoder, Ranking, allocations_digest
from ledger.currency import current_policy, get_currency
from ledger.db import bulk, closes, models, reversals, store
from ledger.db.batch import BatchStatements
from ledger.db.closes import Basis, ClosePlan
from ledger.db.liquidations import cycle_loss_total, has_liquidations, open_cycles
from ledger.db.session import Database
from ledger.db.store import account_balance, now_us
from ledger.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LedgerError,
    NotFound,
    Unavailable,
)
from ledger.journal import INSURANCE_FUND, SYSTEM_LOSS, UNCOVERED_LOSS, EntryKind
from ledger.limits import INT64_MAX, MEMO_LENGTH_MAX, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX

log = logging.getLogger("ledger.cycle")

CLOSE_ATTEMPTS_MAX = 3
REVERSE_ATTEMPTS_MAX = 3
VERSION_MAX = 2**31 - 1  # the column's range (a uint32 asked beyond it names no close)


class CycleState(enum.IntEnum):
    """Numbers are those of insurance.v1.CycleState."""

    PREVIEW = 1
    CLOSED = 2
    REVERSED = 3


@dataclass(frozen=True, slots=True)
class CycleSummary:
    cycle_id: str
    currency: str
    state: CycleState
    loss_total: int
    fund_balance_before: int
    fund_share: int
    fund_paid: int
    user_due: int
    allocated_total: int
    uncovered: int
    positions_total: int
    profitable_count: int
    profit_total: int
    participant_count: int
    participant_profit: int
    cutoff_pnl: int
    widened: bool
    input_digest: str
    insurance_share: str
    coverage_ratio: str
    closed_at_us: int  # 0 for a preview
    ranking: Ranking = Ranking.POSITION
    version: int = 0  # of the close: 1 for the first, one more after each reversal; 0 preview


@dataclass(frozen=True, slots=True)
class CycleKey:
    cycle_id: str
    currency: str


def check_header(cycle_id: str, currency: str) -> CycleKey:
    money.identifier("cycle_id", cycle_id)
    money.currency_code("currency", currency)
    return CycleKey(cycle_id, currency)


def check_currency(session: Session, key: CycleKey) -> None:
    get_currency(session, key.currency)


def close(
    database: Database,
    key: CycleKey,
    positions: CycleInputDecoder,
    input_digest: str,
    is_active: Callable[[], bool],
) -> CycleSummary:
    """Close the cycle, or return the summary of its earlier close with the same input.

    `is_active` is asked between the steps of the write and before the commit: False (the
    client went away) rolls the close back and raises Cancelled.
    """
    for attempt in range(1, CLOSE_ATTEMPTS_MAX + 1):
        try:
            if attempt == CLOSE_ATTEMPTS_MAX:
                return _close_holding_locks(database, key, positions, input_digest, is_active)
            with database.read() as session:
                basis = _basis(session, key)
            if isinstance(basis, CycleSummary):
                return _repeat(basis, input_digest)
            plan, summary = _plan(key, basis, positions, input_digest)
            closes.write(database, plan, is_active)
            return summary
        except closes.ClosedMeanwhile:
            with database.read() as session:
                stored = _stored(session, key)
            assert stored is not None, "a close committed first, yet its cycle row is missing"
            if stored.state != CycleState.CLOSED:  # and was reversed since: close again
                continue
            return _repeat(stored, input_digest)
        except closes.Stale as stale:
            log.info("close attempt %d computed again: %s", attempt, stale)
    raise AssertionError("unreachable: the last attempt holds the locks")


def _close_holding_locks(
    database: Database,
    key: CycleKey,
    positions: CycleInputDecoder,
    input_digest: str,
    is_active: Callable[[], bool],
) -> CycleSummary:
    with database.write() as session:
        closes.lock(BatchStatements.of_session(session), key.currency)
        basis = _basis(session, key)
        if isinstance(basis, CycleSummary):
            return _repeat(basis, input_digest)
        plan, summary = _plan(key, basis, positions, input_digest)
        closes.write_holding_locks(database, session, plan, is_active)
    return summary


def _basis(session: Session, key: CycleKey) -> Basis | CycleSummary:
    """What the allocation depends on now, or the stored summary of a closed cycle."""
    get_currency(session, key.currency)
    stored = _stored(session, key)
    if stored is not None and stored.state == CycleState.CLOSED:
        return stored
    db = BatchStatements.of_session(session)
    policy = current_policy(session, key.currency)
    return Basis(
        version=1 if stored is None else stored.version + 1,
        loss_total=cycle_loss_total(db, key.currency, key.cycle_id),
        fund_balance=account_balance(session, key.currency, INSURANCE_FUND),
        policy_version=policy.version,
        insurance_share=policy.insurance_share,
        coverage_ratio=policy.coverage_ratio,
        ranking=policy.ranking,
    )


def _plan(
    key: CycleKey, basis: Basis, positions: CycleInputDecoder, input_digest: str
) -> tuple[ClosePlan, CycleSummary]:
    """The allocation (in Rust, with no lock held) and everything the close writes."""
    policy_share, policy_coverage = basis.insurance_share, basis.coverage_ratio
    result = positions.allocate(
        basis.loss_total, basis.fund_balance, policy_share, policy_coverage, basis.ranking
    )
    _check_fits(result)
    closed_at = now_us()
    transfers = []
    if result.fund_paid > 0:
        transfers.append(
            journal.transfer(
                EntryKind.INSURANCE_COVER,
                key.currency,
                key.cycle_id,
                INSURANCE_FUND,
                SYSTEM_LOSS,
                result.fund_paid,
            )
        )
    if result.uncovered > 0:
        transfers.append(
            journal.transfer(
                EntryKind.UNCOVERED_LOSS,
                key.currency,
                key.cycle_id,
                UNCOVERED_LOSS,
                SYSTEM_LOSS,
                result.uncovered,
            )
        )
    summary = _summary(
        key,
        CycleState.CLOSED,
        basis.loss_total,
        basis.fund_balance,
        result,
        input_digest,
        policy_share,
        policy_coverage,
        closed_at,
        basis.ranking,
        basis.version,
    )
    plan = ClosePlan(
        currency=key.currency,
        cycle_id=key.cycle_id,
        basis=basis,
        fund_paid=result.fund_paid,
        transfers=transfers,
        allocated_total=result.allocated_total,
        cycle_row=_cycle_row(summary, basis.policy_version),
        closed_at_us=closed_at,
        allocations=bulk.allocation_rows(
            result.position_id, result.account_id, result.pnl, result.amount
        ),
        allocations_digest=allocations_digest(
            result.position_id, result.account_id, result.pnl, result.amount
        ),
    )
    return plan, summary


def reverse(database: Database, key: CycleKey, reason: str) -> CycleSummary:
    """Reverse the cycle's close in force, append-only: post the reversal of its fund cover,
    of its uncovered rest and of every allocation flow (one row per allocation, made in bulk
    from the close's rows), as new entries naming what they reverse. The cycle's loss is
    then open again: liquidations may be recorded in it and it may be closed again, as the
    next version. A repeat returns the same (reversed) summary.

    The allocation rows' entry ids are reserved first (on PostgreSQL in a transaction of
    their own). On PostgreSQL the reversal rows are then written holding only the close's
    cycle row, as the close writes its rows before it takes the currency's (a big reversal
    over two connections at once: db/reversals.write_rows); the entries and
    the record are written under the currency's rows, so no liquidation or close of the
    currency comes between the last check and the write. SQLite has one writer: it does it
    all in one transaction. If the close moved meanwhile (reversed by another call), the
    reversal looks again.
    """
    if len(reason) > MEMO_LENGTH_MAX:
        raise InvalidArgument("reason", reason[:32] + "…", f"longer than {MEMO_LENGTH_MAX}")
    for _ in range(REVERSE_ATTEMPTS_MAX):
        with database.read() as session:
            get_currency(session, key.currency)
            db = BatchStatements.of_session(session)
            close = reversals.latest_close(db, key.currency, key.cycle_id)
            if close is None:
                raise _never_closed(db, key)
            if close.reversed:
                stored = _stored(session, key)
                assert stored is not None
                return stored
            count = reversals.allocation_count(db, close)
        first_id = 0
        if count and not database.is_sqlite:
            with database.write() as session:
                first_id = store.reserve_entry_block(BatchStatements.of_session(session), count)
        try:
            with database.write() as session:
                db = BatchStatements.of_session(session)
                if not database.is_sqlite:
                    # The rows first, holding no row that a liquidation locks (as the close
                    # does), only the close's: a second reversal of it waits here.
                    if reversals.lock_close(db, key.currency, key.cycle_id, close) != close:
                        raise _Moved
                    if count:
                        reversals.write_rows(database, db, close, first_id, count)
                accounts = closes.lock(db, key.currency)
                if reversals.latest_close(db, key.currency, key.cycle_id) != close:
                    raise _Moved  # reversed (or reversed and closed again) meanwhile
                if count and database.is_sqlite:
                    first_id = store.reserve_entry_block(db, count)
                    reversals.write_rows(database, db, close, first_id, count)
                summary = _stored(session, key)
                assert summary is not None and summary.state == CycleState.CLOSED
                _post_reversal(session, db, accounts, key, summary, close, first_id, count, reason)
        except _Moved:
            continue
        log.info(
            "reversed close %d of cycle %r of %s: %d allocations, reason %r",
            close.version,
            key.cycle_id,
            key.currency,
            count,
            reason,
        )
        return replace(summary, state=CycleState.REVERSED)
    raise Unavailable(
        f"cycle {key.cycle_id!r} of {key.currency} kept being reversed and closed again "
        "meanwhile; try again"
    )


class _Moved(Exception):
    """The close to reverse changed between the read and the locks."""


def _post_reversal(
    session: Session,
    db: BatchStatements,
    accounts: store.Accounts,
    key: CycleKey,
    summary: CycleSummary,
    close: reversals.CloseRow,
    first_id: int,
    count: int,
    reason: str,
) -> None:
    """Under the currency's rows: the reversal entries of the cover and the uncovered rest,
    system_loss given back the allocated total, and the reversal's record (its chain link)."""
    corrections = _corrections(session, db, key, summary, reason)
    for correction in corrections:
        refused = store.move(accounts, correction)
        if refused is not None:
            raise refused
    if summary.allocated_total:
        refused = store.move_amount(
            accounts, key.currency, SYSTEM_LOSS, None, summary.allocated_total
        )
        if refused is not None:
            raise refused
    reversed_at = now_us()
    heads = store.read_heads(db, [key.currency])
    store.append(db, accounts, heads, corrections, reversed_at)
    reversals.write_record(
        db,
        heads,
        {
            "cycle_pk": close.pk,
            "currency": key.currency,
            "cycle_id": key.cycle_id,
            "version": close.version,
            "reason": reason,
            "reversed_at_us": reversed_at,
            "first_entry_id": first_id,
            "allocation_count": count,
            "allocations_digest": close.allocations_digest,
        },
    )
    db.write_together(heads.writes())


def _never_closed(db: BatchStatements, key: CycleKey) -> LedgerError:
    if has_liquidations(db, key.currency, key.cycle_id):
        return FailedPrecondition(
            f"cycle {key.cycle_id!r} of {key.currency} is open (it has liquidations and no "
            "close): there is no close to reverse (reverse its liquidations instead)",
            type="CYCLE_OPEN",
            subject=f"cycle {key.cycle_id} of {key.currency}",
        )
    return NotFound(f"cycle {key.cycle_id!r} of {key.currency} has not been closed")


def _corrections(
    session: Session, db: BatchStatements, key: CycleKey, summary: CycleSummary, reason: str
) -> list[journal.Transfer]:
    """The reversals of the close's fund cover and uncovered rest, which must be as its
    summary says (anything else is a ledger that VerifyLedger would not pass)."""
    ids = reversals.unreversed_close_entries(db, key.currency, key.cycle_id)
    originals = [store.load_entry(session, entry_id) for entry_id in ids]
    found = sorted((int(e.kind), e.transfer().amount) for e in originals)
    expected = sorted(
        (int(kind), amount)
        for kind, amount in (
            (EntryKind.INSURANCE_COVER, summary.fund_paid),
            (EntryKind.UNCOVERED_LOSS, summary.uncovered),
        )
        if amount
    )
    if found != expected:
        raise FailedPrecondition(
            f"cycle {key.cycle_id!r} of {key.currency}: its close's entries are {found}, its "
            f"summary says {expected}; run VerifyLedger",
            type="LEDGER_INCONSISTENT",
            subject=f"cycle {key.cycle_id} of {key.currency}",
        )
    return [journal.reversal(e.transfer(), e.entry_id, reason) for e in originals]


def preview(
    session: Session, key: CycleKey, positions: CycleInputDecoder, input_digest: str
) -> CycleSummary:
    """The same computation over the ledger as it is now; writes nothing."""
    get_currency(session, key.currency)
    fund_balance = account_balance(session, key.currency, INSURANCE_FUND)
    loss = cycle_loss_total(BatchStatements.of_session(session), key.currency, key.cycle_id)
    policy = current_policy(session, key.currency)
    result = positions.allocate(
        loss, fund_balance, policy.insurance_share, policy.coverage_ratio, policy.ranking
    )
    _check_fits(result)
    return _summary(
        key,
        CycleState.PREVIEW,
        loss,
        fund_balance,
        result,
        input_digest,
        policy.insurance_share,
        policy.coverage_ratio,
        0,
        policy.ranking,
    )


def get(session: Session, key: CycleKey, version: int = 0) -> CycleSummary:
    """The summary of one close of the cycle: `version` 0 is the latest, 1 the first (a
    cycle is closed again only after its close is reversed)."""
    get_currency(session, key.currency)
    stored = _stored(session, key, version) if version <= VERSION_MAX else None
    if stored is not None:
        return stored
    if version and _stored(session, key) is not None:
        raise NotFound(f"cycle {key.cycle_id!r} of {key.currency} has no close version {version}")
    raise NotFound(f"cycle {key.cycle_id!r} of {key.currency} has not been closed")


def allocations(
    session: Session, key: CycleKey, account_id: int | None, rows_per_chunk: int
) -> Iterator[bulk.AllocationColumns]:
    """The allocations of the cycle's latest close in position_id order, in chunks of at most
    rows_per_chunk rows, straight from the ledger's rows (a reversed close's too: its summary
    says that they were reversed)."""
    get_currency(session, key.currency)
    row = latest_row(session, key)
    if row is None:
        raise NotFound(f"cycle {key.cycle_id!r} of {key.currency} has not been closed")
    yield from bulk.read_allocations(session, row.id, account_id, rows_per_chunk)


def latest_row(session: Session, key: CycleKey) -> models.Cycle | None:
    """The cycle row of the cycle's latest close, reversed or not."""
    return session.scalars(
        select(models.Cycle)
        .where(models.Cycle.currency == key.currency, models.Cycle.cycle_id == key.cycle_id)
        .order_by(models.Cycle.version.desc())
        .limit(1)
    ).one_or_none()


def _stored(session: Session, key: CycleKey, version: int = 0) -> CycleSummary | None:
    """The summary of the cycle's close `version` (0: its latest), or None."""
    query = _with_reversal().where(
        models.Cycle.currency == key.currency, models.Cycle.cycle_id == key.cycle_id
    )
    if version:
        query = query.where(models.Cycle.version == version)
    found = session.execute(query.order_by(models.Cycle.version.desc()).limit(1)).one_or_none()
    return None if found is None else _summary_of(found[0], found[1] is not None)


def _with_reversal() -> Select[models.Cycle, int]:
    """Cycle rows, each with its reversal's key (None while the close is in force)."""
    return select(models.Cycle, models.CycleReversal.cycle_pk).outerjoin(
        models.CycleReversal, models.CycleReversal.cycle_pk == models.Cycle.id
    )


def _summary_of(row: models.Cycle, reversed: bool) -> CycleSummary:
    return CycleSummary(
        cycle_id=row.cycle_id,
        currency=row.currency,
        state=CycleState.REVERSED if reversed else CycleState.CLOSED,
        loss_total=row.loss_total,
        fund_balance_before=row.fund_balance_before,
        fund_share=row.fund_share,
        fund_paid=row.fund_paid,
        user_due=row.user_due,
        allocated_total=row.allocated_total,
        uncovered=row.uncovered,
        positions_total=row.positions_total,
        profitable_count=row.profitable_count,
        profit_total=row.profit_total,
        participant_count=row.participant_count,
        participant_profit=row.participant_profit,
        cutoff_pnl=row.cutoff_pnl,
        widened=row.widened,
        input_digest=row.input_digest,
        insurance_share=row.insurance_share,
        coverage_ratio=row.coverage_ratio,
        closed_at_us=row.closed_at_us,
        ranking=Ranking(row.ranking),
        version=row.version,
    )


def _repeat(stored: CycleSummary, input_digest: str) -> CycleSummary:
    if stored.input_digest != input_digest:
        raise AlreadyExists(
            f"cycle {stored.cycle_id!r} of {stored.currency} was closed with input_digest "
            f"{stored.input_digest}; this close has input_digest {input_digest}"
        )
    return stored


def _check_fits(result: AllocationResult) -> None:
    """The contract carries totals as sint64; a profit sum beyond it cannot be reported."""
    for name in ("profit_total", "participant_profit"):
        value = getattr(result, name)
        if value > INT64_MAX:
            raise InvalidArgument(name, value, "exceeds a signed 64-bit integer of minor units")


def _summary(
    key: CycleKey,
    state: CycleState,
    loss: int,
    fund_balance: int,
    result: AllocationResult,
    input_digest: str,
    insurance_share: str,
    coverage_ratio: str,
    closed_at_us: int,
    ranking: Ranking,
    version: int = 0,
) -> CycleSummary:
    return CycleSummary(
        cycle_id=key.cycle_id,
        currency=key.currency,
        state=state,
        loss_total=loss,
        fund_balance_before=fund_balance,
        fund_share=result.fund_share,
        fund_paid=result.fund_paid,
        user_due=result.user_due,
        allocated_total=result.allocated_total,
        uncovered=result.uncovered,
        positions_total=result.positions_total,
        profitable_count=result.profitable_count,
        profit_total=result.profit_total,
        participant_count=result.participant_count,
        participant_profit=result.participant_profit,
        cutoff_pnl=result.cutoff_pnl,
        widened=result.widened,
        input_digest=input_digest,
        insurance_share=insurance_share,
        coverage_ratio=coverage_ratio,
        closed_at_us=closed_at_us,
        ranking=ranking,
        version=version,
    )


def _cycle_row(summary: CycleSummary, policy_version: int) -> dict[str, object]:
    """The cycle row's columns but its id and allocation_first_entry_id (the store's)."""
    row = {name: getattr(summary, name) for name in CycleSummary.__slots__ if name != "state"}
    row["policy_version"] = policy_version
    row["ranking"] = int(summary.ranking)
    return row


@dataclass(frozen=True, slots=True)
class CyclePage:
    cycles: list[CycleSummary]
    next_page_token: str


def list_cycles(session: Session, currency: str, page_size: int, page_token: str) -> CyclePage:
    """The currency's cycle closes (a reversed one and the close after it each appear), newest
    first, in pages; the token is the last close's (closed_at_us, id) as
    "<closed_at_us>.<id>"."""
    get_currency(session, currency)
    if page_size < 0 or page_size > PAGE_SIZE_MAX:
        raise InvalidArgument("page_size", page_size, f"must be 0 to {PAGE_SIZE_MAX}")
    size = page_size or PAGE_SIZE_DEFAULT
    query = (
        _with_reversal()
        .where(models.Cycle.currency == currency)
        .order_by(models.Cycle.closed_at_us.desc(), models.Cycle.id.desc())
        .limit(size + 1)
    )
    if page_token:
        closed_at, pk = _page_token(page_token)
        query = query.where(
            (models.Cycle.closed_at_us < closed_at)
            | ((models.Cycle.closed_at_us == closed_at) & (models.Cycle.id < pk))
        )
    rows = list(session.execute(query))
    page = rows[:size]
    token = f"{page[-1][0].closed_at_us}.{page[-1][0].id}" if len(rows) > size else ""
    return CyclePage([_summary_of(row, pk is not None) for row, pk in page], token)


def _page_token(token: str) -> tuple[int, int]:
    closed_at, dot, pk = token.partition(".")
    if not dot:
        raise InvalidArgument("page_token", token, "is not a token from a previous page")
    return money.page_token_number(token, closed_at), money.page_token_number(token, pk)


@dataclass(frozen=True, slots=True)
class OpenCycle:
    cycle_id: str
    currency: str
    loss_total: int
    liquidations_count: int
    first_recorded_at_us: int
    last_recorded_at_us: int


def list_open(session: Session, currency: str) -> list[OpenCycle]:
    """Every cycle with liquidations and no close in force (empty currency: every one)."""
    if currency:
        get_currency(session, currency)
    rows = open_cycles(BatchStatements.of_session(session), currency)
    return [
        OpenCycle(str(cycle_id), str(code), int(loss), int(count), int(first), int(last))
        for code, cycle_id, loss, count, first, last in rows
    ]
