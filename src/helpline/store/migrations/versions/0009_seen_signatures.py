"""seen signatures: request signatures accepted by any instance, refused as replays by all

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seen_signatures",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_seen_signatures_expires_at", "seen_signatures", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_seen_signatures_expires_at", table_name="seen_signatures")
    op.drop_table("seen_signatures")
