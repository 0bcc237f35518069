"""Cross-instance fan-out on PostgreSQL: LISTEN/NOTIFY carries live events and wake-ups.

Events are sent with ``pg_notify`` inside the transaction that caused them, so PostgreSQL delivers
them to every listening instance (this one included) exactly when, and only if, it commits. A
payload over PostgreSQL's 8000-byte limit is parked in ``bus_spill`` and the notification carries
its id. The listener reconnects by itself; while it is down, instances fall back to their polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import structlog
from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from helpline.store.models import BusSpill

log = structlog.get_logger("helpline.bus")

CHANNEL = "helpline_bus"
MAX_PAYLOAD = 7900
SPILL_TTL_S = 300.0

Message = dict[str, Any]


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def send(session: AsyncSession, messages: list[Message], t: float) -> None:
    """Queue ``messages`` for every instance; they go out when the session's transaction commits."""
    payloads: list[str] = []
    for msg in messages:
        payload = orjson.dumps(msg).decode()
        if len(payload.encode()) > MAX_PAYLOAD:
            spill_id = await session.scalar(
                insert(BusSpill).values(payload=payload, created_at=t).returning(BusSpill.id)
            )
            payload = orjson.dumps({"spill": spill_id}).decode()
        payloads.append(payload)
    if len(payloads) == 1:
        await session.execute(_NOTIFY_ONE, {"c": CHANNEL, "p": payloads[0]})
    elif payloads:  # one round trip for the whole transaction's events, in their order
        await session.execute(_NOTIFY_MANY, {"c": CHANNEL, "ps": payloads})


_NOTIFY_ONE = text("SELECT pg_notify(:c, :p)")
# A function scan returns the array's elements in order, so the events are notified in order.
_NOTIFY_MANY = text("SELECT pg_notify(:c, p) FROM unnest(CAST(:ps AS text[])) AS p")


class Listener:
    """One dedicated connection LISTENing on the bus; hands each message to ``deliver``."""

    def __init__(
        self, url: str, sessionmaker: async_sessionmaker[AsyncSession], deliver: Callable[[Message], None]
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._sessionmaker = sessionmaker
        self._deliver = deliver
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._pumping = False  # the pump holds a message (a spill being read): later ones queue behind it
        self.connected = asyncio.Event()

    async def run(self) -> None:
        pump = asyncio.create_task(self._pump())
        try:
            while True:
                try:
                    conn = await asyncpg.connect(self._dsn, timeout=10)
                except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                    log.warning("bus connect failed", error=type(exc).__name__)
                    await asyncio.sleep(1.0)
                    continue
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.connected.set()
                # Whatever was missed while disconnected is caught by the loops' polls.
                self._queue.put_nowait({"wake": ["hunter", "outbox"]})
                try:
                    while not lost.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(lost.wait(), timeout=60)
                        if not lost.is_set():
                            await purge_spill(self._sessionmaker, time.time())
                finally:
                    self.connected.clear()
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
                log.warning("bus connection lost; reconnecting")
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        """Delivered at once, in this callback (no hop through the pump's task: under load each hop
        waits for a turn of the event loop), unless it must wait for a spill to be read first."""
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.exception("bus message dropped")
            return
        if self._pumping or not self._queue.empty() or "spill" in msg:
            self._queue.put_nowait(msg)
        else:
            self._hand_over(msg)

    async def _pump(self) -> None:
        while True:
            msg = await self._queue.get()
            self._pumping = True
            try:
                if "spill" in msg:
                    async with self._sessionmaker() as s:
                        raw = await s.scalar(select(BusSpill.payload).where(BusSpill.id == msg["spill"]))
                    if raw is None:
                        continue
                    msg = orjson.loads(raw)
                self._hand_over(msg)
            except Exception:
                log.exception("bus message dropped")
            finally:
                self._pumping = False  # messages still queued keep _on_notify queueing behind them

    def _hand_over(self, msg: Message) -> None:
        try:
            self._deliver(msg)
        except Exception:
            log.exception("bus message dropped")


async def purge_spill(sessionmaker: async_sessionmaker[AsyncSession], t: float) -> None:
    async with sessionmaker() as s, s.begin():
        await s.execute(delete(BusSpill).where(BusSpill.created_at < t - SPILL_TTL_S))
