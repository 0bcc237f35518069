"""How conversations, messages and offers look to API callers and in live events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from helpline.domain import attachments
from helpline.store.models import Conversation, Message, Offer


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def conversation_view(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.id,
        "chat_session": c.chat_session,
        "site": c.site,
        "status": c.status,
        "risk": c.risk,
        "client_name": c.client_name,
        "source": c.source,
        "location": c.location,
        "counselor_id": c.counselor_id,
        "created_at": iso(c.created_at),
        "queued_at": iso(c.queued_at),
        "assigned_at": iso(c.assigned_at),
        "closed_at": iso(c.closed_at),
        "closed_by": c.closed_by,
        "close_reason": c.close_reason,
    }


def message_view(m: Message, *, counselor_name: str | None = None) -> dict[str, Any]:
    return {
        "id": m.id,
        "uuid": m.uuid,
        "message_id": m.external_id,
        "conversation_id": m.conversation_id,
        "direction": m.direction,
        # contact | counselor | bot (chatbot history) | system (a Weni ticket's opening note)
        "sender": m.sender or ("contact" if m.direction == "in" else "counselor"),
        "text": m.text,
        "attachments": attachments.loads(m.attachments),
        "status": m.status,
        "counselor_name": counselor_name,
        "created_at": iso(m.created_at),
        "status_at": iso(m.status_at),
    }


def offer_view(o: Offer, c: Conversation) -> dict[str, Any]:
    return {
        "id": o.id,
        "status": o.status,
        "created_at": iso(o.created_at),
        "deadline": iso(o.deadline),
        "expires_in_s": max(0.0, round(o.deadline - o.created_at, 3)),
        "conversation": conversation_view(c),
    }
