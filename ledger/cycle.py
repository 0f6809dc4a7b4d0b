"""The cycle close: cover the cycle's system loss from the fund and the profitable positions.

The clearing system streams every position's profit for the cycle; the Rust core ranks, cuts
and splits (ledger.alloc); this module reads the ledger's side of the inputs under the locks
that keep them still, and writes the whole outcome in one transaction: the fund's cover, one
ALLOCATION flow per allocated position, the uncovered rest, and the closed cycle's summary.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from ledger import journal, money
from ledger.alloc import AllocationResult, CycleInputDecoder
from ledger.currency import current_policy, get_currency
from ledger.db import bulk, models
from ledger.db.store import (
    account_balance,
    account_deltas,
    apply_deltas,
    insert_entries,
    lock_account,
    lock_system_loss,
    now_us,
)
from ledger.errors import AlreadyExists, InvalidArgument, NotFound
from ledger.journal import INSURANCE_FUND, SYSTEM_LOSS, UNCOVERED_LOSS, EntryKind
from ledger.limits import INT64_MAX
from ledger.liquidation import loss_total as cycle_loss_total

ReserveIds = Callable[[Session, int], int]


class CycleState(enum.IntEnum):
    """Numbers are those of insurance.v1.CycleState."""

    PREVIEW = 1
    CLOSED = 2


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
    session: Session,
    key: CycleKey,
    positions: CycleInputDecoder,
    input_digest: str,
    reserve_ids: ReserveIds,
) -> CycleSummary:
    """Close the cycle, or return the summary of its earlier close with the same input.

    Runs in the caller's write transaction. Locks the currency's system_loss row first (every
    liquidation batch takes it too, so the loss total cannot move), then the fund's row.
    """
    get_currency(session, key.currency)
    lock_system_loss(session, [key.currency])
    fund_balance = lock_account(session, key.currency, INSURANCE_FUND)
    stored = _stored(session, key)
    if stored is not None:
        return _repeat(stored, input_digest)
    loss = cycle_loss_total(session, key.currency, key.cycle_id)
    policy = current_policy(session, key.currency)
    result = positions.allocate(loss, fund_balance, policy.insurance_share, policy.coverage_ratio)
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
    deltas = account_deltas(transfers)
    if result.allocated_total > 0:  # the user side has no cached row (see models.Account)
        credits, debits = deltas.get((key.currency, SYSTEM_LOSS), (0, 0))
        deltas[(key.currency, SYSTEM_LOSS)] = (credits + result.allocated_total, debits)
    apply_deltas(session, deltas)

    allocations = result.allocation_count
    first_id = reserve_ids(session, len(transfers) + allocations) if transfers or allocations else 0
    summary = _summary(
        key,
        CycleState.CLOSED,
        loss,
        fund_balance,
        result,
        input_digest,
        policy.insurance_share,
        policy.coverage_ratio,
        closed_at,
    )
    cycle_pk = session.execute(
        insert(models.Cycle).returning(models.Cycle.id),
        [_cycle_row(summary, policy.version, first_id + len(transfers))],
    ).scalar_one()
    insert_entries(session, first_id, transfers, closed_at)
    bulk.write_allocations(
        session,
        cycle_pk,
        first_id + len(transfers),
        result.position_id,
        result.account_id,
        result.pnl,
        result.amount,
    )
    return summary


def preview(
    session: Session, key: CycleKey, positions: CycleInputDecoder, input_digest: str
) -> CycleSummary:
    """The same computation over the ledger as it is now; writes nothing."""
    get_currency(session, key.currency)
    fund_balance = account_balance(session, key.currency, INSURANCE_FUND)
    loss = cycle_loss_total(session, key.currency, key.cycle_id)
    policy = current_policy(session, key.currency)
    result = positions.allocate(loss, fund_balance, policy.insurance_share, policy.coverage_ratio)
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
    )


def get(session: Session, key: CycleKey) -> CycleSummary:
    get_currency(session, key.currency)
    stored = _stored(session, key)
    if stored is None:
        raise NotFound(f"cycle {key.cycle_id!r} of {key.currency} has not been closed")
    return stored


def allocations(
    session: Session, key: CycleKey, account_id: int | None, rows_per_chunk: int
) -> Iterator[bulk.AllocationColumns]:
    """A closed cycle's allocations in position_id order, in chunks of at most
    rows_per_chunk rows, straight from the ledger's rows."""
    get_currency(session, key.currency)
    pk = session.scalar(
        select(models.Cycle.id).where(
            models.Cycle.currency == key.currency, models.Cycle.cycle_id == key.cycle_id
        )
    )
    if pk is None:
        raise NotFound(f"cycle {key.cycle_id!r} of {key.currency} has not been closed")
    yield from bulk.read_allocations(session, pk, account_id, rows_per_chunk)


def _stored(session: Session, key: CycleKey) -> CycleSummary | None:
    row = session.scalars(
        select(models.Cycle).where(
            models.Cycle.currency == key.currency, models.Cycle.cycle_id == key.cycle_id
        )
    ).one_or_none()
    if row is None:
        return None
    return CycleSummary(
        cycle_id=row.cycle_id,
        currency=row.currency,
        state=CycleState.CLOSED,
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
    )


def _cycle_row(
    summary: CycleSummary, policy_version: int, first_allocation_id: int
) -> dict[str, object]:
    row = {
        name: getattr(summary, name)
        for name in CycleSummary.__slots__
        if name not in ("state", "closed_at_us")
    }
    row.update(
        policy_version=policy_version,
        allocation_first_entry_id=first_allocation_id,
        closed_at_us=summary.closed_at_us,
    )
    return row
