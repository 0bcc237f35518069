"""Hypothesis state machines: no sequence of events reaches an illegal state.

(a) Pure: ``helpline.domain.states`` against the graph DESIGN.md documents. Every legal move
    lands where it should, every other one raises ``Conflict`` (an unknown state ``ValueError``),
    and the states a conversation or an offer passes through always follow the graph.
(b) The real domain on a real server, store included: a chatbot posts, continues and closes;
    counselors join, pause and leave the queue, read and decline offers, reply, mark read and
    close; the hunter hunts and offers lapse. The hunter is driven by the rules (the server runs no
    background loops) and time passes by moving deadlines into the past, so every example is
    deterministic. After every step the store is checked against the invariants (``check_store``)
    and every change in it against the graphs (``check_moves``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import delete, select, update

from conftest import PASSWORD, sites_toml
from helpline.app import create_app
from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.delivery.rapidpro import split_text
from helpline.domain import auth
from helpline.domain.auth import issue_service_token
from helpline.domain.errors import Conflict
from helpline.domain.states import (
    ConversationStatus,
    OfferStatus,
    can_move_conversation,
    can_move_offer,
    move_conversation,
    move_offer,
)
from helpline.routing.hunt import Hunter
from helpline.store.models import Agent, ApiToken, Base, Conversation, LoginFailure, Message, Offer, OutboxEvent, User
from helpline.testing.fake_rapidpro import FakeRapidPro
from helpline.testing.live import LiveServer

# The graph of DESIGN.md ("Hunting"): queued -> offered -> assigned -> closed, back to queued when an
# offer lapses; closing ends a conversation in any state; a transfer puts an assigned one back in a
# queue. An offer is pending until it is read, times out, is declined or withdrawn: all final.
CONVERSATION_GRAPH: dict[str, set[str]] = {
    "queued": {"offered", "closed"},
    "offered": {"queued", "assigned", "closed"},
    "assigned": {"closed", "queued"},
    "closed": set(),
}
OFFER_GRAPH: dict[str, set[str]] = {
    "pending": {"read", "timed_out", "declined", "withdrawn"},
    "read": set(),
    "timed_out": set(),
    "declined": set(),
    "withdrawn": set(),
}
MAX_CHATS = 2
MAX_OPEN = 5  # conversations open at once: more than two counselors can take
PICK = st.integers(min_value=0, max_value=10_000)  # an index into whatever exists, modulo its length


def test_the_graphs_are_the_documented_ones() -> None:
    assert set(CONVERSATION_GRAPH) == {s.value for s in ConversationStatus}
    assert set(OFFER_GRAPH) == {s.value for s in OfferStatus}
    for src, dst in itertools.product(CONVERSATION_GRAPH, repeat=2):
        assert can_move_conversation(src, dst) == (dst in CONVERSATION_GRAPH[src]), (src, dst)
    for src, dst in itertools.product(OFFER_GRAPH, repeat=2):
        assert can_move_offer(src, dst) == (dst in OFFER_GRAPH[src]), (src, dst)


# --------------------------------------------------------------------------- (a) pure


class PureStates(RuleBasedStateMachine):
    """Conversations and offers moved at random through ``move_conversation`` / ``move_offer``."""

    def __init__(self) -> None:
        super().__init__()
        self.conversations: list[list[str]] = []  # each one's states so far, oldest first
        self.offers: list[list[str]] = []

    @rule()
    def new_conversation(self) -> None:
        self.conversations.append([ConversationStatus.QUEUED.value])  # every conversation starts queued

    @rule()
    def new_offer(self) -> None:
        self.offers.append([OfferStatus.PENDING.value])

    @precondition(lambda self: self.conversations)
    @rule(pick=PICK, dst=st.sampled_from(list(CONVERSATION_GRAPH)))
    def move_a_conversation(self, pick: int, dst: str) -> None:
        history = self.conversations[pick % len(self.conversations)]
        src = history[-1]
        if dst in CONVERSATION_GRAPH[src]:
            assert move_conversation(src, dst) == dst
            history.append(dst)
        else:
            with pytest.raises(Conflict):
                move_conversation(src, dst)

    @precondition(lambda self: self.offers)
    @rule(pick=PICK, dst=st.sampled_from(list(OFFER_GRAPH)))
    def move_an_offer(self, pick: int, dst: str) -> None:
        history = self.offers[pick % len(self.offers)]
        src = history[-1]
        if dst in OFFER_GRAPH[src]:
            assert move_offer(src, dst) == dst
            history.append(dst)
        else:
            with pytest.raises(Conflict):
                move_offer(src, dst)

    @rule(src=st.sampled_from(list(CONVERSATION_GRAPH)), dst=st.text(max_size=12))
    def unknown_states_are_refused(self, src: str, dst: str) -> None:
        if dst in CONVERSATION_GRAPH or dst in OFFER_GRAPH:
            return
        with pytest.raises(ValueError):
            move_conversation(src, dst)
        with pytest.raises(ValueError):
            move_conversation(dst, src)
        with pytest.raises(ValueError):
            move_offer(dst, "read")

    @invariant()
    def histories_follow_the_graph(self) -> None:
        for history in self.conversations:
            assert history[0] == "queued"
            for src, dst in itertools.pairwise(history):
                assert dst in CONVERSATION_GRAPH[src], history
            # assigned only ever through an offer; nothing after closed
            for i, state in enumerate(history):
                if state == "assigned":
                    assert history[i - 1] == "offered", history
            assert "closed" not in history[:-1], history
        for history in self.offers:
            assert history[0] == "pending" and len(history) <= 2, history
            assert all(state in OFFER_GRAPH for state in history), history


TestPureStates = PureStates.TestCase
TestPureStates.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, derandomize=True, database=None
)


# --------------------------------------------------------------------------- (b) the real domain


@dataclass(frozen=True)
class Row:
    """What the invariants need of one conversation or offer."""

    id: Any
    status: str
    counselor_id: int | None
    conversation_id: str | None = None
    deadline: float = 0.0
    resolved_at: float | None = None
    chat_session: str = ""


@dataclass
class Snapshot:
    conversations: dict[str, Row]
    offers: dict[int, Row]
    messages: list[tuple[int, str, str, str, int | None, str]]  # id, conversation, external_id, direction, by, text
    outbox: list[tuple[int, int | None, str, str, str]]  # id, message_ref, target, event, payload
    agents: dict[int, str]


class World:
    """A helpline without background loops: a chatbot, two counselors, and a hunter driven by hand."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.core = server.core
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.bot = self._client("weni", "chatbot", "*")
        self.counselors = [self._client(name, "counselor", "ke") for name in ("amina", "baraka")]
        self.ids = [self.user_id(name) for name in ("amina", "baraka")]
        self.hunter = Hunter(self.core)

    def _client(self, username: str, role: str, site: str) -> dict[str, str]:
        self.server.create_user(username, PASSWORD, role, site=site, name=username.title())
        token, _ = self.server.call(issue_service_token(self.core, username=username, ttl_s=3600))
        return {"Authorization": f"Token {token}"}

    def user_id(self, username: str) -> int:
        async def run() -> int:
            async with self.core.sessionmaker() as s:
                uid = await s.scalar(select(User.id).where(User.username == username))
                assert uid is not None
                return uid

        return self.server.call(run())

    def reset(self) -> None:
        """Empty the store but for users and tokens: every example starts from nothing."""
        keep = {User.__tablename__, ApiToken.__tablename__, LoginFailure.__tablename__}

        async def run() -> None:
            async with self.core.sessionmaker() as s, s.begin():
                for table in reversed(Base.metadata.sorted_tables):
                    if table.name not in keep:
                        await s.execute(delete(table))

        self.server.call(run())
        self.hunter = Hunter(self.core)

    def snapshot(self) -> Snapshot:
        async def run() -> Snapshot:
            async with self.core.sessionmaker() as s:
                convs = (await s.scalars(select(Conversation))).all()
                offers = (await s.scalars(select(Offer))).all()
                messages = (await s.scalars(select(Message).order_by(Message.id))).all()
                outbox = (await s.scalars(select(OutboxEvent).order_by(OutboxEvent.id))).all()
                agents = (await s.scalars(select(Agent))).all()
            return Snapshot(
                {c.id: Row(c.id, c.status, c.counselor_id, c.id, chat_session=c.chat_session) for c in convs},
                {
                    o.id: Row(o.id, o.status, o.counselor_id, o.conversation_id, o.deadline, o.resolved_at)
                    for o in offers
                },
                [(m.id, m.conversation_id, m.external_id, m.direction, m.counselor_id, m.text) for m in messages],
                [(e.id, e.message_ref, e.target, e.event, e.payload) for e in outbox],
                {a.user_id: a.status for a in agents},
            )

        return self.server.call(run())

    def post(self, path: str, who: dict[str, str], body: Any = None) -> httpx.Response:
        return self.http.post(path, json=body, headers=who)


def check_store(snap: Snapshot, counselor_ids: list[int]) -> None:
    """The invariants of the store, whatever happened before."""
    statuses = set(CONVERSATION_GRAPH)
    offers_of: dict[str, list[Row]] = {cid: [] for cid in snap.conversations}
    for o in snap.offers.values():
        assert o.status in OFFER_GRAPH, o
        assert o.conversation_id in offers_of, o
        assert (o.resolved_at is None) == (o.status == "pending"), o
        offers_of[str(o.conversation_id)].append(o)

    load: Counter[int] = Counter()
    for c in snap.conversations.values():
        assert c.status in statuses, c  # in exactly one of the four states
        pending = [o for o in offers_of[c.id] if o.status == "pending"]
        assert len({o.counselor_id for o in pending}) == len(pending), pending  # one offer per counselor
        read = [o for o in offers_of[c.id] if o.status == "read"]
        assert len(read) <= 1, (c, read)  # at most one counselor ever got it (no transfers here)
        if c.status == "assigned":
            assert c.counselor_id is not None, c
            assert len(read) == 1 and read[0].counselor_id == c.counselor_id, (c, read)
            assert not pending, (c, pending)
            load[c.counselor_id] += 1
        elif c.status == "offered":
            assert pending, c  # an offered conversation is in front of someone
            assert c.counselor_id is None and not read, (c, read)
        elif c.status == "queued":
            assert not pending, (c, pending)
            assert c.counselor_id is None and not read, (c, read)
        else:  # closed: by the chatbot at any time, or by its counselor
            assert not pending, (c, pending)
            if read:
                assert c.counselor_id == read[0].counselor_id, (c, read)
        load.update(o.counselor_id for o in pending if o.counselor_id is not None)
    for uid in counselor_ids:
        assert load[uid] <= MAX_CHATS, (uid, load)  # assigned + pending

    keys = Counter((conv, ext) for _, conv, ext, *_ in snap.messages)
    assert not [k for k, n in keys.items() if n > 1], keys  # no message twice
    parts: dict[int, list[dict[str, Any]]] = {}  # message id -> the params of its flow starts, in order
    for _, ref, target, event, payload in snap.outbox:
        if event == "message":
            assert ref is not None and target == "rapidpro", payload
            body = json.loads(payload)
            parts.setdefault(ref, []).append(body.get("params") or body["extra"])
    for mid, _conv, ext, direction, by, text in snap.messages:
        if direction == "out":  # exactly its events: the whole text, in order, never cut
            assert by is not None
            sent = parts.pop(mid, [])
            assert len(sent) == len(split_text(text)), (mid, len(text), len(sent))
            assert all(p["message_id"] == ext for p in sent), (mid, ext, sent)
            assert "".join(p["text"] for p in sent) == text, (mid, sent)
            if len(sent) > 1:
                assert [(p["part"], p["parts"]) for p in sent] == [
                    (str(i), str(len(sent))) for i in range(1, len(sent) + 1)
                ], sent
    assert not parts, f"outbox events of no counselor message: {sorted(parts)}"


def check_moves(before: Snapshot, after: Snapshot) -> None:
    """One step moves a conversation along the graph at most once; a final offer stays final.

    ``hunt`` may lapse an offer and offer the conversation again in one step: offered -> offered.
    """
    for cid, c in after.conversations.items():
        if cid in before.conversations:
            src = before.conversations[cid].status
            assert c.status == src or c.status in CONVERSATION_GRAPH[src], (src, c)
        else:
            assert c.status in ("queued", "offered"), c  # created by a chatbot message (and hunted)
    for oid, o in after.offers.items():
        if oid in before.offers:
            src = before.offers[oid].status
            assert o.status == src or o.status in OFFER_GRAPH[src], (src, o)
        else:
            assert o.status == "pending", o
    assert set(before.conversations) <= set(after.conversations)
    assert set(before.offers) <= set(after.offers)


Draw = st.DataObject


class DomainMachine(RuleBasedStateMachine):
    """Chatbot, counselors, hunter and clock, in any order, over HTTP against the real domain.

    One rule, ``event``, draws what happens next from the events possible in the current state,
    with the weights of ``EVENTS``: Hypothesis' own choice among many rules favours a few of them
    and rarely gets a conversation as far as assigned, replied to and closed by its counselor.
    """

    world: World  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.w = type(self).world
        self.serial = itertools.count(1)
        self.sessions: list[str] = []
        self.message_ids: set[str] = set()
        self.w.reset()  # every example starts from nothing
        self.snap = self.w.snapshot()

    @initialize(statuses=st.tuples(*[st.sampled_from(["available", "available", "paused", "offline"])] * 2))
    def counselors_start(self, statuses: tuple[str, str]) -> None:
        for who, status in enumerate(statuses):
            self._presence(who, status)

    @rule(data=st.data())
    def event(self, data: Draw) -> None:
        possible = [name for name, (weight, can) in EVENTS.items() if can(self) for _ in range(weight)]
        name = data.draw(st.sampled_from(possible), label="event")
        getattr(self, name)(data)

    # -- what the last snapshot says ---------------------------------------------------------------
    def _conversation(self, session: str) -> Row | None:
        return next((c for c in self.snap.conversations.values() if c.chat_session == session), None)

    def _open(self) -> int:
        return sum(c.status != "closed" for c in self.snap.conversations.values())

    def _pending_offers(self) -> list[Row]:
        return sorted((o for o in self.snap.offers.values() if o.status == "pending"), key=lambda o: int(o.id))

    def _with_counselor(self) -> list[Row]:
        rows = (c for c in self.snap.conversations.values() if c.counselor_id is not None)
        return sorted(rows, key=lambda c: c.chat_session)

    def _index(self, counselor_id: int | None) -> int:
        return self.w.ids.index(counselor_id) if counselor_id in self.w.ids else 0

    @staticmethod
    def _pick(data: Draw, rows: list[Any], label: str) -> Any:
        return rows[data.draw(st.integers(0, len(rows) - 1), label=label)]

    # -- the chatbot -------------------------------------------------------------------------------
    def chatbot_starts(self, data: Draw) -> None:
        """A new conversation; ``hunt``: the hunter, woken by it, runs before anything else happens."""
        session = f"s{next(self.serial)}"
        body = {"chat_sender": "23343411", "chat_message": "hello", "chat_session": session, "chat_source": "WENI"}
        risk = data.draw(st.sampled_from(["low", "medium", "high", None]), label="risk")
        if risk is not None:
            body["risk"] = risk
        r = self.w.post("/api/chat/", self.w.bot, body)
        assert r.status_code == 201, r.text
        self.sessions.append(session)
        self._maybe_hunt(data)

    def chatbot_continues(self, data: Draw) -> None:
        session = self._pick(data, self.sessions, "session")
        conv = self._conversation(session)
        assert conv is not None
        repeat = data.draw(st.booleans(), label="repeat")
        message_id = f"{session}-again" if repeat else f"m{next(self.serial)}"
        body = {"chat_sender": "23343411", "chat_message": "still there?", "chat_session": session}
        r = self.w.post("/api/chat/", self.w.bot, body | {"chat_source": "WENI", "message_id": message_id})
        if message_id in self.message_ids:
            assert r.status_code == 200, r.text  # a repeat: the first answer, closed or not
        elif conv.status == "closed":
            assert r.status_code == 409, r.text
        else:
            assert r.status_code == 201, r.text
            self.message_ids.add(message_id)

    def chatbot_closes(self, data: Draw) -> None:
        session = self._pick(data, self.sessions, "session")
        r = self.w.post(f"/api/chat/{session}/close/", self.w.bot, {"chat_source": "WENI"})
        assert r.status_code == 200, r.text  # also when it was closed already
        self._maybe_hunt(data)

    # -- counselors --------------------------------------------------------------------------------
    def _presence(self, who: int, status: str) -> None:
        r = self.w.http.put(
            "/api/agents/me/presence", json={"status": status, "reason": "busy"}, headers=self.w.counselors[who]
        )
        assert r.status_code == 200, r.text

    def counselor_presence(self, data: Draw) -> None:
        who = data.draw(st.sampled_from([0, 1]), label="counselor")
        self._presence(who, data.draw(st.sampled_from(["available", "paused", "offline"]), label="status"))
        self._maybe_hunt(data)

    def _offer_answer(self, who: int, offer: Row, r: httpx.Response) -> None:
        if offer.counselor_id != self.w.ids[who]:
            assert r.status_code == 404, r.text  # someone else's offer
        elif offer.status == "pending" and offer.deadline > time.time():
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 409, r.text  # read, declined, withdrawn, timed out or past its deadline

    def counselor_answers_an_offer(self, data: Draw) -> None:
        """The counselor a pending offer is for reads it, or declines it."""
        offer: Row = self._pick(data, self._pending_offers(), "offer")
        who = self._index(offer.counselor_id)
        verb = data.draw(st.sampled_from(["read", "read", "decline"]), label="answer")
        self._offer_answer(who, offer, self.w.post(f"/api/offers/{offer.id}/{verb}", self.w.counselors[who]))
        self._maybe_hunt(data)

    def counselor_tries_an_offer(self, data: Draw) -> None:
        """Any counselor, any offer: someone else's (404), no longer pending (409), or hers."""
        offer: Row = self._pick(data, sorted(self.snap.offers.values(), key=lambda o: int(o.id)), "offer")
        who = data.draw(st.sampled_from([0, 1]), label="counselor")
        verb = data.draw(st.sampled_from(["read", "decline"]), label="answer")
        self._offer_answer(who, offer, self.w.post(f"/api/offers/{offer.id}/{verb}", self.w.counselors[who]))

    def counselor_works(self, data: Draw) -> None:
        """A counselor on one of her conversations (assigned, or closed since): reply, read, close."""
        conv: Row = self._pick(data, self._with_counselor(), "conversation")
        self._work(data, self._index(conv.counselor_id), conv)

    def counselor_tries(self, data: Draw) -> None:
        """A counselor on any conversation: hers, someone else's or nobody's yet (404)."""
        rows = sorted(self.snap.conversations.values(), key=lambda c: c.chat_session)
        self._work(data, data.draw(st.sampled_from([0, 1]), label="counselor"), self._pick(data, rows, "conversation"))

    def _work(self, data: Draw, who: int, conv: Row) -> None:
        headers = self.w.counselors[who]
        action = data.draw(st.sampled_from(["reply", "reply", "read", "close"]), label="action")
        if action == "reply":
            length = data.draw(st.sampled_from([1, 640, 641, 1500]), label="length")
            text = ("word " * length)[:length]  # over 640 characters: sent to RapidPro in parts
            r = self.w.post(f"/api/conversations/{conv.id}/messages/", headers, {"text": text})
            ok = 201
        elif action == "read":
            r = self.w.post(f"/api/conversations/{conv.id}/read/", headers)
            ok = 200
        else:
            r = self.w.post(f"/api/conversations/{conv.id}/close/", headers, {"reason": "resolved"})
            ok = 200
        if conv.counselor_id != self.w.ids[who]:
            assert r.status_code == 404, r.text  # a counselor sees only her own conversations
        elif action == "close" or conv.status == "assigned":
            assert r.status_code == ok, r.text  # closing a closed one is fine too
        else:
            assert r.status_code == 409, r.text
        if action == "close":
            self._maybe_hunt(data)

    # -- the hunter and the clock ------------------------------------------------------------------
    def _maybe_hunt(self, data: Draw) -> None:
        """What wakes the hunter may be followed by a round of hunting before anything else."""
        if data.draw(st.booleans(), label="hunt"):
            self.hunter_runs(data)

    def hunter_runs(self, data: Draw) -> None:
        """Lapse what is due, then offer what is queued."""
        self.w.server.call(self.w.hunter.step())

    def time_passes(self, data: Draw) -> None:
        """The deadline of one pending offer (or of all) is behind us; then the hunter notices the
        lapse (``lapse``), runs a whole round (``hunt``) or is late (``late``)."""
        pending = self._pending_offers()
        every = data.draw(st.booleans(), label="all")
        ids = [o.id for o in pending] if every else [self._pick(data, pending, "offer").id]

        async def run() -> None:
            async with self.w.core.sessionmaker() as s, s.begin():
                await s.execute(update(Offer).where(Offer.id.in_(ids)).values(deadline=time.time() - 1))

        self.w.server.call(run())
        then = data.draw(st.sampled_from(["lapse", "hunt", "late"]), label="then")
        if then == "lapse":
            self.w.server.call(self.w.hunter.lapse_due())
        elif then == "hunt":
            self.hunter_runs(data)

    # -- after every step --------------------------------------------------------------------------
    @invariant()
    def the_store_is_consistent(self) -> None:
        after = self.w.snapshot()
        check_moves(self.snap, after)
        check_store(after, self.w.ids)
        self.snap = after


# Each event: its weight, and whether it can happen now. Hypothesis draws the first one possible
# more often than its weight says (it tries simple choices first): the hunter, harmless, is first.
EVENTS: dict[str, tuple[int, Callable[[DomainMachine], bool]]] = {
    "hunter_runs": (1, lambda m: True),
    "counselor_answers_an_offer": (4, lambda m: bool(m._pending_offers())),
    "counselor_works": (4, lambda m: bool(m._with_counselor())),
    "chatbot_starts": (3, lambda m: m._open() < MAX_OPEN),  # a small world: the other events act on it
    "chatbot_continues": (1, lambda m: bool(m.sessions)),
    "chatbot_closes": (1, lambda m: bool(m.sessions)),
    "counselor_presence": (2, lambda m: True),
    "counselor_tries_an_offer": (1, lambda m: bool(m.snap.offers)),
    "counselor_tries": (1, lambda m: bool(m.snap.conversations)),
    "time_passes": (2, lambda m: bool(m._pending_offers())),
}


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_hasher", PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1),)))


@pytest.fixture
def world(database_url: str, rapidpro: FakeRapidPro, tmp_path: Path) -> Iterator[World]:
    path = tmp_path / "sites.toml"
    path.write_text(sites_toml(rapidpro, strategy="ringall", offer_timeout_s=3600, max_chats=MAX_CHATS))
    s = Settings(database_url=database_url, sites=str(path), poll_interval_s=0.5)
    sites = SiteRegistry.from_toml(path)
    server = LiveServer(s, sites)
    server.app = create_app(s, sites, run_workers=False)  # the rules drive the hunter; no outbox sends
    server.start()
    w = World(server)
    try:
        yield w
    finally:
        w.http.close()
        server.stop()


@pytest.mark.timeout(600)  # ~15 s when it passes; shrinking a failure replays many sequences
def test_no_sequence_of_events_breaks_the_domain(world: World) -> None:
    DomainMachine.world = world
    run_state_machine_as_test(
        DomainMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
