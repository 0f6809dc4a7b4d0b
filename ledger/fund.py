"""The insurance fund of a currency: operator transfers in and out, and its balance."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ledger import journal, money
from ledger.currency import get_currency
from ledger.db import models
from ledger.db.session import Database
from ledger.db.store import StoredEntry, load_entry, now_us, post_in
from ledger.errors import AlreadyExists, InvalidArgument
from ledger.idempotency import request_hash
from ledger.journal import EXTERNAL, INSURANCE_FUND, EntryKind
from ledger.limits import MEMO_LENGTH_MAX


class Direction(enum.IntEnum):
    """Numbers are those of insurance.v1.TransferDirection."""

    DEPOSIT = 1
    WITHDRAW = 2


@dataclass(frozen=True, slots=True)
class FundView:
    currency: str
    balance: int
    inflow_total: int
    outflow_total: int


def transfer_fund(
    session: Session,
    transfer_id: str,
    currency: str,
    direction: int,
    amount: int,
    memo: str,
) -> StoredEntry:
    """Deposit into or withdraw from the fund, once per transfer_id."""
    money.identifier("transfer_id", transfer_id)
    money.currency_code("currency", currency)
    if direction not in Direction.__members__.values():
        raise InvalidArgument("direction", direction, "must be DEPOSIT (1) or WITHDRAW (2)")
    money.positive_amount("amount", amount)
    if len(memo) > MEMO_LENGTH_MAX:
        raise InvalidArgument("memo", memo[:32] + "…", f"longer than {MEMO_LENGTH_MAX}")
    get_currency(session, currency)
    digest = request_hash(
        transfer_id=transfer_id, currency=currency, direction=direction, amount=amount, memo=memo
    )
    previous = _previous_transfer(session, transfer_id, digest)
    if previous is not None:
        return previous
    if direction == Direction.DEPOSIT:
        kind, debit, credit = EntryKind.FUND_DEPOSIT, EXTERNAL, INSURANCE_FUND
    else:
        kind, debit, credit = EntryKind.FUND_WITHDRAWAL, INSURANCE_FUND, EXTERNAL
    entry = journal.transfer(kind, currency, transfer_id, debit, credit, amount, memo)
    try:
        with session.begin_nested():
            (entry_id,) = post_in(session, [entry], now_us())
            session.add(
                models.Transfer(transfer_id=transfer_id, request_hash=digest, entry_id=entry_id)
            )
            session.flush()
    except IntegrityError:  # the same transfer_id committed concurrently
        previous = _previous_transfer(session, transfer_id, digest)
        if previous is None:
            raise
        return previous
    return load_entry(session, entry_id)


def _previous_transfer(session: Session, transfer_id: str, digest: str) -> StoredEntry | None:
    row = session.get(models.Transfer, transfer_id, populate_existing=True)
    if row is None:
        return None
    if row.request_hash != digest:
        raise AlreadyExists(
            f"transfer_id {transfer_id!r} was already used for a different transfer"
        )
    return load_entry(session, row.entry_id)


def get_fund(session: Session, currency: str) -> FundView:
    get_currency(session, currency)
    row = session.scalars(
        select(models.Account).where(
            models.Account.currency == currency, models.Account.name == INSURANCE_FUND
        )
    ).one()
    return FundView(currency, row.balance, row.credit_total, row.debit_total)


def balances(database: Database) -> list[tuple[str, int]]:
    """Every currency's fund balance (for the metrics), in one read."""
    with database.read() as session:
        rows = session.execute(
            select(models.Account.currency, models.Account.balance)
            .where(models.Account.name == INSURANCE_FUND)
            .order_by(models.Account.currency)
        ).all()
    return [(str(currency), int(balance)) for currency, balance in rows]
