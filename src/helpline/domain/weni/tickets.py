"""Weni -> helpline: the calls of the generic ticketer contract v1 on a ticket.

``POST /v1/tickets`` opens one, then ``…/messages``, ``…/close``, ``…/reopen`` and ``…/history``
(see :mod:`helpline.domain.weni` for how a ticket maps onto a conversation). Every call first looks
for its first answer (:mod:`~helpline.domain.weni.requests`) and stores its own beside what it did.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from helpline.config.sites import Site
from helpline.delivery.weni import SOURCE, rfc3339, webhook_base_url
from helpline.domain import attachments as att
from helpline.domain.auth import ALL_SITES, Principal, Role, require_chatbot
from helpline.domain.conversations import close_conversation
from helpline.domain.errors import NotFound
from helpline.domain.states import ConversationStatus, Risk
from helpline.domain.views import message_view
from helpline.domain.weni.errors import (
    MissingWebhookUrl,
    TicketAlreadyClosed,
    TicketAlreadyOpen,
    TicketClosed,
    TicketNotFound,
)
from helpline.domain.weni.requests import Answer, RequestKeys, once_more_on_conflict, remember, replay
from helpline.runtime import metrics
from helpline.runtime.core import Core, Tx, now
from helpline.store.models import Conversation, Message, Ticket

PRIORITY_RISK: dict[str, Risk] = {"low": Risk.LOW, "normal": Risk.MEDIUM, "high": Risk.HIGH, "urgent": Risk.HIGH}


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ContactIn:
    uuid: str
    urn: str
    name: str | None = None


@dataclass(frozen=True)
class OpenIn:
    ticket_id: str
    contact: ContactIn
    opened_at: float
    topic_uuid: str | None = None
    topic_name: str | None = None
    body: str | None = None
    priority: str | None = None
    project_uuid: str | None = None
    org_uuid: str | None = None
    webhook_base_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MessageIn:
    ticket_id: str | None
    message_id: str | None
    text: str
    attachments: list[dict[str, Any]]
    sent_at: float | None = None


@dataclass(frozen=True)
class HistoryMessageIn:
    message_id: str | None
    direction: str  # incoming | outgoing
    sender_type: str  # contact | agent | bot | system
    text: str
    attachments: list[dict[str, Any]]
    sent_at: float | None = None


# --------------------------------------------------------------------------- helpers


def choose_site(core: Core, who: Principal, *, path_site: str | None, topic_name: str | None) -> Site:
    if path_site is not None:
        found = core.sites.get(path_site)
        if found is None:
            raise NotFound(f"unknown site {path_site!r}")
        return found
    if topic_name:
        key = topic_name.strip().lower()
        for site in core.sites:
            if key in (site.slug.lower(), site.name.strip().lower()) or key.upper() in (
                c.upper() for c in site.countries
            ):
                return site
    if who.site != ALL_SITES:
        own = core.sites.get(who.site)
        if own is not None:
            return own
    return core.sites.default


def _risk(priority: str | None) -> Risk:
    return PRIORITY_RISK.get((priority or "normal").lower(), Risk.MEDIUM)


async def _ticket(
    tx: Tx, who: Principal, external_id: str, path_site: str | None, *, lock: bool = True
) -> tuple[Ticket, Conversation]:
    q = select(Ticket, Conversation).join(Conversation, Conversation.id == Ticket.conversation_id)
    q = q.where(Ticket.external_id == external_id)
    if who.role != Role.ADMIN:
        q = q.where(Ticket.chatbot_id == who.id)
    if lock:
        q = q.with_for_update()
    row = (await tx.session.execute(q)).first()
    if row is None:
        raise TicketNotFound(external_id)
    ticket, conv = row
    # A ticket transferred or overflowed to another site is still its origin site's ticket.
    if path_site is not None and path_site not in (conv.site, conv.origin_site):
        raise TicketNotFound(external_id)
    return ticket, conv


async def claim_contact(tx: Tx, ticket: Ticket) -> None:
    """Mark ``ticket`` the contact's open one; 409 when another ticket of the contact is open."""
    other = await tx.session.scalar(
        select(Ticket)
        .where(
            Ticket.chatbot_id == ticket.chatbot_id,
            Ticket.open_contact == ticket.contact_uuid,
            Ticket.id != ticket.id,
        )
        .with_for_update()
    )
    if other is not None:
        other_conv = await tx.session.get(Conversation, other.conversation_id)
        if other_conv is not None and other_conv.status != ConversationStatus.CLOSED:
            raise TicketAlreadyOpen(other.external_id)
        other.open_contact = None  # closed some other way (e.g. the OpenCHS close call): release it
        await tx.session.flush()
    ticket.open_contact = ticket.contact_uuid


def _notify_new(tx: Tx, conv: Conversation, m: Message) -> None:
    if conv.status == ConversationStatus.ASSIGNED and conv.counselor_id is not None:
        tx.notify(conv.counselor_id, "message", message=message_view(m))


def reopen_conversation(conv: Conversation, t: float, *, counselor_id: int | None) -> None:
    """Closed -> queued (hunted again) or assigned (to the counselor reopening it).

    The conversation state machine keeps ``closed`` final for the OpenCHS interface; a Weni ticket
    alone may be reopened, by the contract's ``reopen`` calls, here.
    """
    conv.status = (ConversationStatus.ASSIGNED if counselor_id is not None else ConversationStatus.QUEUED).value
    conv.counselor_id = counselor_id
    conv.queued_at = t
    conv.assigned_at = t if counselor_id is not None else None
    conv.closed_at = None
    conv.closed_by = None
    conv.close_reason = None


# --------------------------------------------------------------------------- Weni -> helpline


async def open_ticket(core: Core, who: Principal, data: OpenIn, keys: RequestKeys, *, path_site: str | None) -> Answer:
    """``POST /v1/tickets``: 201 ``{"external_id", "status": "open", "created_at"}``."""
    require_chatbot(who, path_site)
    return await once_more_on_conflict(lambda: _open(core, who, data, keys, path_site))


async def _open(core: Core, who: Principal, data: OpenIn, keys: RequestKeys, path_site: str | None) -> Answer:
    async with core.tx() as tx:
        s = tx.session
        first = await replay(tx, who, "open", keys)
        if first is not None:
            return first
        same = await s.scalar(select(Ticket).where(Ticket.chatbot_id == who.id, Ticket.ticket_id == data.ticket_id))
        if same is not None:  # Weni's retry under another key: the same ticket
            conv0 = await s.get(Conversation, same.conversation_id)
            assert conv0 is not None
            return remember(tx, who, "open", keys, Answer(201, _opened(same, conv0)))
        site = _open_site(core, who, data, path_site)
        t = now()
        conv = _new_conversation(who, site, data, t)
        s.add(conv)
        await s.flush()
        ticket = _new_ticket(who, conv, data, t)
        s.add(ticket)
        await s.flush()
        await claim_contact(tx, ticket)
        if data.body and data.body.strip():
            s.add(_body_message(conv, data.ticket_id, data.body, t))
        await s.flush()
        tx.wake_hunter = True
        tx.notify_site(site.slug, "queue_changed", conversation_id=conv.id)
        return remember(tx, who, "open", keys, Answer(201, _opened(ticket, conv)))


def _open_site(core: Core, who: Principal, data: OpenIn, path_site: str | None) -> Site:
    """The site a new ticket goes to (the caller must be allowed there); its webhooks need a URL."""
    site = choose_site(core, who, path_site=path_site, topic_name=data.topic_name)
    who.require_site(site.slug)
    if webhook_base_url(core.settings, who.username, data.webhook_base_url) is None:
        raise MissingWebhookUrl(
            "no metadata.webhook_base_url in the ticket and none configured (HELPLINE_WENI_WEBHOOK_BASE_URL)",
            fields={"metadata.webhook_base_url": ["required"]},
        )
    return site


def _new_conversation(who: Principal, site: Site, data: OpenIn, t: float) -> Conversation:
    """The ticket's conversation, queued: its id is also its ``chat_session`` and the ticket's ``external_id``."""
    risk = _risk(data.priority)
    conv_id = str(uuid.uuid4())
    return Conversation(
        id=conv_id,
        site=site.slug,
        chatbot_id=who.id,
        chat_session=conv_id,
        source=SOURCE,
        client_id=data.contact.uuid,
        client_name=(data.contact.name or "").strip()[:150] or f"Client {data.contact.urn[-4:]}",
        contact_urn=data.contact.urn,
        contact_uuid=data.contact.uuid,
        location=None,
        risk=risk.value,
        risk_rank=risk.rank,
        status=ConversationStatus.QUEUED.value,
        created_at=t,
        queued_at=t,
    )


def _new_ticket(who: Principal, conv: Conversation, data: OpenIn, t: float) -> Ticket:
    """The Weni side of ``conv``; not yet the contact's open ticket (:func:`claim_contact` makes it so)."""
    return Ticket(
        conversation_id=conv.id,
        chatbot_id=who.id,
        ticket_id=data.ticket_id,
        external_id=conv.id,
        project=who.username,
        project_uuid=data.project_uuid,
        org_uuid=data.org_uuid,
        contact_uuid=data.contact.uuid,
        contact_urn=data.contact.urn,
        topic_uuid=data.topic_uuid,
        topic_name=data.topic_name,
        priority=data.priority,
        webhook_base_url=data.webhook_base_url,
        body=data.body,
        meta=json.dumps(data.metadata, ensure_ascii=False) if data.metadata else None,
        open_contact=None,
        opened_at=data.opened_at,
        created_at=t,
    )


def _body_message(conv: Conversation, ticket_id: str, text: str, t: float) -> Message:
    """The ticket's opening text, shown to the counselor as the conversation's first message."""
    return Message(
        uuid=str(uuid.uuid4()),
        conversation_id=conv.id,
        direction="in",
        sender="system",
        external_id=f"ticket-body:{ticket_id}"[:128],
        text=text,
        status="queued",
        created_at=t,
        status_at=t,
    )


def _opened(ticket: Ticket, conv: Conversation) -> dict[str, Any]:
    return {"external_id": ticket.external_id, "status": "open", "created_at": rfc3339(conv.created_at)}


async def add_message(
    core: Core, who: Principal, external_id: str, data: MessageIn, keys: RequestKeys, *, path_site: str | None
) -> Answer:
    """``POST /v1/tickets/{external_id}/messages``: 200 ``{"message_external_id", "status": "received"}``."""
    require_chatbot(who, path_site)
    return await once_more_on_conflict(lambda: _add_message(core, who, external_id, data, keys, path_site))


async def _add_message(
    core: Core, who: Principal, external_id: str, data: MessageIn, keys: RequestKeys, path_site: str | None
) -> Answer:
    scope = f"messages:{external_id}"[:80]
    async with core.tx() as tx:
        s = tx.session
        first = await replay(tx, who, scope, keys)
        if first is not None:
            return first
        ticket, conv = await _ticket(tx, who, external_id, path_site)
        if data.ticket_id is not None and data.ticket_id != ticket.ticket_id:
            raise TicketNotFound(external_id)
        if data.message_id is not None:
            known = await s.scalar(
                select(Message).where(Message.conversation_id == conv.id, Message.external_id == data.message_id)
            )
            if known is not None:
                return remember(tx, who, scope, keys, Answer(200, _received(known)))
        if conv.status == ConversationStatus.CLOSED:
            raise TicketClosed(external_id)
        files = att.normalize(data.attachments, max_bytes=core.settings.attachment_max_bytes)
        t = now()
        m = Message(
            uuid=str(uuid.uuid4()),
            conversation_id=conv.id,
            direction="in",
            sender="contact",
            external_id=data.message_id or str(uuid.uuid4()),
            text=data.text,
            attachments=att.dumps(files),
            status="delivered" if conv.status == ConversationStatus.ASSIGNED else "queued",
            created_at=t,
            status_at=t,
        )
        s.add(m)
        await s.flush()
        metrics.MESSAGES_IN.labels(conv.site).inc()
        _notify_new(tx, conv, m)
        tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        return remember(tx, who, scope, keys, Answer(200, _received(m)))


def _received(m: Message) -> dict[str, Any]:
    return {"message_external_id": m.uuid, "status": "received"}


async def close_ticket(
    core: Core, who: Principal, external_id: str, reason: str | None, keys: RequestKeys, *, path_site: str | None
) -> Answer:
    """``POST /v1/tickets/{external_id}/close``: 200 ``{"status": "closed"}``; 409 when already closed."""
    require_chatbot(who, path_site)
    return await once_more_on_conflict(lambda: _close(core, who, external_id, reason, keys, path_site))


async def _close(
    core: Core, who: Principal, external_id: str, reason: str | None, keys: RequestKeys, path_site: str | None
) -> Answer:
    scope = f"close:{external_id}"[:80]
    async with core.tx() as tx:
        first = await replay(tx, who, scope, keys)
        if first is not None:
            return first
        ticket, conv = await _ticket(tx, who, external_id, path_site)
        if conv.status == ConversationStatus.CLOSED:
            raise TicketAlreadyClosed(external_id)
        await close_conversation(core, tx, conv, by="chatbot", reason=reason or "closed by weni")
        ticket.open_contact = None
        return remember(tx, who, scope, keys, Answer(200, {"status": "closed"}))


async def reopen_ticket(
    core: Core, who: Principal, external_id: str, keys: RequestKeys, *, path_site: str | None
) -> Answer:
    """``POST /v1/tickets/{external_id}/reopen``: the conversation is queued and hunted again."""
    require_chatbot(who, path_site)
    return await once_more_on_conflict(lambda: _reopen_ticket(core, who, external_id, keys, path_site))


async def _reopen_ticket(
    core: Core, who: Principal, external_id: str, keys: RequestKeys, path_site: str | None
) -> Answer:
    scope = f"reopen:{external_id}"[:80]
    async with core.tx() as tx:
        first = await replay(tx, who, scope, keys)
        if first is not None:
            return first
        ticket, conv = await _ticket(tx, who, external_id, path_site)
        if conv.status == ConversationStatus.CLOSED:
            await claim_contact(tx, ticket)
            reopen_conversation(conv, now(), counselor_id=None)
            tx.wake_hunter = True
            tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        return remember(tx, who, scope, keys, Answer(200, {"status": "open"}))


async def add_history(
    core: Core,
    who: Principal,
    external_id: str,
    messages: Sequence[HistoryMessageIn],
    keys: RequestKeys,
    *,
    path_site: str | None,
) -> Answer:
    """``POST /v1/tickets/{external_id}/history``: the conversation before the ticket, in ``sent_at`` order.

    The contact's messages come in as the client's; the bot's (and any agent's) as ``out`` messages
    already ``sent``, marked with their sender, that nobody sends again. A message already stored
    (same ``message_id``, or same direction, time and text when it has none) is not added twice.
    """
    require_chatbot(who, path_site)
    return await once_more_on_conflict(lambda: _add_history(core, who, external_id, messages, keys, path_site))


def history_id(m: HistoryMessageIn) -> str:
    if m.message_id:
        return m.message_id
    urls = ",".join(str(a.get("url")) for a in m.attachments)
    digest = hashlib.sha256(f"{m.direction}|{m.sent_at}|{m.text}|{urls}".encode()).hexdigest()
    return f"history:{digest[:40]}"


async def _add_history(
    core: Core,
    who: Principal,
    external_id: str,
    messages: Sequence[HistoryMessageIn],
    keys: RequestKeys,
    path_site: str | None,
) -> Answer:
    scope = f"history:{external_id}"[:80]
    async with core.tx() as tx:
        s = tx.session
        first = await replay(tx, who, scope, keys)
        if first is not None:
            return first
        _ticket_row, conv = await _ticket(tx, who, external_id, path_site)
        ids = [history_id(m) for m in messages]
        known = set(
            (
                await s.scalars(
                    select(Message.external_id).where(Message.conversation_id == conv.id, Message.external_id.in_(ids))
                )
            ).all()
        )
        t = now()
        in_status = "delivered" if conv.status == ConversationStatus.ASSIGNED else "queued"
        added: list[Message] = []
        for hm, ext in zip(messages, ids, strict=True):
            if ext in known:
                continue
            known.add(ext)
            files = att.normalize(hm.attachments, max_bytes=core.settings.attachment_max_bytes)
            incoming = hm.direction == "incoming"
            at = hm.sent_at if hm.sent_at is not None else t
            m = Message(
                uuid=str(uuid.uuid4()),
                conversation_id=conv.id,
                direction="in" if incoming else "out",
                sender="contact" if incoming else (hm.sender_type if hm.sender_type in ("bot", "system") else "bot"),
                external_id=ext,
                text=hm.text,
                attachments=att.dumps(files),
                status=in_status if incoming else "sent",
                created_at=at,
                status_at=t,
            )
            s.add(m)
            added.append(m)
        await s.flush()
        for m in sorted(added, key=lambda m: (m.created_at, m.id)):
            _notify_new(tx, conv, m)
        if added:
            tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        body = {"status": "history_received", "messages_received": len(messages)}
        return remember(tx, who, scope, keys, Answer(200, body))
