"""Case files and the audit trail as staff read them: one conversation's export, and the audit log.

The export is a whole conversation as one JSON document for a case file: its metadata, every message
(sender, timestamps, delivery status), the history of its offers and its audit trail, the export
itself included. Who may export: an admin, a supervisor of the conversation's site, the counselor it
is (or was last) assigned to. Counselors get what their console shows of the client (the pseudonym);
supervisors and admins also get the contact identifiers a referral may need. Every export is audited.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from helpline.domain import audit
from helpline.domain.auth import STAFF, Principal, Role
from helpline.domain.errors import NotFound
from helpline.domain.supervision import visible_sites
from helpline.domain.views import conversation_view, iso, message_view
from helpline.runtime.core import Core, now
from helpline.store.models import AuditEntry, Conversation, Message, Offer, User

FORMAT = "helpline.conversation/1"
MAX_AUDIT_LIMIT = 500


def may_see(who: Principal, conv: Conversation) -> bool:
    """An admin, a supervisor of the conversation's site, or its counselor."""
    if who.role == Role.COUNSELOR:
        return conv.counselor_id == who.id
    if who.role == Role.SUPERVISOR:
        return who.may_use_site(conv.site)
    return who.role == Role.ADMIN


def _person(user: User | None) -> dict[str, Any] | None:
    if user is None:
        return None
    return {"id": user.id, "username": user.username, "name": user.name}


async def export_conversation(
    core: Core, who: Principal, conversation_id: str, *, address: str | None = None
) -> dict[str, Any]:
    """The case file of one conversation (404 when unknown or not the caller's to see)."""
    who.require_role(*STAFF)
    async with core.tx() as tx:
        s = tx.session
        conv = await s.get(Conversation, conversation_id)
        if conv is None or not may_see(who, conv):
            raise NotFound(f"no conversation {conversation_id}")
        audit.record(tx, who, audit.Action.EXPORT, conversation_id=conv.id, site=conv.site, address=address)
        await s.flush()
        counselor = await s.get(User, conv.counselor_id) if conv.counselor_id is not None else None
        messages = (
            await s.execute(
                select(Message, User.name)
                .outerjoin(User, User.id == Message.counselor_id)
                .where(Message.conversation_id == conv.id)
                .order_by(Message.created_at, Message.id)
            )
        ).all()
        offers = (
            await s.execute(
                select(Offer, User)
                .outerjoin(User, User.id == Offer.counselor_id)
                .where(Offer.conversation_id == conv.id)
                .order_by(Offer.created_at, Offer.id)
            )
        ).all()
        trail = await audit.trail(s, conv.id)
    client: dict[str, Any] = {"name": conv.client_name}
    if who.role != Role.COUNSELOR:
        client |= {"id": conv.client_id, "contact_urn": conv.contact_urn, "contact_uuid": conv.contact_uuid}
    return {
        "format": FORMAT,
        "exported_at": iso(now()),
        "exported_by": {"id": who.id, "username": who.username, "name": who.name, "role": who.role.value},
        "conversation": {
            **conversation_view(conv),
            "purged_at": iso(conv.purged_at),
            "counselor": _person(counselor),
            "client": client,
        },
        "messages": [message_view(m, counselor_name=name) for m, name in messages],
        "offers": [
            {
                "id": o.id,
                "site": o.site,
                "counselor": _person(u),
                "status": o.status,
                "created_at": iso(o.created_at),
                "deadline": iso(o.deadline),
                "resolved_at": iso(o.resolved_at),
            }
            for o, u in offers
        ],
        "audit": trail,
    }


async def audit_log(
    core: Core,
    who: Principal,
    *,
    conversation_id: str | None = None,
    site: str | None = None,
    username: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Audit entries, newest first: of one conversation (404 when unknown or of a site the caller may
    not see), else of the caller's sites (``site`` narrows); ``username`` keeps one staff member's.
    Supervisors and admins only (403)."""
    slugs = visible_sites(core, who, site)
    q = select(AuditEntry)
    async with core.sessionmaker() as s:
        if conversation_id is not None:
            conv = await s.get(Conversation, conversation_id)
            if conv is None or not who.may_use_site(conv.site) or (site is not None and conv.site != site):
                raise NotFound(f"no conversation {conversation_id}")
            q = q.where(AuditEntry.conversation_id == conversation_id)
        else:
            q = q.where(AuditEntry.site.in_(slugs))
        if username is not None:
            q = q.where(AuditEntry.username == username)
        q = q.order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(max(1, min(limit, MAX_AUDIT_LIMIT)))
        rows = (await s.scalars(q)).all()
    return {"results": [audit.entry_view(e) for e in rows], "count": len(rows)}
