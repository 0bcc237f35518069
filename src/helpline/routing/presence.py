"""Who can take a conversation now: counselors in the queue, not paused, under capacity, not on the phone."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Float,
    Integer,
    Row,
    Select,
    String,
    bindparam,
    func,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.config.sites import Site
from helpline.domain.states import ConversationStatus, OfferStatus
from helpline.routing.strategies import LAST_OFFER_STRATEGIES, STORE_ORDERED_STRATEGIES, Candidate
from helpline.store.models import Agent, Conversation, Offer, PhoneState


def _statement(*, phones: bool, last_offer: bool, first: str | None) -> Select[int, int, float, float]:
    """The candidates of site ``:slug`` at time ``:t`` with ``:max_chats`` per counselor.

    Built once per variant (``phones``: the site has an Asterisk queue; ``last_offer``: its
    strategy looks at ``last_offer_at``; ``first``: a strategy the store orders, and only the first
    ``:first`` in its order; ``roundrobin``'s among the ids in ``(:after, :upto]``) and run with
    parameters: building a statement like this one costs more CPU than SQLite takes to run it.
    """
    slug = bindparam("slug", type_=String)
    if first is None:
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
        active = func.coalesce(assigned.c.n, 0) + func.coalesce(pending.c.n, 0)
        return (
            select(Agent.user_id, active, Agent.last_assigned_at, _last_offer_at(slug, last_offer))
            .outerjoin(assigned, assigned.c.uid == Agent.user_id)
            .outerjoin(pending, pending.c.uid == Agent.user_id)
            .where(*_free(slug, phones), active < bindparam("max_chats", type_=Integer))
        )
    # Walk an index of agents in the strategy's order, counting each counselor's load (two index
    # seeks) until ``:first`` have room: a few counselors read, however many are free. (Counting
    # everyone's load at once, above, is cheaper only for all of them.)
    assigned_n = (
        select(func.count())
        .where(
            Conversation.site == slug,
            Conversation.status == ConversationStatus.ASSIGNED,
            Conversation.counselor_id == Agent.user_id,
        )
        .correlate(Agent)
        .scalar_subquery()
    )
    pending_n = (
        select(func.count())
        .where(Offer.counselor_id == Agent.user_id, Offer.status == OfferStatus.PENDING)
        .correlate(Agent)
        .scalar_subquery()
    )
    load = assigned_n + pending_n
    limit = bindparam("first", type_=Integer)
    with_room = select(
        Agent.user_id,
        load.label("active"),
        Agent.last_assigned_at,
        _last_offer_at(slug, last_offer).label("last_offer_at"),
    ).where(*_free(slug, phones), load < bindparam("max_chats", type_=Integer))
    if first == "leastrecent":  # along ix_agents_site_status_assigned
        return with_room.order_by(Agent.last_assigned_at, Agent.user_id).limit(limit)
    if first == "roundrobin":  # along ix_agents_site_status_user: the ids in (:after, :upto], lowest first
        span = (Agent.user_id > bindparam("after", type_=Integer), Agent.user_id <= bindparam("upto", type_=Integer))
        return with_room.where(*span).order_by(Agent.user_id).limit(limit)
    raise ValueError(f"the store keeps no order for strategy {first!r}")


def _free(slug: BindParameter[str], phones: bool) -> list[ColumnElement[bool]]:
    """In the site's queue, available, past their wrap-up, not on the phone."""
    on_the_phone = (  # busy or paused in the site's Asterisk queue: no chat offers
        select(PhoneState.user_id)
        .where(PhoneState.user_id == Agent.user_id, or_(PhoneState.busy, PhoneState.paused))
        .exists()
    )
    return [
        Agent.site == slug,
        Agent.status == "available",
        Agent.wrapup_until <= bindparam("t", type_=Float),
        ~on_the_phone if phones else true(),
    ]


def _last_offer_at(slug: BindParameter[str], last_offer: bool) -> ColumnElement[float]:
    """When each was last offered anything: read from the offers, not kept on the agent's row, so
    hunting (on any instance) never writes to agents rows that counselors' own requests lock.
    Correlated, so only the candidates' own offers are read (ix_offers_counselor_status), not
    every offer the site ever made; and only for the strategies that look at it."""
    if not last_offer:
        return literal_column("0.0", Float)
    offered = (
        select(func.max(Offer.created_at))
        .where(Offer.counselor_id == Agent.user_id, Offer.site == slug)
        .correlate(Agent)
        .scalar_subquery()
    )
    return func.coalesce(offered, 0.0)


_MAX_ID = 2**31 - 1  # users.id is an INTEGER

_STATEMENTS = {
    (phones, last_offer, first): _statement(phones=phones, last_offer=last_offer, first=first)
    for phones in (False, True)
    for last_offer in (False, True)
    for first in (None, *STORE_ORDERED_STRATEGIES)
}


async def candidates(
    session: AsyncSession, site: Site, t: float, *, first: int | None = None, after: int | None = None
) -> list[Candidate]:
    """The site's free counselors with room for one more conversation, with their load.

    ``first``: only the first ``first`` of them in the order of the site's strategy (one of
    STORE_ORDERED_STRATEGIES; for ``roundrobin``, starting after counselor ``after``, the last one
    offered); fewer means there are no more.
    """
    strategy = site.routing.strategy
    if first is not None and strategy not in STORE_ORDERED_STRATEGIES:
        raise ValueError(f"strategy {strategy!r} does not order candidates as the store does")
    key = (site.asterisk is not None, strategy in LAST_OFFER_STRATEGIES, strategy if first is not None else None)
    params = {"slug": site.slug, "t": t, "max_chats": site.routing.max_chats_per_counselor, "first": first}
    statement = _STATEMENTS[key]
    if first is not None and strategy == "roundrobin":
        rows = await _in_turn(session, statement, params, first, after)
    else:
        rows = list((await session.execute(statement, params)).all())
    return [Candidate(uid, int(n), la, lo) for uid, n, la, lo in rows]


async def _in_turn(
    session: AsyncSession,
    statement: Select[int, int, float, float],
    params: dict[str, Any],
    first: int,
    after: int | None,
) -> list[Row[int, int, float, float]]:
    """roundrobin's first ``first``: the ids after the turn, then (when they are too few) from the
    lowest up to the turn. Two statements rather than one UNION, which would walk both ranges to
    sort them together."""
    turn = -1 if after is None else after
    rows = list((await session.execute(statement, {**params, "after": turn, "upto": _MAX_ID})).all())
    if len(rows) < first and turn >= 0:
        wrapped = {**params, "first": first - len(rows), "after": -1, "upto": turn}
        rows += (await session.execute(statement, wrapped)).all()
    return rows
