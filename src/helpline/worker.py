"""The background components of an instance: what it runs besides answering HTTP requests.

``helpline serve`` (app.py's lifespan) and ``helpline work`` start the same ones, the same way
(:class:`Background`), as the settings say:

- the bus listener (PostgreSQL): live events and wake-ups from the other instances. It starts
  first, and the loops start with it connected;
- the WAL checkpointer (SQLite; so only under ``serve``: ``work`` needs PostgreSQL);
- the hunter (``run_hunter``) and the outbox (``run_outbox``);
- the Asterisk presence adapter: one AMI connection per site with ``[site.asterisk]``;
- the retention purge (``retention_days`` > 0);
- the garbage-collection policy (``gc_freeze``, ``gc_full_collection_s``), once the rest has
  started: a full collection pauses the process's event loop, the hunter's as much as the HTTP side's.

On PostgreSQL the loops can also run in a process of their own, ``helpline work``: instances share
the work through the store (offers and claims are taken under ``SKIP LOCKED``; the purge takes its
batches the same way) and hear each other through LISTEN/NOTIFY (a queued conversation wakes the
hunter wherever it runs; an offer reaches the counselor's WebSocket wherever it is connected). A
hunter in a process of its own does not wait behind the HTTP requests of the moment at each of its
statements.

Asterisk with several instances: each instance that runs the adapter keeps its own AMI connection
per site. Each stores the queue's events in ``phone_states``, shared through the store (every
hunter sees a busy phone, whichever instance heard it; a busy phone's offers are withdrawn once,
under the row's lock), and each repairs the queue's membership from the stored presence at every
login and every ``resync_s``. A presence change is pushed to Asterisk at once by the instance
where it is made, through its core's presence sink: the adapter is that sink, set on the core the
instance's HTTP side uses. ``helpline work`` has no HTTP side, so it makes no presence change and
pushes none; nor does it repeat those it hears on the bus from the servers: the server that made
a change has pushed it already, and a second sender could put a quick join-then-pause in the wrong
order. What its adapter adds is the phone states kept current while no server is up (a rolling
restart), and its resyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.delivery.outbox import OutboxWorker
from helpline.delivery.rapidpro import RapidProClient
from helpline.delivery.weni import WeniClient
from helpline.domain.retention import run_retention
from helpline.routing.asterisk import AsteriskPresence
from helpline.routing.hunt import Hunter
from helpline.runtime import gcpolicy
from helpline.runtime.core import Core
from helpline.store.checkpoint import WalCheckpointer
from helpline.store.db import sqlite_path

log = structlog.get_logger("helpline.worker")

LISTENER_WAIT_S = 10.0


class Background:
    """The background components of one instance, as ``core.settings`` says (see the module).

    ``loops=False`` leaves out the hunter, the outbox, Asterisk and the purge, keeping what the
    process needs to run at all (the listener, the WAL checkpointer, the GC policy): for tests that
    drive the rules themselves.
    """

    def __init__(self, core: Core, *, loops: bool = True) -> None:
        self.core = core
        self.loops = loops
        self.tasks: list[asyncio.Task[Any]] = []
        self._client = RapidProClient()
        self._weni_client = WeniClient()
        self._restore_gc: Callable[[], None] | None = None

    async def start(self) -> None:
        await self._start_listener()
        wal = sqlite_path(self.core.settings.database_url)
        if wal is not None:
            self._spawn(WalCheckpointer(wal).run(), "wal-checkpoint")
        if self.loops:
            self._start_loops()
        self._apply_gc_policy()
        log.info("background started", components=[t.get_name() for t in self.tasks])

    async def stop(self) -> None:
        """Stop every component (the latest started first) and close the outbound clients."""
        if self._restore_gc is not None:
            self._restore_gc()
            self._restore_gc = None
        await cancel_all(self.tasks[::-1])
        self.tasks.clear()
        await self._client.aclose()
        await self._weni_client.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    async def _start_listener(self) -> None:
        """Listen on the bus (PostgreSQL), waiting a little for it: the loops start with it connected."""
        listener = self.core.listener
        if listener is None:
            return
        self._spawn(listener.run(), "bus")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener.connected.wait(), timeout=LISTENER_WAIT_S)

    def _start_loops(self) -> None:
        core, settings = self.core, self.core.settings
        if settings.run_hunter:
            self._spawn(Hunter(core).run(), "hunter")
        if settings.run_outbox:
            self._spawn(OutboxWorker(core, self._client, self._weni_client).run(), "outbox")
        phones = AsteriskPresence.for_core(core)  # sites with [site.asterisk]
        if phones is not None:
            core.presence_sink = phones  # the presence changes made on this core reach Asterisk
            self._spawn(phones.run(), "asterisk")
        if settings.retention_days > 0:
            self._spawn(run_retention(core), "retention")

    def _apply_gc_policy(self) -> None:
        settings = self.core.settings
        if settings.gc_freeze:
            gcpolicy.freeze()
        if settings.gc_full_collection_s > 0:
            self._restore_gc = gcpolicy.schedule_full_collections()
            self._spawn(gcpolicy.run_full_collections(settings.gc_full_collection_s), "gc")


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until each has stopped."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not in the main thread
            loop.add_signal_handler(sig, stop.set)


async def work(settings: Settings, sites: SiteRegistry, stop: asyncio.Event | None = None) -> None:
    """Run the background components without an HTTP server until ``stop`` is set (or SIGTERM/SIGINT).

    PostgreSQL only: with SQLite, one process does everything (``helpline serve``). The schema must be
    up to date (``helpline serve`` or ``helpline migrate`` upgrade it).
    """
    core = Core(settings, sites)
    if core.listener is None:
        await core.close()
        raise ValueError("helpline work needs PostgreSQL: with SQLite, `helpline serve` runs every loop")
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    background = Background(core)
    try:
        await background.start()
        log.info("worker started", hunter=settings.run_hunter, outbox=settings.run_outbox)
        await stop.wait()
    finally:
        await background.stop()
        await core.close()
        log.info("worker stopped")
