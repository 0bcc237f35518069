"""asterisk: users.extension and phone_states (a counselor's phone as Asterisk reports it)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("extension", sa.String(length=32), nullable=True))

    op.create_table(
        "phone_states",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(length=32), nullable=False),
        sa.Column("member", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("in_call", sa.Boolean(), nullable=False),
        sa.Column("busy", sa.Boolean(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=128), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id"),
    )
    op.create_index("ix_phone_states_site", "phone_states", ["site"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_phone_states_site", table_name="phone_states")
    op.drop_table("phone_states")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("extension")
