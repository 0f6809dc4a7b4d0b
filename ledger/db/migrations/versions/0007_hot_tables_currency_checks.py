"""No foreign key from an entry or a liquidation to its currency: on PostgreSQL their checks
were half of what a RecordLiquidations batch cost the server (a trigger and a query per row,
measured with perf: 52% of the COPY's time; the two COPYs of a 1,000-item batch took 46 ms
with them, 15 ms without).

The currency of both rows is copied, in the same transaction, from rows that keep their own
foreign key and are read under its locks (the contract's margin_currency, the currency's
system accounts), and no currency is ever deleted; VerifyLedger checks that every entry and
liquidation names a known currency.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("entries") as batch_op:
        batch_op.drop_constraint("fk_entries_currency_currencies", type_="foreignkey")
    with op.batch_alter_table("liquidations") as batch_op:
        batch_op.drop_constraint("fk_liquidations_currency_currencies", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("liquidations") as batch_op:
        batch_op.create_foreign_key(
            "fk_liquidations_currency_currencies", "currencies", ["currency"], ["code"]
        )
    with op.batch_alter_table("entries") as batch_op:
        batch_op.create_foreign_key(
            "fk_entries_currency_currencies", "currencies", ["currency"], ["code"]
        )
