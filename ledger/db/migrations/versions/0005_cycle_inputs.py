"""The statements of a cycle's positions (issue 13, ExplainAllocation): a closed cycle's input
columns, kept in compressed parts. Cycles closed before this revision have none (their
statements are FAILED_PRECONDITION until the same close is sent again).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cycle_input_parts",
        sa.Column("cycle_pk", sa.BigInteger(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("parts", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("cycle_pk", "part", name=op.f("pk_cycle_input_parts")),
    )


def downgrade() -> None:
    op.drop_table("cycle_input_parts")
