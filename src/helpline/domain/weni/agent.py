"""A counselor reopening a Weni ticket's conversation (``POST /api/conversations/<id>/reopen/``).

Only a Weni ticket reopens: the contract has the call, the OpenCHS interface keeps ``closed``
final. A counselor's reply and close on a ticket are the same calls as on any conversation;
:mod:`helpline.domain.outbox` turns each into Weni's webhook (bodies in :mod:`.webhooks`).
"""

from __future__ import annotations

from typing import Any

from helpline.domain import outbox
from helpline.domain.access import visible_conversation
from helpline.domain.auth import STAFF, Principal, Role
from helpline.domain.states import ConversationStatus
from helpline.domain.views import conversation_view
from helpline.domain.weni.errors import ReopenNotSupported
from helpline.domain.weni.tickets import claim_contact, reopen_conversation
from helpline.domain.weni.webhooks import ticket_for
from helpline.runtime.core import Core, now


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
        await outbox.conversation_reopened(core, tx, conv, who, t)
        if conv.counselor_id is not None:
            tx.notify(conv.counselor_id, "conversation_reopened", conversation=conversation_view(conv))
        else:
            tx.wake_hunter = True
        tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        return {"conversation": conversation_view(conv), "already_open": False}
