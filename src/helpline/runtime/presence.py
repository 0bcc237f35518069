"""Presence sinks: outside systems told when a counselor joins the queue, pauses or leaves.

``set_presence`` calls the core's sink once its transaction has committed. The default sink does
nothing; the Asterisk adapter (``helpline.routing.asterisk``) mirrors presence into a phone queue.
A sink must return quickly and never raise into the chat side: the presence call has already
succeeded, whatever an outside system makes of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import structlog

log = structlog.get_logger("helpline.presence")


@dataclass(frozen=True)
class PresenceChange:
    counselor_id: int
    site: str
    status: str  # available | paused | offline
    reason: str | None = None


class PresenceSink(Protocol):
    async def presence_changed(self, change: PresenceChange) -> None:
        """Take note of a committed presence change (queue it; do not wait on a peer)."""


class NoPresenceSink:
    """The default: presence lives in helpline alone."""

    async def presence_changed(self, change: PresenceChange) -> None:
        return None


async def tell_sink(sink: PresenceSink, change: PresenceChange) -> None:
    """Hand ``change`` to ``sink``; a failing sink is logged, never raised to the caller."""
    try:
        await sink.presence_changed(change)
    except Exception:
        log.warning("presence sink failed", counselor_id=change.counselor_id, status=change.status, exc_info=True)
