"""What a supervisor sees: live queues, counselors, lapsed offers, the outbox and its dead letters.

Everything is scoped to the supervisor's site; an admin (or a supervisor of site ``*``) sees every
site and may narrow the view with ``site``. Dead letters are shown without their payload: a
supervisor needs the reason and the conversation, not the message text.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.domain import audit
from helpline.domain.auth import ALL_SITES, Principal, Role
from helpline.domain.errors import Conflict, Invalid, NotFound
from helpline.domain.outbox import PURGED_PAYLOAD, replay_dead
from helpline.domain.states import ConversationStatus, OfferStatus
from helpline.domain.views import iso
from helpline.runtime import message_status
from helpline.runtime.core import Core, now
from helpline.store.models import Agent, Conversation, Message, Offer, OutboxEvent, User

SUPERVISORS = (Role.SUPERVISOR, Role.ADMIN)
LAPSED_WINDOW_S = 3600.0
MAX_STATS_HOURS = 24 * 7
WAITING = (ConversationStatus.QUEUED.value, ConversationStatus.OFFERED.value)


def visible_sites(core: Core, who: Principal, site: str | None = None) -> list[str]:
    """The slugs this supervisor may look at, narrowed to ``site`` when given.

    403 for a role other than supervisor or admin, or a site outside the supervisor's own;
    404 for a site that is not configured.
    """
    who.require_role(*SUPERVISORS)
    if site is not None:
        if core.sites.get(site) is None:
            raise NotFound(f"unknown site {site!r}")
        who.require_site(site)
        return [site]
    if who.role == Role.ADMIN or who.site == ALL_SITES:
        return [s.slug for s in core.sites]
    return [who.site] if core.sites.get(who.site) is not None else []


def _age(t: float, since: float | None) -> float | None:
    return None if since is None else round(max(0.0, t - since), 1)


async def overview(core: Core, who: Principal, *, site: str | None = None) -> dict[str, Any]:
    """Per site: the queue, the counselors, offers lapsed in the last hour, outbox and dead letters."""
    slugs = visible_sites(core, who, site)
    t = now()
    per_site = {slug: _site_view(core, slug) for slug in slugs}
    if slugs:
        async with core.sessionmaker() as s:
            await _count_queues(s, per_site, t)
            await _count_lapsed_offers(s, per_site, t)
            await _count_outbox(s, per_site, t)
            for slug, people in (await _counselors(s, slugs, t)).items():
                per_site[slug]["counselors"] = people
    for entry in per_site.values():
        people = entry["counselors"]
        entry["counselors_summary"] = {
            status: sum(1 for c in people if c["status"] == status) for status in ("available", "paused", "offline")
        }
    return {"generated_at": iso(t), "sites": [per_site[slug] for slug in slugs]}


def _site_view(core: Core, slug: str) -> dict[str, Any]:
    """A site's overview before anything is counted: an empty queue, nobody, nothing pending."""
    cfg = core.sites.get(slug)
    return {
        "slug": slug,
        "name": cfg.name if cfg else slug,
        "max_chats_per_counselor": cfg.routing.max_chats_per_counselor if cfg else None,
        "offer_timeout_s": cfg.routing.offer_timeout_s if cfg else None,
        "queue": {
            "waiting": 0,
            "queued": 0,
            "offered": 0,
            "assigned": 0,
            "high_risk_waiting": 0,
            "longest_wait_s": None,
        },
        "counselors": [],
        "offers_lapsed_last_hour": 0,
        "outbox": {"pending": 0, "oldest_pending_age_s": None},
        "dead_letters": 0,
    }


async def _count_queues(s: AsyncSession, per_site: dict[str, dict[str, Any]], t: float) -> None:
    """Open conversations per status; of those waiting (queued or offered): how many are at high
    risk, and the longest wait."""
    rows = await s.execute(
        select(
            Conversation.site,
            Conversation.status,
            func.count(),
            func.min(Conversation.queued_at),
            func.sum(case((Conversation.risk == "high", 1), else_=0)),
        )
        .where(Conversation.site.in_(list(per_site)), Conversation.status != ConversationStatus.CLOSED)
        .group_by(Conversation.site, Conversation.status)
    )
    for slug, status, count, oldest, high in rows.all():
        q = per_site[slug]["queue"]
        q[status] = int(count)
        if status in WAITING:
            q["waiting"] += int(count)
            q["high_risk_waiting"] += int(high or 0)
            age = _age(t, oldest)
            if age is not None and (q["longest_wait_s"] is None or age > q["longest_wait_s"]):
                q["longest_wait_s"] = age


async def _count_lapsed_offers(s: AsyncSession, per_site: dict[str, dict[str, Any]], t: float) -> None:
    rows = await s.execute(
        select(Offer.site, func.count())
        .where(
            Offer.site.in_(list(per_site)),
            Offer.status == OfferStatus.TIMED_OUT,
            Offer.resolved_at >= t - LAPSED_WINDOW_S,
        )
        .group_by(Offer.site)
    )
    for slug, count in rows.all():
        per_site[slug]["offers_lapsed_last_hour"] = int(count)


async def _count_outbox(s: AsyncSession, per_site: dict[str, dict[str, Any]], t: float) -> None:
    """Pending events (and the oldest one's age) and dead letters."""
    rows = await s.execute(
        select(OutboxEvent.site, OutboxEvent.status, func.count(), func.min(OutboxEvent.created_at))
        .where(OutboxEvent.site.in_(list(per_site)), OutboxEvent.status.in_(("pending", "dead")))
        .group_by(OutboxEvent.site, OutboxEvent.status)
    )
    for slug, status, count, oldest in rows.all():
        if status == "pending":
            per_site[slug]["outbox"] = {"pending": int(count), "oldest_pending_age_s": _age(t, oldest)}
        else:
            per_site[slug]["dead_letters"] = int(count)


async def _counselors(s: AsyncSession, slugs: list[str], t: float) -> dict[str, list[dict[str, Any]]]:
    active = dict(
        (
            await s.execute(
                select(Conversation.counselor_id, func.count())
                .where(Conversation.status == ConversationStatus.ASSIGNED, Conversation.counselor_id.is_not(None))
                .group_by(Conversation.counselor_id)
            )
        ).all()
    )
    pending = dict(
        (
            await s.execute(
                select(Offer.counselor_id, func.count())
                .where(Offer.status == OfferStatus.PENDING)
                .group_by(Offer.counselor_id)
            )
        ).all()
    )
    rows = (
        await s.execute(
            select(User, Agent)
            .outerjoin(Agent, Agent.user_id == User.id)
            .where(User.role == Role.COUNSELOR.value, User.site.in_(slugs), User.active.is_(True))
            .order_by(User.name, User.id)
        )
    ).all()
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for user, agent in rows:
        wrapup = agent is not None and agent.wrapup_until > t
        out[user.site].append(
            {
                "id": user.id,
                "username": user.username,
                "name": user.name,
                "status": agent.status if agent else "offline",
                "reason": agent.reason if agent else None,
                "since": iso(agent.since) if agent else None,
                "in_wrapup": wrapup,
                "active_conversations": int(active.get(user.id, 0)),
                "pending_offers": int(pending.get(user.id, 0)),
            }
        )
    return out


def _dead_letter_view(ev: OutboxEvent, chat_session: str | None) -> dict[str, Any]:
    return {
        "id": ev.id,
        "site": ev.site,
        "conversation_id": ev.conversation_id,
        "chat_session": chat_session,
        "event": ev.event,
        "last_error": ev.last_error,
        "attempts": ev.attempts,
        "created_at": iso(ev.created_at),
    }


async def dead_letters(core: Core, who: Principal, *, site: str | None = None, limit: int = 100) -> dict[str, Any]:
    """The site's dead letters, newest first: the reason and the conversation, never the text."""
    slugs = visible_sites(core, who, site)
    if not slugs:
        return {"results": [], "count": 0}
    async with core.sessionmaker() as s:
        where = (OutboxEvent.site.in_(slugs), OutboxEvent.status == "dead")
        total = await s.scalar(select(func.count()).select_from(OutboxEvent).where(*where))
        rows = (
            await s.execute(
                select(OutboxEvent, Conversation.chat_session)
                .outerjoin(Conversation, Conversation.id == OutboxEvent.conversation_id)
                .where(*where)
                .order_by(OutboxEvent.id.desc())
                .limit(limit)
            )
        ).all()
    return {"results": [_dead_letter_view(ev, cs) for ev, cs in rows], "count": int(total or 0)}


async def replay(core: Core, who: Principal, outbox_id: int, *, address: str | None = None) -> dict[str, Any]:
    """Send a dead letter again (audited). 404 when unknown or of another site; 409 when it is not
    dead, or when the retention purge has emptied it.

    A counselor message that failed because of it goes back to ``pending`` (the counselor's
    console is told), and becomes ``sent`` once RapidPro takes it.
    """
    who.require_role(*SUPERVISORS)
    async with core.tx() as tx:
        ev = await tx.session.get(OutboxEvent, outbox_id, with_for_update=True)
        if ev is None or not who.may_use_site(ev.site):
            raise NotFound(f"no dead letter {outbox_id}")
        if ev.status != "dead":
            raise Conflict(f"outbox event {outbox_id} is {ev.status}, not a dead letter")
        if ev.payload == PURGED_PAYLOAD:
            raise Conflict(f"outbox event {outbox_id} was purged (retention): nothing left to send")
        audit.record(tx, who, audit.Action.REPLAY, conversation_id=ev.conversation_id, site=ev.site, address=address)
        if ev.message_ref is not None:
            msg = await tx.session.get(Message, ev.message_ref, with_for_update=True)
            if msg is not None and msg.status == "failed":
                message_status.set_status(tx, msg, "pending")
        site = ev.site
    if not await replay_dead(core, outbox_id):
        raise Conflict(f"outbox event {outbox_id} is no longer a dead letter")
    return {"id": outbox_id, "site": site, "status": "pending"}


async def stats(core: Core, who: Principal, *, hours: int = 24, site: str | None = None) -> dict[str, Any]:
    """Per site and hour (UTC, oldest first): conversations started, and the wait to assignment
    (median and max, seconds) of those that were assigned."""
    if not 1 <= hours <= MAX_STATS_HOURS:
        raise Invalid(f"hours must be 1..{MAX_STATS_HOURS}", fields={"hours": ["out of range"]})
    slugs = visible_sites(core, who, site)
    t = now()
    first = (math.floor(t / 3600) - hours + 1) * 3600.0
    async with core.sessionmaker() as s:
        rows = (
            (
                await s.execute(
                    select(Conversation.site, Conversation.created_at, Conversation.assigned_at).where(
                        Conversation.site.in_(slugs), Conversation.created_at >= first
                    )
                )
            ).all()
            if slugs
            else []
        )
    started: dict[tuple[str, int], int] = defaultdict(int)
    waits: dict[tuple[str, int], list[float]] = defaultdict(list)
    for slug, created_at, assigned_at in rows:
        idx = min(hours - 1, int((created_at - first) // 3600))
        started[slug, idx] += 1
        if assigned_at is not None:
            waits[slug, idx].append(max(0.0, assigned_at - created_at))
    out = []
    for slug in slugs:
        cfg = core.sites.get(slug)
        buckets = []
        for i in range(hours):
            w = waits.get((slug, i), [])
            buckets.append(
                {
                    "start": iso(first + i * 3600),
                    "conversations": started.get((slug, i), 0),
                    "assigned": len(w),
                    "median_wait_s": round(statistics.median(w), 1) if w else None,
                    "max_wait_s": round(max(w), 1) if w else None,
                }
            )
        out.append({"slug": slug, "name": cfg.name if cfg else slug, "hours": buckets})
    return {"generated_at": iso(t), "hours": hours, "sites": out}
