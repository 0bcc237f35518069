"""Alembic environment: the connection comes from ``helpline.store.migrate``."""

from __future__ import annotations

from alembic import context

from helpline.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - always run through helpline.store.migrate
    raise RuntimeError("run migrations with `helpline migrate`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
