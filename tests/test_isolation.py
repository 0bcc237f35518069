"""Per-site isolation: a chatbot, counselor or supervisor of site A reads and changes nothing of site B.

One server with two sites, ``ke`` (A) and ``tz`` (B). Site B gets data of every kind: conversations
assigned, offered and closed, a counselor's reply, Weni tickets open and closed, a dead letter and
audit entries. Then every route of the app is called by A's chatbot, Weni project, counselor and
supervisor with B's ids (and B's site in paths and filters), and each call must be refused the way
the API documents it (403 for a role or another site named in a path or filter, 404 for another
site's resource, the JSON error body of the API called); answers must not carry B's data, and
B's rows must be exactly as they were. A's WebSockets must hear none of B's events (nor B's of A's).

``ROUTES`` maps each route of the app to its case; ``EXEMPT`` lists the routes that take no
site-owned resource, and why. ``test_every_route_has_an_isolation_case`` walks ``app.routes``: a new
route without a case (or an exemption) fails it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import inspect, or_, select
from starlette.routing import Mount, Route, WebSocketRoute

from conftest import PASSWORD, PG_URL, reset_postgres
from helpline.app import create_app
from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.domain.auth import issue_service_token
from helpline.store.models import (
    Agent,
    AuditEntry,
    Conversation,
    IdempotencyKey,
    Message,
    Offer,
    OutboxEvent,
    Ticket,
    TicketRequest,
)
from helpline.testing.fake_chatbot import FakeChatbot
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro
from helpline.testing.fake_weni import FakeTicket, FakeWeni
from helpline.testing.live import LiveServer
from support import eventually

A, B = "ke", "tz"
SECRET = "whsec-isolation"
B_TEXT = "TZSECRET"  # in every text of site B
A_TEXT = "KESECRET"  # in every text of site A

CHATBOT_PREFIXES = ("/api", "/open/api", "/sites/{site}/api", "/sites/{site}/open/api")
WENI_PREFIXES = ("/v1", "/sites/{site}/v1")


def sites_file(base_url: str, token: str, flow: str) -> str:
    def site(slug: str, name: str, country: str, zone: str, scheme: str, default: bool) -> str:
        return textwrap.dedent(f"""
            [[site]]
            slug = "{slug}"
            name = "{name}"
            countries = ["{country}"]
            timezone = "{zone}"
            default = {"true" if default else "false"}
            [site.rapidpro]
            base_url = "{base_url}"
            token = "{token}"
            flow = "{flow}"
            urn_scheme = "{scheme}"
            [site.routing]
            strategy = "ringall"
            offer_timeout_s = 600
            retry_gap_s = 0
            max_chats_per_counselor = 20
            """)

    return site(A, "Childline Kenya", "KE", "Africa/Nairobi", "telegram", True) + site(
        B, "C-Sema Tanzania", "TZ", "Africa/Dar_es_Salaam", "whatsapp", False
    )


# --------------------------------------------------------------------------- the world


@dataclass
class SiteB:
    """What site B holds, by id."""

    assigned: str = ""  # conversation ids
    offered: str = ""
    closed: str = ""
    dead: str = ""
    ticket_open: str = ""  # external ids (= conversation ids)
    ticket_closed: str = ""
    sessions: dict[str, str] = field(default_factory=dict)  # conversation id -> chat_session
    offer_id: int = 0  # pending, to tumaini
    reply_id: str = ""  # message_id of tumaini's reply in ``assigned``
    dead_letter: int = 0  # outbox id
    tickets: dict[str, FakeTicket] = field(default_factory=dict)  # external id -> Weni's ticket

    @property
    def conversations(self) -> list[str]:
        return [self.assigned, self.offered, self.closed, self.dead, self.ticket_open, self.ticket_closed]


@dataclass
class World:
    server: LiveServer
    rapidpro: FakeRapidPro
    bot_a: FakeChatbot  # a chatbot bound to site A
    bot_b: FakeChatbot
    weni_a: FakeWeni  # a Weni project bound to site A
    weni_b: FakeWeni
    amina: FakeCounselor  # counselor of A
    sam: FakeCounselor  # supervisor of A (REST and /ws)
    tumaini: FakeCounselor  # counselor of B
    zawadi: FakeCounselor  # supervisor of B
    bot_b_id: int  # B's chatbot and Weni project
    weni_b_id: int
    b: SiteB = field(default_factory=SiteB)
    a_conv: str = ""  # amina's own conversation, assigned to her
    a_session: str = "ke-own"
    baseline: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    # -- B's rows ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of site B, column by column."""

        async def run() -> dict[str, list[dict[str, Any]]]:
            async with self.server.core.sessionmaker() as s:
                convs = (
                    await s.scalars(
                        select(Conversation)
                        .where(or_(Conversation.site == B, Conversation.origin_site == B))
                        .order_by(Conversation.id)
                    )
                ).all()
                ids = [c.id for c in convs]
                b_users = [self.bot_b_id, self.weni_b_id]
                queries: dict[str, Any] = {
                    "messages": select(Message).where(Message.conversation_id.in_(ids)).order_by(Message.id),
                    "offers": select(Offer)
                    .where(or_(Offer.conversation_id.in_(ids), Offer.site == B))
                    .order_by(Offer.id),
                    "tickets": select(Ticket)
                    .where(or_(Ticket.conversation_id.in_(ids), Ticket.chatbot_id.in_(b_users)))
                    .order_by(Ticket.id),
                    "outbox": select(OutboxEvent)
                    .where(or_(OutboxEvent.conversation_id.in_(ids), OutboxEvent.site == B))
                    .order_by(OutboxEvent.id),
                    "audit": select(AuditEntry)
                    .where(or_(AuditEntry.conversation_id.in_(ids), AuditEntry.site == B))
                    .order_by(AuditEntry.id),
                    "agents": select(Agent).where(Agent.site == B).order_by(Agent.user_id),
                    "idempotency": select(IdempotencyKey)
                    .where(or_(IdempotencyKey.conversation_id.in_(ids), IdempotencyKey.chatbot_id.in_(b_users)))
                    .order_by(IdempotencyKey.id),
                    "ticket_requests": select(TicketRequest)
                    .where(TicketRequest.chatbot_id.in_(b_users))
                    .order_by(TicketRequest.id),
                }
                out = {"conversations": [_columns(c) for c in convs]}
                for name, q in queries.items():
                    out[name] = [_columns(row) for row in (await s.scalars(q)).all()]
                return out

        return self.server.call(run())

    def assert_b_unchanged(self) -> None:
        """B's rows are as they were; when not, the next case starts from what they are now (one
        bug, one failing case)."""
        before, self.baseline = self.baseline, self.snapshot()
        for table, rows in before.items():
            assert self.baseline[table] == rows, f"site B's {table} changed"

    # -- what must not leak ------------------------------------------------------------------------

    def b_markers(self) -> list[str]:
        """Strings only B's data holds: texts, names, contact URNs, conversation and offer ids."""
        markers = [B_TEXT, "TzKid", "Tumaini", "tumaini", "zawadi", "whatsapp:2557", *self.b.conversations]
        return markers + [t.contact_uuid for t in self.b.tickets.values()]

    def assert_no_leak(self, r: httpx.Response) -> None:
        """``r`` carries nothing of B that its request did not name itself (nor B's site)."""
        asked = str(r.request.url) + r.request.content.decode(errors="replace")
        leaked = [m for m in self.b_markers() if m in r.text and m not in asked]
        named_b = f"/sites/{B}/" in asked or f"={B}" in asked or f'"{B}"' in asked
        if not named_b and f'"{B}"' in r.text:
            leaked.append(f'"{B}"')
        assert not leaked, (r.request.method, str(r.request.url), leaked, r.text[:2000])


def _columns(row: Any) -> dict[str, Any]:
    return {a.key: getattr(row, a.key) for a in inspect(row).mapper.column_attrs}


def token_of(server: LiveServer, username: str) -> str:
    token, _ = server.call(issue_service_token(server.core, username=username, ttl_s=3600))
    return token


def counselor(server: LiveServer, username: str, *, connect: bool = True) -> FakeCounselor:
    c = FakeCounselor(server.url, username, PASSWORD)
    c.login()
    if connect:
        c.connect()
    return c


def settle(w: World) -> None:
    """Nothing left in the outbox: every event sent (or dead)."""

    def quiet() -> None:
        async def run() -> int:
            async with w.server.core.sessionmaker() as s:
                rows = (await s.scalars(select(OutboxEvent.id).where(OutboxEvent.status == "pending"))).all()
                return len(rows)

        assert w.server.call(run()) == 0

    eventually(quiet, timeout=30)


def offer_of(c: FakeCounselor, conversation: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    offer: dict[str, Any] = c.wait_for("offer", lambda e: conversation(e["offer"]["conversation"]))["offer"]
    return offer


def by_session(session: str) -> Callable[[dict[str, Any]], bool]:
    return lambda conv: bool(conv["chat_session"] == session)


def by_id(conversation_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda conv: bool(conv["id"] == conversation_id)


def take(c: FakeCounselor, which: Callable[[dict[str, Any]], bool]) -> str:
    """Read the offer of a conversation: it is ``c``'s; its id."""
    r = c.read_offer(offer_of(c, which)["id"])
    assert r.status_code == 200, r.text
    conversation_id: str = r.json()["conversation"]["id"]
    return conversation_id


def open_ticket(weni: FakeWeni, **kwargs: Any) -> FakeTicket:
    ticket, r = weni.open_ticket(**kwargs)
    assert r.status == 201 and ticket is not None and ticket.external_id, r.body
    return ticket


def ticket_body(weni: FakeWeni, *, contact_uuid: str | None = None) -> dict[str, Any]:
    """``POST /v1/tickets`` as Weni sends it."""
    return {
        "ticket_id": str(uuid.uuid4()),
        "contact": {"uuid": contact_uuid or str(uuid.uuid4()), "urn": "telegram:4242", "name": "KeKid"},
        "metadata": {"webhook_base_url": weni.webhook_base_url},
        "opened_at": "2026-05-20T14:30:00Z",
    }


def build_site_b(w: World) -> None:
    b = w.b
    bot, tumaini = w.bot_b, w.tumaini
    urn = iter(f"whatsapp:2557000000{n:02d}" for n in range(1, 100))

    def post(session: str, text: str) -> None:
        r = bot.send(session, f"{B_TEXT} {text}", client_name="TzKid", contact_urn=next(urn))
        assert r.status_code == 201, r.text

    post("tz-assigned", "I need help")
    b.assigned = take(tumaini, by_session("tz-assigned"))
    r = tumaini.reply(b.assigned, f"{B_TEXT} I am here")
    assert r.status_code == 201, r.text
    b.reply_id = r.json()["message_id"]

    post("tz-closed", "bye")
    b.closed = take(tumaini, by_session("tz-closed"))
    assert tumaini.close(b.closed).status_code == 200

    post("tz-offered", "anyone?")
    offer = offer_of(tumaini, by_session("tz-offered"))
    b.offer_id, b.offered = offer["id"], offer["conversation"]["id"]

    t = open_ticket(w.weni_b, name="TzKid", urn=next(urn), body=f"{B_TEXT} ticket")
    b.ticket_open = take(tumaini, by_id(str(t.external_id)))
    assert tumaini.reply(b.ticket_open, f"{B_TEXT} ticket reply").status_code == 201
    assert w.weni_b.forward(t, f"{B_TEXT} from Weni").status == 200
    b.tickets[b.ticket_open] = t

    t = open_ticket(w.weni_b, name="TzKid", urn=next(urn), body=f"{B_TEXT} closed ticket")
    b.ticket_closed = take(tumaini, by_id(str(t.external_id)))
    assert tumaini.close(b.ticket_closed).status_code == 200
    b.tickets[b.ticket_closed] = t

    # A dead letter of site B: RapidPro refuses the first event of a new conversation for good.
    settle(w)
    w.rapidpro.fail_next(1, 400)
    post("tz-dead", "lost")

    def dead_letter() -> tuple[int, str]:
        r = w.zawadi.http.get("/api/supervisor/dead-letters")
        assert r.status_code == 200 and r.json()["count"] == 1, r.text
        dead = r.json()["results"][0]
        return int(dead["id"]), str(dead["conversation_id"])

    b.dead_letter, b.dead = eventually(dead_letter)
    b.sessions = {c: _conversation(w, c)["chat_session"] for c in b.conversations}
    settle(w)


def _conversation(w: World, conversation_id: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with w.server.core.sessionmaker() as s:
            conv = await s.get(Conversation, conversation_id)
            assert conv is not None
            return _columns(conv)

    return w.server.call(run())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("isolation")
    if PG_URL:
        reset_postgres(PG_URL)
    url = PG_URL or f"sqlite+aiosqlite:///{tmp / 'helpline.db'}"
    with contextlib.ExitStack() as stack:
        rapidpro = FakeRapidPro().start()
        stack.callback(rapidpro.stop)
        wenis = []
        for _ in range(2):
            weni = FakeWeni(secrets=[SECRET], max_retry_wait_s=0.5).start()
            stack.callback(weni.shutdown)
            wenis.append(weni)
        path = tmp / "sites.toml"
        path.write_text(sites_file(rapidpro.url, rapidpro.token, rapidpro.flow))
        settings = Settings(
            database_url=url,
            sites=str(path),
            poll_interval_s=0.5,
            outbox_backoff_base_s=0.05,
            outbox_backoff_cap_s=0.5,
            weni_webhook_secrets=SECRET,
        )
        server = LiveServer(settings, SiteRegistry.from_toml(path)).start()
        stack.callback(server.stop)

        def user(username: str, role: str, site: str, name: str | None = None) -> int:
            return server.create_user(username, PASSWORD, role, site=site, name=name or username.title()).id

        user("bot-ke", "chatbot", A)
        bot_b_id = user("bot-tz", "chatbot", B)
        user("weni-ke", "chatbot", A)
        weni_b_id = user("weni-tz", "chatbot", B)
        user("amina", "counselor", A)
        user("sam", "supervisor", A)
        user("tumaini", "counselor", B)
        user("zawadi", "supervisor", B)
        bots = []
        for username in ("bot-ke", "bot-tz"):
            bot = FakeChatbot(server.url, username, PASSWORD)
            bot.login()
            stack.callback(bot.aclose)
            bots.append(bot)
        wenis[0].connect(server.url, token_of(server, "weni-ke"))
        wenis[1].connect(server.url, token_of(server, "weni-tz"))
        people = {}
        for username in ("amina", "sam", "tumaini", "zawadi"):
            people[username] = counselor(server, username)  # every socket open before anything happens
            stack.callback(people[username].close_all)
        w = World(
            server=server,
            rapidpro=rapidpro,
            bot_a=bots[0],
            bot_b=bots[1],
            weni_a=wenis[0],
            weni_b=wenis[1],
            amina=people["amina"],
            sam=people["sam"],
            tumaini=people["tumaini"],
            zawadi=people["zawadi"],
            bot_b_id=bot_b_id,
            weni_b_id=weni_b_id,
        )
        for c in (w.amina, w.tumaini):
            assert c.join_queue().status_code == 200
        build_site_b(w)
        r = w.bot_a.send(w.a_session, f"{A_TEXT} hello", contact_urn="telegram:1001")
        assert r.status_code == 201, r.text
        w.a_conv = take(w.amina, by_session(w.a_session))
        assert w.amina.reply(w.a_conv, f"{A_TEXT} hi").status_code == 201
        settle(w)
        w.baseline = w.snapshot()
        yield w


# --------------------------------------------------------------------------- checks


def refused(w: World, r: httpx.Response, status: int, code: str | None = None) -> None:
    """The one error body of the OpenCHS-style API, ``status`` (and ``code``), nothing of B in it."""
    assert r.status_code == status, (r.request.method, str(r.request.url), r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "fields"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    w.assert_no_leak(r)


def weni_refused(w: World, r: httpx.Response, status: int, code: str) -> None:
    """The Weni contract's error body ``{"error": code, "message", "details"?}``, nothing of B in it."""
    assert r.status_code == status, (r.request.method, str(r.request.url), r.status_code, r.text)
    body = r.json()
    assert body["error"] == code and isinstance(body["message"], str), body
    assert set(body) <= {"error", "message", "details"}, body
    w.assert_no_leak(r)


def ok(w: World, r: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, (r.request.method, str(r.request.url), r.status_code, r.text)
    w.assert_no_leak(r)
    body: dict[str, Any] = r.json()
    return body


def concrete(prefix: str) -> list[tuple[str, str | None]]:
    """The prefix as called: with B's site (refused outright) and A's own, or without a site."""
    if "{site}" in prefix:
        return [(prefix.format(site=B), B), (prefix.format(site=A), A)]
    return [(prefix, None)]


def staff_and_bot(w: World) -> list[httpx.Client]:
    return [w.amina.http, w.sam.http, w.bot_a.http]


def staff(w: World) -> list[httpx.Client]:
    return [w.amina.http, w.sam.http]


def chat(session: str, **extra: Any) -> dict[str, Any]:
    return {
        "chat_sender": "23343411",
        "chat_message": f"{A_TEXT} intrusion",
        "chat_session": session,
        "chat_source": "WENI",
        "message_id": str(uuid.uuid4()),
        **extra,
    }


# --------------------------------------------------------------------------- chatbot API cases


def case_chat_post(w: World, prefix: str) -> None:
    """403 for B's site in the path or B's country; B's chat_session names A's own conversation."""
    session = w.b.sessions[w.b.dead]  # used by no other case: A's chatbot makes it its own here
    for p, site in concrete(prefix):
        if site == B:
            refused(w, w.bot_a.http.post(f"{p}/chat/", json=chat(session)), 403, "permission_denied")
            continue
        fresh = f"new-{uuid.uuid4().hex}"  # a new conversation: the country chooses its site
        r = w.bot_a.http.post(f"{p}/chat/", json=chat(fresh, location="TZ"))
        if site is None:
            refused(w, r, 403, "permission_denied")  # B's country: B's site
            assert ok(w, w.bot_a.http.get(f"{p}/chat/", params={"chat_session": fresh}))["results"] == []
        else:
            ok(w, r, 201)  # the path wins over the country: A's site
        body = ok(w, w.bot_a.http.post(f"{p}/chat/", json=chat(session)), 201)
        mine = ok(w, w.bot_a.http.get(f"{p}/chat/", params={"chat_session": session}))["results"]
        assert [c["site"] for c in mine] == [A] and mine[0]["id"] != w.b.dead, mine
        assert body["chat_session"] == session
    for who in staff(w):
        refused(w, who.post(f"{concrete(prefix)[0][0]}/chat/", json=chat(session)), 403, "permission_denied")


def case_chat_list(w: World, prefix: str) -> None:
    for p, site in concrete(prefix):
        if site == B:
            refused(w, w.bot_a.http.get(f"{p}/chat/"), 403, "permission_denied")
            continue
        for params in ({}, {"status": "assigned"}, {"status": "closed"}, {"chat_session": "tz-assigned"}):
            results = ok(w, w.bot_a.http.get(f"{p}/chat/", params=params))["results"]
            assert all(c["site"] == A for c in results), results
        assert w.a_conv in [c["id"] for c in ok(w, w.bot_a.http.get(f"{p}/chat/"))["results"]]
    for who in staff(w):
        refused(w, who.get(f"{concrete(prefix)[0][0]}/chat/"), 403, "permission_denied")


def case_chat_messages(w: World, prefix: str) -> None:
    for p, site in concrete(prefix):
        for conv in (w.b.assigned, w.b.closed):
            r = w.bot_a.http.get(f"{p}/chat/{w.b.sessions[conv]}/messages/")
            refused(w, r, 403 if site == B else 404, "permission_denied" if site == B else "not_found")
        if site != B:  # the same call on A's own chat answers
            assert ok(w, w.bot_a.http.get(f"{p}/chat/{w.a_session}/messages/"))["results"]
    for who in staff(w):
        r = who.get(f"{concrete(prefix)[0][0]}/chat/{w.b.sessions[w.b.assigned]}/messages/")
        refused(w, r, 403, "permission_denied")


def case_chat_close(w: World, prefix: str) -> None:
    for p, site in concrete(prefix):
        for conv in (w.b.assigned, w.b.offered, w.b.ticket_open):
            r = w.bot_a.http.post(f"{p}/chat/{w.b.sessions[conv]}/close/", json={"chat_source": "WENI"})
            refused(w, r, 403 if site == B else 404, "permission_denied" if site == B else "not_found")
    for who in staff(w):
        r = who.post(f"{concrete(prefix)[0][0]}/chat/{w.b.sessions[w.b.assigned]}/close/", json={})
        refused(w, r, 403, "permission_denied")


def case_chat_ack(w: World, prefix: str) -> None:
    ack = {"message_id": w.b.reply_id, "status": "read"}
    for p, site in concrete(prefix):
        r = w.bot_a.http.post(f"{p}/chat/{w.b.sessions[w.b.assigned]}/ack/", json=ack)
        refused(w, r, 403 if site == B else 404, "permission_denied" if site == B else "not_found")
        if site != B:  # B's message_id in A's own chat: not found either
            refused(w, w.bot_a.http.post(f"{p}/chat/{w.a_session}/ack/", json=ack), 404, "not_found")
    for who in staff(w):
        r = who.post(f"{concrete(prefix)[0][0]}/chat/{w.b.sessions[w.b.assigned]}/ack/", json=ack)
        refused(w, r, 403, "permission_denied")


# --------------------------------------------------------------------------- counselor API cases


def case_me(w: World) -> None:
    me = ok(w, w.amina.http.get("/api/agents/me"))
    assert (me["site"], me["username"], me["active_conversations"]) == (A, "amina", 1), me
    assert ok(w, w.sam.http.get("/api/agents/me"))["site"] == A
    refused(w, w.bot_a.http.get("/api/agents/me"), 403, "permission_denied")


def case_presence(w: World) -> None:
    """One's own presence only; B's supervisor hears nothing of it (checked with the sockets)."""
    for status in ("paused", "available"):
        assert ok(w, w.amina.presence(status, "a break"))["status"] == status
    assert ok(w, w.sam.http.put("/api/agents/me/presence", json={"status": "offline"}))["status"] == "offline"
    refused(w, w.bot_a.http.put("/api/agents/me/presence", json={"status": "available"}), 403, "permission_denied")


def case_offers(w: World) -> None:
    for who in staff(w):
        offers = ok(w, who.get("/api/offers/"))["results"]
        assert all(o["conversation"]["site"] == A for o in offers), offers
    refused(w, w.bot_a.http.get("/api/offers/"), 403, "permission_denied")


def case_offer_action(w: World, action: str) -> None:
    for who in staff(w):
        refused(w, who.post(f"/api/offers/{w.b.offer_id}/{action}"), 404, "not_found")
    refused(w, w.bot_a.http.post(f"/api/offers/{w.b.offer_id}/{action}"), 403, "permission_denied")


def case_conversations(w: World) -> None:
    for who in staff(w):
        for params in ({}, {"status": "queued"}, {"status": "offered"}, {"status": "assigned"}, {"status": "closed"}):
            results = ok(w, who.get("/api/conversations/", params=params))["results"]
            assert all(c["site"] == A for c in results), results
    assert w.a_conv in [c["id"] for c in ok(w, w.sam.http.get("/api/conversations/"))["results"]]
    refused(w, w.bot_a.http.get("/api/conversations/"), 403, "permission_denied")


def on_b_conversations(
    w: World, method: str, action: str, body: dict[str, Any] | None = None, convs: list[str] | None = None
) -> None:
    """``/api/conversations/<B's id>/<action>``: 404 for A's staff, 403 for A's chatbot."""
    for conv in convs or w.b.conversations:
        for who in staff(w):
            refused(w, who.request(method, f"/api/conversations/{conv}/{action}", json=body), 404, "not_found")
        r = w.bot_a.http.request(method, f"/api/conversations/{conv}/{action}", json=body)
        refused(w, r, 403, "permission_denied")


def case_read_messages(w: World) -> None:
    on_b_conversations(w, "GET", "messages/")
    assert ok(w, w.amina.messages(w.a_conv))["results"]  # A's own: yes
    assert ok(w, w.sam.http.get(f"/api/conversations/{w.a_conv}/messages/"))["results"]


def case_reply(w: World) -> None:
    on_b_conversations(w, "POST", "messages/", {"text": f"{A_TEXT} reply"})


def case_mark_read(w: World) -> None:
    on_b_conversations(w, "POST", "read/")


def case_close(w: World) -> None:
    on_b_conversations(w, "POST", "close/", {"reason": "resolved"})


def case_transfer(w: World) -> None:
    on_b_conversations(w, "POST", "transfer/", {"site": A})
    on_b_conversations(w, "POST", "transfer/", {"counselor": "amina"})
    # A's own conversation to B's counselor: no such counselor of A's site; it stays with amina.
    r = w.amina.http.post(f"/api/conversations/{w.a_conv}/transfer/", json={"counselor": "tumaini"})
    refused(w, r, 404, "not_found")
    assert _conversation(w, w.a_conv)["counselor_id"] is not None


def case_reopen(w: World) -> None:
    # 404, not 422 "not a Weni ticket": whether B's conversation is a ticket is B's business too.
    on_b_conversations(w, "POST", "reopen/")


def case_export(w: World) -> None:
    on_b_conversations(w, "GET", "export")
    assert ok(w, w.sam.http.get(f"/api/conversations/{w.a_conv}/export"))["conversation"]["id"] == w.a_conv


# --------------------------------------------------------------------------- supervisor API cases


def supervisor_view(w: World, path: str) -> dict[str, Any]:
    """A's supervisor sees A only; B named in the filter: 403; A's other roles: 403."""
    refused(w, w.sam.http.get(path, params={"site": B}), 403, "permission_denied")
    for who in (w.amina.http, w.bot_a.http):
        refused(w, who.get(path), 403, "permission_denied")
        refused(w, who.get(path, params={"site": B}), 403, "permission_denied")
    ok(w, w.sam.http.get(path, params={"site": A}))
    return ok(w, w.sam.http.get(path))


def case_overview(w: World) -> None:
    view = supervisor_view(w, "/api/supervisor/overview")
    assert [s["slug"] for s in view["sites"]] == [A]
    assert [c["username"] for c in view["sites"][0]["counselors"]] == ["amina"]


def case_dead_letters(w: World) -> None:
    assert supervisor_view(w, "/api/supervisor/dead-letters") == {"results": [], "count": 0}


def case_replay(w: World) -> None:
    refused(w, w.sam.http.post(f"/api/supervisor/dead-letters/{w.b.dead_letter}/replay"), 404, "not_found")
    for who in (w.amina.http, w.bot_a.http):
        r = who.post(f"/api/supervisor/dead-letters/{w.b.dead_letter}/replay")
        refused(w, r, 403, "permission_denied")


def case_stats(w: World) -> None:
    assert [s["slug"] for s in supervisor_view(w, "/api/supervisor/stats")["sites"]] == [A]


def case_audit(w: World) -> None:
    entries = supervisor_view(w, "/api/supervisor/audit")["results"]
    assert entries and all(e["site"] == A for e in entries), entries
    for conv in w.b.conversations:
        for params in ({"conversation": conv}, {"conversation": conv, "site": A}):
            refused(w, w.sam.http.get("/api/supervisor/audit", params=params), 404, "not_found")
    assert ok(w, w.sam.http.get("/api/supervisor/audit", params={"user": "tumaini"})) == {"results": [], "count": 0}


# --------------------------------------------------------------------------- Weni ticketer cases


def weni_call(w: World, who: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """A call of the contract made with a staff member's or chatbot's own token."""
    return who.post(path, json=body, headers={"X-API-Version": "1"})


def weni_http(weni: FakeWeni, path: str, body: dict[str, Any]) -> httpx.Response:
    assert weni.helpline_url is not None and weni.api_token is not None
    return httpx.post(
        weni.helpline_url + path,
        json=body,
        headers={"Authorization": f"Bearer {weni.api_token}", "X-API-Version": "1"},
        timeout=30,
    )


def case_open_ticket(w: World, prefix: str) -> None:
    b_contact = w.b.tickets[w.b.ticket_open].contact_uuid
    for p, site in concrete(prefix):
        if site == B:
            weni_refused(w, weni_http(w.weni_a, f"{p}/tickets", ticket_body(w.weni_a)), 403, "forbidden")
            continue
        if site is None:  # B's country as the topic: B's site
            body = ticket_body(w.weni_a) | {"topic": {"uuid": str(uuid.uuid4()), "name": "TZ"}}
            weni_refused(w, weni_http(w.weni_a, f"{p}/tickets", body), 403, "forbidden")
        # B's open ticket's contact: A's project has its own tickets (B's stays open, untouched).
        r = weni_http(w.weni_a, f"{p}/tickets", ticket_body(w.weni_a, contact_uuid=f"{b_contact}"))
        body = r.json()
        assert r.status_code in (201, 409), r.text  # 409: A's own open ticket of that contact
        ext = body["external_id"] if r.status_code == 201 else body["details"]["external_id"]
        assert ext not in w.b.conversations and _conversation(w, ext)["site"] == A
    for who in staff(w):
        r = weni_call(w, who, f"{concrete(prefix)[0][0]}/tickets", ticket_body(w.weni_a))
        weni_refused(w, r, 403, "forbidden")


def ticket_call_body(w: World, ext: str, action: str) -> dict[str, Any]:
    t = w.b.tickets[ext]
    base: dict[str, Any] = {"ticket_id": t.uuid, "external_id": ext}
    if action == "messages":
        return base | {
            "message_id": str(uuid.uuid4()),
            "direction": "incoming",
            "sender": {"type": "contact", "id": t.contact_uuid},
            "text": f"{A_TEXT} intrusion",
            "sent_at": "2026-05-20T14:31:00Z",
        }
    if action == "history":
        return base | {
            "messages": [{"direction": "incoming", "text": f"{A_TEXT} old", "sent_at": "2026-05-20T14:00:00Z"}]
        }
    return base


def case_ticket_action(w: World, prefix: str, action: str) -> None:
    """B's ticket: 404 ticket_not_found for A's project; 403 under B's site path; 403 for staff."""
    ext = w.b.ticket_closed if action == "reopen" else w.b.ticket_open
    body = ticket_call_body(w, ext, action)
    for p, site in concrete(prefix):
        r = weni_http(w.weni_a, f"{p}/tickets/{ext}/{action}", body)
        if site == B:
            weni_refused(w, r, 403, "forbidden")
        else:
            weni_refused(w, r, 404, "ticket_not_found")
    for who in staff(w):
        weni_refused(w, weni_call(w, who, f"{concrete(prefix)[0][0]}/tickets/{ext}/{action}", body), 403, "forbidden")


# --------------------------------------------------------------------------- WebSocket


def case_ws(w: World) -> None:
    """A's sockets heard nothing of B (since before B had any data), nor B's of A: then B is busy
    once more while everyone listens, and B's own sockets hear it."""
    session = "tz-ws"
    r = w.bot_b.send(session, f"{B_TEXT} late", client_name="TzKid", contact_urn="whatsapp:255700000099")
    assert r.status_code == 201, r.text
    late = take(w.tumaini, by_session(session))
    assert w.tumaini.reply(late, f"{B_TEXT} late reply").status_code == 201
    assert w.bot_b.send(w.b.sessions[w.b.assigned], f"{B_TEXT} more").status_code == 201
    assert w.weni_b.forward(w.b.tickets[w.b.ticket_open], f"{B_TEXT} more from Weni").status == 200
    for status in ("paused", "available"):
        assert w.tumaini.presence(status, "tea").status_code == 200
    assert w.tumaini.close(late).status_code == 200
    w.zawadi.wait_for("queue_changed", lambda e: e.get("conversation_id") == late)
    w.zawadi.wait_for("presence", lambda e: e["presence"]["reason"] == "tea")
    w.zawadi.wait_for("presence", lambda e: e["presence"]["status"] == "available")
    w.tumaini.wait_for("message", lambda e: e["message"]["text"] == f"{B_TEXT} more from Weni")
    w.amina.http.get("/api/agents/me")  # a request after the events: they have been published
    time.sleep(1.0)  # PostgreSQL: anything misrouted over LISTEN/NOTIFY would have arrived by now
    a_convs = set(_conversation_ids(w, A))
    b_convs = set(_conversation_ids(w, B)) | set(w.b.conversations)
    for c in (w.amina, w.sam):
        assert any(e["type"] != "hello" for e in c.events), f"{c.username} heard nothing at all"
        for e in c.events:
            text = json.dumps(e)
            assert e.get("site") not in (B, "*"), (c.username, e)
            assert B_TEXT not in text and not any(conv in text for conv in b_convs), (c.username, e)
    for c in (w.tumaini, w.zawadi):
        for e in c.events:
            text = json.dumps(e)
            assert e.get("site") != A, (c.username, e)
            assert A_TEXT not in text and not any(conv in text for conv in a_convs), (c.username, e)
    settle(w)
    w.baseline = w.snapshot()  # B was busy on purpose


def _conversation_ids(w: World, site: str) -> list[str]:
    async def run() -> list[str]:
        async with w.server.core.sessionmaker() as s:
            q = select(Conversation.id).where(or_(Conversation.site == site, Conversation.origin_site == site))
            return list((await s.scalars(q)).all())

    return w.server.call(run())


# --------------------------------------------------------------------------- the table

Case = Callable[[World], None]
Key = tuple[str, str]  # (method, path template); "WS" for a WebSocket, "MOUNT" for a mount

ROUTES: dict[Key, Case] = {}
for _p in CHATBOT_PREFIXES:
    ROUTES |= {
        ("POST", f"{_p}/chat/"): functools.partial(case_chat_post, prefix=_p),
        ("GET", f"{_p}/chat/"): functools.partial(case_chat_list, prefix=_p),
        ("GET", f"{_p}/chat/{{chat_session}}/messages/"): functools.partial(case_chat_messages, prefix=_p),
        ("POST", f"{_p}/chat/{{chat_session}}/close/"): functools.partial(case_chat_close, prefix=_p),
        ("POST", f"{_p}/chat/{{chat_session}}/ack/"): functools.partial(case_chat_ack, prefix=_p),
    }
ROUTES |= {
    ("GET", "/api/agents/me"): case_me,
    ("PUT", "/api/agents/me/presence"): case_presence,
    ("GET", "/api/offers/"): case_offers,
    ("POST", "/api/offers/{offer_id}/read"): functools.partial(case_offer_action, action="read"),
    ("POST", "/api/offers/{offer_id}/decline"): functools.partial(case_offer_action, action="decline"),
    ("GET", "/api/conversations/"): case_conversations,
    ("GET", "/api/conversations/{conversation_id}/messages/"): case_read_messages,
    ("POST", "/api/conversations/{conversation_id}/messages/"): case_reply,
    ("POST", "/api/conversations/{conversation_id}/read/"): case_mark_read,
    ("POST", "/api/conversations/{conversation_id}/close/"): case_close,
    ("POST", "/api/conversations/{conversation_id}/transfer/"): case_transfer,
    ("POST", "/api/conversations/{conversation_id}/reopen/"): case_reopen,
    ("GET", "/api/conversations/{conversation_id}/export"): case_export,
    ("GET", "/api/supervisor/overview"): case_overview,
    ("GET", "/api/supervisor/dead-letters"): case_dead_letters,
    ("POST", "/api/supervisor/dead-letters/{outbox_id}/replay"): case_replay,
    ("GET", "/api/supervisor/stats"): case_stats,
    ("GET", "/api/supervisor/audit"): case_audit,
}
for _p in WENI_PREFIXES:
    ROUTES[("POST", f"{_p}/tickets")] = functools.partial(case_open_ticket, prefix=_p)
    for _action in ("messages", "close", "reopen", "history"):
        ROUTES[("POST", f"{_p}/tickets/{{external_id}}/{_action}")] = functools.partial(
            case_ticket_action, prefix=_p, action=_action
        )
ROUTES[("WS", "/ws")] = case_ws  # last: it makes B busy on purpose

_NO_RESOURCE = "no site-owned resource"
EXEMPT: dict[Key, str] = {}
for _p in CHATBOT_PREFIXES:
    EXEMPT[("POST", f"{_p}/token/")] = f"{_NO_RESOURCE}: a username and password in, the account's token out"
    EXEMPT[("DELETE", f"{_p}/token/")] = f"{_NO_RESOURCE}: revokes the token presented, nothing else"
EXEMPT |= {
    ("GET", "/openapi.json"): f"{_NO_RESOURCE}: the API's description",
    ("GET", "/docs"): f"{_NO_RESOURCE}: the API's documentation page",
    ("GET", "/docs/oauth2-redirect"): f"{_NO_RESOURCE}: part of the documentation page",
    ("GET", "/redoc"): f"{_NO_RESOURCE}: the API's documentation page",
    ("GET", "/console"): f"{_NO_RESOURCE}: a redirect to the console page",
    ("GET", "/console/"): f"{_NO_RESOURCE}: a static page, its data comes from the API above",
    ("GET", "/console/supervisor"): f"{_NO_RESOURCE}: a redirect to the supervisor page",
    ("GET", "/console/supervisor/"): f"{_NO_RESOURCE}: a static page, its data comes from the API above",
    ("MOUNT", "/console/static"): f"{_NO_RESOURCE}: the console's scripts and styles",
    ("GET", "/healthz"): f"{_NO_RESOURCE}: liveness",
    ("GET", "/readyz"): f"{_NO_RESOURCE}: readiness (the store answers)",
    ("GET", "/metrics"): f"{_NO_RESOURCE}: per-site counters for Prometheus, no conversation data",
}


def app_routes(app: FastAPI) -> set[Key]:
    """Every (method, path) the app serves, included routers flattened (HEAD goes with GET)."""
    try:  # FastAPI >= 0.165 includes routers lazily: app.routes holds the inclusions
        from fastapi.routing import iter_route_contexts

        flat: list[Any] = list(iter_route_contexts(app.routes))
    except ImportError:
        flat = list(app.routes)
    keys: set[Key] = set()
    for route in flat:
        original = getattr(route, "original_route", route)
        path = str(route.path)
        if isinstance(original, Mount):
            keys.add(("MOUNT", path))
        elif isinstance(original, WebSocketRoute) or type(original).__name__ == "APIWebSocketRoute":
            keys.add(("WS", path))
        elif isinstance(original, Route) or route.methods:
            keys |= {(m, path) for m in (route.methods or ()) if m != "HEAD"}
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return keys


def test_every_route_has_an_isolation_case(tmp_path: Path) -> None:
    path = tmp_path / "sites.toml"
    path.write_text(sites_file("http://127.0.0.1:9", "token", str(uuid.uuid4())))
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}", sites=str(path))
    routes = app_routes(create_app(settings, SiteRegistry.from_toml(path), run_workers=False))
    assert ("WS", "/ws") in routes and ("POST", "/v1/tickets") in routes, routes  # the walk sees everything
    assert not ROUTES.keys() & EXEMPT.keys()
    missing = sorted(routes - ROUTES.keys() - EXEMPT.keys())
    assert not missing, f"routes without an isolation case (add one to ROUTES, or to EXEMPT with why): {missing}"
    stale = sorted((ROUTES.keys() | EXEMPT.keys()) - routes)
    assert not stale, f"cases for routes the app no longer has: {stale}"


@pytest.mark.parametrize("route", list(ROUTES), ids=lambda key: " ".join(key))
def test_site_a_gets_nothing_of_site_b(world: World, route: Key) -> None:
    ROUTES[route](world)
    world.assert_b_unchanged()
