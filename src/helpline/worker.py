"""The background loops of an instance: hunting and outbox delivery.

``helpline serve`` runs them beside its HTTP server, as its settings say (``run_hunter``,
``run_outbox``). On PostgreSQL they can also run in a process of their own, ``helpline work``:
instances share the work through the store (offers and claims are taken under ``SKIP LOCKED``) and
hear each other through LISTEN/NOTIFY (a queued conversation wakes the hunter wherever it runs; an
offer reaches the counselor's WebSocket wherever it is connected). A hunter in a process of its own
does not wait behind the HTTP requests of the moment at each of its statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog

from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.delivery.outbox import OutboxWorker
from helpline.delivery.rapidpro import RapidProClient
from helpline.delivery.weni import WeniClient
from helpline.routing.hunt import Hunter
from helpline.runtime.core import Core

log = structlog.get_logger("helpline.worker")

LISTENER_WAIT_S = 10.0


class Workers:
    """The hunting and delivery loops of one instance, as ``core.settings`` says."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.tasks: list[asyncio.Task[Any]] = []
        self._client = RapidProClient()
        self._weni_client = WeniClient()

    def start(self) -> None:
        settings = self.core.settings
        if settings.run_hunter:
            self.tasks.append(asyncio.create_task(Hunter(self.core).run(), name="hunter"))
        if settings.run_outbox:
            worker = OutboxWorker(self.core, self._client, self._weni_client)
            self.tasks.append(asyncio.create_task(worker.run(), name="outbox"))

    async def stop(self) -> None:
        await cancel_all(self.tasks)
        await self._client.aclose()
        await self._weni_client.aclose()


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until each has stopped."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


async def start_listener(core: Core) -> asyncio.Task[None] | None:
    """Listen on the bus (PostgreSQL), waiting a little for it: the loops start with it connected."""
    if core.listener is None:
        return None
    task = asyncio.create_task(core.listener.run(), name="bus")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(core.listener.connected.wait(), timeout=LISTENER_WAIT_S)
    return task


async def work(settings: Settings, sites: SiteRegistry, stop: asyncio.Event | None = None) -> None:
    """Run the loops without an HTTP server until ``stop`` is set (or SIGTERM/SIGINT).

    PostgreSQL only: with SQLite, one process does everything (``helpline serve``). The schema must be
    up to date (``helpline serve`` or ``helpline migrate`` upgrade it).
    """
    core = Core(settings, sites)
    if core.listener is None:
        await core.close()
        raise ValueError("helpline work needs PostgreSQL: with SQLite, `helpline serve` runs every loop")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not in the main thread
            loop.add_signal_handler(sig, stop.set)
    listener = await start_listener(core)
    workers = Workers(core)
    workers.start()
    log.info("worker started", hunter=settings.run_hunter, outbox=settings.run_outbox)
    try:
        await stop.wait()
    finally:
        await workers.stop()
        await cancel_all([listener] if listener is not None else [])
        await core.close()
        log.info("worker stopped")
