"""Engine and sessions for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Generator
from typing import Any

import aiosqlite
from sqlalchemy import event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

# How long the SQLite writer waits for another process's write lock (a CLI command, say) before
# the request fails with a 503: it waits on the event loop's thread, so briefly.
WRITER_BUSY_TIMEOUT_MS = 250


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


class _RunNow:
    """Stands in for aiosqlite's queue to its worker thread: each call runs at once, here."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:  # handed to the awaiting caller, as aiosqlite's thread does
            if future is not None and not future.done():
                future.set_exception(exc)
        else:
            if future is not None and not future.done():
                future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    """aiosqlite's API, but each call runs on the calling (event loop) thread, with no worker thread.

    The writer's statements are short point reads and writes into the OS page cache (WAL,
    ``synchronous=NORMAL``, no checkpoint on this connection: :class:`WalCheckpointer` does that
    on its own thread), typically tens of microseconds: less than the two thread switches and the
    loop wake-up that aiosqlite spends per call (and SQLAlchemy makes several calls per statement).
    """

    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _RunNow()  # type: ignore[assignment]

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def _connect(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._connect().__await__()

    def stop(self) -> None:
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def close(self) -> None:
        self.stop()


def _inline_creator(database: str) -> Callable[[], Any]:
    async def connect() -> InlineConnection:
        def connector() -> sqlite3.Connection:
            conn = sqlite3.connect(database, timeout=WRITER_BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the WalCheckpointer's thread does it
            return conn

        return await InlineConnection(connector)

    return connect


def sqlite_path(url: str) -> str | None:
    """The database file of a SQLite URL; None for an in-memory database or another database."""
    if not is_sqlite(url):
        return None
    database = make_url(url).database
    return None if not database or database == ":memory:" else database


def make_engine(url: str, *, reader: bool = False) -> AsyncEngine:
    """``hide_parameters``: a statement's parameters (message texts, contacts) never reach an error's
    text, so a logged traceback shows none of them.

    On SQLite the writer engine holds one connection and opens every transaction with
    ``BEGIN IMMEDIATE``; ``Core.tx`` queues writers on an asyncio lock in front of it, so a writer
    waits for the previous one's commit instead of sleeping in SQLite's busy handler. A ``reader``
    engine opens deferred transactions on a pool of connections: under WAL, reads never wait.
    """
    if is_sqlite(url):
        path = sqlite_path(url)
        kw: dict[str, Any]
        if reader or path is None:
            kw = {"pool_size": 4, "max_overflow": 4} if reader else {"pool_size": 1, "max_overflow": 0}
            kw["connect_args"] = {"timeout": 30}
            busy_ms = 30000
        else:
            kw = {"pool_size": 1, "max_overflow": 0, "async_creator": _inline_creator(path)}
            busy_ms = WRITER_BUSY_TIMEOUT_MS
        engine = create_async_engine(url, hide_parameters=True, **kw)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
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
    #
    # Statements are prepared once per connection (asyncpg); PostgreSQL would then switch each to
    # a generic plan, made without the parameters' values, after five runs. Our statements filter
    # on values as skewed as a conversation's status (a few queued among every one ever assigned
    # or closed): a generic plan reads the whole table where the index reads a few rows (the
    # hunter's survey: 1.4 ms instead of 0.2 ms with 10,000 open conversations, and growing with
    # the table). Planned with their values every time, at the cost of planning.
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql+asyncpg"):
        connect_args["server_settings"] = {"plan_cache_mode": "force_custom_plan"}
    return create_async_engine(url, pool_size=10, max_overflow=20, hide_parameters=True, connect_args=connect_args)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
