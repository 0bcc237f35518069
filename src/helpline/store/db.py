"""Engine and sessions for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, *, reader: bool = False) -> AsyncEngine:
    """``hide_parameters``: a statement's parameters (message texts, contacts) never reach an error's
    text, so a logged traceback shows none of them.

    On SQLite the writer engine holds one connection and opens every transaction with
    ``BEGIN IMMEDIATE``; ``Core.tx`` queues writers on an asyncio lock in front of it, so a writer
    waits for the previous one's commit instead of sleeping in SQLite's busy handler. A ``reader``
    engine opens deferred transactions on a pool of connections: under WAL, reads never wait.
    """
    if is_sqlite(url):
        pool = {"pool_size": 4, "max_overflow": 4} if reader else {"pool_size": 1, "max_overflow": 0}
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True, **pool)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            # Let SQLAlchemy's "begin" below open every transaction as a writer: a deferred
            # transaction that reads, then writes, fails at once with SQLITE_BUSY under concurrency.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN" if reader else "BEGIN IMMEDIATE")

        return engine
    # No pre-ping (a round trip per checkout): after a database restart the first statement on a
    # stale connection fails (503 with Retry-After to the caller) and the pool replaces it.
    return create_async_engine(url, pool_size=10, max_overflow=20, hide_parameters=True)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
