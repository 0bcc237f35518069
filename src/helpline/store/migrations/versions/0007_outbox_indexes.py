"""outbox indexes: heads of conversations' queues, and the parts of a message

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbox_heads", "outbox", ["status", "conversation_id", "id"], unique=False)
    op.create_index("ix_outbox_message", "outbox", ["message_ref", "status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_outbox_message", table_name="outbox")
    op.drop_index("ix_outbox_heads", table_name="outbox")
