"""The migrations build exactly the schema of the models, on SQLite and (when configured) PostgreSQL.

A fresh database upgraded to head must show no difference with ``Base.metadata`` (Alembic's own
autogenerate comparison: tables, columns, types, nullability, indexes, unique constraints, foreign
keys), the newest revision must go down and up again, and there must be one head.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from conftest import PG_URL, reset_postgres
from helpline.store.migrate import alembic_config, upgrade
from helpline.store.models import Base

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    if not PG_URL:
        pytest.skip("HELPLINE_TEST_DATABASE_URL is not set")
    reset_postgres(PG_URL)
    return PG_URL


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
    return list(compare_metadata(ctx, Base.metadata))


async def _with_engine(url: str, steps: Any) -> Any:
    engine: AsyncEngine = create_async_engine(url)
    try:
        return await steps(engine)
    finally:
        await engine.dispose()


def test_one_head() -> None:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, f"several migration heads: {heads}"


def test_upgrade_from_scratch_matches_the_models(fresh_url: str) -> None:
    async def steps(engine: AsyncEngine) -> list[Any]:
        await upgrade(engine)
        await upgrade(engine)  # idempotent
        async with engine.connect() as conn:
            return await conn.run_sync(_diff)

    assert asyncio.run(_with_engine(fresh_url, steps)) == []


def test_newest_revision_goes_down_and_up(fresh_url: str) -> None:
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None
    previous = script.get_revision(head).down_revision
    assert isinstance(previous, str)

    def down(conn: Connection) -> None:
        command.downgrade(alembic_config(conn), previous)

    async def steps(engine: AsyncEngine) -> list[Any]:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(down)
        await upgrade(engine)
        async with engine.connect() as conn:
            return await conn.run_sync(_diff)

    assert asyncio.run(_with_engine(fresh_url, steps)) == []


def test_audit_and_retention_revision_goes_down_and_up(fresh_url: str) -> None:
    """0004 (audit_log, conversations.purged_at) undone and redone under whatever came after it."""

    def to(revision: str, up: bool) -> Any:
        def run(conn: Connection) -> None:
            (command.upgrade if up else command.downgrade)(alembic_config(conn), revision)

        return run

    async def steps(engine: AsyncEngine) -> list[Any]:
        async with engine.begin() as conn:
            await conn.run_sync(to("0004", True))
        async with engine.begin() as conn:
            await conn.run_sync(to("0003", False))
        await upgrade(engine)
        async with engine.connect() as conn:
            return await conn.run_sync(_diff)

    assert asyncio.run(_with_engine(fresh_url, steps)) == []
