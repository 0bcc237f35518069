"""A counselor message's delivery status: set here, and the counselor told (``message_status``).

``pending`` (written) -> ``sent`` (every part went out) -> ``delivered`` -> ``read`` (the chatbot's
acks), or ``failed`` (a part was dead-lettered; a supervisor's replay makes it ``pending`` again).
A change of it goes through here, so the WebSocket event has one shape and one sender. It lives
under the rules because the outbox worker (``delivery``, which may not import them) changes
statuses too: in bulk, with a conditional ``UPDATE … RETURNING``, announcing each row that changed
with :func:`announce`; the rules change one message at a time with :func:`set_status`.
The chatbot's ack (``domain.conversations.ack_message``) and a dead letter's replay
(``domain.supervision``) use :func:`set_status`.
"""

from __future__ import annotations

from helpline.runtime.core import Tx, now
from helpline.store.models import Message


def announce(tx: Tx, *, counselor_id: int | None, conversation_id: str, message_id: str, status: str) -> None:
    """Tell the message's counselor (if it has one) its new status, once the transaction commits."""
    if counselor_id is not None:
        tx.notify(counselor_id, "message_status", conversation_id=conversation_id, message_id=message_id, status=status)


def set_status(tx: Tx, m: Message, status: str, *, t: float | None = None) -> None:
    """``m`` is now ``status`` (as of ``t``, default now); its counselor is told."""
    m.status = status
    m.status_at = now() if t is None else t
    announce(
        tx, counselor_id=m.counselor_id, conversation_id=m.conversation_id, message_id=m.external_id, status=status
    )
