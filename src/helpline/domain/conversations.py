"""The chatbot's side of a conversation once it is under way: close, acknowledge, list.

A chatbot message (``POST /api/chat/``) is ``domain.inbound``'s: its one path, batched or alone.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from sqlalchemy import or_, select, tuple_

from helpline.domain.auth import Principal, require_chatbot
from helpline.domain.errors import Invalid, NotFound
from helpline.domain.states import ConversationStatus, OfferStatus, move_conversation
from helpline.domain.views import conversation_view, iso, message_view
from helpline.runtime import message_status
from helpline.runtime.core import Core, Tx, now
from helpline.store.models import Agent, Conversation, Message, Offer, User

# Order of a counselor message's delivery as the chatbot reports it; it never goes backwards.
_OUT_RANK = {"pending": 0, "sent": 1, "delivered": 2, "read": 3}


async def _chatbot_conversation(tx: Tx, who: Principal, chat_session: str, path_site: str | None) -> Conversation:
    conv = await tx.session.scalar(
        select(Conversation)
        .where(Conversation.chatbot_id == who.id, Conversation.chat_session == chat_session)
        .with_for_update()
    )
    # A conversation transferred or overflowed to another site is still its origin site's chat.
    if conv is None or (path_site is not None and path_site not in (conv.site, conv.origin_site)):
        raise NotFound(f"no conversation {chat_session!r}")
    return conv


async def close_conversation(
    core: Core, tx: Tx, conv: Conversation, *, by: str, reason: str | None, by_user: int | None = None
) -> None:
    """Close and tell everyone concerned: pending offers withdrawn, the counselor told."""
    conv.status = move_conversation(conv.status, ConversationStatus.CLOSED)
    conv.closed_at = now()
    conv.closed_by = by
    conv.close_reason = reason
    offers = (
        await tx.session.scalars(
            select(Offer).where(Offer.conversation_id == conv.id, Offer.status == OfferStatus.PENDING).with_for_update()
        )
    ).all()
    for o in offers:
        o.status = OfferStatus.WITHDRAWN
        o.resolved_at = conv.closed_at
        tx.notify(o.counselor_id, "offer_withdrawn", offer_id=o.id, conversation_id=conv.id, reason="closed")
    if conv.counselor_id is not None:
        tx.notify(
            conv.counselor_id,
            "conversation_closed",
            conversation_id=conv.id,
            closed_by=by,
            reason=reason,
        )
    if conv.counselor_id is not None:
        await _start_wrapup(core, tx, conv)
    tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
    tx.wake_hunter = True


async def _start_wrapup(core: Core, tx: Tx, conv: Conversation) -> None:
    """The counselor of a conversation that closed (whoever closed it) gets ``wrapup_s`` without
    offers, to write their notes; the hunter wakes when it ends."""
    site = core.sites.get(conv.site)
    if site is None or site.routing.wrapup_s <= 0 or conv.counselor_id is None:
        return
    agent = await tx.session.get(Agent, conv.counselor_id, with_for_update=True)  # after the conversation
    if agent is None:
        return
    agent.wrapup_until = max(agent.wrapup_until, now() + site.routing.wrapup_s)
    view = {
        "status": agent.status,
        "reason": agent.reason,
        "since": iso(agent.since),
        "wrapup_until": iso(agent.wrapup_until),
    }
    tx.notify(agent.user_id, "presence", presence=view)
    tx.notify_site(agent.site, "presence", counselor_id=agent.user_id, presence=view)


async def close_chat(core: Core, who: Principal, chat_session: str, *, path_site: str | None) -> dict[str, Any]:
    require_chatbot(who, path_site)
    async with core.tx() as tx:
        conv = await _chatbot_conversation(tx, who, chat_session, path_site)
        already = conv.status == ConversationStatus.CLOSED
        if not already:
            await close_conversation(core, tx, conv, by="chatbot", reason="closed by chatbot")
        return {
            "status": "success",
            "chat_session": chat_session,
            "conversation_status": "closed",
            "already_closed": already,
            "closed_at": iso(conv.closed_at),
        }


async def ack_message(
    core: Core, who: Principal, chat_session: str, message_id: str, status: str, *, path_site: str | None
) -> dict[str, Any]:
    """The chatbot says a counselor message reached the client (``delivered``, ``read``) or not."""
    require_chatbot(who, path_site)
    async with core.tx() as tx:
        conv = await _chatbot_conversation(tx, who, chat_session, path_site)
        m = await tx.session.scalar(
            select(Message)
            .where(Message.conversation_id == conv.id, Message.external_id == message_id, Message.direction == "out")
            .with_for_update()
        )
        if m is None:
            raise NotFound(f"no counselor message {message_id!r} in conversation {chat_session!r}")
        changed = False
        if status == "failed":
            changed = m.status != "failed" and m.status != "read"
        elif m.status == "failed":
            changed = True  # it arrived after all
        else:
            changed = _OUT_RANK.get(status, 0) > _OUT_RANK.get(m.status, 0)
        if changed:
            message_status.set_status(tx, m, status)
        return {"status": "success", "chat_session": chat_session, "message_id": message_id, "delivery": m.status}


def _encode_cursor(created_at: float, id_: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, id_]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, id_ = json.loads(raw)
        if "\x00" in str(id_):  # made up, and PostgreSQL would refuse it in the query (a 503)
            raise ValueError("NUL character")
        return float(created_at), str(id_)
    except (ValueError, TypeError) as exc:
        raise Invalid("invalid cursor", fields={"cursor": ["invalid cursor"]}) from exc


async def list_chats(
    core: Core,
    who: Principal,
    *,
    path_site: str | None,
    limit: int,
    cursor: str | None,
    chat_session: str | None,
    status: str | None,
) -> dict[str, Any]:
    require_chatbot(who, path_site)
    q = select(Conversation).where(Conversation.chatbot_id == who.id)
    if path_site is not None:
        q = q.where(or_(Conversation.site == path_site, Conversation.origin_site == path_site))
    if chat_session is not None:
        q = q.where(Conversation.chat_session == chat_session)
    if status is not None:
        q = q.where(Conversation.status == status)
    if cursor:
        c_at, c_id = _decode_cursor(cursor)
        q = q.where(tuple_(Conversation.created_at, Conversation.id) < tuple_(c_at, c_id))
    q = q.order_by(Conversation.created_at.desc(), Conversation.id.desc()).limit(limit + 1)
    async with core.sessionmaker() as s:
        rows = (await s.scalars(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "results": [conversation_view(c) for c in rows],
        "next_cursor": _encode_cursor(rows[-1].created_at, rows[-1].id) if more else None,
    }


async def list_chat_messages(core: Core, who: Principal, chat_session: str, *, path_site: str | None) -> dict[str, Any]:
    require_chatbot(who, path_site)
    async with core.tx() as tx:
        conv = await _chatbot_conversation(tx, who, chat_session, path_site)
        rows = (
            await tx.session.execute(
                select(Message, User.name)
                .outerjoin(User, User.id == Message.counselor_id)
                .where(Message.conversation_id == conv.id)
                .order_by(Message.id)
            )
        ).all()
    return {
        "chat_session": chat_session,
        "conversation_status": conv.status,
        "results": [message_view(m, counselor_name=name) for m, name in rows],
    }
