"""Close attempts (SQLite); PostgreSQL's entry ids from a sequence instead of a counter row;
no foreign key from a liquidation to its entry (written together; the check cost a quarter
of a liquidation on PostgreSQL), and no index of entries by (currency, kind, reference), which
no query used (an eighth of an entry's cost to write).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "close_attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("cycle_id", sa.String(length=128), nullable=False),
        sa.Column("started_at_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_close_attempts_currency_currencies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_close_attempts")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("liquidations") as batch_op:
        batch_op.drop_constraint("fk_liquidations_entry_id_entries", type_="foreignkey")
    with op.batch_alter_table("entries") as batch_op:
        batch_op.drop_index("ix_entries_currency_kind_reference")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # Entry ids continue where the counter row stopped; the row goes.
        op.execute("CREATE SEQUENCE entry_ids AS bigint MINVALUE 1")
        op.execute(
            "SELECT setval('entry_ids', next_value, false) FROM counters WHERE name = 'entry_id'"
        )
        op.execute("DELETE FROM counters WHERE name = 'entry_id'")
    else:
        # An attempt's id becomes its cycle's id: start above every cycle closed so far.
        op.execute(
            "INSERT INTO sqlite_sequence (name, seq)"
            " SELECT 'close_attempts', coalesce(max(id), 0) FROM cycles"
        )


def downgrade() -> None:
    with op.batch_alter_table("entries") as batch_op:
        batch_op.create_index(
            "ix_entries_currency_kind_reference", ["currency", "kind", "reference"], unique=False
        )
    with op.batch_alter_table("liquidations") as batch_op:
        batch_op.create_foreign_key(
            "fk_liquidations_entry_id_entries", "entries", ["entry_id"], ["id"]
        )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(
            "INSERT INTO counters (name, next_value) SELECT 'entry_id', nextval('entry_ids')"
        )
        op.execute("DROP SEQUENCE entry_ids")
    op.drop_table("close_attempts")
