"""bus spill: live events too large for a NOTIFY payload

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bus_spill",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_bus_spill_created_at", "bus_spill", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_bus_spill_created_at", table_name="bus_spill")
    op.drop_table("bus_spill")
