"""Initial schema: currencies, accounts, policies, contracts, the journal, cycles.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("next_value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )
    op.create_table(
        "currencies",
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("scale", sa.SmallInteger(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_currencies")),
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("credit_total", sa.BigInteger(), nullable=False),
        sa.Column("debit_total", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "name <> 'insurance_fund' OR balance >= 0", name=op.f("ck_accounts_fund_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_accounts_currency_currencies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("currency", "name", name=op.f("uq_accounts_currency_name")),
    )
    op.create_table(
        "contracts",
        sa.Column("symbol", sa.String(length=128), nullable=False),
        sa.Column("margin_currency", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("multiplier", sa.String(length=64), nullable=False),
        sa.Column("updated_at_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["margin_currency"],
            ["currencies.code"],
            name=op.f("fk_contracts_margin_currency_currencies"),
        ),
        sa.PrimaryKeyConstraint("symbol", name=op.f("pk_contracts")),
    )
    op.create_table(
        "cycles",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("cycle_id", sa.String(length=128), nullable=False),
        sa.Column("loss_total", sa.BigInteger(), nullable=False),
        sa.Column("fund_balance_before", sa.BigInteger(), nullable=False),
        sa.Column("fund_share", sa.BigInteger(), nullable=False),
        sa.Column("fund_paid", sa.BigInteger(), nullable=False),
        sa.Column("user_due", sa.BigInteger(), nullable=False),
        sa.Column("allocated_total", sa.BigInteger(), nullable=False),
        sa.Column("uncovered", sa.BigInteger(), nullable=False),
        sa.Column("positions_total", sa.BigInteger(), nullable=False),
        sa.Column("profitable_count", sa.BigInteger(), nullable=False),
        sa.Column("profit_total", sa.BigInteger(), nullable=False),
        sa.Column("participant_count", sa.BigInteger(), nullable=False),
        sa.Column("participant_profit", sa.BigInteger(), nullable=False),
        sa.Column("cutoff_pnl", sa.BigInteger(), nullable=False),
        sa.Column("widened", sa.Boolean(), nullable=False),
        sa.Column("input_digest", sa.String(length=64), nullable=False),
        sa.Column("insurance_share", sa.String(length=40), nullable=False),
        sa.Column("coverage_ratio", sa.String(length=40), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("allocation_first_entry_id", sa.BigInteger(), nullable=False),
        sa.Column("closed_at_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_cycles_currency_currencies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cycles")),
        sa.UniqueConstraint("currency", "cycle_id", name=op.f("uq_cycles_currency_cycle_id")),
    )
    op.create_table(
        "entries",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("reference", sa.String(length=128), nullable=False),
        sa.Column("debit_account", sa.String(length=32), nullable=False),
        sa.Column("credit_account", sa.String(length=32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("memo", sa.Text(), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_entries_amount_positive")),
        sa.CheckConstraint(
            "debit_account <> credit_account", name=op.f("ck_entries_distinct_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_entries_currency_currencies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entries")),
    )
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_entries_currency_credit_account_id"),
            ["currency", "credit_account", "id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_entries_currency_debit_account_id"),
            ["currency", "debit_account", "id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_entries_currency_kind_reference"),
            ["currency", "kind", "reference"],
            unique=False,
        )

    op.create_table(
        "policies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("insurance_share", sa.String(length=40), nullable=False),
        sa.Column("coverage_ratio", sa.String(length=40), nullable=False),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_policies_currency_currencies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policies")),
        sa.UniqueConstraint("currency", "version", name=op.f("uq_policies_currency_version")),
    )
    op.create_table(
        "allocations",
        sa.Column("cycle_pk", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("position_id", sa.BigInteger(), nullable=False),
        sa.Column("pnl", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_allocations_amount_positive")),
        sa.PrimaryKeyConstraint(
            "cycle_pk", "account_id", "position_id", name=op.f("pk_allocations")
        ),
        sqlite_with_rowid=False,
    )

    op.create_table(
        "liquidations",
        sa.Column("liquidation_id", sa.String(length=128), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("cycle_id", sa.String(length=128), nullable=False),
        sa.Column("symbol", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("position_id", sa.BigInteger(), nullable=False),
        sa.Column("side", sa.SmallInteger(), nullable=False),
        sa.Column("quantity", sa.String(length=64), nullable=False),
        sa.Column("takeover_price", sa.String(length=64), nullable=False),
        sa.Column("close_price", sa.String(length=64), nullable=False),
        sa.Column("remaining_margin", sa.BigInteger(), nullable=False),
        sa.Column("engine_result", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.SmallInteger(), nullable=False),
        sa.Column("fund_balance_after", sa.BigInteger(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["currency"], ["currencies.code"], name=op.f("fk_liquidations_currency_currencies")
        ),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["entries.id"], name=op.f("fk_liquidations_entry_id_entries")
        ),
        sa.PrimaryKeyConstraint("liquidation_id", name=op.f("pk_liquidations")),
    )
    with op.batch_alter_table("liquidations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_liquidations_currency_cycle_id_outcome"),
            ["currency", "cycle_id", "outcome"],
            unique=False,
        )

    op.create_table(
        "transfers",
        sa.Column("transfer_id", sa.String(length=128), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["entries.id"], name=op.f("fk_transfers_entry_id_entries")
        ),
        sa.PrimaryKeyConstraint("transfer_id", name=op.f("pk_transfers")),
    )
    counters = sa.table(
        "counters", sa.column("name", sa.String), sa.column("next_value", sa.BigInteger)
    )
    op.bulk_insert(counters, [{"name": "entry_id", "next_value": 1}])


def downgrade() -> None:
    op.drop_table("transfers")
    with op.batch_alter_table("liquidations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_liquidations_currency_cycle_id_outcome"))

    op.drop_table("liquidations")
    op.drop_table("allocations")
    op.drop_table("policies")
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_entries_currency_kind_reference"))
        batch_op.drop_index(batch_op.f("ix_entries_currency_debit_account_id"))
        batch_op.drop_index(batch_op.f("ix_entries_currency_credit_account_id"))

    op.drop_table("entries")
    op.drop_table("cycles")
    op.drop_table("contracts")
    op.drop_table("accounts")
    op.drop_table("currencies")
    op.drop_table("counters")
