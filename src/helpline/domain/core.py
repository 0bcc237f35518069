"""The running core: settings, sites, store, live events and the wake-ups of background loops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from helpline.domain.events import Event, EventHub
from helpline.domain.sites import Site, SiteRegistry
from helpline.settings import Settings
from helpline.store.db import make_engine, make_sessionmaker


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


class Core:
    def __init__(self, settings: Settings, sites: SiteRegistry) -> None:
        self.settings = settings
        self.sites = sites
        self.engine: AsyncEngine = make_engine(settings.database_url)
        self.sessionmaker: async_sessionmaker[AsyncSession] = make_sessionmaker(self.engine)
        self.hub = EventHub()
        self.hunter_wakeup = asyncio.Event()
        self.outbox_wakeup = asyncio.Event()

    def site(self, slug: str) -> Site:
        found = self.sites.get(slug)
        if found is None:
            raise KeyError(slug)
        return found

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        async with self.sessionmaker() as session:
            async with session.begin():
                t = Tx(session)
                yield t
        self.announce(t)

    def announce(self, t: Tx) -> None:
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
