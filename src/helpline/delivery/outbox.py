"""The durable outbox: events owed to RapidPro (or Weni), written in the caller's transaction, sent in order.

A conversation's events go out one at a time, oldest first: the next is only tried after the
previous one got its 201 (or was dead-lettered). Different conversations go out concurrently.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Sequence

import structlog
from sqlalchemy import case, func, select, update
from sqlalchemy.sql import Subquery

from helpline import metrics
from helpline.delivery.rapidpro import (
    PART_LIMIT,
    Outcome,
    RapidProClient,
    backoff_delay,
    build_flow_start,
    contact_target,
    split_text,
)
from helpline.delivery.weni import SOURCE as WENI_SOURCE
from helpline.delivery.weni import Webhook, WeniClient
from helpline.domain.core import Core, Tx, now
from helpline.domain.sites import Site
from helpline.store.models import Conversation, Message, OutboxEvent

log = structlog.get_logger("helpline.outbox")

# What the retention purge (domain/retention.py) leaves of a sent or dead event's payload.
PURGED_PAYLOAD = '{"purged":true}'
_GAVE_UP = re.compile(r"^gave up after \d+ attempts: ")
_HTTP_STATUS = re.compile(r"^HTTP \d{3}")


def short_reason(reason: str) -> str:
    """A failure reason without the peer's answer, which may echo the params (message text, contact):
    ``"HTTP 400: {...}"`` -> ``"HTTP 400"``, ``"ConnectError: ..."`` -> ``"ConnectError"``. For logs."""
    prefix = ""
    gave_up = _GAVE_UP.match(reason)
    if gave_up:
        prefix, reason = gave_up.group(0), reason[gave_up.end() :]
    status = _HTTP_STATUS.match(reason)
    head = status.group(0) if status else reason.split(": ", 1)[0]
    return (prefix + head)[:200]


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


def _heads() -> Subquery:
    """The oldest pending event of each conversation: the only one of its queue that may go.
    One pass over the (status, conversation_id, id) index, whatever the backlog."""
    return (
        select(func.min(OutboxEvent.id).label("id"))
        .where(OutboxEvent.status == "pending")
        .group_by(OutboxEvent.conversation_id)
        .subquery()
    )


class OutboxWorker:
    """Claims due heads of conversations' queues and sends them; retries with backoff."""

    def __init__(self, core: Core, client: RapidProClient | None = None, weni: WeniClient | None = None) -> None:
        self.core = core
        self.client = client or RapidProClient()
        self.weni = weni or WeniClient()
        self._rng = random.Random()

    async def run(self) -> None:
        s = self.core.settings
        while True:
            # Cleared before looking, so a wake-up that comes while we look is not lost.
            self.core.outbox_wakeup.clear()
            try:
                batch = await self._claim(s.outbox_concurrency)
            except Exception:
                log.exception("outbox claim failed")
                batch = []
            if batch:
                outcomes = await asyncio.gather(*(self._send(e) for e in batch))
                try:
                    await self._record(list(zip(batch, outcomes, strict=True)))
                except Exception:
                    # The leases run out and the events are tried again: at least once, never lost.
                    log.exception("outbox record failed", outbox_ids=[e.id for e in batch])
                continue
            wait = min(s.poll_interval_s, await self._until_next_due())
            try:
                await asyncio.wait_for(self.core.outbox_wakeup.wait(), timeout=max(0.0, wait))
            except TimeoutError:
                pass

    async def _until_next_due(self) -> float:
        """Seconds until a head of a conversation's queue may be claimed. Only heads count: the
        events behind a head in backoff (or in flight) are "due" but cannot go, and waiting for
        them would spin this loop for as long as RapidPro is down."""
        heads = _heads()
        due_at = case(
            (OutboxEvent.claimed_until > OutboxEvent.next_attempt_at, OutboxEvent.claimed_until),
            else_=OutboxEvent.next_attempt_at,
        )
        try:
            async with self.core.sessionmaker() as session:
                nxt = await session.scalar(select(func.min(due_at)).join(heads, heads.c.id == OutboxEvent.id))
        except Exception:
            return self.core.settings.poll_interval_s
        return self.core.settings.poll_interval_s if nxt is None else nxt - now()

    async def _claim(self, limit: int) -> Sequence[OutboxEvent]:
        t = now()
        heads = _heads()
        async with self.core.tx() as tx:
            rows = (
                await tx.session.scalars(
                    select(OutboxEvent)
                    .join(heads, heads.c.id == OutboxEvent.id)
                    .where(OutboxEvent.next_attempt_at <= t, OutboxEvent.claimed_until < t)
                    .order_by(OutboxEvent.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True, of=OutboxEvent)
                )
            ).all()
            for r in rows:
                r.claimed_until = t + self.core.settings.outbox_lease_s
            return rows

    async def _send(self, ev: OutboxEvent) -> Outcome:
        site = self.core.sites.get(ev.site)
        if ev.target == "weni":
            return await self.weni.deliver(self.core.settings, ev.payload)
        if site is None:
            return Outcome("dead", f"site {ev.site!r} is no longer configured")
        return await self.client.send(site.rapidpro, json.loads(ev.payload))

    async def _record(self, results: list[tuple[OutboxEvent, Outcome]]) -> None:
        """The outcomes of one batch, in one transaction."""
        async with self.core.tx() as tx:
            for ev, outcome in results:
                await self._record_one(tx, ev, outcome)

    async def _record_one(self, tx: Tx, ev: OutboxEvent, outcome: Outcome) -> None:
        s = self.core.settings
        t = now()
        row = await tx.session.get(OutboxEvent, ev.id, with_for_update=True)
        if row is None or row.status != "pending":
            return
        row.attempts += 1
        row.claimed_until = 0.0
        if outcome.kind == "retry" and s.outbox_max_attempts and row.attempts >= s.outbox_max_attempts:
            outcome = Outcome("dead", f"gave up after {row.attempts} attempts: {outcome.reason}")
        if outcome.kind == "sent":
            row.status = "sent"
            row.sent_at = t
            metrics.OUTBOX_SENT.labels(row.site, row.event).inc()
            row.last_error = None
        elif outcome.kind == "retry":
            delay = backoff_delay(
                row.attempts,
                base=s.outbox_backoff_base_s,
                cap=s.outbox_backoff_cap_s,
                retry_after=outcome.retry_after,
                rng=self._rng,
            )
            row.next_attempt_at = t + delay
            metrics.OUTBOX_RETRIES.labels(row.site).inc()
            row.last_error = outcome.reason
            log.info(
                "outbox retry",
                outbox_id=row.id,
                attempts=row.attempts,
                delay=round(delay, 3),
                reason=short_reason(outcome.reason),
            )
            return
        else:
            row.status = "dead"
            row.last_error = outcome.reason
            metrics.OUTBOX_DEAD.labels(row.site).inc()
            log.warning(
                "outbox dead letter", outbox_id=row.id, outbox_event=row.event, reason=short_reason(outcome.reason)
            )
        if row.message_ref is not None:
            await _update_message_status(tx, row)
        tx.wake_outbox = True


async def _update_message_status(tx: Tx, row: OutboxEvent) -> None:
    """A counselor message is ``sent`` once all its parts are, ``failed`` if one is dead."""
    msg = await tx.session.get(Message, row.message_ref)
    if msg is None or msg.status not in ("pending", "sent"):
        return
    if row.status == "dead":
        new = "failed"
    else:
        left = await tx.session.scalar(
            select(func.count()).where(
                OutboxEvent.message_ref == row.message_ref,
                OutboxEvent.status == "pending",
                OutboxEvent.id != row.id,
            )
        )
        if left:
            return
        new = "sent"
    if msg.status == new:
        return
    msg.status = new
    msg.status_at = now()
    if msg.counselor_id is not None:
        tx.notify(
            msg.counselor_id,
            "message_status",
            conversation_id=msg.conversation_id,
            message_id=msg.external_id,
            status=new,
        )


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
