"""helpline -> Weni: what a counselor does to a ticket's conversation, sent back as signed webhooks.

A reply becomes Weni's ``POST .../messages``, a close ``POST .../tickets/close`` and a reopen
``POST .../tickets/reopen``, each queued in the outbox in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from helpline.delivery.weni import SOURCE, Webhook, rfc3339, webhook_base_url
from helpline.domain import attachments as att
from helpline.domain.access import visible_conversation
from helpline.domain.auth import STAFF, Principal, Role
from helpline.domain.outbox import enqueue_webhook
from helpline.domain.states import ConversationStatus
from helpline.domain.views import conversation_view
from helpline.domain.weni.errors import ReopenNotSupported
from helpline.domain.weni.tickets import claim_contact, reopen_conversation
from helpline.runtime.core import Core, Tx, now
from helpline.store.models import Conversation, Message, Ticket

CLOSE_REASONS = ("resolved", "abandoned", "transferred", "expired", "cancelled", "other")


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
        await claim_contact(tx, ticket)
        t = now()
        reopen_conversation(conv, t, counselor_id=who.id if who.role == Role.COUNSELOR else None)
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
