"""The counselor's side: presence, offers, replies, reading, closing and transfers."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Integer, Row, String, bindparam, func, or_, select

from helpline.config import hours
from helpline.domain import attachments, audit, notices, outbox
from helpline.domain.access import visible_conversation
from helpline.domain.auth import STAFF, Principal, Role
from helpline.domain.conversations import close_conversation
from helpline.domain.errors import Conflict, Invalid, NotFound
from helpline.domain.offers import lock_conversation_of, make_offer, requeue_unoffered
from helpline.domain.states import ConversationStatus, OfferStatus, move_conversation, move_offer
from helpline.domain.views import conversation_view, iso, message_view, offer_view
from helpline.runtime import metrics
from helpline.runtime.core import Core, Tx, now
from helpline.runtime.presence import PresenceChange, tell_sink
from helpline.store.models import Agent, Conversation, Message, Offer, User

PRESENCE = ("available", "paused", "offline")


async def _agent(tx: Tx, who: Principal) -> Agent:
    agent = await tx.session.get(Agent, who.id, with_for_update=True)
    if agent is None:
        agent = Agent(
            user_id=who.id,
            site=who.site,
            status="offline",
            since=now(),
            last_offer_at=0.0,
            last_assigned_at=0.0,
            wrapup_until=0.0,
        )
        tx.session.add(agent)
    return agent


def presence_view(agent: Agent | None) -> dict[str, Any]:
    if agent is None:
        return {"status": "offline", "reason": None, "since": None, "wrapup_until": None}
    return {
        "status": agent.status,
        "reason": agent.reason,
        "since": iso(agent.since),
        "wrapup_until": iso(agent.wrapup_until) if agent.wrapup_until > now() else None,
    }


async def me(core: Core, who: Principal) -> dict[str, Any]:
    who.require_role(*STAFF)
    async with core.sessionmaker() as s:
        agent = await s.get(Agent, who.id)
        active = await s.scalar(
            select(func.count()).where(
                Conversation.counselor_id == who.id, Conversation.status == ConversationStatus.ASSIGNED
            )
        )
    site = core.sites.get(who.site)
    return {
        "id": who.id,
        "username": who.username,
        "name": who.name,
        "role": who.role.value,
        "site": who.site,
        "site_name": site.name if site else None,
        "presence": presence_view(agent),
        "active_conversations": active or 0,
        "max_conversations": site.routing.max_chats_per_counselor if site else None,
    }


async def set_presence(core: Core, who: Principal, status: str, reason: str | None) -> dict[str, Any]:
    who.require_role(*STAFF)
    if status not in PRESENCE:
        raise Invalid("status must be available, paused or offline", fields={"status": ["invalid choice"]})
    async with core.tx() as tx:
        if status == "offline":  # conversations and offers before the agent: see lock_conversation_of
            await withdraw_offers_of(tx, who.id, reason="offline")
        agent = await _agent(tx, who)
        agent.status = status
        agent.reason = reason if status != "available" else None
        agent.since = now()
        tx.wake_hunter = True
        view = presence_view(agent)
        tx.notify(who.id, "presence", presence=view)
        tx.notify_site(agent.site, "presence", counselor_id=who.id, name=who.name, presence=view)
        change = PresenceChange(who.id, agent.site, status, agent.reason)
    await tell_sink(core.presence_sink, change)  # committed: e.g. the Asterisk queue follows
    return view


async def withdraw_offers_of(tx: Tx, counselor_id: int, *, reason: str) -> None:
    """The counselor's pending offers are withdrawn (they went offline, or on a call); those of
    their conversations offered to nobody else go back to the queue, keeping their place."""
    mine = (Offer.counselor_id == counselor_id, Offer.status == OfferStatus.PENDING)
    conversation_ids = select(Offer.conversation_id).where(*mine).scalar_subquery()
    convs = (  # the conversations first: see lock_conversation_of
        await tx.session.scalars(
            select(Conversation)
            .where(Conversation.id.in_(conversation_ids))
            .order_by(Conversation.id)
            .with_for_update()
            .execution_options(populate_existing=True)  # as locked, whatever the session held
        )
    ).all()
    offers = (await tx.session.scalars(select(Offer).where(*mine).with_for_update())).all()
    t = now()
    for o in offers:
        o.status = move_offer(o.status, OfferStatus.WITHDRAWN)
        o.resolved_at = t
        tx.notify(counselor_id, "offer_withdrawn", offer_id=o.id, conversation_id=o.conversation_id, reason=reason)
    await requeue_unoffered(tx, convs)


async def list_offers(core: Core, who: Principal) -> dict[str, Any]:
    who.require_role(*STAFF)
    async with core.sessionmaker() as s:
        rows = (
            await s.execute(
                select(Offer, Conversation)
                .join(Conversation, Conversation.id == Offer.conversation_id)
                .where(Offer.counselor_id == who.id, Offer.status == OfferStatus.PENDING)
                .order_by(Offer.id)
            )
        ).all()
    return {"results": [offer_view(o, c) for o, c in rows]}


def _check_offer(offer: Offer | None, who: Principal, offer_id: int, t: float) -> Offer:
    """``offer`` must be the caller's and still pending (409 otherwise, 404 if not theirs)."""
    if offer is None or offer.counselor_id != who.id:
        raise NotFound(f"no offer {offer_id}")
    if offer.status == OfferStatus.PENDING and offer.deadline <= t:
        raise Conflict("the offer has lapsed")
    if offer.status != OfferStatus.PENDING:
        raise Conflict(
            f"the offer is {offer.status}" if offer.status != OfferStatus.TIMED_OUT else "the offer has lapsed"
        )
    return offer


# The offer being read and the conversation's other pending offers (ringall), locked: one statement.
_OFFER_AND_PENDING = (
    select(Offer)
    .where(
        Offer.conversation_id == bindparam("conversation_id", type_=String),
        or_(Offer.id == bindparam("offer_id", type_=Integer), Offer.status == OfferStatus.PENDING),
    )
    .order_by(Offer.id)
    .with_for_update()
)


async def read_offer(core: Core, who: Principal, offer_id: int, *, address: str | None = None) -> dict[str, Any]:
    """Reading an offer assigns the conversation; the client's messages become delivered (audited)."""
    who.require_role(*STAFF)
    async with core.tx() as tx:
        conv = await lock_conversation_of(tx, offer_id)  # before the offer: see lock_conversation_of
        if conv is None:
            raise NotFound(f"no offer {offer_id}")
        params = {"conversation_id": conv.id, "offer_id": offer_id}
        offers = (await tx.session.scalars(_OFFER_AND_PENDING, params)).all()
        t = now()
        offer = _check_offer(next((o for o in offers if o.id == offer_id), None), who, offer_id, t)
        offer.status = move_offer(offer.status, OfferStatus.READ)
        offer.resolved_at = t
        conv.status = move_conversation(conv.status, ConversationStatus.ASSIGNED)
        conv.counselor_id = who.id
        conv.assigned_at = t
        agent = await _agent(tx, who)
        agent.last_assigned_at = t
        for o in offers:  # ringall: the first to read wins
            if o.id == offer.id:
                continue
            o.status = move_offer(o.status, OfferStatus.WITHDRAWN)
            o.resolved_at = t
            tx.notify(o.counselor_id, "offer_withdrawn", offer_id=o.id, conversation_id=conv.id, reason="taken")
        site = outbox.contact_site(core, conv)  # its RapidPro, also after a transfer
        metrics.QUEUE_WAIT.labels(conv.site).observe(max(0.0, t - conv.created_at))
        outbox.enqueue_event(tx, site, conv, "assigned", counselor_name=who.name)
        rows = await _message_rows(tx, conv.id)  # the whole conversation, for the answer
        for m in sorted((m for m, _ in rows if m.direction == "in" and m.status == "queued"), key=lambda m: m.id):
            m.status = "delivered"
            m.status_at = t
            outbox.enqueue_event(tx, site, conv, "ack", message_id=m.external_id, status="delivered")
        tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        audit.record(tx, who, audit.Action.READ_OFFER, conversation_id=conv.id, site=conv.site, address=address)
        messages = [message_view(m, counselor_name=name) for m, name in rows]
        return {"offer": offer_view(offer, conv), "conversation": conversation_view(conv), "messages": messages}


async def decline_offer(core: Core, who: Principal, offer_id: int) -> dict[str, Any]:
    who.require_role(*STAFF)
    async with core.tx() as tx:
        conv = await lock_conversation_of(tx, offer_id)  # before the offer: see lock_conversation_of
        if conv is None:
            raise NotFound(f"no offer {offer_id}")
        t = now()
        offer = _check_offer(await tx.session.get(Offer, offer_id, with_for_update=True), who, offer_id, t)
        offer.status = move_offer(offer.status, OfferStatus.DECLINED)
        offer.resolved_at = t
        await requeue_unoffered(tx, [conv])
        tx.wake_hunter = True
        return {"id": offer.id, "status": offer.status}


async def _message_rows(tx: Tx, conversation_id: str) -> Sequence[Row[Message, str | None]]:
    """The conversation's messages, each with its counselor's name (None for the client's)."""
    return (
        await tx.session.execute(
            select(Message, User.name)
            .outerjoin(User, User.id == Message.counselor_id)
            .where(Message.conversation_id == conversation_id)
            .order_by(Message.created_at, Message.id)  # a Weni ticket's history may arrive late
        )
    ).all()


async def _messages(tx: Tx, conversation_id: str) -> list[dict[str, Any]]:
    return [message_view(m, counselor_name=name) for m, name in await _message_rows(tx, conversation_id)]


async def _assigned_to_me(tx: Tx, who: Principal, conversation_id: str) -> Conversation:
    conv = await visible_conversation(tx, who, conversation_id, lock=True)
    if conv.status == ConversationStatus.CLOSED:
        raise Conflict("the conversation is closed")
    if conv.counselor_id != who.id:
        raise Conflict("the conversation is not assigned to you")
    return conv


async def list_conversations(core: Core, who: Principal, *, status: str | None, limit: int) -> dict[str, Any]:
    who.require_role(*STAFF)
    q = select(Conversation)
    if who.role == Role.COUNSELOR:
        q = q.where(Conversation.counselor_id == who.id)
    elif who.role == Role.SUPERVISOR and who.site != "*":
        q = q.where(Conversation.site == who.site)
    if status is not None:
        q = q.where(Conversation.status == status)
    else:
        q = q.where(Conversation.status != ConversationStatus.CLOSED)
    q = q.order_by(Conversation.created_at.desc()).limit(limit)
    async with core.sessionmaker() as s:
        rows = (await s.scalars(q)).all()
    return {"results": [conversation_view(c) for c in rows]}


async def conversation_messages(
    core: Core, who: Principal, conversation_id: str, *, address: str | None = None
) -> dict[str, Any]:
    """The conversation and its messages (audited)."""
    who.require_role(*STAFF)
    async with core.tx() as tx:
        conv = await visible_conversation(tx, who, conversation_id)
        audit.record(tx, who, audit.Action.READ_MESSAGES, conversation_id=conv.id, site=conv.site, address=address)
        return {"conversation": conversation_view(conv), "results": await _messages(tx, conv.id)}


async def reply(
    core: Core, who: Principal, conversation_id: str, text: str, files: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Reply to the client; ``files`` (attachments, URL references) only on a Weni ticket."""
    who.require_role(*STAFF)
    files = attachments.from_counselor(files, core.settings) if files else []
    async with core.tx() as tx:
        conv = await _assigned_to_me(tx, who, conversation_id)
        t = now()
        m = Message(
            uuid=str(uuid.uuid4()),
            conversation_id=conv.id,
            direction="out",
            external_id=str(uuid.uuid4()),
            text=text,
            attachments=attachments.dumps(files),
            status="pending",
            counselor_id=who.id,
            created_at=t,
            status_at=t,
        )
        tx.session.add(m)
        await tx.session.flush()
        await outbox.counselor_message(core, tx, conv, m, who)  # to RapidPro or Weni
        metrics.MESSAGES_OUT.labels(conv.site).inc()
        view = message_view(m, counselor_name=who.name)
        tx.notify(who.id, "message", message=view)
        return view


async def mark_read(core: Core, who: Principal, conversation_id: str) -> dict[str, Any]:
    """The counselor has read the client's messages: they become ``read`` and RapidPro is told."""
    who.require_role(*STAFF)
    async with core.tx() as tx:
        conv = await _assigned_to_me(tx, who, conversation_id)
        unread = (
            await tx.session.scalars(
                select(Message)
                .where(Message.conversation_id == conv.id, Message.direction == "in", Message.status != "read")
                .order_by(Message.id)
            )
        ).all()
        t = now()
        site = outbox.contact_site(core, conv)  # its RapidPro, also after a transfer
        for m in unread:
            m.status = "read"
            m.status_at = t
            outbox.enqueue_event(tx, site, conv, "ack", message_id=m.external_id, status="read")
        return {"conversation_id": conv.id, "read": [m.external_id for m in unread]}


async def close(
    core: Core, who: Principal, conversation_id: str, reason: str | None, *, address: str | None = None
) -> dict[str, Any]:
    who.require_role(*STAFF)
    async with core.tx() as tx:
        conv = await visible_conversation(tx, who, conversation_id, lock=True)
        if conv.status == ConversationStatus.CLOSED:
            return {"conversation": conversation_view(conv), "already_closed": True}
        if who.role == Role.COUNSELOR and conv.counselor_id != who.id:
            raise Conflict("the conversation is not assigned to you")
        await close_conversation(core, tx, conv, by="counselor", reason=reason or "resolved")
        audit.record(tx, who, audit.Action.CLOSE, conversation_id=conv.id, site=conv.site, address=address)
        await outbox.conversation_closed(core, tx, conv, who, reason)  # to RapidPro or Weni
        return {"conversation": conversation_view(conv), "already_closed": False}


async def transfer(
    core: Core,
    who: Principal,
    conversation_id: str,
    *,
    counselor: str | None,
    site: str | None,
    address: str | None = None,
) -> dict[str, Any]:
    """Hand an assigned conversation to another counselor of the site, or to another site's queue."""
    who.require_role(*STAFF)
    if (counselor is None) == (site is None):
        raise Invalid("give exactly one of counselor or site", fields={"counselor": ["one of"], "site": ["one of"]})
    async with core.tx() as tx:
        conv = await _assigned_to_me(tx, who, conversation_id)
        audit.record(tx, who, audit.Action.TRANSFER, conversation_id=conv.id, site=conv.site, address=address)
        t = now()
        if site is not None:
            target_site = core.sites.get(site)
            if target_site is None:
                raise NotFound(f"unknown site {site!r}")
            if not hours.is_open(target_site.hours, target_site.zone, t):
                opens = notices.next_open_iso(target_site, t) or "never"
                raise Conflict(f"{target_site.name} is closed (opens {opens})")
            target_counselor: User | None = None
        else:
            target_site = core.site(conv.site)
            target_counselor = await tx.session.scalar(
                select(User).where(User.username == counselor, User.role == Role.COUNSELOR.value, User.active.is_(True))
            )
            if target_counselor is None or target_counselor.site != conv.site or target_counselor.id == who.id:
                raise NotFound(f"no counselor {counselor!r} of site {conv.site!r} to transfer to")
        source = conv.site
        conv.status = move_conversation(conv.status, ConversationStatus.QUEUED)
        conv.counselor_id = None
        conv.queued_at = t
        conv.assigned_at = None
        notices.enter_queue(conv, target_site, t)
        tx.notify(who.id, "conversation_closed", conversation_id=conv.id, closed_by="transfer", reason="transferred")
        if target_counselor is not None:
            await make_offer(tx, core.site(conv.site), conv, target_counselor.id, t)
        tx.wake_hunter = True
        tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        if source != conv.site:
            tx.notify_site(source, "queue_changed", conversation_id=conv.id)
        return {"conversation": conversation_view(conv)}
