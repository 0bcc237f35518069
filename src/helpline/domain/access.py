"""Which conversations a member of staff may act on: one rule for every counselor-side call."""

from __future__ import annotations

from helpline.domain.auth import Principal, Role
from helpline.domain.errors import NotFound
from helpline.runtime.core import Tx
from helpline.store.models import Conversation


async def visible_conversation(tx: Tx, who: Principal, conversation_id: str, *, lock: bool = False) -> Conversation:
    """A counselor sees the conversations assigned to them; a supervisor those of their site; an
    admin all. Any other is 404, as if it did not exist. ``lock``: ``SELECT … FOR UPDATE``."""
    conv = await tx.session.get(Conversation, conversation_id, with_for_update=lock)
    if conv is None:
        raise NotFound(f"no conversation {conversation_id}")
    if who.role == Role.COUNSELOR and conv.counselor_id != who.id:
        raise NotFound(f"no conversation {conversation_id}")
    if who.role == Role.SUPERVISOR and not who.may_use_site(conv.site):
        raise NotFound(f"no conversation {conversation_id}")
    return conv
