"""The audit trail of child data: which staff member read or acted on which conversation, when, from where.

Every staff access to a conversation's content (its messages, an offer read, an export) and every act
on it (close, transfer, a dead letter's replay) adds one row to ``audit_log`` in the transaction of the
access itself: no access commits without its trace, and a refused or failed access leaves none.

The trail names staff, never clients, and is not purged with the conversations (domain/retention.py).
A supervisor reads it for their site's conversations, an admin for every site:
``GET /api/supervisor/audit?conversation=<id>``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.domain.auth import Principal
from helpline.domain.views import iso
from helpline.runtime.core import Tx, now
from helpline.store.models import AuditEntry


class Action(StrEnum):
    READ_MESSAGES = "read_messages"  # GET /api/conversations/<id>/messages/
    READ_OFFER = "read_offer"  # POST /api/offers/<id>/read: the conversation and its messages
    EXPORT = "export"  # GET /api/conversations/<id>/export
    CLOSE = "close"
    TRANSFER = "transfer"
    REPLAY = "replay"  # a dead letter (an event carrying the conversation's text) sent again


def record(
    tx: Tx, who: Principal, action: Action, *, conversation_id: str, site: str, address: str | None
) -> AuditEntry:
    """Add one entry to the caller's transaction: it commits (or not) with the access it traces."""
    entry = AuditEntry(
        at=now(),
        user_id=who.id,
        username=who.username,
        role=who.role.value,
        action=action.value,
        conversation_id=conversation_id,
        site=site,
        address=(address or None) and address[:64],
    )
    tx.session.add(entry)
    return entry


def entry_view(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": iso(e.at),
        "user_id": e.user_id,
        "username": e.username,
        "role": e.role,
        "action": e.action,
        "conversation_id": e.conversation_id,
        "site": e.site,
        "address": e.address,
    }


async def trail(session: AsyncSession, conversation_id: str) -> list[dict[str, Any]]:
    """A conversation's entries, oldest first."""
    rows = (
        await session.scalars(
            select(AuditEntry)
            .where(AuditEntry.conversation_id == conversation_id)
            .order_by(AuditEntry.at, AuditEntry.id)
        )
    ).all()
    return [entry_view(e) for e in rows]
