"""Who can take a conversation now: counselors in the queue, not paused, under capacity, not on the phone."""

from __future__ import annotations

from sqlalchemy import Float, Integer, Select, String, bindparam, func, literal_column, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.domain.sites import Site
from helpline.domain.states import ConversationStatus, OfferStatus
from helpline.routing.strategies import LAST_OFFER_STRATEGIES, Candidate
from helpline.store.models import Agent, Conversation, Offer, PhoneState


def _statement(*, phones: bool, last_offer: bool) -> Select[int, int, float, float]:
    """The candidates of site ``:slug`` at time ``:t`` with ``:max_chats`` per counselor.

    Built once per variant (``phones``: the site has an Asterisk queue; ``last_offer``: its
    strategy looks at ``last_offer_at``) and run with parameters: building a statement like this
    one costs more CPU than SQLite takes to run it.
    """
    slug = bindparam("slug", type_=String)
    assigned = (
        select(Conversation.counselor_id.label("uid"), func.count().label("n"))
        .where(Conversation.site == slug, Conversation.status == ConversationStatus.ASSIGNED)
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
    # Correlated, so only the candidates' own offers are read (ix_offers_counselor_status), not
    # every offer the site ever made; and only for the strategies that look at it.
    offered = (
        select(func.max(Offer.created_at))
        .where(Offer.counselor_id == Agent.user_id, Offer.site == slug)
        .correlate(Agent)
        .scalar_subquery()
    )
    last_offer_at = func.coalesce(offered, 0.0) if last_offer else literal_column("0.0", Float)
    active = func.coalesce(assigned.c.n, 0) + func.coalesce(pending.c.n, 0)
    on_the_phone = (  # busy or paused in the site's Asterisk queue: no chat offers
        select(PhoneState.user_id)
        .where(PhoneState.user_id == Agent.user_id, or_(PhoneState.busy, PhoneState.paused))
        .exists()
    )
    return (
        select(Agent.user_id, active, Agent.last_assigned_at, last_offer_at)
        .outerjoin(assigned, assigned.c.uid == Agent.user_id)
        .outerjoin(pending, pending.c.uid == Agent.user_id)
        .where(
            Agent.site == slug,
            Agent.status == "available",
            Agent.wrapup_until <= bindparam("t", type_=Float),
            active < bindparam("max_chats", type_=Integer),
            ~on_the_phone if phones else true(),
        )
    )


_STATEMENTS = {
    (phones, last_offer): _statement(phones=phones, last_offer=last_offer)
    for phones in (False, True)
    for last_offer in (False, True)
}


async def candidates(session: AsyncSession, site: Site, t: float) -> list[Candidate]:
    statement = _STATEMENTS[site.asterisk is not None, site.routing.strategy in LAST_OFFER_STRATEGIES]
    params = {"slug": site.slug, "t": t, "max_chats": site.routing.max_chats_per_counselor}
    rows = (await session.execute(statement, params)).all()
    return [Candidate(uid, int(n), la, lo) for uid, n, la, lo in rows]
