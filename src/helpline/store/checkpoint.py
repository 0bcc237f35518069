"""SQLite: the WAL checkpoint, on a thread of its own instead of the writer's commit.

The writer connection runs on the event loop's thread (``store.db.InlineConnection``) with
``wal_autocheckpoint=0``: a checkpoint copies pages back into the database file and fsyncs it,
which must not stall the loop. This task does it every ``interval_s`` in a worker thread, in
``PASSIVE`` mode, so it never waits for (or blocks) the writer or the readers; once a checkpoint
has caught up and no reader still uses old frames, the next commit starts the WAL over.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading

import structlog

log = structlog.get_logger("helpline.store")


class WalCheckpointer:
    def __init__(self, path: str, interval_s: float = 0.5) -> None:
        self.path = path
        self.interval_s = interval_s
        self._conn: sqlite3.Connection | None = None
        # The connection is used on worker threads and closed when the task stops, possibly while
        # a checkpoint is still running on its thread (cancelling the await does not stop it).
        self._lock = threading.Lock()
        self._closed = False

    def checkpoint(self) -> tuple[int, int, int]:
        """One passive checkpoint: (busy, frames in the WAL, frames checkpointed)."""
        with self._lock:
            if self._closed:
                return 0, 0, 0
            if self._conn is None:
                self._conn = sqlite3.connect(self.path, timeout=5, check_same_thread=False, isolation_level=None)
            row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(row[0]), int(row[1]), int(row[2])

    def close(self) -> None:
        """Close the connection, after the checkpoint running on a thread (if any) has finished."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    await asyncio.to_thread(self.checkpoint)
                except sqlite3.Error as exc:  # e.g. the file is busy or gone: try again next time
                    log.warning("wal_checkpoint_failed", error=type(exc).__name__)
        finally:
            self.close()
