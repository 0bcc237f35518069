"""audit log and retention: audit_log, conversations.purged_at

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=150), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("conversation_id", sa.String(length=36), nullable=False),
        sa.Column("site", sa.String(length=32), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_conversation_at", "audit_log", ["conversation_id", "at"], unique=False)
    op.create_index("ix_audit_log_site_at", "audit_log", ["site", "at"], unique=False)
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("purged_at", sa.Float(), nullable=True))
        batch_op.create_index("ix_conversations_purge", ["purged_at", "closed_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_purge")
        batch_op.drop_column("purged_at")
    op.drop_index("ix_audit_log_site_at", table_name="audit_log")
    op.drop_index("ix_audit_log_conversation_at", table_name="audit_log")
    op.drop_table("audit_log")
