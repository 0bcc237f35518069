"""routing notices and overflow: conversations.origin_site, site_since, overflow_*, notice_*

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("origin_site", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("site_since", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("overflow_depth", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("overflow_from", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("notice_position", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("notice_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("closed_notice_at", sa.Float(), nullable=True))
        batch_op.create_index("ix_conversations_site_assigned", ["site", "assigned_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_site_assigned")
        batch_op.drop_column("closed_notice_at")
        batch_op.drop_column("notice_at")
        batch_op.drop_column("notice_position")
        batch_op.drop_column("overflow_from")
        batch_op.drop_column("overflow_depth")
        batch_op.drop_column("site_since")
        batch_op.drop_column("origin_site")
