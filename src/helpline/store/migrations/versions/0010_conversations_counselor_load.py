"""conversations index: each counselor's assigned conversations per site, read from the index alone

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_conversations_site_status_counselor", "conversations", ["site", "status", "counselor_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_conversations_site_status_counselor", table_name="conversations")
