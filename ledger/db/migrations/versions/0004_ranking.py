"""Per-account ranking (issue 13): the ranking of each policy version and of each close.

Every existing policy and close ranked positions, the only rule there was: both columns
default to 1 (RANKING_POSITION), which also leaves every cycle's chain link as it was (a
link hashes the ranking only when it is not 1).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("policies", "cycles"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(
                sa.Column("ranking", sa.SmallInteger(), nullable=False, server_default="1")
            )


def downgrade() -> None:
    for table in ("cycles", "policies"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("ranking")
