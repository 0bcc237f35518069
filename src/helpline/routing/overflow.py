"""Overflow: a conversation nobody at its site answers moves to the site's ``overflow_site``.

When (``overflow_due``): the site has nobody logged in (no counselor of the site available or
paused: a paused counselor is on shift and will be back, so only "everyone offline" counts), or
the conversation has waited ``max_wait_s`` in this site's queue while the site was open.
Where (``overflow_target``): the site's ``overflow_site``, only when that site is open (business
hours) and has someone logged in, while the conversation has overflowed fewer than the site's
``max_overflow_depth`` times and has never been at that site before (no A -> B -> A).
How (``move``): pending offers withdrawn, back to ``queued`` at the new site, keeping its original
``queued_at`` (its place in the hunting order), and the client told (``overflow`` event).

A closed site keeps its conversations (they get ``out_of_hours``); while closed, nothing
overflows and the ``max_wait_s`` clock does not run: it counts from the later of the arrival in
the site's queue and the last opening.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import structlog
from sqlalchemy import func, select

from helpline.config import hours
from helpline.config.sites import Site, SiteRegistry
from helpline.domain import notices
from helpline.domain.states import ConversationStatus, OfferStatus, move_conversation
from helpline.runtime.core import Core, Tx
from helpline.store.models import Agent, Conversation, Offer

log = structlog.get_logger("helpline.overflow")

LOGGED_IN = ("available", "paused")
BATCH = 200

Wake = Callable[[float], None]


# --------------------------------------------------------------------------- pure decisions


def visited(conv: Conversation) -> list[str]:
    """The sites the conversation has been moved away from by overflow, oldest first."""
    return [s for s in (conv.overflow_from or "").split(",") if s]


def waiting_since(conv: Conversation) -> float:
    """Since when the conversation has been in its current site's queue."""
    return conv.site_since if conv.site_since is not None else conv.queued_at


def overflow_due(*, since: float, open_since: float, max_wait_s: float, nobody_logged_in: bool, t: float) -> bool:
    """Whether a conversation waiting at an open site (open since ``open_since``) should move now."""
    if nobody_logged_in:
        return True
    return max_wait_s > 0 and t - max(since, open_since) >= max_wait_s


def due_at(*, since: float, open_since: float, max_wait_s: float) -> float | None:
    """When ``max_wait_s`` runs out for a conversation (``None``: never, it is off)."""
    return max(since, open_since) + max_wait_s if max_wait_s > 0 else None


def overflow_target(
    site: Site,
    sites: SiteRegistry,
    *,
    depth: int,
    been_at: Collection[str],
    t: float,
    staffed: Callable[[str], bool],
) -> Site | None:
    """Where a conversation at ``site`` goes, or ``None`` when it stays.

    ``depth``: how many times it has overflowed already; ``been_at``: the sites it has been at
    (its current one included); ``staffed(slug)``: whether someone is logged in there.
    """
    slug = site.routing.overflow_site
    if slug is None or depth >= site.routing.max_overflow_depth:
        return None
    target = sites.get(slug)
    if target is None or target.slug == site.slug or target.slug in been_at:
        return None
    if not hours.is_open(target.hours, target.zone, t) or not staffed(target.slug):
        return None
    return target


# --------------------------------------------------------------------------- moving


async def move(core: Core, tx: Tx, conv: Conversation, target: Site, t: float) -> None:
    """Overflow ``conv`` (locked, waiting) to ``target``: withdraw its offers, requeue, tell the client."""
    source = conv.site
    offers = (
        await tx.session.scalars(
            select(Offer)
            .where(Offer.conversation_id == conv.id, Offer.status == OfferStatus.PENDING)
            .order_by(Offer.id)
            .with_for_update()
        )
    ).all()
    for o in offers:
        o.status = OfferStatus.WITHDRAWN.value
        o.resolved_at = t
        tx.notify(o.counselor_id, "offer_withdrawn", offer_id=o.id, conversation_id=conv.id, reason="overflow")
    if conv.status != ConversationStatus.QUEUED:
        conv.status = move_conversation(conv.status, ConversationStatus.QUEUED)
    conv.overflow_from = ",".join([*visited(conv), source])
    conv.overflow_depth = (conv.overflow_depth or 0) + 1
    notices.enter_queue(conv, target, t)
    position, waits = await notices.position_and_waits(tx.session, conv)
    notices.tell_position(core, tx, conv, "overflow", t, position, waits)  # of the new site
    tx.notify_site(source, "queue_changed", conversation_id=conv.id)
    tx.notify_site(target.slug, "queue_changed", conversation_id=conv.id)
    tx.wake_hunter = True
    log.info("conversation overflowed", conversation_id=conv.id, site=source, to=target.slug, depth=conv.overflow_depth)


async def logged_in(tx: Tx, site: str) -> int:
    """How many counselors of ``site`` are logged in (available or paused)."""
    n = await tx.session.scalar(select(func.count()).where(Agent.site == site, Agent.status.in_(LOGGED_IN)))
    return int(n or 0)


async def overflow_pass(core: Core, site: Site, t: float, wake: Wake) -> int:
    """Move the site's due conversations to its overflow site. Returns how many moved."""
    r = site.routing
    if r.overflow_site is None or r.max_overflow_depth <= 0:
        return 0
    opened = hours.open_since(site.hours, site.zone, t)
    if opened is None:
        return 0  # closed: out_of_hours, not overflow
    moved = 0
    async with core.tx() as tx:
        nobody = await logged_in(tx, site.slug) == 0
        since = func.coalesce(Conversation.site_since, Conversation.queued_at)
        waiting = (
            Conversation.site == site.slug,
            Conversation.status.in_(notices.WAITING),
            Conversation.overflow_depth < r.max_overflow_depth,
        )
        q = select(Conversation).where(*waiting)
        if not nobody:
            if r.max_wait_s <= 0:
                return 0
            threshold = t - r.max_wait_s
            # Those not due yet: wake when the first of them is.
            first = await tx.session.scalar(select(func.min(since)).where(*waiting, since > threshold))
            if first is not None:
                at = due_at(since=first, open_since=opened, max_wait_s=r.max_wait_s)
                if at is not None:
                    wake(at)
            if opened > threshold and math.isfinite(opened):
                wake(opened + r.max_wait_s)
                return 0
            q = q.where(since <= threshold)
        due = (
            await tx.session.scalars(q.order_by(*notices.QUEUE_ORDER).limit(BATCH).with_for_update(skip_locked=True))
        ).all()
        if not due:
            return 0
        staffed = {r.overflow_site: await logged_in(tx, r.overflow_site) > 0}
        for conv in due:
            if conv.site != site.slug or conv.status not in notices.WAITING:
                continue
            if not overflow_due(
                since=waiting_since(conv), open_since=opened, max_wait_s=r.max_wait_s, nobody_logged_in=nobody, t=t
            ):
                continue
            target = overflow_target(
                site,
                core.sites,
                depth=conv.overflow_depth or 0,
                been_at=[*visited(conv), conv.site],
                t=t,
                staffed=lambda slug: staffed.get(slug, False),
            )
            if target is None:
                continue
            await move(core, tx, conv, target, t)
            moved += 1
    return moved
