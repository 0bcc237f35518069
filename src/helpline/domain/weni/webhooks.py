"""The webhooks a counselor's actions on a Weni ticket become (contract v1, helpline -> Weni).

Bodies only: :mod:`helpline.domain.outbox` decides that a conversation is reached through Weni and
queues them in the caller's transaction; :mod:`helpline.delivery.weni` signs and sends them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from helpline.delivery.weni import SOURCE, Webhook, rfc3339, webhook_base_url
from helpline.domain import attachments as att
from helpline.domain.auth import Principal
from helpline.runtime.core import Core, Tx
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


def message(core: Core, conv: Conversation, ticket: Ticket, m: Message, who: Principal) -> Webhook:
    """A counselor's reply: Weni's ``POST .../messages``."""
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
    return _webhook(core, ticket, "/messages", body)


def close(core: Core, conv: Conversation, ticket: Ticket, who: Principal, reason: str | None) -> Webhook:
    """A counselor closed the conversation: Weni's ``POST .../tickets/close``.

    The reason goes as one of the contract's (``resolved``, ``abandoned``, ...); any other text
    goes as ``other`` with ``metadata.reason_text``.
    """
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
    return _webhook(core, ticket, "/tickets/close", body)


def reopen(core: Core, ticket: Ticket, who: Principal, t: float) -> Webhook:
    """A counselor (or supervisor) reopened the ticket at ``t``: Weni's ``POST .../tickets/reopen``."""
    body = {
        "external_id": ticket.external_id,
        "reopened_by": _agent(who),
        "metadata": {"source": "helpline"},
        "reopened_at": rfc3339(t),
    }
    return _webhook(core, ticket, "/tickets/reopen", body)
