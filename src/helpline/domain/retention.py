"""Retention: closed conversations lose their text and client identifiers after ``retention_days``.

What a purge does to a conversation closed more than N days ago:

* every message's text becomes ``""`` and its attachments (URL references) are dropped;
* the client's name, ``client_id`` (the chatbot's ``chat_sender``), contact URN and contact UUID are
  replaced by pseudonyms; a Weni ticket loses its contact, opening text and metadata;
* the events the outbox has already sent (or dead-lettered) for it lose their payload (it carries the
  text and the contact) and the peer's answer; events still pending keep theirs until they go out,
  and a later purge run empties them then;
* ``purged_at`` is set.

Kept, for anonymous statistics: the conversation's site, risk, source, location, timestamps (so
queue waits), statuses, counselor, and each message's direction, sender, status and timestamps. The
audit trail (who read what) names staff only and is kept.

``HELPLINE_RETENTION_DAYS`` (0, the default, keeps everything for ever) drives a loop in every
instance (:func:`run_retention`, daily) and ``helpline purge [--days N] [--dry-run]``. Work is taken
in small batches with ``FOR UPDATE SKIP LOCKED``: instances purging at the same time on PostgreSQL
share it, never touch a row twice and never wait for each other; on SQLite writers take turns.
A conversation reopened after its purge (Weni tickets) is purged again once closed long enough.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from sqlalchemy import ColumnElement, and_, func, or_, select, update

from helpline.domain.errors import Invalid
from helpline.domain.outbox import PURGED_PAYLOAD
from helpline.domain.states import ConversationStatus
from helpline.runtime.core import Core, now
from helpline.runtime.logs import short_reason
from helpline.store.models import Conversation, Message, OutboxEvent, Ticket

log = structlog.get_logger("helpline.retention")

DAY_S = 86400.0
BATCH = 200
FIRST_RUN_DELAY_S = 60.0
PURGED_CLIENT_ID = "purged"
PURGED_CLIENT_NAME = "(purged)"
_SENT_OR_DEAD = ("sent", "dead")


@dataclass(frozen=True)
class PurgeReport:
    cutoff: float  # conversations closed before this (epoch seconds) are purged
    dry_run: bool
    conversations: int
    messages: int
    outbox_events: int


def _due(cutoff: float) -> ColumnElement[bool]:
    """Closed before ``cutoff`` and not purged since its last close."""
    return and_(
        Conversation.status == ConversationStatus.CLOSED.value,
        Conversation.closed_at < cutoff,
        or_(Conversation.purged_at.is_(None), Conversation.purged_at < Conversation.closed_at),
    )


def _stale_event() -> ColumnElement[bool]:
    """An outbox event sent or dead, written before its (closed) conversation's purge, not yet emptied."""
    return and_(
        Conversation.status == ConversationStatus.CLOSED.value,
        Conversation.purged_at.is_not(None),
        OutboxEvent.created_at <= Conversation.purged_at,
        OutboxEvent.status.in_(_SENT_OR_DEAD),
        OutboxEvent.payload != PURGED_PAYLOAD,
    )


async def purge(core: Core, *, days: float, dry_run: bool = False, t: float | None = None) -> PurgeReport:
    """Purge conversations closed more than ``days`` ago (``dry_run``: only count them)."""
    if days <= 0:
        raise Invalid("days must be positive (a retention of 0 days keeps everything)")
    t = now() if t is None else t
    cutoff = t - days * DAY_S
    if dry_run:
        return await _count(core, cutoff)
    conversations = messages = 0
    while True:
        n, m = await _purge_conversations(core, cutoff, t)
        conversations += n
        messages += m
        if n < BATCH:
            break
    events = 0
    while True:
        k = await _purge_outbox(core)
        events += k
        if k < BATCH:
            break
    return PurgeReport(cutoff, False, conversations, messages, events)


async def _purge_conversations(core: Core, cutoff: float, t: float) -> tuple[int, int]:
    async with core.tx() as tx:
        s = tx.session
        convs = (
            await s.scalars(
                select(Conversation)
                .where(_due(cutoff))
                .order_by(Conversation.closed_at, Conversation.id)
                .limit(BATCH)
                .with_for_update(skip_locked=True)
            )
        ).all()
        if not convs:
            return 0, 0
        ids = [c.id for c in convs]
        emptied = await s.execute(
            update(Message)
            .where(Message.conversation_id.in_(ids))
            .values(text="", attachments=None)
            .execution_options(synchronize_session=False)
        )
        for c in convs:
            c.client_id = PURGED_CLIENT_ID
            c.client_name = PURGED_CLIENT_NAME
            c.contact_urn = None
            c.contact_uuid = None
            c.purged_at = t
        tickets = (await s.scalars(select(Ticket).where(Ticket.conversation_id.in_(ids)))).all()
        for ticket in tickets:
            # Unique per ticket: a reopened purged ticket must not collide with another's open contact.
            ticket.contact_uuid = f"purged:{ticket.id}"
            ticket.contact_urn = PURGED_CLIENT_ID
            ticket.open_contact = None  # closed: the contact is free (a close through the OpenCHS API may leave it)
            ticket.body = None
            ticket.meta = None
        return len(convs), int(emptied.rowcount)  # type: ignore[attr-defined]


async def _purge_outbox(core: Core) -> int:
    async with core.tx() as tx:
        events = (
            await tx.session.scalars(
                select(OutboxEvent)
                .join(Conversation, Conversation.id == OutboxEvent.conversation_id)
                .where(_stale_event())
                .order_by(OutboxEvent.id)
                .limit(BATCH)
                .with_for_update(of=OutboxEvent, skip_locked=True)
            )
        ).all()
        for ev in events:
            ev.payload = PURGED_PAYLOAD
            if ev.last_error is not None:
                ev.last_error = short_reason(ev.last_error)
        return len(events)


async def _count(core: Core, cutoff: float) -> PurgeReport:
    async with core.sessionmaker() as s:
        due = select(Conversation.id).where(_due(cutoff))
        conversations = await s.scalar(select(func.count()).select_from(due.subquery()))
        messages = await s.scalar(select(func.count()).where(Message.conversation_id.in_(due)))
        events = await s.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .join(Conversation, Conversation.id == OutboxEvent.conversation_id)
            .where(
                or_(
                    _stale_event(),
                    and_(
                        _due(cutoff),
                        OutboxEvent.status.in_(_SENT_OR_DEAD),
                        OutboxEvent.payload != PURGED_PAYLOAD,
                    ),
                )
            )
        )
    return PurgeReport(cutoff, True, int(conversations or 0), int(messages or 0), int(events or 0))


async def run_retention(core: Core) -> None:
    """The background purge of one instance: shortly after start, then every ``retention_interval_s``.

    Does nothing while ``retention_days`` is 0. A failed run is logged and tried at the next tick.
    """
    s = core.settings
    delay = min(s.retention_interval_s, FIRST_RUN_DELAY_S)
    while True:
        await asyncio.sleep(delay)
        delay = s.retention_interval_s
        if s.retention_days <= 0:
            continue
        try:
            report = await purge(core, days=s.retention_days)
        except Exception:
            log.exception("retention purge failed")
            continue
        if report.conversations or report.outbox_events:
            log.info(
                "retention purge",
                conversations=report.conversations,
                messages=report.messages,
                outbox_events=report.outbox_events,
            )
