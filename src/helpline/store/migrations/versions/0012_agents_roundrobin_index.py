"""agents index: available counselors of a site in the order of ``roundrobin`` (by id)

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_agents_site_status_user", "agents", ["site", "status", "user_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_agents_site_status_user", table_name="agents")
