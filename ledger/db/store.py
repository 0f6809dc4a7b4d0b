"""Writing and reading the journal: id blocks, entries, and the cached account totals.

Domain modules call these with the session of the current unit of work; nothing here commits.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from ledger.db import models
from ledger.errors import FailedPrecondition, InvalidArgument, NotFound
from ledger.journal import (
    NON_NEGATIVE_ACCOUNTS,
    SYSTEM_ACCOUNTS,
    SYSTEM_LOSS,
    EntryKind,
    Posting,
    Transfer,
)
from ledger.limits import INT64_MAX, INT64_MIN


def now_us() -> int:
    return time.time_ns() // 1000


# Statements built once against the tables (Core, not ORM: no identity map to keep in step,
# and SQLAlchemy reuses the compiled form without rebuilding the expression per call).
_ACCOUNTS = models.Base.metadata.tables["accounts"]
_COUNTERS = models.Base.metadata.tables["counters"]

_RESERVE_IDS = (
    update(_COUNTERS)
    .where(_COUNTERS.c.name == "entry_id")
    .values(next_value=_COUNTERS.c.next_value + bindparam("count"))
    .returning(_COUNTERS.c.next_value)
)

# Every bound is rearranged so that no intermediate value can overflow on either backend.
_MOVE = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.currency == bindparam("b_currency"), _ACCOUNTS.c.name == bindparam("b_name"))
    .where(_ACCOUNTS.c.credit_total <= bindparam("credit_room"))
    .where(_ACCOUNTS.c.debit_total <= bindparam("debit_room"))
    .values(
        balance=_ACCOUNTS.c.balance + bindparam("delta"),
        credit_total=_ACCOUNTS.c.credit_total + bindparam("credits"),
        debit_total=_ACCOUNTS.c.debit_total + bindparam("debits"),
    )
    .returning(_ACCOUNTS.c.balance)
)
_MOVE_UP = _MOVE.where(_ACCOUNTS.c.balance <= bindparam("bound"))  # bound = INT64_MAX − delta
_MOVE_DOWN = _MOVE.where(_ACCOUNTS.c.balance >= bindparam("bound"))  # bound = floor − delta

_LOCK_SYSTEM_LOSS = (
    select(_ACCOUNTS.c.id)
    .where(_ACCOUNTS.c.currency == bindparam("b_currency"), _ACCOUNTS.c.name == SYSTEM_LOSS)
    .with_for_update()
)


@dataclass(frozen=True, slots=True)
class StoredEntry:
    entry_id: int
    kind: EntryKind
    currency: str
    reference: str
    postings: tuple[Posting, ...]
    created_at_us: int
    memo: str = ""
    position_id: int = 0
    pnl: int = 0


def reserve_entry_ids(session: Session, count: int) -> int:
    """Take `count` consecutive entry ids; returns the first. Holds the counter's row lock
    until the transaction ends, so blocks never overlap, also across server processes."""
    assert count > 0
    next_value = session.execute(_RESERVE_IDS, {"count": count}).scalar_one()
    return int(next_value) - count


def post(session: Session, transfers: Sequence[Transfer], created_at_us: int) -> list[int]:
    """Append entries and move the cached totals of the system accounts they touch.

    Raises FailedPrecondition (and the caller's transaction rolls back) when an account that
    must stay non-negative would go below zero.
    """
    if not transfers:
        return []
    # Lock order everywhere: system_loss rows, then the other accounts by name, then the id
    # counter last (see lock_system_loss), so that no two writers ever wait on each other.
    apply_deltas(session, account_deltas(transfers))
    first = reserve_entry_ids(session, len(transfers))
    ids = list(range(first, first + len(transfers)))
    insert_entries(session, first, transfers, created_at_us)
    return ids


def insert_entries(
    session: Session, first_id: int, transfers: Sequence[Transfer], created_at_us: int
) -> None:
    """Insert entries with the consecutive ids first_id, first_id + 1, … (already reserved)."""
    if not transfers:
        return
    session.execute(
        insert(models.Entry),
        [
            {
                "id": first_id + n,
                "currency": t.currency,
                "kind": int(t.kind),
                "reference": t.reference,
                "debit_account": t.debit,
                "credit_account": t.credit,
                "amount": t.amount,
                "memo": t.memo,
                "created_at_us": created_at_us,
            }
            for n, t in enumerate(transfers)
        ],
    )


Deltas = dict[tuple[str, str], tuple[int, int]]  # (currency, account) → (credits, debits)


def account_deltas(transfers: Sequence[Transfer]) -> Deltas:
    totals: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for t in transfers:
        totals[(t.currency, t.credit)][0] += t.amount
        totals[(t.currency, t.debit)][1] += t.amount
    return {key: (c, d) for key, (c, d) in totals.items() if key[1] in SYSTEM_ACCOUNTS}


def apply_deltas(session: Session, deltas: Deltas) -> dict[tuple[str, str], int]:
    """Move the cached totals in a fixed order (so two writers never deadlock) and return the
    new balances. The UPDATE itself holds the row lock and re-checks every bound: the floor of
    a non-negative account, and int64 for the balance and both running totals (the bounds are
    rearranged so that no intermediate value can overflow on either backend)."""
    balances: dict[tuple[str, str], int] = {}
    for (currency, name), (credits, debits) in sorted(deltas.items()):
        delta = credits - debits
        floor = 0 if name in NON_NEGATIVE_ACCOUNTS else INT64_MIN
        params = {
            "b_currency": currency,
            "b_name": name,
            "credits": credits,
            "debits": debits,
            "delta": delta,
            "credit_room": INT64_MAX - credits,
            "debit_room": INT64_MAX - debits,
        }
        if delta > 0:
            statement, params["bound"] = _MOVE_UP, INT64_MAX - delta
        elif delta < 0:
            statement, params["bound"] = _MOVE_DOWN, floor - delta
        else:
            statement = _MOVE
        balance = session.execute(statement, params).scalar_one_or_none()
        if balance is None:
            _refuse(session, currency, name, delta, floor)
        balances[(currency, name)] = int(balance)
    return balances


def _refuse(session: Session, currency: str, name: str, delta: int, floor: int) -> NoReturn:
    current = account_balance(session, currency, name)
    if delta < 0 and floor == 0 and current + delta < 0:
        raise FailedPrecondition(
            f"{name} of {currency} has balance {current}, less than the {-delta} to be "
            "taken from it"
        )
    raise InvalidArgument(
        "amount", abs(delta), f"would take {name} of {currency} beyond a signed 64-bit integer"
    )


def account_balance(session: Session, currency: str, name: str) -> int:
    balance = session.scalar(
        select(models.Account.balance).where(
            models.Account.currency == currency, models.Account.name == name
        )
    )
    if balance is None:
        raise NotFound(f"currency {currency!r} has no account {name!r}")
    return int(balance)


def lock_system_loss(session: Session, currencies: Sequence[str]) -> None:
    """Take the system_loss rows of these currencies first, in code order.

    A cycle close and every liquidation batch of a currency take this row before anything
    else, so a liquidation either lands before a close reads the cycle's loss or sees the
    cycle closed; and since every writer takes system_loss rows first, accounts next (by
    currency and name) and the id counter last, no two writers wait on each other in a cycle.
    """
    if not currencies or session.get_bind().dialect.name == "sqlite":
        return  # SQLite: BEGIN IMMEDIATE already serialises writers
    for currency in sorted(set(currencies)):
        session.execute(_LOCK_SYSTEM_LOSS, {"b_currency": currency}).all()


def lock_account(session: Session, currency: str, name: str) -> int:
    """Lock one system account row and return its balance."""
    query = select(models.Account.balance).where(
        models.Account.currency == currency, models.Account.name == name
    )
    if session.get_bind().dialect.name != "sqlite":
        query = query.with_for_update()
    return int(session.execute(query).scalar_one())


def stored_entry(row: models.Entry) -> StoredEntry:
    t = Transfer(
        EntryKind(row.kind),
        row.currency,
        row.reference,
        row.debit_account,
        row.credit_account,
        row.amount,
        row.memo,
    )
    return StoredEntry(
        row.id, t.kind, t.currency, t.reference, t.postings(), row.created_at_us, row.memo
    )


def load_entry(session: Session, entry_id: int) -> StoredEntry:
    row = session.get(models.Entry, entry_id)
    assert row is not None, f"entry {entry_id} is referenced but missing"
    return stored_entry(row)
