"""The embedded store (SQLite): the writer on the event loop's thread, checkpoints on their own."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from conftest import PG_URL, Env
from helpline.store.checkpoint import WalCheckpointer
from helpline.store.db import WRITER_BUSY_TIMEOUT_MS, sqlite_path

pytestmark = pytest.mark.skipif(bool(PG_URL), reason="the SQLite store")


def db_file(env: Env) -> str:
    path = sqlite_path(env.server.core.settings.database_url)
    assert path is not None
    return path


def test_another_process_holding_the_write_lock_costs_a_503_not_a_frozen_server(env: Env) -> None:
    bot = env.chatbot()
    assert bot.send("s1", "hello").status_code == 201
    other = sqlite3.connect(db_file(env), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a CLI command writing to the same file
    try:
        t0 = time.monotonic()
        r = bot.send("s1", "while the file is locked")
        waited = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] and r.json()["error"]["code"] == "unavailable"
        # It waited about the writer's busy timeout, not SQLite's usual 30 s; the server answers.
        assert WRITER_BUSY_TIMEOUT_MS / 1000 <= waited < 10, waited
        assert bot.http.get("/healthz").status_code == 200
        assert [c["chat_session"] for c in bot.chats().json()["results"]] == ["s1"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    r = bot.send("s1", "after")
    assert r.status_code == 201, r.text
    assert [m["text"] for m in bot.messages("s1").json()["results"]] == ["hello", "after"]


def test_the_server_writes_leave_checkpointing_to_the_checkpointer(env: Env) -> None:
    bot = env.chatbot()
    for i in range(30):
        assert bot.send("s1", f"message {i}").status_code == 201
    path = db_file(env)
    # The server's writer never checkpoints (wal_autocheckpoint=0); its checkpointer does, and
    # catches up with everything committed so far.
    busy, frames, done = WalCheckpointer(path).checkpoint()
    assert busy == 0 and frames == done, (busy, frames, done)
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert check.execute("SELECT count(*) FROM messages").fetchone()[0] == 30
    finally:
        check.close()


def test_checkpointer_copies_the_wal_back(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (x TEXT)")
    for _ in range(200):
        conn.execute("INSERT INTO t VALUES (?)", ("x" * 500,))
    wal = Path(path + "-wal")
    assert wal.stat().st_size > 100_000
    busy, frames, done = WalCheckpointer(path).checkpoint()
    assert busy == 0 and frames > 0 and done == frames
    conn.execute("INSERT INTO t VALUES ('y')")  # the WAL starts over from its beginning
    assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] <= 2
    conn.close()


def test_the_writer_runs_on_the_callers_thread_and_readers_on_aiosqlites(tmp_path: Path) -> None:
    """InlineConnection overrides aiosqlite internals (pinned to 0.22.x): if they change, this fails."""
    import asyncio
    import threading

    from sqlalchemy import text

    from helpline.store.db import make_engine

    url = f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"

    def workers() -> int:
        return sum(1 for t in threading.enumerate() if "_connection_worker_thread" in t.name)

    async def go() -> None:
        writer, reader = make_engine(url), make_engine(url, reader=True)
        try:
            before = workers()
            async with writer.begin() as conn:
                await conn.execute(text("CREATE TABLE t (x INTEGER)"))
                await conn.execute(text("INSERT INTO t VALUES (1), (2)"))
            assert workers() == before  # no thread for the writer
            async with writer.connect() as conn:
                assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == WRITER_BUSY_TIMEOUT_MS
                assert (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 0
            async with reader.connect() as conn:
                assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 2
            assert workers() == before + 1  # the reader's connection has its worker thread
        finally:
            await writer.dispose()
            await reader.dispose()

    asyncio.run(go())
