"""The journal's rules as every writer applies them: the lock order, an account's bounds, how
entry ids are reserved, and how entries are appended.

Each rule is written once, here, and used by every writer: the liquidation batches, fund
transfers and the cycle close. Domain modules call these inside the caller's transaction;
nothing here commits.

- Lock order: a writer locks every system account row it will move in one statement, in one
  order (system_loss rows first, then the other accounts by currency and name), before it
  reads anything the rows guard; so two writers never wait on each other in a cycle, and a
  liquidation either lands before a close reads the cycle's loss or sees the cycle closed.
- Bounds: a balance and both running totals stay within int64, and the insurance fund never
  goes below zero. The locked rows are moved in memory (AccountState.move) and written back.
- Chain: every entry and cycle close is a link of its currency's chain (journal.entry_hash);
  the head is read under the locks (every writer of a currency locks its insurance_fund row)
  and moved with the links.
- Entry ids: on PostgreSQL from the sequence `entry_ids`, so that writers of different
  currencies share no hot row; a cycle close takes a consecutive block for its allocation
  rows. On SQLite (one writer at a time anyway) from the `counters` row.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger import journal
from ledger.db import models
from ledger.db.batch import BatchStatements, Insert, Query, Statement
from ledger.errors import FailedPrecondition, InvalidArgument, LedgerError, NotFound
from ledger.journal import (
    INSURANCE_FUND,
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


ENTRIES = models.Base.metadata.tables["entries"]

# --- the lock order -----------------------------------------------------------------------

_LOCK_ACCOUNTS = (
    "SELECT currency, name, balance, credit_total, debit_total FROM accounts"
    " WHERE name IN ({names}) AND currency {{}}"
    f" ORDER BY CASE WHEN name = '{SYSTEM_LOSS}' THEN 0 ELSE 1 END, currency, name"
)


def lock_accounts_query(db: BatchStatements, names: Sequence[str], currencies: Query) -> Query:
    """The query that locks these accounts of the currencies in the lock order.

    `currencies` gives the currency condition as a query whose `{}` is the key condition
    (`SELECT margin_currency FROM contracts WHERE symbol {}`, say) or, with sql "", the
    currency codes themselves as its keys.
    """
    assert set(names) <= set(SYSTEM_ACCOUNTS), names
    quoted = ", ".join(f"'{name}'" for name in sorted(names))
    sql = _LOCK_ACCOUNTS.format(names=quoted)
    if currencies.sql:
        sql = sql.format(f"IN ({currencies.sql})")
    return Query(sql + db.for_update, currencies.keys, currencies.params)


def currency_keys(codes: Iterable[str]) -> Query:
    return Query("", codes)


# --- bounds -------------------------------------------------------------------------------


@dataclass(slots=True)
class AccountState:
    """A system account row as locked by a writer, moved in memory until it is written back."""

    currency: str
    name: str
    balance: int
    credit_total: int
    debit_total: int
    moved: bool = False

    @property
    def floor(self) -> int:
        return 0 if self.name in NON_NEGATIVE_ACCOUNTS else INT64_MIN

    def fits(self, credits: int, debits: int) -> bool:
        balance = self.balance + credits - debits
        return (
            self.floor <= balance <= INT64_MAX
            and self.credit_total + credits <= INT64_MAX
            and self.debit_total + debits <= INT64_MAX
        )

    def apply(self, credits: int, debits: int) -> None:
        self.balance += credits - debits
        self.credit_total += credits
        self.debit_total += debits
        self.moved = True


Accounts = dict[tuple[str, str], AccountState]


def accounts_of(rows: Iterable[Sequence[object]]) -> Accounts:
    """The rows of a lock_accounts_query."""
    accounts: Accounts = {}
    for currency, name, balance, credits, debits in rows:
        state = AccountState(
            str(currency),
            str(name),
            int(balance),  # type: ignore[call-overload]
            int(credits),  # type: ignore[call-overload]
            int(debits),  # type: ignore[call-overload]
        )
        accounts[(state.currency, state.name)] = state
    return accounts


def lock_accounts(db: BatchStatements, names: Sequence[str], currencies: Query) -> Accounts:
    return accounts_of(db.rows(lock_accounts_query(db, names, currencies)))


def move(accounts: Accounts, transfer: Transfer, *, field: str = "amount") -> LedgerError | None:
    """Move the transfer's amount between its locked accounts in memory, or say why it cannot
    be (and move nothing): the fund would go below zero (FailedPrecondition), or a balance or
    total beyond int64 (InvalidArgument naming `field`). User accounts have no row to move."""
    return move_amount(
        accounts, transfer.currency, transfer.debit, transfer.credit, transfer.amount, field
    )


def move_amount(
    accounts: Accounts,
    currency: str,
    debit: str | None,
    credit: str | None,
    amount: int,
    field: str = "amount",
) -> LedgerError | None:
    """move() by account names; None for a side without a row (users, in aggregate)."""
    debited = None if debit is None else _locked(accounts, currency, debit)
    credited = None if credit is None else _locked(accounts, currency, credit)
    for state, credits, debits in ((debited, 0, amount), (credited, amount, 0)):
        if state is None or state.fits(credits, debits):
            continue
        if state.floor == 0 and state.balance - debits < 0:
            return FailedPrecondition(
                f"{state.name} of {state.currency} has balance {state.balance}, less than "
                f"the {debits} to be taken from it",
                type="INSUFFICIENT_BALANCE",
                subject=f"{state.name} of {state.currency}",
            )
        return InvalidArgument(
            field,
            amount,
            f"would take {state.name} of {state.currency} beyond a signed 64-bit integer",
        )
    if debited is not None:
        debited.apply(0, amount)
    if credited is not None:
        credited.apply(amount, 0)
    return None


def _locked(accounts: Accounts, currency: str, name: str) -> AccountState | None:
    """The locked row of a system account (None for a user account, which has no row)."""
    state = accounts.get((currency, name))
    if state is None and name in SYSTEM_ACCOUNTS:
        raise NotFound(f"currency {currency!r} has no account {name!r} (not locked)")
    return state


_SET_ACCOUNT = (
    "UPDATE accounts SET balance = ?, credit_total = ?, debit_total = ?"
    " WHERE currency = ? AND name = ?"
)


def account_writes(accounts: Accounts) -> list[Statement]:
    """The UPDATEs of the moved rows, in key order."""
    return [
        (_SET_ACCOUNT, (a.balance, a.credit_total, a.debit_total, a.currency, a.name))
        for _, a in sorted(accounts.items())
        if a.moved
    ]


# --- entry ids ----------------------------------------------------------------------------

_PG_NEXT_IDS = "SELECT nextval('entry_ids') AS id FROM generate_series(1, ?::int)"
_SQLITE_COUNTER = "SELECT next_value FROM counters WHERE name = 'entry_id'"
_SQLITE_SET_COUNTER = "UPDATE counters SET next_value = ? WHERE name = 'entry_id'"


@dataclass(slots=True)
class EntryIds:
    """Entry ids for one transaction, handed out in ascending order as entries are made.

    On PostgreSQL they are taken from the sequence beforehand, one for each request of the
    transaction that may make an entry (unused ones are a gap, as a sequence's ids are after
    a rollback). A liquidation batch's request takes the id of its own index (`take(slot)`),
    whether or not an earlier one made an entry: so a batch's entries get the ids its
    requests would get one by one, and a ledger does not depend on how its liquidations were
    batched. On SQLite they follow the counter, which `writes()` moves on: no gaps.
    """

    ids: list[int]
    counter: int | None = None  # SQLite: the counter's value when read
    used: int = field(default=0)

    def take(self, slot: int | None = None) -> int:
        """The next id; on PostgreSQL, with a `slot`, the one reserved for that request."""
        if self.counter is not None:
            entry_id = self.counter + self.used
        else:
            entry_id = self.ids[self.used if slot is None else slot]
        self.used += 1
        return entry_id

    def writes(self) -> list[Statement]:
        if self.counter is None or not self.used:
            return []
        return [(_SQLITE_SET_COUNTER, (self.counter + self.used,))]


def entry_ids_query(db: BatchStatements, count: int) -> Query:
    """The query that reserves up to `count` ids (run after the accounts are locked, so that
    a currency's entry ids ascend in the order its writers commit)."""
    if db.is_sqlite:
        return Query(_SQLITE_COUNTER)
    return Query(_PG_NEXT_IDS, params=(count,))


def entry_ids_of(db: BatchStatements, rows: Sequence[Sequence[int]]) -> EntryIds:
    if db.is_sqlite:
        ((counter,),) = rows
        return EntryIds([], counter=int(counter))
    return EntryIds([int(row[0]) for row in rows])


def reserve_entry_ids(db: BatchStatements, count: int) -> EntryIds:
    return entry_ids_of(db, db.rows(entry_ids_query(db, count)))


def reserve_entry_block(db: BatchStatements, count: int) -> int:
    """`count` consecutive entry ids; returns the first. Run in a transaction of its own and
    committed at once: on PostgreSQL the sequence is stepped by `count` under ALTER SEQUENCE,
    which holds off every other writer's nextval until the commit (a moment)."""
    assert count > 0
    if db.is_sqlite:
        first = int(db.execute(_SQLITE_COUNTER).fetchone()[0])
        db.execute(_SQLITE_SET_COUNTER, (first + count,))
        return first
    db.execute(f"ALTER SEQUENCE entry_ids INCREMENT BY {int(count)}")
    last = int(db.execute("SELECT nextval('entry_ids')").fetchone()[0])
    db.execute("ALTER SEQUENCE entry_ids INCREMENT BY 1")
    return last - count + 1


# --- the chain ----------------------------------------------------------------------------

_SELECT_HEADS = "SELECT currency, seq, hash FROM chain_heads WHERE currency {}"
_SET_HEAD = "UPDATE chain_heads SET seq = ?, hash = ? WHERE currency = ?"


def chain_heads_query(currencies: Query) -> Query:
    """The heads of the currencies' chains (read after the accounts are locked: every writer
    of a currency locks its insurance_fund row, which keeps its chain still)."""
    if currencies.sql:
        return Query(_SELECT_HEADS.format(f"IN ({currencies.sql})"), currencies.keys)
    return Query(_SELECT_HEADS, currencies.keys)


# A new entry of the liquidation path: (currency, entry_id, kind, reference, debit, credit,
# amount).
NewEntry = tuple[str, int, EntryKind, str, str, str, int]


@dataclass(slots=True)
class ChainHeads:
    """The currencies' chain heads as read under the locks, moved as links are made."""

    heads: dict[str, tuple[int, str]]
    moved: set[str] = field(default_factory=set)

    def link_entry(self, entry_id: int, transfer: Transfer, created_at_us: int) -> tuple[int, str]:
        """The next link of the transfer's currency: its (chain_seq, hash)."""
        seq, previous = self._head(transfer.currency)
        link = seq + 1, journal.entry_hash(previous, seq + 1, entry_id, transfer, created_at_us)
        self._move(transfer.currency, link)
        return link

    def link_new_entries(
        self, entries: Sequence[NewEntry], created_at_us: int
    ) -> list[tuple[object, ...]]:
        """The `entries` rows of new entries made at one time (no memo, reversing nothing), in
        order, each linked into its currency's chain: a currency's links in one call of
        journal.entry_chain."""
        positions: dict[str, list[int]] = {}  # each currency's entries, in order
        for k, entry in enumerate(entries):
            positions.setdefault(entry[0], []).append(k)
        links: list[tuple[int, str]] = [(0, "")] * len(entries)
        for currency, ks in positions.items():
            seq, previous = self._head(currency)
            hashes = journal.entry_chain(
                previous, seq + 1, currency, created_at_us, [entries[k][1:] for k in ks]
            )
            for n, (k, hash_) in enumerate(zip(ks, hashes, strict=True), seq + 1):
                links[k] = (n, hash_)
            self._move(currency, links[ks[-1]])
        return [
            _entries_row(
                entry_id, currency, kind, ref, debit, credit, amount, "", created_at_us, links[k], 0
            )
            for k, (currency, entry_id, kind, ref, debit, credit, amount) in enumerate(entries)
        ]

    def link_cycle(self, currency: str, fields: Sequence[object]) -> tuple[int, str]:
        seq, previous = self._head(currency)
        link = seq + 1, journal.cycle_hash(previous, seq + 1, fields)
        self._move(currency, link)
        return link

    def _head(self, currency: str) -> tuple[int, str]:
        head = self.heads.get(currency)
        if head is None:
            raise NotFound(f"currency {currency!r} has no chain (not locked)")
        return head

    def _move(self, currency: str, link: tuple[int, str]) -> None:
        self.heads[currency] = link
        self.moved.add(currency)

    def writes(self) -> list[Statement]:
        return [(_SET_HEAD, (*self.heads[c], c)) for c in sorted(self.moved)]


def heads_of(rows: Iterable[Sequence[Any]]) -> ChainHeads:
    return ChainHeads({str(c): (int(seq), str(h)) for c, seq, h in rows})


def read_heads(db: BatchStatements, currencies: Iterable[str]) -> ChainHeads:
    return heads_of(db.rows(chain_heads_query(currency_keys(currencies))))


# --- entries ------------------------------------------------------------------------------


def entry_row(
    entry_id: int, transfer: Transfer, created_at_us: int, link: tuple[int, str]
) -> tuple[object, ...]:
    """An `entries` row, in the table's column order, with its chain link."""
    t = transfer
    return _entries_row(
        entry_id,
        t.currency,
        t.kind,
        t.reference,
        t.debit,
        t.credit,
        t.amount,
        t.memo,
        created_at_us,
        link,
        t.reverses,
    )


def _entries_row(
    entry_id: int,
    currency: str,
    kind: EntryKind,
    reference: str,
    debit: str,
    credit: str,
    amount: int,
    memo: str,
    created_at_us: int,
    link: tuple[int, str],
    reverses: int,
) -> tuple[object, ...]:
    """The `entries` table's column order, written once."""
    seq, hash_ = link
    return (
        entry_id,
        currency,
        int(kind),
        reference,
        debit,
        credit,
        amount,
        memo,
        created_at_us,
        seq,
        hash_,
        reverses,
    )


def post(db: BatchStatements, transfers: Sequence[Transfer], created_at_us: int) -> list[int]:
    """Append entries and move the cached totals of the system accounts they touch.

    Locks the accounts (the lock order), checks every bound in memory, then writes. Raises
    the refusal (FailedPrecondition: the fund would go below zero) and writes nothing.
    """
    if not transfers:
        return []
    names = sorted({n for t in transfers for n in (t.debit, t.credit) if n in SYSTEM_ACCOUNTS})
    currencies = {t.currency for t in transfers}
    accounts = lock_accounts(db, [*names, INSURANCE_FUND], currency_keys(currencies))
    heads = read_heads(db, currencies)
    for transfer in transfers:
        refused = move(accounts, transfer)
        if refused is not None:
            raise refused
    entry_ids = append(db, accounts, heads, transfers, created_at_us)
    db.write_together(heads.writes())
    return entry_ids


def append(
    db: BatchStatements,
    accounts: Accounts,
    heads: ChainHeads,
    transfers: Sequence[Transfer],
    created_at_us: int,
) -> list[int]:
    """Write the moved accounts and the entries (ids reserved now, after the locks), each a
    link of its currency's chain; the caller writes the heads (heads.writes()) last."""
    ids = reserve_entry_ids(db, len(transfers)) if transfers else EntryIds([])
    entry_ids = [ids.take() for _ in transfers]
    rows = [
        entry_row(i, t, created_at_us, heads.link_entry(i, t, created_at_us))
        for i, t in zip(entry_ids, transfers, strict=True)
    ]
    writes: list[Statement | Insert] = [*account_writes(accounts), *ids.writes()]
    if rows:
        writes.append(Insert(ENTRIES, rows))
    if writes:
        db.write_together(writes)
    return entry_ids


def post_in(session: Session, transfers: Sequence[Transfer], created_at_us: int) -> list[int]:
    """post() in the session's transaction."""
    return post(BatchStatements.of_session(session), transfers, created_at_us)


# --- reading ------------------------------------------------------------------------------


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
    reverses: int = 0

    def transfer(self) -> Transfer:
        """The entry in its stored form (a system entry: one debit, one credit)."""
        debit, credit = self.postings
        if debit.amount > 0:
            debit, credit = credit, debit
        return Transfer(
            self.kind,
            self.currency,
            self.reference,
            debit.account,
            credit.account,
            credit.amount,
            self.memo,
            self.reverses,
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


def stored_entry(row: models.Entry) -> StoredEntry:
    t = Transfer(
        EntryKind(row.kind),
        row.currency,
        row.reference,
        row.debit_account,
        row.credit_account,
        row.amount,
        row.memo,
        row.reverses,
    )
    return StoredEntry(
        row.id,
        t.kind,
        t.currency,
        t.reference,
        t.postings(),
        row.created_at_us,
        row.memo,
        reverses=row.reverses,
    )


def load_entry(session: Session, entry_id: int) -> StoredEntry:
    row = session.get(models.Entry, entry_id)
    assert row is not None, f"entry {entry_id} is referenced but missing"
    return stored_entry(row)
