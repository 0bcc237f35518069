"""safety net: conversation timers and language, alerts, supervisors' whispers

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

CONVERSATION_COLUMNS = (
    sa.Column("language", sa.String(16), nullable=True),
    sa.Column("wait_due", sa.Float(), nullable=True),
    sa.Column("fallback_at", sa.Float(), nullable=True),
    sa.Column("awaiting_since", sa.Float(), nullable=True),
    sa.Column("reply_due", sa.Float(), nullable=True),
    sa.Column("reply_stage", sa.Integer(), nullable=False, server_default="0"),
)


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        for column in CONVERSATION_COLUMNS:
            batch.add_column(column.copy())
    op.create_index("ix_conversations_wait_due", "conversations", ["wait_due"], unique=False)
    op.create_index("ix_conversations_reply_due", "conversations", ["reply_due"], unique=False)
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("site", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("cause", sa.String(120), nullable=False),
        sa.Column("open_cause", sa.String(120), nullable=True, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("conversation_id", sa.String(36), nullable=True),
        sa.Column("counselor_id", sa.Integer(), nullable=True),
        sa.Column("risk", sa.String(8), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("raised_at", sa.Float(), nullable=False),
        sa.Column("acked_at", sa.Float(), nullable=True),
        sa.Column("acked_by", sa.Integer(), nullable=True),
        sa.Column("acked_by_name", sa.String(150), nullable=True),
        sa.Column("resolved_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_alerts_site_raised", "alerts", ["site", "raised_at"], unique=False)
    op.create_index("ix_alerts_site_status", "alerts", ["site", "status"], unique=False)
    op.create_index("ix_alerts_conversation", "alerts", ["conversation_id"], unique=False)
    op.create_table(
        "whispers",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "conversation_id", sa.String(36), sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("site", sa.String(32), nullable=False),
        sa.Column("author_id", sa.Integer(), nullable=False),
        sa.Column("author_name", sa.String(150), nullable=False),
        sa.Column("counselor_id", sa.Integer(), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_whispers_conversation", "whispers", ["conversation_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_whispers_conversation", table_name="whispers")
    op.drop_table("whispers")
    op.drop_index("ix_alerts_conversation", table_name="alerts")
    op.drop_index("ix_alerts_site_status", table_name="alerts")
    op.drop_index("ix_alerts_site_raised", table_name="alerts")
    op.drop_table("alerts")
    op.drop_index("ix_conversations_reply_due", table_name="conversations")
    op.drop_index("ix_conversations_wait_due", table_name="conversations")
    with op.batch_alter_table("conversations") as batch:
        for column in reversed(CONVERSATION_COLUMNS):
            batch.drop_column(column.name)
