"""Reading the journal of one account, newest first, in pages.

Allocation flows live in their own compact table (see db/models.Allocation) and are merged
in here, so a reader sees one journal.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

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
    if kind in (None, EntryKind.ALLOCATION):
        sources.append(_allocation_rows(session, currency, account, before, size + 1))
    merged = list(heapq.merge(*sources, key=lambda e: -e.entry_id))[: size + 1]
    has_more = len(merged) > size
    page = merged[:size]
    token = str(page[-1].entry_id) if has_more else ""
    return EntryPage(page, token)


def _decode_token(token: str) -> int:
    if not token:
        return INT64_MAX
    if not token.isdigit() or len(token) > 19:
        raise InvalidArgument("page_token", token, "is not a token from a previous page")
    return int(token)


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
    user_id = user_account_id(account)
    if user_id is None and account != SYSTEM_LOSS:
        return []
    alloc, cycle = models.Allocation, models.Cycle
    cycles = session.execute(
        select(cycle.id, cycle.cycle_id, cycle.closed_at_us)
        .where(cycle.currency == currency, cycle.allocation_first_entry_id < before)
        .order_by(cycle.allocation_first_entry_id.desc())
    )
    found: list[StoredEntry] = []
    for cycle_pk, cycle_id, closed_at_us in cycles:
        query = (
            select(alloc)
            .where(alloc.cycle_pk == cycle_pk, alloc.entry_id < before)
            .order_by(alloc.entry_id.desc())
            .limit(limit - len(found))
        )
        if user_id is not None:
            query = query.where(alloc.account_id == to_signed(user_id))
        found.extend(
            allocation_entry(currency, cycle_id, closed_at_us, row)
            for row in session.scalars(query)
        )
        if len(found) >= limit:
            break
    return found


def allocation_entry(
    currency: str, cycle_id: str, closed_at_us: int, row: models.Allocation
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
