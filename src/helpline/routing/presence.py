"""Who can take a conversation now: counselors in the queue, not paused, under capacity, not on the phone."""

from __future__ import annotations

from sqlalchemy import func, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.domain.sites import Site
from helpline.domain.states import ConversationStatus, OfferStatus
from helpline.routing.strategies import Candidate
from helpline.store.models import Agent, Conversation, Offer, PhoneState


async def candidates(session: AsyncSession, site: Site, t: float) -> list[Candidate]:
    assigned = (
        select(Conversation.counselor_id.label("uid"), func.count().label("n"))
        .where(Conversation.site == site.slug, Conversation.status == ConversationStatus.ASSIGNED)
        .group_by(Conversation.counselor_id)
        .subquery()
    )
    pending = (
        select(Offer.counselor_id.label("uid"), func.count().label("n"))
        .where(Offer.status == OfferStatus.PENDING)
        .group_by(Offer.counselor_id)
        .subquery()
    )
    # When each was last offered anything: read from the offers, not kept on the agent's row, so
    # hunting (on any instance) never writes to agents rows that counselors' own requests lock.
    offered = (
        select(Offer.counselor_id.label("uid"), func.max(Offer.created_at).label("at"))
        .where(Offer.site == site.slug)
        .group_by(Offer.counselor_id)
        .subquery()
    )
    active = func.coalesce(assigned.c.n, 0) + func.coalesce(pending.c.n, 0)
    on_the_phone = (  # busy or paused in the site's Asterisk queue: no chat offers
        select(PhoneState.user_id)
        .where(PhoneState.user_id == Agent.user_id, or_(PhoneState.busy, PhoneState.paused))
        .exists()
    )
    rows = (
        await session.execute(
            select(Agent.user_id, active, Agent.last_assigned_at, func.coalesce(offered.c.at, 0.0))
            .outerjoin(assigned, assigned.c.uid == Agent.user_id)
            .outerjoin(offered, offered.c.uid == Agent.user_id)
            .outerjoin(pending, pending.c.uid == Agent.user_id)
            .where(
                Agent.site == site.slug,
                Agent.status == "available",
                Agent.wrapup_until <= t,
                active < site.routing.max_chats_per_counselor,
                true() if site.asterisk is None else ~on_the_phone,
            )
        )
    ).all()
    return [Candidate(uid, int(n), la, lo) for uid, n, la, lo in rows]
