"""In-process fan-out of live events to connected counselors and supervisors."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

Event = dict[str, Any]


class EventHub:
    """Each WebSocket subscribes with a queue; events go to a user or to a site's supervisors."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._users: dict[int, set[asyncio.Queue[Event]]] = defaultdict(set)
        self._sites: dict[str, set[asyncio.Queue[Event]]] = defaultdict(set)
        self._queue_size = queue_size

    def subscribe(self, user_id: int, *, site: str | None = None) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._users[user_id].add(q)
        if site is not None:
            self._sites[site].add(q)
        return q

    def unsubscribe(self, user_id: int, q: asyncio.Queue[Event], *, site: str | None = None) -> None:
        self._users[user_id].discard(q)
        if not self._users[user_id]:
            del self._users[user_id]
        if site is not None:
            self._sites[site].discard(q)
            if not self._sites[site]:
                del self._sites[site]

    def connected(self, user_id: int) -> bool:
        return bool(self._users.get(user_id))

    def publish(self, user_id: int, event: Event) -> None:
        for q in list(self._users.get(user_id, ())):
            _put(q, event)

    def publish_site(self, site: str, event: Event) -> None:
        # Supervisors of every site (site "*") hear each site's events, tagged with the site.
        for q in list(self._sites.get(site, ())) + list(self._sites.get("*", ())):
            _put(q, {"site": site, **event})


def _put(q: asyncio.Queue[Event], event: Event) -> None:
    try:
        q.put_nowait(event)
    except asyncio.QueueFull:
        # A consumer this far behind is stuck: it is told to reconnect and catch up over REST.
        while not q.empty():
            q.get_nowait()
        q.put_nowait({"type": "resync", "reason": "too many events pending"})
