"""``POST /api/chat/``, the whole of it: a chatbot message, written in batches (one transaction for many).

A message has one way in, :func:`post_chat`, and this module is all of it: the batch and the
one-message path beside it share their checks and answers here rather than calling each other
across modules. ``domain.conversations`` keeps what follows (close, acknowledge, list).

Under load, many ``POST /api/chat/`` requests are in flight at once. Each one hands its message
to the :class:`InboundBatcher` and waits; the batcher takes everything waiting and writes it in
one transaction: one read of the idempotency keys, one read (and lock) of the conversations, one
multi-row INSERT of the messages and one of the keys, one commit. Each request gets its own
answer (or its own error) only after that commit, so a 201 still means "stored".

What the batch does not handle is handed back to the one-message path (:func:`_post_chat`,
below): a new conversation (its routing, notices and hunter wake-up; the
batch's read is not repeated there, a conversation created meanwhile trips the unique constraint
and that path starts again). If the batch's transaction fails as a whole (a constraint a
concurrent writer tripped, say), every request in it is handed back too, and each is retried
alone: one bad message fails only itself.

Handed-back messages keep their order: those of one chat take the one-message path one at a time,
in the order they arrived (a :class:`_Turn` each, in the chat's lane), and a later batch hands a
chat's messages back too while that chat's lane is not empty, rather than store them ahead.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from sqlalchemy import ColumnElement, Table, and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from helpline.domain import notices
from helpline.domain.auth import Principal, require_chatbot
from helpline.domain.errors import Conflict, NotFound
from helpline.domain.states import ConversationStatus, Risk
from helpline.domain.views import message_view
from helpline.runtime import metrics
from helpline.runtime.core import Core, now
from helpline.store.db import is_sqlite
from helpline.store.models import Conversation, IdempotencyKey, Message

log = structlog.get_logger("helpline.inbound")

MAX_BATCH = 256

_CONVERSATIONS = cast(Table, Conversation.__table__)
_C = _CONVERSATIONS.c
_M = cast(Table, Message.__table__)
_K = cast(Table, IdempotencyKey.__table__)


@dataclass(frozen=True)
class ChatIn:
    chat_sender: str
    chat_message: str
    chat_session: str
    chat_source: str
    chat_receiver: str | None = None
    message_id: str | None = None
    client_name: str | None = None
    location: str | None = None
    risk: Risk | None = None
    contact_urn: str | None = None
    contact_uuid: str | None = None


@dataclass(frozen=True)
class Answer:
    created: bool  # False: an idempotent repeat, answered 200 with the first answer
    body: dict[str, Any]


Alone = Callable[[bool], Awaitable[Answer]]
"""The one-message path for a message the batch hands back; its argument says whether the batch
found neither the message's ``message_id`` nor its conversation (they need not be read again)."""

ChatKey = tuple[int, str]  # (chatbot id, chat_session)


@dataclass(frozen=True)
class _Turn:
    """A handed-back message's place in its chat's lane: it goes once ``after`` (the message
    handed back before it in that chat) is done, and sets ``done`` when it is."""

    new: bool
    after: asyncio.Future[None] | None
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def release(self) -> None:
        """Let the next message of the lane go, but never before ``after``: a message whose request
        was cancelled while waiting for its turn still holds its place until then."""
        if self.after is None or self.after.done():
            _set(self.done)
        else:
            self.after.add_done_callback(lambda _: _set(self.done))


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class _Item:
    who: Principal
    msg: ChatIn
    path_site: str | None
    future: asyncio.Future[Answer | _Turn]

    @property
    def chat(self) -> ChatKey:
        return (self.who.id, self.msg.chat_session)


def repeat_answer(first: str, msg: ChatIn) -> Answer:
    """The stored first answer to a ``message_id``, for a repeat of it (409 if from another chat)."""
    answer: dict[str, Any] = json.loads(first)
    if answer.get("chat_session") != msg.chat_session:
        # Not a retry: answering 200 would tell the chatbot a message it never stored arrived.
        raise Conflict(
            f"message_id {msg.message_id!r} was already used in another chat_session",
            fields={"message_id": ["already used in another chat_session"]},
        )
    return Answer(False, answer)


async def post_chat(core: Core, who: Principal, msg: ChatIn, *, path_site: str | None) -> Answer:
    require_chatbot(who, path_site)

    async def alone(new: bool) -> Answer:  # what the batch hands back (a new conversation, say)
        try:
            return await _post_chat(core, who, msg, path_site=path_site, new=new)
        except IntegrityError:
            # A concurrent request with the same message_id or chat_session won the race: its row is
            # committed now, so the second try finds it (a repeat, or the conversation to add to).
            return await _post_chat(core, who, msg, path_site=path_site)

    return await InboundBatcher.of(core).submit(who, msg, path_site, alone)


async def _post_chat(core: Core, who: Principal, msg: ChatIn, *, path_site: str | None, new: bool = False) -> Answer:
    """``new``: the inbound batch has just found neither the message_id nor the conversation, so they
    are not read again; one created since trips a unique constraint (IntegrityError: the caller
    tries again without ``new``)."""
    t = now()
    async with core.tx() as tx:
        s = tx.session
        conv: Conversation | None = None
        if not new:
            if msg.message_id is not None:
                first = await s.scalar(
                    select(IdempotencyKey.response).where(
                        IdempotencyKey.chatbot_id == who.id, IdempotencyKey.message_id == msg.message_id
                    )
                )
                if first is not None:
                    return repeat_answer(first, msg)
            conv = await s.scalar(
                select(Conversation)
                .where(Conversation.chatbot_id == who.id, Conversation.chat_session == msg.chat_session)
                .with_for_update()
            )
        created = conv is None
        if conv is None:
            site = core.sites.choose(path_slug=path_site, location=msg.location, home=who.site)
            if site is None:
                raise NotFound(f"unknown site {path_site!r}")
            who.require_site(site.slug)
            risk = msg.risk or Risk.LOW
            conv = Conversation(
                id=str(uuid.uuid4()),
                site=site.slug,
                chatbot_id=who.id,
                chat_session=msg.chat_session,
                source=msg.chat_source,
                client_id=msg.chat_sender,
                client_name=msg.client_name or f"Client {msg.chat_sender[-4:]}",
                contact_urn=msg.contact_urn,
                contact_uuid=msg.contact_uuid,
                location=(msg.location or "").upper() or None,
                risk=risk.value,
                risk_rank=risk.rank,
                status=ConversationStatus.QUEUED.value,
                created_at=t,
                queued_at=t,
            )
            # Told before it is added: its INSERT then carries what it was told (no UPDATE after it).
            await notices.conversation_created(core, tx, conv, t)  # queued, or out_of_hours
            s.add(conv)
            tx.wake_hunter = True
            queue_changed = True
        else:
            if path_site is not None and path_site not in (conv.site, conv.origin_site):
                raise Conflict(f"conversation {msg.chat_session!r} belongs to another site")
            if conv.status == ConversationStatus.CLOSED:
                raise Conflict(f"conversation {msg.chat_session!r} is closed")
            before = (conv.contact_urn, conv.contact_uuid, conv.risk, conv.risk_rank)
            after = refreshed_contact(before, msg)
            if after != before:
                conv.contact_urn, conv.contact_uuid, conv.risk, conv.risk_rank = after
            # The queue's order and the dashboards change with a new conversation or a higher risk;
            # another message in a conversation does not change them: no event to every socket of the site.
            queue_changed = after[3] != before[3]
        delivery = "delivered" if conv.status == ConversationStatus.ASSIGNED else "queued"
        m = Message(
            uuid=str(uuid.uuid4()),
            conversation_id=conv.id,
            direction="in",
            external_id=msg.message_id or str(uuid.uuid4()),
            text=msg.chat_message,
            status=delivery,
            created_at=t,
            status_at=t,
        )
        s.add(m)
        body = {
            "status": "success",
            "uuid": m.uuid,
            "chat_session": conv.chat_session,
            "message_id": m.external_id,
            "delivery": delivery,
            "created": created,
        }
        metrics.MESSAGES_IN.labels(conv.site).inc()
        if msg.message_id is not None:
            s.add(
                IdempotencyKey(
                    chatbot_id=who.id,
                    message_id=msg.message_id,
                    conversation_id=conv.id,
                    response=json.dumps(body),
                    created_at=t,
                )
            )
        if conv.status == ConversationStatus.ASSIGNED and conv.counselor_id is not None:
            await s.flush()  # the message's id, for its view
            # The answer's "delivery" tells the chatbot; RapidPro hears of it when the counselor reads.
            tx.notify(conv.counselor_id, "message", message=message_view(m))
        if queue_changed:
            tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)
        return Answer(True, body)


class InboundBatcher:
    """``max_in_flight`` transactions at once: 1 on SQLite (one writer anyway); on PostgreSQL a few,
    so that one batch's commit (its WAL flush) overlaps the next batch's statements. Messages of
    one chat in two batches still go in order: a batch with a chat of a batch still running starts
    once that one has ended (row locks alone would not do: the earlier batch may still be waiting
    for another conversation's lock when the later one takes this one's)."""

    @staticmethod
    def of(core: Core) -> InboundBatcher:
        """The instance's batcher (a component of the core)."""
        return core.component(
            InboundBatcher, lambda c: InboundBatcher(c, max_in_flight=1 if is_sqlite(c.settings.database_url) else 4)
        )

    def __init__(self, core: Core, max_in_flight: int = 1) -> None:
        self.core = core
        self.max_in_flight = max_in_flight
        self._waiting: list[_Item] = []
        self._running: set[asyncio.Task[None]] = set()
        self._kick_scheduled = False
        # Per chat with handed-back messages not yet stored: the last one's ``done``.
        self._lanes: dict[ChatKey, asyncio.Future[None]] = {}
        # Per chat in a running batch: the last batch that has it (the next one waits for it to end,
        # and then finds the lanes it opened).
        self._busy: dict[ChatKey, asyncio.Task[None]] = {}

    async def submit(self, who: Principal, msg: ChatIn, path_site: str | None, alone: Alone) -> Answer:
        """Store ``msg`` with others, or, if the batch hands it back, by ``alone`` in its turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer | _Turn] = loop.create_future()
        self._waiting.append(_Item(who, msg, path_site, future))
        if not self._kick_scheduled:
            # After the requests already runnable in this turn of the loop have handed theirs over.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        try:
            outcome = await future
        except asyncio.CancelledError:
            # Cancelled after the batch handed it back, before it woke: its place must not block the lane.
            if future.done() and not future.cancelled() and future.exception() is None:
                if isinstance(turn := future.result(), _Turn):
                    turn.release()
            raise
        if isinstance(outcome, Answer):
            return outcome
        try:
            if outcome.after is not None:
                await asyncio.wait({outcome.after})  # unlike an await, it leaves ``after`` alone if cancelled
            return await alone(outcome.new)
        finally:
            outcome.release()

    def _turn(self, item: _Item, new: bool) -> _Turn:
        """The next place in ``item``'s chat lane. Only a lane's first message can be new: the
        earlier ones may have created the conversation."""
        after = self._lanes.get(item.chat)
        turn = _Turn(new=new and after is None, after=after)
        self._lanes[item.chat] = turn.done
        turn.done.add_done_callback(lambda done: self._lane_done(item.chat, done))
        return turn

    def _lane_done(self, chat: ChatKey, done: asyncio.Future[None]) -> None:
        if self._lanes.get(chat) is done:  # the lane's last message: the lane is empty
            del self._lanes[chat]

    def _kick(self) -> None:
        self._kick_scheduled = False
        while self._waiting and len(self._running) < self.max_in_flight:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            chats = {item.chat for item in batch}
            after = {self._busy[chat] for chat in chats if chat in self._busy}
            task = asyncio.create_task(self._run(batch, after), name="inbound-batch")
            self._busy.update(dict.fromkeys(chats, task))
            self._running.add(task)
            task.add_done_callback(functools.partial(self._done, chats))

    def _done(self, chats: set[ChatKey], task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        for chat in chats:
            if self._busy.get(chat) is task:  # no later batch has this chat
                del self._busy[chat]
        self._kick()

    async def _run(self, batch: list[_Item], after: set[asyncio.Task[None]]) -> None:
        outcomes: list[Answer | Exception | _Turn | None] = [None] * len(batch)
        committed = False
        try:
            if after:  # batches before it with some of its chats (a wait does not cancel them)
                await asyncio.wait(after)
            await self._write(batch, outcomes)
            committed = True
        except Exception as exc:  # the whole transaction failed: each message is retried alone
            metrics.INBOUND_BATCH_FAILED.inc()
            log.info("inbound_batch_retried_alone", size=len(batch), error=type(exc).__name__)
        finally:
            if not committed:  # failed, or cancelled
                self._hand_back_the_rest(batch, outcomes)
            for item, outcome in zip(batch, outcomes, strict=True):
                assert outcome is not None
                if item.future.done():  # its request was cancelled
                    if isinstance(outcome, _Turn):
                        outcome.release()
                elif isinstance(outcome, Exception):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    def _hand_back_the_rest(self, batch: list[_Item], outcomes: list[Answer | Exception | _Turn | None]) -> None:
        """Every message not already handed back is, in batch order, to be stored alone."""
        for i, item in enumerate(batch):
            if not isinstance(outcomes[i], _Turn):
                outcomes[i] = self._turn(item, new=False)

    async def _write(self, batch: list[_Item], outcomes: list[Answer | Exception | _Turn | None]) -> None:
        """Fills in ``outcomes``; they stand if it returns (committed)."""
        metrics.INBOUND_BATCH.observe(len(batch))
        t = now()
        async with self.core.tx() as tx:
            conn = await tx.session.connection()
            firsts: dict[tuple[int, str], str] = {}
            keys = {(it.who.id, it.msg.message_id) for it in batch if it.msg.message_id is not None}
            if keys:
                rows = await conn.execute(
                    select(_K.c.chatbot_id, _K.c.message_id, _K.c.response).where(
                        _pairs_in(_K.c.chatbot_id, _K.c.message_id, keys)
                    )
                )
                firsts = {(r.chatbot_id, r.message_id): r.response for r in rows}
            sessions = {(it.who.id, it.msg.chat_session) for it in batch}
            rows = await conn.execute(
                select(
                    _C.id,
                    _C.chatbot_id,
                    _C.chat_session,
                    _C.site,
                    _C.origin_site,
                    _C.status,
                    _C.counselor_id,
                    _C.risk,
                    _C.risk_rank,
                    _C.contact_urn,
                    _C.contact_uuid,
                )
                .where(_pairs_in(_C.chatbot_id, _C.chat_session, sessions))
                .order_by(_C.id)  # one lock order for every writer
                .with_for_update()
            )
            convs = {(r.chatbot_id, r.chat_session): dict(r._mapping) for r in rows}
            changed: dict[str, dict[str, Any]] = {}
            messages: list[dict[str, Any]] = []
            idem: list[dict[str, Any]] = []
            placed: list[tuple[int, dict[str, Any]]] = []  # (item index, its conversation) per message
            for i, it in enumerate(batch):
                msg = it.msg
                key = (it.who.id, msg.message_id) if msg.message_id is not None else None
                if it.chat in self._lanes:  # earlier messages of this chat are still to be stored alone
                    outcomes[i] = self._turn(it, new=False)
                    continue
                try:
                    if key is not None and key in firsts:
                        outcomes[i] = repeat_answer(firsts[key], msg)
                        continue
                    conv = convs.get((it.who.id, msg.chat_session))
                    if conv is None:
                        outcomes[i] = self._turn(it, new=True)  # the one-message path creates it
                        continue
                    if it.path_site is not None and it.path_site not in (conv["site"], conv["origin_site"]):
                        raise Conflict(f"conversation {msg.chat_session!r} belongs to another site")
                    if conv["status"] == ConversationStatus.CLOSED:
                        raise Conflict(f"conversation {msg.chat_session!r} is closed")
                except Conflict as exc:
                    outcomes[i] = exc
                    continue
                before: Contact = (conv["contact_urn"], conv["contact_uuid"], conv["risk"], conv["risk_rank"])
                after = refreshed_contact(before, msg)
                if after != before:
                    conv.update(zip(_CONTACT, after, strict=True))
                    changed[conv["id"]] = conv
                if after[3] != before[3]:  # the queue's order and the dashboards change
                    tx.notify_site(conv["site"], "queue_changed", conversation_id=conv["id"])
                delivery = "delivered" if conv["status"] == ConversationStatus.ASSIGNED else "queued"
                row = {
                    "uuid": str(uuid.uuid4()),
                    "conversation_id": conv["id"],
                    "direction": "in",
                    "external_id": msg.message_id or str(uuid.uuid4()),
                    "text": msg.chat_message,
                    "status": delivery,
                    "created_at": t,
                    "status_at": t,
                }
                body = {
                    "status": "success",
                    "uuid": row["uuid"],
                    "chat_session": msg.chat_session,
                    "message_id": row["external_id"],
                    "delivery": delivery,
                    "created": False,
                }
                messages.append(row)
                placed.append((i, conv))
                outcomes[i] = Answer(True, body)
                if key is not None:
                    response = json.dumps(body)
                    firsts[key] = response  # a repeat later in this batch gets this answer
                    idem.append(
                        {
                            "chatbot_id": key[0],
                            "message_id": key[1],
                            "conversation_id": conv["id"],
                            "response": response,
                            "created_at": t,
                        }
                    )
            for conv in changed.values():
                await conn.execute(
                    update(_CONVERSATIONS)
                    .where(_C.id == conv["id"])
                    .values(
                        risk=conv["risk"],
                        risk_rank=conv["risk_rank"],
                        contact_urn=conv["contact_urn"],
                        contact_uuid=conv["contact_uuid"],
                    )
                )
            if messages:
                ids = (
                    await conn.execute(insert(_M).returning(_M.c.id, sort_by_parameter_order=True), messages)
                ).scalars()
                for row, id_, (_i, conv) in zip(messages, ids, placed, strict=True):
                    metrics.MESSAGES_IN.labels(conv["site"]).inc()
                    if conv["status"] == ConversationStatus.ASSIGNED and conv["counselor_id"] is not None:
                        # The answer's "delivery" tells the chatbot; RapidPro hears of it when the counselor reads.
                        tx.notify(conv["counselor_id"], "message", message=message_view(Message(id=id_, **row)))
            if idem:
                await conn.execute(insert(_K), idem)


def _pairs_in(
    owner: ColumnElement[int], name: ColumnElement[str], pairs: Iterable[tuple[int, str]]
) -> ColumnElement[bool]:
    """``(owner, name) IN pairs``, written per owner (usually one chatbot): ``owner = ? AND name IN (...)``,
    which binds faster than a tuple IN and uses the same unique index."""
    by_owner: dict[int, list[str]] = {}
    for o, n in pairs:
        by_owner.setdefault(o, []).append(n)
    return or_(*(and_(owner == o, name.in_(sorted(names))) for o, names in sorted(by_owner.items())))


_CONTACT = ("contact_urn", "contact_uuid", "risk", "risk_rank")
Contact = tuple[str | None, str | None, str, int]


def refreshed_contact(current: Contact, msg: ChatIn) -> Contact:
    """A conversation's (contact_urn, contact_uuid, risk, risk_rank) after a later message of it,
    which may bring the contact's URN or UUID, or a higher risk (never a lower one)."""
    urn, uuid_, risk, risk_rank = current
    if msg.risk is not None and msg.risk.rank > risk_rank:
        risk, risk_rank = msg.risk.value, msg.risk.rank
    return msg.contact_urn or urn, msg.contact_uuid or uuid_, risk, risk_rank
