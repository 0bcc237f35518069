"""Events owed to a conversation's contact, written into the outbox inside the caller's transaction.

The rules call these; ``helpline.delivery.outbox.OutboxWorker`` sends what they wrote, in order per
conversation. A row's ``target`` says who reaches the contact: the site's RapidPro (a flow start)
or Weni (a signed webhook, for a conversation that came in as a Weni ticket).
"""

from __future__ import annotations

import json

from sqlalchemy import update

from helpline.config.sites import Site
from helpline.delivery.rapidpro import PART_LIMIT, build_flow_start, contact_target, split_text
from helpline.delivery.weni import SOURCE as WENI_SOURCE
from helpline.delivery.weni import Webhook
from helpline.runtime.core import Core, Tx, now
from helpline.store.models import Conversation, Message, OutboxEvent

# What the retention purge (domain/retention.py) leaves of a sent or dead event's payload.
PURGED_PAYLOAD = '{"purged":true}'


def _add(tx: Tx, site: Site, conv: Conversation, event: str, params: dict[str, str], message_ref: int | None) -> None:
    if conv.source == WENI_SOURCE:
        return  # a Weni ticket's contact is reached through Weni's webhooks (enqueue_webhook), not flow starts
    target = contact_target(
        site.rapidpro, contact_urn=conv.contact_urn, contact_uuid=conv.contact_uuid, client_id=conv.client_id
    )
    body = build_flow_start(site.rapidpro, target, {"event": event, "conversation_id": conv.chat_session, **params})
    t = now()
    tx.session.add(
        OutboxEvent(
            conversation_id=conv.id,
            site=site.slug,
            target="rapidpro",
            event=event,
            message_ref=message_ref,
            payload=json.dumps(body, ensure_ascii=False),
            status="pending",
            attempts=0,
            next_attempt_at=t,
            claimed_until=0.0,
            created_at=t,
        )
    )
    tx.wake_outbox = True


def contact_site(core: Core, conv: Conversation) -> Site:
    """The site whose RapidPro reaches the conversation's contact: the one it came in through,
    also after a transfer or an overflow moved it to another site's queue (that site's flow,
    token and URN scheme do not know the contact)."""
    return core.sites.get(conv.origin_site or conv.site) or core.site(conv.site)


def enqueue_event(tx: Tx, site: Site, conv: Conversation, event: str, /, **params: str) -> None:
    """Queue one event (``ack``, ``queued``, ``assigned``, ``closed`` …) for the conversation's contact."""
    _add(tx, site, conv, event, {k: v[:PART_LIMIT] for k, v in params.items()}, None)


def enqueue_message(tx: Tx, site: Site, conv: Conversation, message: Message, counselor_name: str) -> None:
    """Queue a counselor message; a text over RapidPro's 640 characters goes as ordered parts."""
    parts = split_text(message.text)
    for i, part in enumerate(parts, start=1):
        params = {"message_id": message.external_id, "text": part, "counselor_name": counselor_name}
        if len(parts) > 1:
            params |= {"part": str(i), "parts": str(len(parts))}
        _add(tx, site, conv, "message", params, message.id)


def enqueue_webhook(tx: Tx, conv: Conversation, event: str, hook: Webhook, *, message_ref: int | None = None) -> None:
    """Queue a signed webhook to Weni (``message``, ``closed``, ``reopened``), in line with the
    conversation's other events."""
    t = now()
    tx.session.add(
        OutboxEvent(
            conversation_id=conv.id,
            site=conv.site,
            target="weni",
            event=event,
            message_ref=message_ref,
            payload=hook.to_payload(),
            status="pending",
            attempts=0,
            next_attempt_at=t,
            claimed_until=0.0,
            created_at=t,
        )
    )
    tx.wake_outbox = True


async def replay_dead(core: Core, outbox_id: int) -> bool:
    """Put a dead letter back in line (a supervisor's replay)."""
    async with core.tx() as tx:
        result = await tx.session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == outbox_id, OutboxEvent.status == "dead", OutboxEvent.payload != PURGED_PAYLOAD)
            .values(status="pending", next_attempt_at=now(), claimed_until=0.0, attempts=0)
        )
        tx.wake_outbox = True
        return bool(result.rowcount)  # type: ignore[attr-defined]
