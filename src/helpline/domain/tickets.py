"""Weni tickets (generic ticketer contract v1) mapped onto conversations and messages.

A ticket *is* a conversation: ``POST /v1/tickets`` creates one (queued for hunting like any other),
with ``chat_session`` = ``external_id`` = the conversation id and ``source`` = ``weni-ticketer``.
Weni's contact becomes the client (``contact.name`` the pseudo-name shown to counselors, URN and
UUID kept), its topic chooses the site, its priority the risk:

* site: the per-site path (``/sites/<slug>/v1/...``), else a topic whose name is a site's slug, name
  or country code, else the chatbot account's own site, else the default site;
* risk: ``low`` -> low, ``normal`` (Weni's default, and no priority) -> medium, ``high`` and
  ``urgent`` -> high.

The Weni project authenticates as a user of role ``chatbot`` (its ``api_token`` is that user's
long-lived token: ``helpline issuetoken``); one open ticket per contact and project. Repeats are
answered from the first answer: by ``Idempotency-Key`` and by ``X-Request-Id`` (per endpoint and
ticket), by ``ticket_id`` on open and by ``message_id`` on messages.

The counselor's side (replies, closes, reopens) goes back to Weni as signed webhooks through the
outbox (:func:`agent_message`, :func:`agent_close`, :func:`reopen_by_counselor`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from helpline.config.sites import Site
from helpline.delivery.weni import SOURCE, Webhook, rfc3339, webhook_base_url
from helpline.domain import attachments as att
from helpline.domain.access import visible_conversation
from helpline.domain.auth import ALL_SITES, STAFF, Principal, Role, require_chatbot
from helpline.domain.conversations import close_conversation
from helpline.domain.errors import Conflict, Invalid, NotFound
from helpline.domain.outbox import enqueue_webhook
from helpline.domain.states import ConversationStatus, Risk
from helpline.domain.views import conversation_view, message_view
from helpline.runtime import metrics
from helpline.runtime.core import Core, Tx, now
from helpline.store.models import Conversation, Message, Ticket, TicketRequest

T = TypeVar("T")

PRIORITY_RISK: dict[str, Risk] = {"low": Risk.LOW, "normal": Risk.MEDIUM, "high": Risk.HIGH, "urgent": Risk.HIGH}
CLOSE_REASONS = ("resolved", "abandoned", "transferred", "expired", "cancelled", "other")


# --------------------------------------------------------------------------- errors


class TicketNotFound(NotFound):
    code = "ticket_not_found"

    def __init__(self, external_id: str) -> None:
        super().__init__(f"Ticket {external_id} was not found", fields={"external_id": external_id})


class TicketAlreadyOpen(Conflict):
    code = "ticket_already_open"

    def __init__(self, external_id: str) -> None:
        super().__init__("An open ticket already exists for this contact", fields={"external_id": external_id})


class TicketAlreadyClosed(Conflict):
    code = "ticket_already_closed"

    def __init__(self, external_id: str) -> None:
        super().__init__("Ticket is already closed", fields={"external_id": external_id})


class TicketClosed(Conflict):
    code = "ticket_closed"

    def __init__(self, external_id: str) -> None:
        super().__init__(f"Ticket {external_id} is closed", fields={"external_id": external_id})


class MissingWebhookUrl(Invalid):
    code = "webhook_base_url_required"


class ReopenNotSupported(Invalid):
    code = "reopen_not_supported"


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


@dataclass(frozen=True)
class RequestKeys:
    """What makes a Weni request a repeat: ``Idempotency-Key`` and ``X-Request-Id``."""

    idempotency_key: str | None = None
    request_id: str | None = None

    def keys(self) -> list[str]:
        out = []
        if self.idempotency_key:
            out.append(f"idem:{self.idempotency_key}")
        if self.request_id:
            out.append(f"req:{self.request_id}")
        return out


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


# --------------------------------------------------------------------------- helpers


async def _once_more_on_conflict(run: Callable[[], Awaitable[T]]) -> T:
    """A concurrent twin (same key, ticket or message) committed first: the second try sees it."""
    try:
        return await run()
    except IntegrityError:
        return await run()


async def _replay(tx: Tx, who: Principal, scope: str, keys: RequestKeys) -> Answer | None:
    wanted = keys.keys()
    if not wanted:
        return None
    row = await tx.session.scalar(
        select(TicketRequest)
        .where(TicketRequest.chatbot_id == who.id, TicketRequest.scope == scope, TicketRequest.key.in_(wanted))
        .order_by(TicketRequest.id)
        .limit(1)
    )
    return None if row is None else Answer(row.status, json.loads(row.response))


def _remember(tx: Tx, who: Principal, scope: str, keys: RequestKeys, answer: Answer) -> Answer:
    t = now()
    for key in keys.keys():
        tx.session.add(
            TicketRequest(
                chatbot_id=who.id,
                scope=scope,
                key=key,
                status=answer.status,
                response=json.dumps(answer.body),
                created_at=t,
            )
        )
    return answer


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


async def _claim_contact(tx: Tx, ticket: Ticket) -> None:
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


def _reopen(conv: Conversation, t: float, *, counselor_id: int | None) -> None:
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
    return await _once_more_on_conflict(lambda: _open(core, who, data, keys, path_site))


async def _open(core: Core, who: Principal, data: OpenIn, keys: RequestKeys, path_site: str | None) -> Answer:
    async with core.tx() as tx:
        s = tx.session
        first = await _replay(tx, who, "open", keys)
        if first is not None:
            return first
        same = await s.scalar(select(Ticket).where(Ticket.chatbot_id == who.id, Ticket.ticket_id == data.ticket_id))
        if same is not None:  # Weni's retry under another key: the same ticket
            conv0 = await s.get(Conversation, same.conversation_id)
            assert conv0 is not None
            return _remember(tx, who, "open", keys, Answer(201, _opened(same, conv0)))
        site = choose_site(core, who, path_site=path_site, topic_name=data.topic_name)
        who.require_site(site.slug)
        if webhook_base_url(core.settings, who.username, data.webhook_base_url) is None:
            raise MissingWebhookUrl(
                "no metadata.webhook_base_url in the ticket and none configured (HELPLINE_WENI_WEBHOOK_BASE_URL)",
                fields={"metadata.webhook_base_url": ["required"]},
            )
        t = now()
        risk = _risk(data.priority)
        conv_id = str(uuid.uuid4())
        conv = Conversation(
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
        s.add(conv)
        await s.flush()
        ticket = Ticket(
            conversation_id=conv_id,
            chatbot_id=who.id,
            ticket_id=data.ticket_id,
            external_id=conv_id,
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
        s.add(ticket)
        await s.flush()
        await _claim_contact(tx, ticket)
        if data.body and data.body.strip():
            s.add(
                Message(
                    uuid=str(uuid.uuid4()),
                    conversation_id=conv_id,
                    direction="in",
                    sender="system",
                    external_id=f"ticket-body:{data.ticket_id}"[:128],
                    text=data.body,
                    status="queued",
                    created_at=t,
                    status_at=t,
                )
            )
        await s.flush()
        tx.wake_hunter = True
        tx.notify_site(site.slug, "queue_changed", conversation_id=conv_id)
        return _remember(tx, who, "open", keys, Answer(201, _opened(ticket, conv)))


def _opened(ticket: Ticket, conv: Conversation) -> dict[str, Any]:
    return {"external_id": ticket.external_id, "status": "open", "created_at": rfc3339(conv.created_at)}


async def add_message(
    core: Core, who: Principal, external_id: str, data: MessageIn, keys: RequestKeys, *, path_site: str | None
) -> Answer:
    """``POST /v1/tickets/{external_id}/messages``: 200 ``{"message_external_id", "status": "received"}``."""
    require_chatbot(who, path_site)
    return await _once_more_on_conflict(lambda: _add_message(core, who, external_id, data, keys, path_site))


async def _add_message(
    core: Core, who: Principal, external_id: str, data: MessageIn, keys: RequestKeys, path_site: str | None
) -> Answer:
    scope = f"messages:{external_id}"[:80]
    async with core.tx() as tx:
        s = tx.session
        first = await _replay(tx, who, scope, keys)
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
                return _remember(tx, who, scope, keys, Answer(200, _received(known)))
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
        return _remember(tx, who, scope, keys, Answer(200, _received(m)))


def _received(m: Message) -> dict[str, Any]:
    return {"message_external_id": m.uuid, "status": "received"}


async def close_ticket(
    core: Core, who: Principal, external_id: str, reason: str | None, keys: RequestKeys, *, path_site: str | None
) -> Answer:
    """``POST /v1/tickets/{external_id}/close``: 200 ``{"status": "closed"}``; 409 when already closed."""
    require_chatbot(who, path_site)
    return await _once_more_on_conflict(lambda: _close(core, who, external_id, reason, keys, path_site))


async def _close(
    core: Core, who: Principal, external_id: str, reason: str | None, keys: RequestKeys, path_site: str | None
) -> Answer:
    scope = f"close:{external_id}"[:80]
    async with core.tx() as tx:
        first = await _replay(tx, who, scope, keys)
        if first is not None:
            return first
        ticket, conv = await _ticket(tx, who, external_id, path_site)
        if conv.status == ConversationStatus.CLOSED:
            raise TicketAlreadyClosed(external_id)
        await close_conversation(core, tx, conv, by="chatbot", reason=reason or "closed by weni")
        ticket.open_contact = None
        return _remember(tx, who, scope, keys, Answer(200, {"status": "closed"}))


async def reopen_ticket(
    core: Core, who: Principal, external_id: str, keys: RequestKeys, *, path_site: str | None
) -> Answer:
    """``POST /v1/tickets/{external_id}/reopen``: the conversation is queued and hunted again."""
    require_chatbot(who, path_site)
    return await _once_more_on_conflict(lambda: _reopen_ticket(core, who, external_id, keys, path_site))


async def _reopen_ticket(
    core: Core, who: Principal, external_id: str, keys: RequestKeys, path_site: str | None
) -> Answer:
    scope = f"reopen:{external_id}"[:80]
    async with core.tx() as tx:
        first = await _replay(tx, who, scope, keys)
        if first is not None:
            return first
        ticket, conv = await _ticket(tx, who, external_id, path_site)
        if conv.status == ConversationStatus.CLOSED:
            await _claim_contact(tx, ticket)
            _reopen(conv, now(), counselor_id=None)
            tx.wake_hunter = True
            tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        return _remember(tx, who, scope, keys, Answer(200, {"status": "open"}))


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
    return await _once_more_on_conflict(lambda: _add_history(core, who, external_id, messages, keys, path_site))


def _history_id(m: HistoryMessageIn) -> str:
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
        first = await _replay(tx, who, scope, keys)
        if first is not None:
            return first
        _ticket_row, conv = await _ticket(tx, who, external_id, path_site)
        ids = [_history_id(m) for m in messages]
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
        return _remember(tx, who, scope, keys, Answer(200, body))


# --------------------------------------------------------------------------- helpline -> Weni


async def ticket_for(tx: Tx, conv: Conversation) -> Ticket | None:
    """The Weni ticket behind a conversation, or ``None`` for a conversation of the OpenCHS API."""
    if conv.source != SOURCE:
        return None
    return await tx.session.scalar(select(Ticket).where(Ticket.conversation_id == conv.id))


def _webhook(core: Core, ticket: Ticket, path: str, body: dict[str, Any]) -> Webhook:
    base = webhook_base_url(core.settings, ticket.project, ticket.webhook_base_url) or ""
    return Webhook.new(base + path, body, ticket.project)


def _agent(who: Principal) -> dict[str, str]:
    return {"type": "agent", "id": str(who.id), "name": who.name}


def check_reply_attachments(core: Core, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A counselor's attachments, checked against the size limit and the allowed content types."""
    return att.normalize(
        items,
        max_bytes=core.settings.attachment_max_bytes,
        allowed_types=att.patterns(core.settings.attachment_content_types),
    )


def agent_message(core: Core, tx: Tx, conv: Conversation, ticket: Ticket, m: Message, who: Principal) -> None:
    """Queue a counselor's reply as Weni's ``POST .../messages`` webhook."""
    body: dict[str, Any] = {
        "external_id": ticket.external_id,
        "message_external_id": m.external_id,
        "direction": "outgoing",
        "sender": _agent(who),
    }
    if m.text:
        body["text"] = m.text
    body |= {
        "attachments": att.loads(m.attachments),
        "metadata": {"source": "helpline", "conversation_id": conv.id},
        "sent_at": rfc3339(m.created_at),
    }
    enqueue_webhook(tx, conv, "message", _webhook(core, ticket, "/messages", body), message_ref=m.id)


def agent_close(core: Core, tx: Tx, conv: Conversation, ticket: Ticket, who: Principal, reason: str | None) -> None:
    """Queue Weni's ``POST .../tickets/close`` webhook for a conversation a counselor has just closed.

    The reason goes as one of the contract's (``resolved``, ``abandoned``, ...); any other text
    goes as ``other`` with ``metadata.reason_text``.
    """
    ticket.open_contact = None
    given = (reason or "resolved").strip()
    metadata: dict[str, Any] = {"source": "helpline"}
    code = given.lower()
    if code not in CLOSE_REASONS:
        code = "other"
        metadata["reason_text"] = given
    body = {
        "external_id": ticket.external_id,
        "closed_by": _agent(who),
        "reason": code,
        "metadata": metadata,
        "closed_at": rfc3339(conv.closed_at),
    }
    enqueue_webhook(tx, conv, "closed", _webhook(core, ticket, "/tickets/close", body))


async def reopen_by_counselor(core: Core, who: Principal, conversation_id: str) -> dict[str, Any]:
    """A counselor reopens a Weni ticket they closed: it is theirs again and Weni is told.

    A supervisor (or admin) reopening puts it back in the queue. 422 ``reopen_not_supported`` for a
    conversation of the OpenCHS API; 409 when the contact has another open ticket.
    """
    who.require_role(*STAFF)
    async with core.tx() as tx:
        conv = await visible_conversation(tx, who, conversation_id, lock=True)
        ticket = await ticket_for(tx, conv)
        if ticket is None:
            raise ReopenNotSupported("only a Weni ticket can be reopened")
        if conv.status != ConversationStatus.CLOSED:
            return {"conversation": conversation_view(conv), "already_open": True}
        await _claim_contact(tx, ticket)
        t = now()
        _reopen(conv, t, counselor_id=who.id if who.role == Role.COUNSELOR else None)
        body = {
            "external_id": ticket.external_id,
            "reopened_by": _agent(who),
            "metadata": {"source": "helpline"},
            "reopened_at": rfc3339(t),
        }
        enqueue_webhook(tx, conv, "reopened", _webhook(core, ticket, "/tickets/reopen", body))
        if conv.counselor_id is not None:
            tx.notify(conv.counselor_id, "conversation_reopened", conversation=conversation_view(conv))
        else:
            tx.wake_hunter = True
        tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        return {"conversation": conversation_view(conv), "already_open": False}
