"""Cycle corrections (issue 13, ReverseCycle): versioned closes, the reversal of a close, and
its allocation reversal rows; a close's count of allocation rows (unknown, NULL, for the
closes before it). Every existing close is version 1 and in force, which leaves
every chain link as it was (a close's link hashes its version only when it is not 1).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cycles") as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("allocation_count", sa.BigInteger(), nullable=True))
        batch_op.drop_constraint("uq_cycles_currency_cycle_id", type_="unique")
        batch_op.create_unique_constraint(
            "uq_cycles_currency_cycle_id_version", ["currency", "cycle_id", "version"]
        )
    op.create_table(
        "cycle_reversals",
        sa.Column("cycle_pk", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("cycle_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("reversed_at_us", sa.BigInteger(), nullable=False),
        sa.Column("first_entry_id", sa.BigInteger(), nullable=False),
        sa.Column("allocation_count", sa.BigInteger(), nullable=False),
        sa.Column("allocations_digest", sa.String(length=64), nullable=False),
        sa.Column("chain_seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_cycle_reversals_currency_currencies")
        ),
        sa.PrimaryKeyConstraint("cycle_pk", name=op.f("pk_cycle_reversals")),
    )
    op.create_table(
        "allocation_reversals",
        sa.Column("cycle_pk", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("position_id", sa.BigInteger(), nullable=False),
        sa.Column("pnl", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_allocation_reversals_amount_positive")),
        sa.PrimaryKeyConstraint(
            "cycle_pk", "account_id", "position_id", name=op.f("pk_allocation_reversals")
        ),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("allocation_reversals")
    op.drop_table("cycle_reversals")
    with op.batch_alter_table("cycles") as batch_op:
        batch_op.drop_constraint("uq_cycles_currency_cycle_id_version", type_="unique")
        batch_op.create_unique_constraint("uq_cycles_currency_cycle_id", ["currency", "cycle_id"])
        batch_op.drop_column("allocation_count")
        batch_op.drop_column("version")
