"""``POST /api/chat/``, the whole of it: a chatbot message, written in batches (one transaction for many).

A message has one way in, :func:`post_chat`, and one way to be stored, :class:`_Writing`: the
message row, its 201 body and its idempotency record are built in one place whether the
transaction holds one message or two hundred (mailroom's "one path for one or many").
``domain.conversations`` keeps what follows (close, acknowledge, list).

Under load, many ``POST /api/chat/`` requests are in flight at once. Each one hands its message
to the :class:`InboundBatcher` and waits; the batcher takes everything waiting and writes it in
one transaction: one read of the idempotency keys, one read (and lock) of the conversations, the
new conversations (routing, first notice, the hunter's wake-up), one multi-row INSERT of the
messages and one of the keys, one commit. Each request gets its own answer (or its own error)
only after that commit, so a 201 still means "stored".

If the batch's transaction fails as a whole (a constraint a concurrent writer tripped, say: on
PostgreSQL, another instance creating the same conversation), every request in it is handed back
and stored alone: the same :class:`_Writing`, for a batch of one in a transaction of its own, so
one bad message fails only itself. Stored alone, a message whose conversation or ``message_id``
a concurrent writer has just created trips a unique constraint and is tried once more (it then
finds the conversation to add to, or the repeat).

Handed-back messages keep their order: those of one chat are stored alone one at a time, in the
order they arrived (a :class:`_Turn` each, in the chat's lane), and a later batch hands a chat's
messages back too while that chat's lane is not empty, rather than store them ahead.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from sqlalchemy import ColumnElement, Table, and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from helpline.config.sites import Site
from helpline.domain import notices
from helpline.domain.auth import Principal, require_chatbot
from helpline.domain.errors import Conflict, DomainError, NotFound
from helpline.domain.states import ConversationStatus, Risk
from helpline.domain.views import message_view
from helpline.runtime import metrics
from helpline.runtime.core import Core, Tx, now
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


ChatKey = tuple[int, str]  # (chatbot id, chat_session)


async def post_chat(core: Core, who: Principal, msg: ChatIn, *, path_site: str | None) -> Answer:
    """One chatbot message: stored (``created``, answered 201) once its transaction has committed,
    or a repeat of a ``message_id`` (answered 200 with the first answer)."""
    require_chatbot(who, path_site)
    return await InboundBatcher.of(core).submit(who, msg, path_site)


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


_CONTACT = ("contact_urn", "contact_uuid", "risk", "risk_rank")
Contact = tuple[str | None, str | None, str, int]


def refreshed_contact(current: Contact, msg: ChatIn) -> Contact:
    """A conversation's (contact_urn, contact_uuid, risk, risk_rank) after a later message of it,
    which may bring the contact's URN or UUID, or a higher risk (never a lower one)."""
    urn, uuid_, risk, risk_rank = current
    if msg.risk is not None and msg.risk.rank > risk_rank:
        risk, risk_rank = msg.risk.value, msg.risk.rank
    return msg.contact_urn or urn, msg.contact_uuid or uuid_, risk, risk_rank


# -- Storing: one transaction's messages, one or many ------------------------------------------

# What a transaction reads (and locks) of each conversation it adds messages to.
_SEEN = (
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
Seen = dict[str, Any]
"""A conversation as a transaction sees it: the columns of ``_SEEN`` by name."""


@dataclass
class _Item:
    """A message waiting for its transaction, and its request's future."""

    who: Principal
    msg: ChatIn
    path_site: str | None
    future: asyncio.Future[Answer | _Turn]

    @property
    def chat(self) -> ChatKey:
        return (self.who.id, self.msg.chat_session)

    @property
    def key(self) -> tuple[int, str] | None:
        """Its idempotency key, if the chatbot gave a ``message_id``."""
        return None if self.msg.message_id is None else (self.who.id, self.msg.message_id)


class _Writing:
    """What one transaction stores: read once for all its messages (:meth:`read`), each message
    placed in turn (:meth:`place`: its checks, its rows, its answer), all written at once
    (:meth:`write`). A batch and a message stored alone differ only in how many it places."""

    def __init__(
        self, core: Core, tx: Tx, t: float, firsts: dict[tuple[int, str], str], convs: dict[ChatKey, Seen]
    ) -> None:
        self.core = core
        self.tx = tx
        self.t = t
        self.firsts = firsts  # the first answers to the items' message_ids, and to those placed since
        self.convs = convs  # the items' conversations, and those created since
        self.changed: dict[str, Seen] = {}  # by id: conversations whose contact or risk a message changed
        self.messages: list[dict[str, Any]] = []  # the message rows, in the order placed
        self.placed: list[Seen] = []  # each message row's conversation
        self.keys: list[dict[str, Any]] = []  # the idempotency rows
        self.created = False  # new conversations, flushed by the ORM before the messages
        # By conversation id, its latest client message (text, when, the answer it got), for the
        # dedupe window; the ones placed in this transaction replace those read.
        self.previous: dict[str, tuple[str, float, dict[str, Any]]] = {}

    @classmethod
    async def read(cls, core: Core, tx: Tx, t: float, items: list[_Item]) -> _Writing:
        """The items' first answers and their conversations (locked, in one order for every writer)."""
        conn = await tx.session.connection()
        firsts: dict[tuple[int, str], str] = {}
        keys = {key for it in items if (key := it.key) is not None}
        if keys:
            rows = await conn.execute(
                select(_K.c.chatbot_id, _K.c.message_id, _K.c.response).where(
                    _pairs_in(_K.c.chatbot_id, _K.c.message_id, keys)
                )
            )
            firsts = {(r.chatbot_id, r.message_id): r.response for r in rows}
        rows = await conn.execute(
            select(*_SEEN)
            .where(_pairs_in(_C.chatbot_id, _C.chat_session, {it.chat for it in items}))
            .order_by(_C.id)  # one lock order for every writer
            .with_for_update()
        )
        writing = cls(core, tx, t, firsts, {(r.chatbot_id, r.chat_session): dict(r._mapping) for r in rows})
        await writing._read_previous(items)
        return writing

    async def _read_previous(self, items: list[_Item]) -> None:
        """The latest client message of each conversation that a keyless item may repeat."""
        ids = {
            conv["id"]
            for it in items
            if it.key is None
            and (conv := self.convs.get(it.chat)) is not None
            and _dedupe_window(self.core, conv["site"]) > 0
        }
        if not ids:
            return
        conn = await self.tx.session.connection()
        latest = (
            select(_M.c.id)
            .where(_M.c.conversation_id == _C.id, _M.c.direction == "in")
            .order_by(_M.c.id.desc())
            .limit(1)
            .correlate(_CONVERSATIONS)
            .scalar_subquery()
        )
        rows = await conn.execute(
            select(
                _M.c.conversation_id,
                _M.c.uuid,
                _M.c.external_id,
                _M.c.text,
                _M.c.status,
                _M.c.created_at,
                _C.chat_session,
                _C.created_at.label("conversation_created_at"),
            )
            .join(_CONVERSATIONS, _C.id == _M.c.conversation_id)
            .where(_M.c.id.in_(select(latest).where(_C.id.in_(sorted(ids))).scalar_subquery()))
        )
        for r in rows:
            created = r.created_at == r.conversation_created_at  # the message that created the conversation
            body = _body(r.chat_session, r.uuid, r.external_id, _delivery_of(r.status), created=created)
            self.previous[r.conversation_id] = (r.text, r.created_at, body)

    async def place(self, item: _Item) -> Answer:
        """``item``'s answer; its rows are written by :meth:`write`. A :class:`DomainError` (a
        repeat from another chat, a closed conversation, a site the chatbot may not use) is
        raised before anything of ``item`` is placed."""
        if item.key is not None and item.key in self.firsts:
            return repeat_answer(self.firsts[item.key], item.msg)
        conv = self.convs.get(item.chat)
        if conv is None:
            site = _site_for(self.core, item)  # its checks, before anything is written
            return self._message(item, await self._create(item, site), created=True)
        _check_continues(conv, item)
        repeat = self._repeat_of_previous(item, conv)
        if repeat is not None:
            return repeat
        self._refresh(conv, item.msg)
        return self._message(item, conv, created=False)

    def _repeat_of_previous(self, item: _Item, conv: Seen) -> Answer | None:
        """A keyless message that repeats its conversation's previous one within the site's dedupe
        window (a RapidPro webhook retried after a timeout): the first answer, marked duplicate."""
        if item.key is not None:
            return None
        previous = self.previous.get(conv["id"])
        window = _dedupe_window(self.core, conv["site"])
        if previous is None or window <= 0:
            return None
        text, at, body = previous
        if text != item.msg.chat_message or self.t - at > window:
            return None
        log.info("inbound_duplicate", conversation_id=conv["id"])
        return Answer(False, {**body, "duplicate": True})

    async def _create(self, item: _Item, site: Site) -> Seen:
        """``item``'s new conversation at ``site``: queued, told so (or ``out_of_hours``), hunted."""
        conv = _new_conversation(item, site, self.t)
        # Told before it is added: its INSERT then carries what it was told (no UPDATE after it).
        await notices.conversation_created(self.core, self.tx, conv, self.t)
        self.tx.session.add(conv)
        self.created = True
        self.tx.wake_hunter = True
        self.tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)  # the queue's order changed
        seen = self.convs[item.chat] = {column.name: getattr(conv, column.name) for column in _SEEN}
        return seen

    def _refresh(self, conv: Seen, msg: ChatIn) -> None:
        """What a later message says of the contact: its URN or UUID, a higher risk."""
        before: Contact = (conv["contact_urn"], conv["contact_uuid"], conv["risk"], conv["risk_rank"])
        after = refreshed_contact(before, msg)
        if after != before:
            conv.update(zip(_CONTACT, after, strict=True))
            self.changed[conv["id"]] = conv
        # The queue's order and the dashboards change with a higher risk; another message in a
        # conversation does not change them: no event to every socket of the site.
        if after[3] != before[3]:
            self.tx.notify_site(conv["site"], "queue_changed", conversation_id=conv["id"])

    def _message(self, item: _Item, conv: Seen, *, created: bool) -> Answer:
        """The message row, its 201 body, and with a ``message_id`` the idempotency row that
        answers a repeat with that same body (a repeat later in this transaction included)."""
        msg = item.msg
        delivery = "delivered" if conv["status"] == ConversationStatus.ASSIGNED else "queued"
        row = {
            "uuid": str(uuid.uuid4()),
            "conversation_id": conv["id"],
            "direction": "in",
            "external_id": msg.message_id or str(uuid.uuid4()),
            "text": msg.chat_message,
            "status": delivery,
            "created_at": self.t,
            "status_at": self.t,
        }
        body = _body(msg.chat_session, row["uuid"], row["external_id"], delivery, created=created)
        self.previous[conv["id"]] = (msg.chat_message, self.t, body)
        self.messages.append(row)
        self.placed.append(conv)
        if item.key is not None:
            response = self.firsts[item.key] = json.dumps(body)
            self.keys.append(
                {
                    "chatbot_id": item.key[0],
                    "message_id": item.key[1],
                    "conversation_id": conv["id"],
                    "response": response,
                    "created_at": self.t,
                }
            )
        return Answer(True, body)

    async def write(self) -> None:
        """Everything placed: the new conversations (with their notices), the contact changes,
        the messages in one INSERT (their ids in the order placed), the idempotency rows."""
        if self.created:
            await self.tx.session.flush()  # before the messages that refer to them
        conn = await self.tx.session.connection()
        for conv in self.changed.values():
            await conn.execute(update(_CONVERSATIONS).where(_C.id == conv["id"]).values({c: conv[c] for c in _CONTACT}))
        if self.messages:
            ids = (
                await conn.execute(insert(_M).returning(_M.c.id, sort_by_parameter_order=True), self.messages)
            ).scalars()
            for row, id_, conv in zip(self.messages, ids, self.placed, strict=True):
                metrics.MESSAGES_IN.labels(conv["site"]).inc()
                if conv["status"] == ConversationStatus.ASSIGNED and conv["counselor_id"] is not None:
                    # The answer's "delivery" tells the chatbot; RapidPro hears of it when the counselor reads.
                    self.tx.notify(conv["counselor_id"], "message", message=message_view(Message(id=id_, **row)))
        if self.keys:
            await conn.execute(insert(_K), self.keys)


def _body(chat_session: str, uuid_: str, message_id: str, delivery: str, *, created: bool) -> dict[str, Any]:
    """The answer to a stored message (201; 200 with the same body to a repeat)."""
    return {
        "status": "success",
        "uuid": uuid_,
        "chat_session": chat_session,
        "message_id": message_id,
        "delivery": delivery,
        "created": created,
    }


def _delivery_of(status: str) -> str:
    """A client message's status as the answer's ``delivery`` (``queued``, ``delivered``, ``read``)."""
    return status if status in ("queued", "delivered", "read") else "queued"


def _dedupe_window(core: Core, slug: str) -> float:
    site = core.sites.get(slug)
    return site.dedupe_window_s if site is not None else 0.0


def _site_for(core: Core, item: _Item) -> Site:
    """A new conversation's site: the path's, the ``location``'s, the chatbot's own, the default."""
    site = core.sites.choose(path_slug=item.path_site, location=item.msg.location, home=item.who.site)
    if site is None:
        raise NotFound(f"unknown site {item.path_site!r}")
    item.who.require_site(site.slug)
    return site


def _check_continues(conv: Seen, item: _Item) -> None:
    """``item`` may join ``conv``: a conversation of the path's site (or that came in through it), not closed."""
    if item.path_site is not None and item.path_site not in (conv["site"], conv["origin_site"]):
        raise Conflict(f"conversation {item.msg.chat_session!r} belongs to another site")
    if conv["status"] == ConversationStatus.CLOSED:
        raise Conflict(f"conversation {item.msg.chat_session!r} is closed")


def _new_conversation(item: _Item, site: Site, t: float) -> Conversation:
    """``item``'s chat as a conversation queued at ``site`` since ``t``, with what its first message says."""
    msg = item.msg
    risk = msg.risk or Risk(site.default_risk)  # the chatbot hands over the cases it judges high-risk
    return Conversation(
        id=str(uuid.uuid4()),
        site=site.slug,
        chatbot_id=item.who.id,
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


def _pairs_in(
    owner: ColumnElement[int], name: ColumnElement[str], pairs: Iterable[tuple[int, str]]
) -> ColumnElement[bool]:
    """``(owner, name) IN pairs``, written per owner (usually one chatbot): ``owner = ? AND name IN (...)``,
    which binds faster than a tuple IN and uses the same unique index."""
    by_owner: dict[int, list[str]] = {}
    for o, n in pairs:
        by_owner.setdefault(o, []).append(n)
    return or_(*(and_(owner == o, name.in_(sorted(names))) for o, names in sorted(by_owner.items())))


# -- Batching: who goes in which transaction, and in which order --------------------------------


@dataclass(frozen=True)
class _Turn:
    """A handed-back message's place in its chat's lane: it goes once ``after`` (the message
    handed back before it in that chat) is done, and sets ``done`` when it is."""

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


Outcomes = list[Answer | Exception | _Turn | None]
"""Per message of a batch: its answer, its error, its turn to be stored alone, or not yet known."""


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

    async def submit(self, who: Principal, msg: ChatIn, path_site: str | None) -> Answer:
        """Store ``msg`` with others, or, if its batch hands it back, alone in its turn."""
        loop = asyncio.get_running_loop()
        item = _Item(who, msg, path_site, loop.create_future())
        self._waiting.append(item)
        if not self._kick_scheduled:
            # After the requests already runnable in this turn of the loop have handed theirs over.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        try:
            outcome = await item.future
        except asyncio.CancelledError:
            # Cancelled after the batch handed it back, before it woke: its place must not block the lane.
            future = item.future
            if future.done() and not future.cancelled() and future.exception() is None:
                if isinstance(turn := future.result(), _Turn):
                    turn.release()
            raise
        if isinstance(outcome, Answer):
            return outcome
        try:
            if outcome.after is not None:
                await asyncio.wait({outcome.after})  # unlike an await, it leaves ``after`` alone if cancelled
            return await self._alone(item)
        finally:
            outcome.release()

    async def _alone(self, item: _Item) -> Answer:
        """``item`` in a transaction of its own. A concurrent request with the same message_id or
        chat_session may have won the race: its row is committed now, so the second try finds it
        (a repeat, or the conversation to add to)."""
        try:
            return await self._store_alone(item)
        except IntegrityError:
            return await self._store_alone(item)

    async def _store_alone(self, item: _Item) -> Answer:
        t = now()
        async with self.core.tx() as tx:
            writing = await _Writing.read(self.core, tx, t, [item])
            answer = await writing.place(item)  # its error rolls back nothing but reads
            await writing.write()
            return answer

    def _turn(self, item: _Item) -> _Turn:
        """The next place in ``item``'s chat lane."""
        turn = _Turn(after=self._lanes.get(item.chat))
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
        outcomes: Outcomes = [None] * len(batch)
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

    def _hand_back_the_rest(self, batch: list[_Item], outcomes: Outcomes) -> None:
        """Every message not already handed back is, in batch order, to be stored alone."""
        for i, item in enumerate(batch):
            if not isinstance(outcomes[i], _Turn):
                outcomes[i] = self._turn(item)

    async def _write(self, batch: list[_Item], outcomes: Outcomes) -> None:
        """Fills in ``outcomes``; they stand if it returns (committed)."""
        metrics.INBOUND_BATCH.observe(len(batch))
        t = now()
        async with self.core.tx() as tx:
            writing = await _Writing.read(self.core, tx, t, batch)
            for i, item in enumerate(batch):
                if item.chat in self._lanes:  # earlier messages of this chat are still to be stored alone
                    outcomes[i] = self._turn(item)
                    continue
                try:
                    outcomes[i] = await writing.place(item)
                except DomainError as exc:
                    outcomes[i] = exc
            await writing.write()
