"""The tamper-evident chain: a hash on every entry and cycle close, and each currency's head;
corrections by reversal: an entry's `reverses`, a liquidation's `reversal_entry_id`.

Existing rows are linked in the order they were written: a currency's entries by id, then its
closed cycles by id, each cycle carrying the digest of its allocation rows.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from alembic import op

from ledger import journal
from ledger.alloc import allocations_digest
from ledger.journal import EntryKind, Transfer

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The cycle columns a chain link hashes, in order (ledger.db.closes.CYCLE_HASHED_COLUMNS as of
# this revision; a migration keeps its own copy).
_CYCLE_COLUMNS = (
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


def upgrade() -> None:
    with op.batch_alter_table("entries") as batch_op:
        batch_op.add_column(
            sa.Column("chain_seq", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("hash", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("reverses", sa.BigInteger(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("liquidations") as batch_op:
        batch_op.add_column(sa.Column("reversal_entry_id", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("cycles") as batch_op:
        batch_op.add_column(
            sa.Column("allocations_digest", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("chain_seq", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("hash", sa.String(length=64), server_default="", nullable=False)
        )
    op.create_table(
        "chain_heads",
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_chain_heads_currency_currencies")
        ),
        sa.PrimaryKeyConstraint("currency", name=op.f("pk_chain_heads")),
    )
    bind = op.get_bind()
    for (currency,) in bind.execute(sa.text("SELECT code FROM currencies ORDER BY code")):
        _link(bind, currency)


def _link(bind: sa.Connection, currency: str) -> None:
    seq, head = 0, journal.GENESIS_HASH
    entries = bind.execute(
        sa.text(
            "SELECT id, kind, reference, debit_account, credit_account, amount, memo,"
            " created_at_us FROM entries WHERE currency = :c ORDER BY id"
        ),
        {"c": currency},
    ).all()
    for entry_id, kind, reference, debit, credit, amount, memo, created in entries:
        seq += 1
        transfer = Transfer(EntryKind(kind), currency, reference, debit, credit, amount, memo)
        head = journal.entry_hash(head, seq, entry_id, transfer, created)
        bind.execute(
            sa.text("UPDATE entries SET chain_seq = :s, hash = :h WHERE id = :i"),
            {"s": seq, "h": head, "i": entry_id},
        )
    cycles = bind.execute(
        sa.text(
            f"SELECT id, {', '.join(_CYCLE_COLUMNS[:-1])} FROM cycles WHERE currency = :c ORDER BY id"
        ),
        {"c": currency},
    ).all()
    for row in cycles:
        pk, fields = row[0], list(row[1:])
        rows = bind.execute(
            sa.text(
                "SELECT position_id, account_id, pnl, amount FROM allocations WHERE cycle_pk = :p"
            ),
            {"p": pk},
        ).all()
        table = np.array(rows, dtype=np.int64).reshape(-1, 4)
        table = table[np.argsort(table[:, 0].view(np.uint64), kind="stable")]
        digest = allocations_digest(
            np.ascontiguousarray(table[:, 0]).view(np.uint64),
            np.ascontiguousarray(table[:, 1]).view(np.uint64),
            np.ascontiguousarray(table[:, 2]),
            np.ascontiguousarray(table[:, 3]),
        )
        fields[_CYCLE_COLUMNS.index("widened")] = bool(fields[_CYCLE_COLUMNS.index("widened")])
        seq += 1
        head = journal.cycle_hash(head, seq, [*fields, digest])
        bind.execute(
            sa.text(
                "UPDATE cycles SET allocations_digest = :d, chain_seq = :s, hash = :h WHERE id = :i"
            ),
            {"d": digest, "s": seq, "h": head, "i": pk},
        )
    bind.execute(
        sa.text("INSERT INTO chain_heads (currency, seq, hash) VALUES (:c, :s, :h)"),
        {"c": currency, "s": seq, "h": head},
    )


def downgrade() -> None:
    with op.batch_alter_table("liquidations") as batch_op:
        batch_op.drop_column("reversal_entry_id")
    op.drop_table("chain_heads")
    with op.batch_alter_table("cycles") as batch_op:
        batch_op.drop_column("hash")
        batch_op.drop_column("chain_seq")
        batch_op.drop_column("allocations_digest")
    with op.batch_alter_table("entries") as batch_op:
        batch_op.drop_column("reverses")
        batch_op.drop_column("hash")
        batch_op.drop_column("chain_seq")
