"""The running core: settings, sites, store, live events and the wake-ups of background loops."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from helpline.config.settings import Settings
from helpline.config.sites import Site, SiteRegistry
from helpline.runtime.events import Event, EventHub
from helpline.runtime.presence import NoPresenceSink, PresenceSink
from helpline.store import bus
from helpline.store.db import is_sqlite, make_engine, make_sessionmaker

C = TypeVar("C")


def now() -> float:
    return time.time()


@dataclass
class Tx:
    """One database transaction plus what to announce once it has committed."""

    session: AsyncSession
    user_events: list[tuple[int, Event]] = field(default_factory=list)
    site_events: list[tuple[str, Event]] = field(default_factory=list)
    wake_hunter: bool = False
    wake_outbox: bool = False

    def notify(self, user_id: int, type_: str, **data: Any) -> None:
        self.user_events.append((user_id, {"type": type_, **data}))

    def notify_site(self, site: str, type_: str, **data: Any) -> None:
        self.site_events.append((site, {"type": type_, **data}))

    def bus_messages(self) -> list[bus.Message]:
        messages: list[bus.Message] = [{"u": u, "e": e} for u, e in self.user_events]
        messages += [{"s": s, "e": e} for s, e in self.site_events]
        wake = [name for name, on in (("hunter", self.wake_hunter), ("outbox", self.wake_outbox)) if on]
        if wake:
            messages.append({"wake": wake})
        return messages


class Core:
    r"""The services of one running instance, shared by every layer above it.

    It names none of the rules: the per-process state of a layer above (the principal cache, the
    inbound batcher) is one of its ``component``\ s, made on first use by that layer's own factory.
    """

    def __init__(self, settings: Settings, sites: SiteRegistry) -> None:
        self.settings = settings
        self.sites = sites
        self.engine: AsyncEngine = make_engine(settings.database_url)
        sqlite = is_sqlite(settings.database_url)
        # Reads (``sessionmaker``) and writes (``tx``): on SQLite, separate engines (see store.db).
        self.read_engine: AsyncEngine = make_engine(settings.database_url, reader=True) if sqlite else self.engine
        self.sessionmaker: async_sessionmaker[AsyncSession] = make_sessionmaker(self.read_engine)
        self._write_sessionmaker = make_sessionmaker(self.engine) if sqlite else self.sessionmaker
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if sqlite else None
        self.hub = EventHub()
        self._components: dict[type[Any], Any] = {}
        # Told of every committed presence change (e.g. the Asterisk adapter); by default, nobody.
        self.presence_sink: PresenceSink = NoPresenceSink()
        self.hunter_wakeup = asyncio.Event()
        self.outbox_wakeup = asyncio.Event()
        # On PostgreSQL, events and wake-ups reach every instance through LISTEN/NOTIFY.
        self.listener: bus.Listener | None = None
        if not is_sqlite(settings.database_url):
            self.listener = bus.Listener(settings.database_url, self.sessionmaker, self.deliver)

    def site(self, slug: str) -> Site:
        found = self.sites.get(slug)
        if found is None:
            raise KeyError(slug)
        return found

    def component(self, kind: type[C], make: Callable[[Core], C]) -> C:
        """This instance's one ``kind`` (made by ``make(core)`` the first time it is asked for)."""
        found = self._components.get(kind)
        if found is None:
            found = self._components[kind] = make(self)
        return cast(C, found)

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        """One write transaction (never nest them: on SQLite writers queue on one lock)."""
        async with self._write_lock or contextlib.nullcontext(), self._write_sessionmaker() as session:
            via_bus = False
            async with session.begin():
                t = Tx(session)
                yield t
                via_bus = self._bus_up()
                if via_bus:
                    messages = t.bus_messages()
                    if messages:
                        await bus.send(session, messages, now())
        if not via_bus:
            self.announce(t)

    def _bus_up(self) -> bool:
        return self.listener is not None and self.listener.connected.is_set()

    def deliver(self, msg: bus.Message) -> None:
        """One message from the bus: publish it to this instance's sockets, or wake a loop."""
        if "u" in msg:
            self.hub.publish(int(msg["u"]), msg["e"])
        elif "s" in msg:
            self.hub.publish_site(str(msg["s"]), msg["e"])
        for name in msg.get("wake", ()):
            (self.hunter_wakeup if name == "hunter" else self.outbox_wakeup).set()

    def announce(self, t: Tx) -> None:
        """Without a bus (SQLite, or while it reconnects), events go to this instance's sockets."""
        for user_id, event in t.user_events:
            self.hub.publish(user_id, event)
        for site, event in t.site_events:
            self.hub.publish_site(site, event)
        if t.wake_hunter:
            self.hunter_wakeup.set()
        if t.wake_outbox:
            self.outbox_wakeup.set()

    async def close(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()
