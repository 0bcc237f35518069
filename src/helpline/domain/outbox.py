"""Events owed to a conversation's contact, written into the outbox inside the caller's transaction.

The rules call these; ``helpline.delivery.outbox.OutboxWorker`` sends what they wrote, in order per
conversation (RapidPro's and Weni's events of one conversation share that order).

**This module alone decides how a contact is reached**, by the conversation's channel
(:func:`channel_of`, from how it came in):

* ``rapidpro``: a conversation of the chatbot API (``/api/chat/``) is reached through its site's
  RapidPro, one flow start per event (``target = "rapidpro"``);
* ``weni``: a conversation opened as a Weni ticket (``POST /v1/tickets``) is reached through Weni,
  one signed webhook per event (``target = "weni"``).

What a counselor does goes to whichever it is — :func:`counselor_message`,
:func:`conversation_closed`, :func:`conversation_reopened` — and the callers never look at the
channel themselves. The other events are notices (:func:`enqueue_event`: ``ack``, ``queued``,
``assigned``, ``position``, ``out_of_hours``, ``overflow``), which RapidPro's flow
shows the contact, and they follow one named rule:

**Weni tickets get no RapidPro notices** (:func:`gets_notices`). Weni's ticketer contract carries
a counselor's messages, a close and a reopen, and nothing else; the ticket's contact is Weni's,
reached through its webhooks, not through the site's RapidPro flow. So a notice for a Weni
conversation is not written at all — deliberately, not as a failure: the counselor, the queue and
the supervisors see the same as for any conversation.

A ``weni`` conversation with no ticket row (only a chatbot calling its ``chat_source``
``weni-ticketer`` on ``/api/chat/`` makes one) has no address: nothing is written for it, and a
warning says so.
"""

from __future__ import annotations

import json
from enum import StrEnum

import structlog
from sqlalchemy import update

from helpline.config.sites import Site
from helpline.delivery.rapidpro import PART_LIMIT, build_flow_start, contact_target, split_text
from helpline.delivery.weni import SOURCE as WENI_SOURCE
from helpline.delivery.weni import Webhook
from helpline.domain.auth import Principal
from helpline.domain.errors import Invalid
from helpline.domain.weni import webhooks
from helpline.runtime.core import Core, Tx, now
from helpline.store.models import Conversation, Message, OutboxEvent, Ticket

log = structlog.get_logger("helpline.outbox")

# What the retention purge (domain/retention.py) leaves of a sent or dead event's payload.
PURGED_PAYLOAD = '{"purged":true}'


class Channel(StrEnum):
    """How a conversation's contact is reached (``outbox.target`` of its events)."""

    RAPIDPRO = "rapidpro"
    WENI = "weni"


def channel_of(conv: Conversation) -> Channel:
    """``weni`` for a conversation opened as a Weni ticket, ``rapidpro`` for every other."""
    return Channel.WENI if conv.source == WENI_SOURCE else Channel.RAPIDPRO


def gets_notices(conv: Conversation) -> bool:
    """The rule "Weni tickets get no RapidPro notices" (see the module's docstring)."""
    return channel_of(conv) is Channel.RAPIDPRO


def contact_site(core: Core, conv: Conversation) -> Site:
    """The site whose RapidPro reaches the conversation's contact: the one it came in through,
    also after a transfer or an overflow moved it to another site's queue (that site's flow,
    token and URN scheme do not know the contact)."""
    return core.sites.get(conv.origin_site or conv.site) or core.site(conv.site)


# --------------------------------------------------------------------------- what is owed, by channel


def enqueue_event(tx: Tx, site: Site, conv: Conversation, event: str, /, **params: str) -> None:
    """Queue one notice (``ack``, ``queued``, ``assigned`` …) for the contact's RapidPro flow.

    None for a Weni ticket: :func:`gets_notices`.
    """
    if not gets_notices(conv):
        return
    _flow_start(tx, site, conv, event, _cut(params), None)


async def counselor_message(core: Core, tx: Tx, conv: Conversation, m: Message, who: Principal) -> None:
    """Queue a counselor's message ``m`` (already flushed) for the contact.

    RapidPro: ``message`` events from the contact's site (:func:`contact_site`); a text over
    RapidPro's 640 characters goes as ordered parts. Weni: the ``POST .../messages`` webhook.
    Attachments only go to a Weni ticket: 422 otherwise (the caller's transaction, message
    included, is rolled back).
    """
    ticket = await _ticket(tx, conv)
    if m.attachments and ticket is None:
        raise Invalid("attachments can only be sent on a Weni ticket", fields={"attachments": ["not supported"]})
    if ticket is not None:
        _webhook_event(tx, conv, "message", webhooks.message(core, conv, ticket, m, who), message_ref=m.id)
    elif channel_of(conv) is Channel.RAPIDPRO:
        _message_parts(tx, contact_site(core, conv), conv, m, who.name)


async def conversation_closed(core: Core, tx: Tx, conv: Conversation, who: Principal, reason: str | None) -> None:
    """A counselor has just closed ``conv``: RapidPro's ``closed`` event, or Weni's close webhook
    (the ticket's contact may then open another ticket)."""
    ticket = await _ticket(tx, conv)
    if ticket is not None:
        ticket.open_contact = None
        _webhook_event(tx, conv, "closed", webhooks.close(core, conv, ticket, who, reason))
    elif channel_of(conv) is Channel.RAPIDPRO:
        params = _cut({"counselor_name": who.name, "status": reason or "resolved"})
        _flow_start(tx, contact_site(core, conv), conv, "closed", params, None)


async def conversation_reopened(core: Core, tx: Tx, conv: Conversation, who: Principal, t: float) -> None:
    """``who`` reopened ``conv`` at ``t``: Weni's reopen webhook. Only a Weni ticket reopens (the
    contract has the call, RapidPro's flow no such event): for another conversation nothing is written."""
    ticket = await _ticket(tx, conv)
    if ticket is not None:
        _webhook_event(tx, conv, "reopened", webhooks.reopen(core, ticket, who, t))


async def _ticket(tx: Tx, conv: Conversation) -> Ticket | None:
    """The Weni ticket that reaches ``conv``'s contact; ``None`` for a RapidPro conversation (and,
    with a warning, for a ``weni`` one without a ticket: see the module's docstring)."""
    if channel_of(conv) is not Channel.WENI:
        return None
    ticket = await webhooks.ticket_for(tx, conv)
    if ticket is None:
        log.warning("weni conversation without a ticket: nothing written for its contact", conversation_id=conv.id)
    return ticket


# --------------------------------------------------------------------------- the rows


def _cut(params: dict[str, str]) -> dict[str, str]:
    """An event's values cut to what RapidPro keeps of a string (a message's text is split instead)."""
    return {k: v[:PART_LIMIT] for k, v in params.items()}


def _message_parts(tx: Tx, site: Site, conv: Conversation, m: Message, counselor_name: str) -> None:
    parts = split_text(m.text)
    for i, part in enumerate(parts, start=1):
        params = {"message_id": m.external_id, "text": part, "counselor_name": counselor_name}
        if len(parts) > 1:
            params |= {"part": str(i), "parts": str(len(parts))}
        _flow_start(tx, site, conv, "message", params, m.id)


def _flow_start(
    tx: Tx, site: Site, conv: Conversation, event: str, params: dict[str, str], message_ref: int | None
) -> None:
    """One RapidPro flow start for a ``rapidpro`` conversation (callers have decided it is one)."""
    target = contact_target(
        site.rapidpro, contact_urn=conv.contact_urn, contact_uuid=conv.contact_uuid, client_id=conv.client_id
    )
    body = build_flow_start(site.rapidpro, target, {"event": event, "conversation_id": conv.chat_session, **params})
    _add(tx, conv, site.slug, Channel.RAPIDPRO, event, json.dumps(body, ensure_ascii=False), message_ref)


def _webhook_event(tx: Tx, conv: Conversation, event: str, hook: Webhook, *, message_ref: int | None = None) -> None:
    """One signed webhook to Weni (``message``, ``closed``, ``reopened``), in line with the
    conversation's other events."""
    _add(tx, conv, conv.site, Channel.WENI, event, hook.to_payload(), message_ref)


def _add(
    tx: Tx, conv: Conversation, site: str, channel: Channel, event: str, payload: str, message_ref: int | None
) -> None:
    t = now()
    tx.session.add(
        OutboxEvent(
            conversation_id=conv.id,
            site=site,
            target=channel.value,
            event=event,
            message_ref=message_ref,
            payload=payload,
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
