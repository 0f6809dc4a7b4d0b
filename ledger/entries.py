"""Reading the journal of one account, newest first, in pages.

Allocation flows and their reversals live in their own compact tables (see
db/models.Allocation and AllocationReversal) and are merged in here, so a reader sees one
journal.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

from sqlalchemy import Result, literal, select
from sqlalchemy.orm import Session

from ledger import money
from ledger.currency import get_currency
from ledger.db import models
from ledger.db.store import StoredEntry, stored_entry
from ledger.db.u64 import to_signed, to_unsigned
from ledger.errors import InvalidArgument
from ledger.journal import (
    SYSTEM_LOSS,
    EntryKind,
    Posting,
    parse_account,
    user_account,
    user_account_id,
)
from ledger.limits import INT64_MAX, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX


@dataclass(frozen=True, slots=True)
class EntryPage:
    entries: list[StoredEntry]
    next_page_token: str


def list_entries(
    session: Session,
    currency: str,
    account: str,
    kind: int | None,
    page_size: int,
    page_token: str,
) -> EntryPage:
    parse_account("account", account)
    if kind is not None and kind not in EntryKind.__members__.values():
        raise InvalidArgument("kind", kind, "is not an entry kind")
    if page_size < 0 or page_size > PAGE_SIZE_MAX:
        raise InvalidArgument("page_size", page_size, f"must be 0 to {PAGE_SIZE_MAX}")
    size = page_size or PAGE_SIZE_DEFAULT
    before = _decode_token(page_token)
    get_currency(session, currency)

    sources = [
        _journal_rows(session, currency, account, kind, before, size + 1, debit=True),
        _journal_rows(session, currency, account, kind, before, size + 1, debit=False),
    ]
    allocated = account == SYSTEM_LOSS or user_account_id(account) is not None
    if kind in (None, EntryKind.ALLOCATION) and allocated:  # the accounts allocations move
        sources.append(_allocation_rows(session, currency, account, before, size + 1))
        sources.append(_reversal_rows(session, currency, account, before, size + 1))
    merged = list(heapq.merge(*sources, key=lambda e: -e.entry_id))[: size + 1]
    has_more = len(merged) > size
    page = merged[:size]
    token = str(page[-1].entry_id) if has_more else ""
    return EntryPage(page, token)


def _decode_token(token: str) -> int:
    if not token:
        return INT64_MAX
    return money.page_token_number(token, token)


def _journal_rows(
    session: Session,
    currency: str,
    account: str,
    kind: int | None,
    before: int,
    limit: int,
    *,
    debit: bool,
) -> list[StoredEntry]:
    column = models.Entry.debit_account if debit else models.Entry.credit_account
    query = (
        select(models.Entry)
        .where(models.Entry.currency == currency, column == account, models.Entry.id < before)
        .order_by(models.Entry.id.desc())
        .limit(limit)
    )
    if kind is not None:
        query = query.where(models.Entry.kind == kind)
    return [stored_entry(row) for row in session.scalars(query)]


def _allocation_rows(
    session: Session, currency: str, account: str, before: int, limit: int
) -> list[StoredEntry]:
    """Allocation entries of one account (a user, or system_loss for all), newest first.

    Cycles are visited by their block of entry ids, newest first: each close takes one
    block of consecutive ids, so a cycle visited later has all its ids below an earlier
    one's. For a user each visit is one seek on the allocations key (cycle, account,
    position).
    """
    cycle = models.Cycle
    blocks = session.execute(
        select(cycle.id, cycle.cycle_id, cycle.closed_at_us, literal(""), literal(0))
        .where(cycle.currency == currency, cycle.allocation_first_entry_id < before)
        .order_by(cycle.allocation_first_entry_id.desc())
    )
    return _block_rows(session, models.Allocation, blocks, currency, account, before, limit)


def _reversal_rows(
    session: Session, currency: str, account: str, before: int, limit: int
) -> list[StoredEntry]:
    """The reversed allocation flows of one account, newest first, the same way: each
    reversal took one block of ids; its rows name the allocations they reverse."""
    reversal, cycle = models.CycleReversal, models.Cycle
    blocks = session.execute(
        select(
            reversal.cycle_pk,
            reversal.cycle_id,
            reversal.reversed_at_us,
            reversal.reason,
            cycle.allocation_first_entry_id - reversal.first_entry_id,
        )
        .join(cycle, cycle.id == reversal.cycle_pk)
        .where(
            reversal.currency == currency,
            reversal.first_entry_id < before,
            reversal.allocation_count > 0,
        )
        .order_by(reversal.first_entry_id.desc())
    )
    return _block_rows(session, models.AllocationReversal, blocks, currency, account, before, limit)


def _block_rows(
    session: Session,
    table: type[models.Allocation] | type[models.AllocationReversal],
    blocks: Result[int, str, int, str, int],
    currency: str,
    account: str,
    before: int,
    limit: int,
) -> list[StoredEntry]:
    """The rows of `table` in the blocks (cycle_pk, cycle_id, created_at_us, memo, and the
    offset from a reversal row's entry id to the allocation's it reverses), newest first."""
    user_id = user_account_id(account)
    found: list[StoredEntry] = []
    for cycle_pk, cycle_id, created_at_us, memo, offset in blocks:
        query = (
            select(table)
            .where(table.cycle_pk == cycle_pk, table.entry_id < before)
            .order_by(table.entry_id.desc())
            .limit(limit - len(found))
        )
        if user_id is not None:
            query = query.where(table.account_id == to_signed(user_id))
        for row in session.scalars(query):
            if isinstance(row, models.AllocationReversal):
                found.append(
                    allocation_reversal_entry(currency, cycle_id, created_at_us, memo, offset, row)
                )
            elif isinstance(row, models.Allocation):
                found.append(allocation_entry(currency, cycle_id, created_at_us, row))
        if len(found) >= limit:
            break
    return found


def allocation_entry(
    currency: str,
    cycle_id: str,
    closed_at_us: int,
    row: models.AllocationRow,
) -> StoredEntry:
    user = user_account(to_unsigned(row.account_id))
    return StoredEntry(
        entry_id=row.entry_id,
        kind=EntryKind.ALLOCATION,
        currency=currency,
        reference=cycle_id,
        postings=(Posting(user, -row.amount), Posting(SYSTEM_LOSS, row.amount)),
        created_at_us=closed_at_us,
        position_id=to_unsigned(row.position_id),
        pnl=row.pnl,
    )


def allocation_reversal_entry(
    currency: str,
    cycle_id: str,
    reversed_at_us: int,
    reason: str,
    offset: int,
    row: models.AllocationReversal,
) -> StoredEntry:
    """The reversal of an allocation flow: the allocation's entry with its postings turned
    round, under its own id, naming the allocation's entry (this row's entry id + offset)."""
    flow = allocation_entry(currency, cycle_id, reversed_at_us, row)
    return replace(
        flow,
        postings=tuple(Posting(p.account, -p.amount) for p in reversed(flow.postings)),
        memo=reason,
        reverses=row.entry_id + offset,
    )
