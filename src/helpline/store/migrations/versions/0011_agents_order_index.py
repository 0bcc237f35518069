"""agents index: available counselors of a site in the order of ``leastrecent``

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_agents_site_status_assigned", "agents", ["site", "status", "last_assigned_at", "user_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_agents_site_status_assigned", table_name="agents")
