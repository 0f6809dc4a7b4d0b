"""SQLAlchemy 2 typed models. The migrations in db/migrations create exactly these tables.

Money columns are BIGINT minor units. u64 ids (positions, user accounts) are stored as the
signed 64-bit integer with the same bits, and converted back at the edges (see db/u64.py).
Times are BIGINT microseconds since the Unix epoch, UTC: exact, portable and fast to COPY.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Currency(Base):
    __tablename__ = "currencies"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    scale: Mapped[int] = mapped_column(SmallInteger)
    created_at_us: Mapped[int] = mapped_column(BigInteger)


class Account(Base):
    """A system account of a currency with its running totals (a cache of its postings,
    updated in the same transaction as the entry; VerifyLedger recomputes it from the journal).

    User accounts (`user:<id>`) exist implicitly from their first posting: there can be
    millions, and a cycle close must not write a row per user beyond its allocation rows.
    """

    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("currency", "name"),
        CheckConstraint("name <> 'insurance_fund' OR balance >= 0", name="fund_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    name: Mapped[str] = mapped_column(String(32))
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    credit_total: Mapped[int] = mapped_column(BigInteger, default=0)
    debit_total: Mapped[int] = mapped_column(BigInteger, default=0)


class Policy(Base):
    """Append-only history: the policy in force is the highest version of its currency."""

    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("currency", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    version: Mapped[int] = mapped_column(Integer)
    insurance_share: Mapped[str] = mapped_column(String(40))
    coverage_ratio: Mapped[str] = mapped_column(String(40))
    created_at_us: Mapped[int] = mapped_column(BigInteger)
    # What the cut ranks: the contract's Ranking (1 positions, the seed's rule; 2 accounts).
    ranking: Mapped[int] = mapped_column(SmallInteger, server_default="1")


class Contract(Base):
    __tablename__ = "contracts"

    symbol: Mapped[str] = mapped_column(String(128), primary_key=True)
    margin_currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    kind: Mapped[int] = mapped_column(SmallInteger)
    multiplier: Mapped[str] = mapped_column(String(64))
    updated_at_us: Mapped[int] = mapped_column(BigInteger)


class Counter(Base):
    """SQLite's entry ids: one counter, so journal and allocation rows never clash (SQLite has
    one writer at a time anyway). PostgreSQL takes them from the sequence `entry_ids`, so
    that writers of different currencies share no hot row."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_value: Mapped[int] = mapped_column(BigInteger)


class Entry(Base):
    """A journal entry stored as a transfer; see ledger/journal.py."""

    __tablename__ = "entries"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("debit_account <> credit_account", name="distinct_accounts"),
        Index(None, "currency", "debit_account", "id"),
        Index(None, "currency", "credit_account", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # No foreign key (migration 0007): copied from rows that have one, read under their
    # locks; a key's check per row was half a liquidation batch's cost on PostgreSQL.
    # VerifyLedger checks that it names a known currency.
    currency: Mapped[str] = mapped_column(String(16))
    kind: Mapped[int] = mapped_column(SmallInteger)
    reference: Mapped[str] = mapped_column(String(128))
    debit_account: Mapped[str] = mapped_column(String(32))
    credit_account: Mapped[str] = mapped_column(String(32))
    amount: Mapped[int] = mapped_column(BigInteger)
    memo: Mapped[str] = mapped_column(Text, default="")
    created_at_us: Mapped[int] = mapped_column(BigInteger)
    # Its link in the currency's chain (see journal.entry_hash; VerifyLedger checks it).
    chain_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    hash: Mapped[str] = mapped_column(String(64), server_default="")
    # A correction: the entry this one reverses (0 for none). Entries stay append-only.
    reverses: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ChainHead(Base):
    """The last link of a currency's chain: its sequence number and hash. Moved by every
    writer of the currency, under the currency's insurance_fund row, which they all lock."""

    __tablename__ = "chain_heads"

    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class Transfer(Base):
    """The idempotency record of TransferFund: a retry is told from a reuse by the hash."""

    __tablename__ = "transfers"

    transfer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    entry_id: Mapped[int] = mapped_column(ForeignKey("entries.id"))


class Liquidation(Base):
    """Every reported liquidation, with its result; the idempotency record of its id."""

    __tablename__ = "liquidations"
    __table_args__ = (Index(None, "currency", "cycle_id", "outcome"),)

    liquidation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    # No foreign key, as for entries (migration 0007): the contract's margin_currency.
    currency: Mapped[str] = mapped_column(String(16))
    cycle_id: Mapped[str] = mapped_column(String(128))
    symbol: Mapped[str] = mapped_column(String(128))
    account_id: Mapped[int] = mapped_column(BigInteger)
    position_id: Mapped[int] = mapped_column(BigInteger)
    side: Mapped[int] = mapped_column(SmallInteger)
    quantity: Mapped[str] = mapped_column(String(64))
    takeover_price: Mapped[str] = mapped_column(String(64))
    close_price: Mapped[str] = mapped_column(String(64))
    remaining_margin: Mapped[int] = mapped_column(BigInteger)
    engine_result: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[int] = mapped_column(SmallInteger)
    fund_balance_after: Mapped[int] = mapped_column(BigInteger)
    # No foreign key: it is written in the same statement as its entry, and a key's check
    # on each row locks the entry's row as well (measured on PostgreSQL: a quarter of a
    # liquidation's cost). VerifyLedger checks that every entry_id names its entry.
    entry_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at_us: Mapped[int] = mapped_column(BigInteger)
    # ReverseLiquidation's entry, once reversed (the cycle's loss no longer counts it).
    reversal_entry_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Cycle(Base):
    """A close of a cycle and its summary. The cycle is closed while its latest close has no
    reversal (CycleReversal); a reversed cycle may be closed again, as the next version."""

    __tablename__ = "cycles"
    __table_args__ = (UniqueConstraint("currency", "cycle_id", "version"),)

    # BIGINT like every column of an allocation row (binary COPY needs one width); INTEGER on
    # SQLite so that it stays the rowid.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    cycle_id: Mapped[str] = mapped_column(String(128))
    loss_total: Mapped[int] = mapped_column(BigInteger)
    fund_balance_before: Mapped[int] = mapped_column(BigInteger)
    fund_share: Mapped[int] = mapped_column(BigInteger)
    fund_paid: Mapped[int] = mapped_column(BigInteger)
    user_due: Mapped[int] = mapped_column(BigInteger)
    allocated_total: Mapped[int] = mapped_column(BigInteger)
    uncovered: Mapped[int] = mapped_column(BigInteger)
    positions_total: Mapped[int] = mapped_column(BigInteger)
    profitable_count: Mapped[int] = mapped_column(BigInteger)
    profit_total: Mapped[int] = mapped_column(BigInteger)
    participant_count: Mapped[int] = mapped_column(BigInteger)
    participant_profit: Mapped[int] = mapped_column(BigInteger)
    cutoff_pnl: Mapped[int] = mapped_column(BigInteger)
    widened: Mapped[bool] = mapped_column(Boolean)
    input_digest: Mapped[str] = mapped_column(String(64))
    insurance_share: Mapped[str] = mapped_column(String(40))
    coverage_ratio: Mapped[str] = mapped_column(String(40))
    policy_version: Mapped[int] = mapped_column(Integer)
    ranking: Mapped[int] = mapped_column(SmallInteger, server_default="1")
    # 1 for a cycle's first close, one more for each close after a reversal.
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    # Its allocation rows (the length of its block of entry ids); None for the closes made
    # before this column, whose rows are counted when needed.
    allocation_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    allocation_first_entry_id: Mapped[int] = mapped_column(BigInteger)
    closed_at_us: Mapped[int] = mapped_column(BigInteger)
    # The digest of its allocation rows (alloc.allocations_digest), and its chain link.
    allocations_digest: Mapped[str] = mapped_column(String(64), server_default="")
    chain_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    hash: Mapped[str] = mapped_column(String(64), server_default="")


class AllocationRow:
    """The columns of one allocation flow, or of its reversal: a compact row, clustered by
    (cycle, account, position), with no other index (see Allocation)."""

    @declared_attr.directive
    def __table_args__(cls) -> tuple[object, ...]:
        return (
            CheckConstraint("amount > 0", name="amount_positive"),
            {"sqlite_with_rowid": False},
        )

    cycle_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    position_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    pnl: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    entry_id: Mapped[int] = mapped_column(BigInteger)


class Allocation(AllocationRow, Base):
    """One ALLOCATION flow: an entry moving `amount` from user:<account_id> to system_loss.

    Kept in its own compact table because a cycle writes millions of them in one transaction:
    its entry id is `allocation_first_entry_id` of the cycle plus the row's rank by position_id
    (one block from the same counter as the journal), its postings are derived like any entry's.

    One clustered key, (cycle, account, position), and no other index or foreign key: the close
    writes the rows sorted by that key, so the bulk write only ever appends (a second, randomly
    ordered index tripled the time of a 1M-row COPY, a foreign-key trigger per row doubled
    it). The key serves a user's allocations (a seek per cycle) and the cycle's rows; the
    stream orders them by position in memory. The cycle row is written in the same transaction,
    and the allocator rejects duplicate positions before anything is written.
    """

    __tablename__ = "allocations"


class CycleReversal(Base):
    """The reversal of one close (ReverseCycle): its existence is the mark that the close is
    no longer in force. Its entries are the reversals of the close's cover and uncovered rest
    (in the journal, `reverses` naming them) and one AllocationReversal row per allocation;
    it is a link of the currency's chain like the close itself."""

    __tablename__ = "cycle_reversals"

    cycle_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    cycle_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    reversed_at_us: Mapped[int] = mapped_column(BigInteger)
    # The allocation reversal rows' entry ids: first_entry_id + the rank of the row's
    # allocation among the close's (so the row of allocation entry_id e has
    # e - allocation_first_entry_id + first_entry_id).
    first_entry_id: Mapped[int] = mapped_column(BigInteger)
    allocation_count: Mapped[int] = mapped_column(BigInteger)
    # The digest of its rows (equal to the close's allocations_digest), and its chain link.
    allocations_digest: Mapped[str] = mapped_column(String(64))
    chain_seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AllocationReversal(AllocationRow, Base):
    """One reversed ALLOCATION flow: `amount` back from system_loss to user:<account_id>,
    the entry `entry_id`, which reverses the allocation of the same (cycle, account,
    position). The same compact, clustered shape as Allocation, written in bulk from it."""

    __tablename__ = "allocation_reversals"


class CloseAttempt(Base):
    """A cycle close on SQLite whose allocation rows are being written, in transactions that
    let other writers in between (SQLite has one writer at a time); its id is the cycle_pk of
    those rows, which count only once the cycle row with that id exists. The close's last
    transaction writes the cycle row and removes this one; an attempt left behind (its
    process died, its lease is free) has its rows removed at the next start. PostgreSQL
    writes a close in one transaction that takes the currency's rows only at its end, and
    leaves this table empty.
    """

    __tablename__ = "close_attempts"
    __table_args__ = ({"sqlite_autoincrement": True},)  # ids never reused: they name rows

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    cycle_id: Mapped[str] = mapped_column(String(128))
    started_at_us: Mapped[int] = mapped_column(BigInteger)


class CycleInputPart(Base):
    """A closed cycle's input, kept for the statements of its positions (ExplainAllocation):
    up to 2^20 positions a part, the part's position_id, account_id and pnl columns (8 bytes
    each, little-endian) one after the other, lz4-compressed. Written after the close has
    committed, a part a transaction; the input is whole when `parts` rows are there."""

    __tablename__ = "cycle_input_parts"

    cycle_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    parts: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
