"""Outbound to RapidPro, as the peers see it: what the fake RapidPro received, what the counselor's
WebSocket said, what the chatbot reads back. Real HTTP and WebSocket on loopback."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import re
import shutil
import ssl
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import event, select

from conftest import Env
from helpline.delivery.rapidpro import Transport, build_flow_start, http_client
from helpline.domain import auth
from helpline.store.models import Message, OutboxEvent
from helpline.testing.fake_chatbot import FakeChatbot
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro, ReceivedStart
from helpline.testing.live import free_socket
from support import eventually, wait_event, wait_until_sync

Event = dict[str, Any]
Params = dict[str, Any]

SENDER = "23343411"
CONTACT_UUID = "5e8f3a7c-2b1d-4c6e-8f9a-0b1c2d3e4f5a"
UNKNOWN_FLOW = "00000000-0000-4000-8000-00000000dead"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here makes users and logs them in; argon2's real cost is for the auth tests."""
    monkeypatch.setattr(auth, "_hasher", PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1),)))


def params(start: ReceivedStart) -> Params:
    p = start.params
    if p is None:  # a request the fake refused: what was sent
        raw = json.loads(start.raw) if start.raw else {}
        p = raw.get("params") or raw.get("extra") or {}
    return dict(p)


def of_session(starts: list[ReceivedStart], session: str, event: str | None = None) -> list[Params]:
    out = [params(s) for s in starts if params(s).get("conversation_id") == session]
    return [p for p in out if event is None or p.get("event") == event]


def starts_of(starts: list[ReceivedStart], session: str, event: str | None = None) -> list[ReceivedStart]:
    return [
        s
        for s in starts
        if params(s).get("conversation_id") == session and (event is None or params(s).get("event") == event)
    ]


def statuses(c: FakeCounselor, message_id: str) -> list[str]:
    return [e["status"] for e in c.of_type("message_status") if e["message_id"] == message_id]


def wait_status(c: FakeCounselor, message_id: str, status: str, timeout: float = 5.0) -> Event:
    return wait_event(c, "message_status", lambda e: e["message_id"] == message_id and e["status"] == status, timeout)


def take(env: Env, bot: FakeChatbot, counselor: FakeCounselor, session: str, *texts: str, **send: Any) -> str:
    """The chatbot opens ``session`` with ``texts``; the counselor reads the offer. Returns the conversation id."""
    for i, text in enumerate(texts or ("hello",)):
        r = bot.send(session, text, message_id=f"{session}-in-{i + 1}", **send)
        assert r.status_code == 201, r.text
    offer = wait_event(counselor, "offer", lambda e: e["offer"]["conversation"]["chat_session"] == session)["offer"]
    r = counselor.read_offer(offer["id"])
    assert r.status_code == 200, r.text
    return str(r.json()["conversation"]["id"])


def settle(env: Env, conv: str, timeout: float = 5.0) -> None:
    """Wait until every event owed to RapidPro for ``conv`` so far (notices, assigned, acks) is sent."""

    def pending() -> list[str]:
        return [r.event for r in outbox_rows(env, conversation_id=conv, status="pending")]

    wait_until_sync(
        lambda: not pending(), timeout=timeout, message=lambda: f"no outbox event of {conv} pending; still {pending()}"
    )


def reply(counselor: FakeCounselor, conv: str, text: str) -> str:
    r = counselor.reply(conv, text)
    assert r.status_code == 201, r.text
    return str(r.json()["message_id"])


def outbox_rows(env: Env, **where: Any) -> list[OutboxEvent]:
    async def go() -> list[OutboxEvent]:
        async with env.server.core.sessionmaker() as s:
            q = select(OutboxEvent).order_by(OutboxEvent.id)
            for k, v in where.items():
                q = q.where(getattr(OutboxEvent, k) == v)
            return list((await s.scalars(q)).all())

    return env.server.call(go())


def count_statements(env: Env, seconds: float) -> int:
    """How many SQL statements the server runs in the next ``seconds``."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engine = env.server.core.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        time.sleep(seconds)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(seen)


def ug_site(rapidpro: FakeRapidPro) -> str:
    """A third site whose flow the RapidPro server does not know: every flow start is a 400."""
    return textwrap.dedent(f"""
        [[site]]
        slug = "ug"
        name = "Sauti Uganda"
        countries = ["UG"]
        timezone = "Africa/Kampala"
        [site.rapidpro]
        base_url = "{rapidpro.url}"
        token = "{rapidpro.token}"
        flow = "{UNKNOWN_FLOW}"
        urn_scheme = "telegram"
        [site.routing]
        strategy = "leastrecent"
        offer_timeout_s = 30
        """)


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    """Offers that do not lapse while a loaded machine is slow to read them: hunting is not tested here."""
    return make_env(offer_timeout_s=30)


# --------------------------------------------------------------------------- the body


def test_a_reply_reaches_rapidpro_with_the_exact_body(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-body", "hi")
    settle(env, conv)
    mid = reply(amina, conv, "Hello, I am here.")

    starts = env.rapidpro.wait_for(lambda rs: bool(of_session(rs, "sess-body", "message")))
    (start,) = starts_of(starts, "sess-body", "message")
    assert start.method == "POST" and start.path == "/api/v2/flow_starts.json"
    assert start.headers["authorization"] == f"Token {env.rapidpro.token}"
    assert start.headers["content-type"].startswith("application/json")
    assert start.body == {
        "flow": env.rapidpro.flow,
        "urns": [f"telegram:{SENDER}"],
        "params": {
            "event": "message",
            "conversation_id": "sess-body",
            "message_id": mid,
            "text": "Hello, I am here.",
            "counselor_name": "Amina",
        },
    }
    assert json.loads(start.raw) == start.body  # nothing was normalized away by RapidPro

    assert wait_status(amina, mid, "sent")["conversation_id"] == conv
    msgs = amina.messages(conv).json()["results"]
    assert [(m["direction"], m["text"], m["status"]) for m in msgs] == [
        ("in", "hi", "delivered"),
        ("out", "Hello, I am here.", "sent"),
    ]


@pytest.mark.parametrize(
    ("contact", "target"),
    [
        ({"contact_urn": "telegram:555001"}, {"urns": ["telegram:555001"]}),
        ({"contact_uuid": CONTACT_UUID}, {"contacts": [CONTACT_UUID]}),
    ],
)
def test_the_contact_given_by_the_chatbot_is_the_target(env: Env, contact: dict[str, str], target: Params) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-contact", "hi", **contact)
    mid = reply(amina, conv, "hello")
    starts = env.rapidpro.wait_for(lambda rs: bool(of_session(rs, "sess-contact", "message")))
    (start,) = starts_of(starts, "sess-contact", "message")
    assert start.body == {"flow": env.rapidpro.flow, **target, "params": start.body["params"]}
    assert start.body["params"]["message_id"] == mid
    # Every event of the conversation goes to the same contact.
    assert all({k: s.body.get(k) for k in target} == target for s in starts_of(starts, "sess-contact"))


def test_an_older_rapidpro_site_gets_extra_and_whatsapp_urns(env: Env) -> None:
    bot = env.chatbot()
    zawadi = env.counselor("zawadi", site="tz", name="Zawadi")
    conv = take(env, bot, zawadi, "sess-tz", "habari", location="TZ", sender=255700000001)
    mid = reply(zawadi, conv, "Karibu")
    starts = env.rapidpro.wait_for(lambda rs: bool(of_session(rs, "sess-tz", "message")))
    (start,) = starts_of(starts, "sess-tz", "message")
    assert start.body == {
        "flow": env.rapidpro.flow,
        "urns": ["whatsapp:255700000001"],
        "extra": {
            "event": "message",
            "conversation_id": "sess-tz",
            "message_id": mid,
            "text": "Karibu",
            "counselor_name": "Zawadi",
        },
    }
    assert all("params" not in s.body and "extra" in s.body for s in starts_of(starts, "sess-tz"))
    wait_status(zawadi, mid, "sent")


def test_a_long_reply_arrives_as_ordered_parts_never_cut(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-long")
    words = [f"word{i:04d}" for i in range(190)]
    text = " ".join(words) + " " + "é" * 300 + " the end."
    assert len(text) > 2 * 640
    mid = reply(amina, conv, text)

    def all_parts(rs: list[ReceivedStart]) -> bool:
        got = of_session(rs, "sess-long", "message")
        return bool(got) and len(got) >= int(got[0]["parts"])

    parts = of_session(env.rapidpro.wait_for(all_parts), "sess-long", "message")
    n = len(parts)
    assert n >= -(-len(text) // 640)
    assert [p["part"] for p in parts] == [str(i) for i in range(1, n + 1)]
    assert all(p["parts"] == str(n) for p in parts)
    assert all(p["message_id"] == mid and p["counselor_name"] == "Amina" for p in parts)
    assert all(len(p["text"]) <= 640 for p in parts)
    assert "".join(p["text"] for p in parts) == text
    wait_status(amina, mid, "sent")
    assert statuses(amina, mid) == ["sent"]  # one status for the whole message, once every part is in
    assert [m["text"] for m in amina.messages(conv).json()["results"] if m["direction"] == "out"] == [text]


# --------------------------------------------------------------------------- retries


def test_server_errors_are_retried_and_delivered_once_in_order(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-500")
    settle(env, conv)
    env.rapidpro.fail_next(2, 500)
    first = reply(amina, conv, "first")
    second = reply(amina, conv, "second")

    env.rapidpro.wait_for(lambda rs: len(of_session(rs, "sess-500", "message")) >= 2)
    received = starts_of(env.rapidpro.received, "sess-500", "message")
    assert [(params(s)["message_id"], s.status) for s in received] == [
        (first, 500),
        (first, 500),
        (first, 201),
        (second, 201),
    ]
    assert [p["text"] for p in of_session(env.rapidpro.accepted, "sess-500", "message")] == ["first", "second"]
    wait_status(amina, first, "sent")
    wait_status(amina, second, "sent")
    assert statuses(amina, first) == ["sent"]
    (row,) = [r for r in outbox_rows(env, event="message") if json.loads(r.payload)["params"]["message_id"] == first]
    assert row.status == "sent" and row.attempts == 3


def test_a_429_is_retried_no_sooner_than_retry_after(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-429")
    settle(env, conv)
    env.rapidpro.fail_next(1, 429, retry_after=1)
    mid = reply(amina, conv, "slow down")
    env.rapidpro.wait_for(lambda rs: bool(starts_of(rs, "sess-429", "message")), accepted_only=False)
    nxt = reply(amina, conv, "and this one waits its turn")
    # The message behind the throttled one waits quietly: the outbox does not spin meanwhile.
    statements = count_statements(env, seconds=0.5)
    assert statements < 60, f"{statements} SQL statements in 0.5s of waiting: the outbox is spinning"

    env.rapidpro.wait_for(lambda rs: len(of_session(rs, "sess-429", "message")) >= 2, timeout=5)
    throttled, ok, second = starts_of(env.rapidpro.received, "sess-429", "message")
    assert [s.status for s in (throttled, ok, second)] == [429, 201, 201]
    assert [params(s)["message_id"] for s in (throttled, ok, second)] == [mid, mid, nxt]
    waited = ok.at - throttled.answered_at
    assert waited >= 0.95, f"retried {waited:.3f}s after a Retry-After: 1"
    assert waited < 3
    wait_status(amina, mid, "sent")
    wait_status(amina, nxt, "sent")


def test_rapidpro_down_then_back_every_message_once_and_in_order(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    sessions = ["down-a", "down-b", "down-c"]
    convs = {s: take(env, bot, amina, s) for s in sessions}
    for conv in convs.values():
        settle(env, conv)

    env.rapidpro.go_down()
    sent: dict[str, list[str]] = {s: [] for s in sessions}
    ids: set[str] = set()
    try:
        for i in range(20):
            s = sessions[i % 3]
            mid = reply(amina, convs[s], f"reply {i:02d}")
            sent[s].append(f"reply {i:02d}")
            ids.add(mid)
        wait_until_sync(
            lambda: [r for r in outbox_rows(env, event="message") if r.last_error],
            message="the outbox to try (and hit the closed port) while RapidPro was down",
        )
        # Waiting out the backoff of each queue's head is idle time: the messages queued behind
        # the heads must not make the outbox loop spin on the store.
    finally:
        env.rapidpro.come_back()

    env.rapidpro.wait_for(lambda rs: sum(len(of_session(rs, s, "message")) for s in sessions) >= 20, timeout=15)
    for s in sessions:
        got = [p["text"] for p in of_session(env.rapidpro.accepted, s, "message")]
        assert got == sent[s], s
    delivered = [
        (p["message_id"], p.get("part")) for s in sessions for p in of_session(env.rapidpro.accepted, s, "message")
    ]
    assert len(delivered) == len(set(delivered))
    assert {mid for mid, _ in delivered} >= ids
    for mid in ids:
        wait_status(amina, mid, "sent")
    assert not [r for r in outbox_rows(env) if r.status != "sent"]
    assert any(r.attempts > 1 for r in outbox_rows(env, event="message"))


# --------------------------------------------------------------------------- dead letters


def test_a_flow_rapidpro_does_not_know_is_a_dead_letter(make_env: Callable[..., Env], rapidpro: FakeRapidPro) -> None:
    env = make_env(offer_timeout_s=30, extra=ug_site(rapidpro))
    bot = env.chatbot()
    okello = env.counselor("okello", site="ug", name="Okello")
    conv = take(env, bot, okello, "sess-ug", location="UG")
    mid = reply(okello, conv, "hello from Kampala")

    failed = wait_status(okello, mid, "failed")
    assert failed["conversation_id"] == conv
    refused = starts_of(rapidpro.received, "sess-ug", "message")
    assert [s.status for s in refused] == [400]  # not retried
    assert refused[0].response == {"flow": [f"No such object: {UNKNOWN_FLOW}"]}
    (row,) = outbox_rows(env, event="message")
    assert row.status == "dead" and row.attempts == 1
    assert row.last_error is not None and "No such object" in row.last_error
    msgs = okello.messages(conv).json()["results"]
    assert [m["status"] for m in msgs if m["direction"] == "out"] == ["failed"]

    # The conversation's queue is not stuck behind the dead letter.
    nxt = reply(okello, conv, "second try")
    wait_status(okello, nxt, "failed")
    assert [params(s)["message_id"] for s in starts_of(rapidpro.received, "sess-ug", "message")] == [mid, nxt]


def test_after_a_dead_letter_the_next_message_still_goes_out(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-dead")
    settle(env, conv)
    env.rapidpro.fail_next(1, 400, body='{"urns": ["Invalid URN"]}')
    bad = reply(amina, conv, "this one is refused")
    good = reply(amina, conv, "this one goes out")

    wait_status(amina, bad, "failed")
    wait_status(amina, good, "sent")
    received = starts_of(env.rapidpro.received, "sess-dead", "message")
    assert [(params(s)["message_id"], s.status) for s in received] == [(bad, 400), (good, 201)]
    assert statuses(amina, bad) == ["failed"]
    out = {m["message_id"]: m["status"] for m in amina.messages(conv).json()["results"] if m["direction"] == "out"}
    assert out == {bad: "failed", good: "sent"}


# --------------------------------------------------------------------------- acks


def test_the_chatbots_acks_reach_the_counselor_and_never_go_backwards(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-ack")
    mid = reply(amina, conv, "are you safe?")
    wait_status(amina, mid, "sent")

    r = bot.ack("sess-ack", mid, "delivered")
    assert r.status_code == 200, r.text
    assert r.json()["delivery"] == "delivered"
    assert wait_status(amina, mid, "delivered")["conversation_id"] == conv
    r = bot.ack("sess-ack", mid, "read")
    assert r.status_code == 200 and r.json()["delivery"] == "read"
    wait_status(amina, mid, "read")

    def out_status() -> str:
        msgs = amina.messages(conv).json()["results"]
        return str(next(m["status"] for m in msgs if m["message_id"] == mid))

    assert out_status() == "read"
    # Late or repeated acks do not go backwards, and tell nobody anything.
    for late in ("delivered", "read", "failed"):
        r = bot.ack("sess-ack", mid, late)
        assert r.status_code == 200 and r.json()["delivery"] == "read", late
    assert out_status() == "read"
    chat = bot.messages("sess-ack").json()["results"]
    assert next(m["status"] for m in chat if m["message_id"] == mid) == "read"
    # A marker event proves the WebSocket has caught up with everything before it.
    marker = reply(amina, conv, "marker")
    wait_status(amina, marker, "sent")
    assert statuses(amina, mid) == ["sent", "delivered", "read"]
    assert bot.ack("sess-ack", "no-such-message", "read").status_code == 404


def test_reading_the_offer_tells_rapidpro_assigned_and_acks_every_waiting_message(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-assign", "one", "two", "three")

    settle(env, conv)
    events = [p for p in of_session(env.rapidpro.accepted, "sess-assign") if p["event"] in ("assigned", "ack")]
    assert events[0] == {"event": "assigned", "conversation_id": "sess-assign", "counselor_name": "Amina"}
    assert events[1:] == [
        {"event": "ack", "conversation_id": "sess-assign", "message_id": f"sess-assign-in-{i}", "status": "delivered"}
        for i in (1, 2, 3)
    ]
    chat = bot.messages("sess-assign").json()
    assert chat["conversation_status"] == "assigned"
    assert [(m["text"], m["status"]) for m in chat["results"]] == [
        ("one", "delivered"),
        ("two", "delivered"),
        ("three", "delivered"),
    ]

    # A message arriving once assigned is delivered at once (the chatbot's answer says so) ...
    r = bot.send("sess-assign", "four", message_id="sess-assign-in-4")
    assert r.status_code == 201 and r.json()["delivery"] == "delivered"
    wait_event(amina, "message", lambda e: e["message"]["text"] == "four")
    # ... and the counselor marking the conversation read sends one "read" ack per message.
    r = amina.mark_read(conv)
    assert r.status_code == 200, r.text
    assert r.json()["read"] == [f"sess-assign-in-{i}" for i in (1, 2, 3, 4)]
    settle(env, conv)
    reads = [p for p in of_session(env.rapidpro.accepted, "sess-assign", "ack") if p["status"] == "read"]
    assert reads == [
        {"event": "ack", "conversation_id": "sess-assign", "message_id": f"sess-assign-in-{i}", "status": "read"}
        for i in (1, 2, 3, 4)
    ]
    assert {m["status"] for m in bot.messages("sess-assign").json()["results"]} == {"read"}
    # Nothing new to read: nothing more sent.
    owed = len(outbox_rows(env, conversation_id=conv))
    assert amina.mark_read(conv).json()["read"] == []
    assert len(outbox_rows(env, conversation_id=conv)) == owed


# --------------------------------------------------------------------------- closing


def test_the_counselor_closes_rapidpro_is_told_and_the_chatbot_gets_409(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-close")
    r = amina.close(conv, reason="resolved")
    assert r.status_code == 200, r.text

    starts = env.rapidpro.wait_for(lambda rs: bool(of_session(rs, "sess-close", "closed")))
    (closed,) = of_session(starts, "sess-close", "closed")
    assert closed == {
        "event": "closed",
        "conversation_id": "sess-close",
        "counselor_name": "Amina",
        "status": "resolved",
    }
    assert [p["event"] for p in of_session(starts, "sess-close")][-1] == "closed"
    r = bot.send("sess-close", "wait, one more thing")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict", r.text
    assert amina.reply(conv, "too late").status_code == 409
    assert bot.messages("sess-close").json()["conversation_status"] == "closed"


def test_the_chatbot_closes_the_counselor_is_told_and_cannot_reply(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-bye")
    r = bot.close("sess-bye")
    assert r.status_code == 200, r.text
    ev = wait_event(amina, "conversation_closed")
    assert ev["conversation_id"] == conv and ev["closed_by"] == "chatbot"
    r = amina.reply(conv, "hello?")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict", r.text
    assert [m["direction"] for m in amina.messages(conv).json()["results"]] == ["in"]
    assert bot.close("sess-bye").status_code == 200  # closing again is fine


# --------------------------------------------------------------------------- the outbox


def test_the_outbox_row_is_written_with_the_message(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-outbox")
    settle(env, conv)
    env.rapidpro.go_down()  # so the row is still there to be seen
    try:
        r = amina.reply(conv, "kept safe")
        assert r.status_code == 201, r.text
        message_pk, mid = r.json()["id"], r.json()["message_id"]
        (row,) = outbox_rows(env, message_ref=message_pk)
        assert row.status == "pending" and row.event == "message" and row.conversation_id == conv
        assert json.loads(row.payload) == {
            "flow": env.rapidpro.flow,
            "urns": [f"telegram:{SENDER}"],
            "params": {
                "event": "message",
                "conversation_id": "sess-outbox",
                "message_id": mid,
                "text": "kept safe",
                "counselor_name": "Amina",
            },
        }
    finally:
        env.rapidpro.come_back()
    wait_status(amina, mid, "sent")
    (row,) = outbox_rows(env, message_ref=message_pk)
    assert row.status == "sent" and row.sent_at is not None

    # A refused reply leaves neither a message nor an outbox row behind.
    assert bot.close("sess-outbox").status_code == 200
    assert amina.reply(conv, "after close").status_code == 409

    async def texts() -> list[str]:
        async with env.server.core.sessionmaker() as s:
            return list((await s.scalars(select(Message.text).where(Message.conversation_id == conv))).all())

    assert "after close" not in env.server.call(texts())
    assert not [r for r in outbox_rows(env) if "after close" in r.payload]


# --------------------------------------------------------------------------- the pipeline


def enqueue(env: Env, events: list[tuple[str, str]]) -> list[bytes]:
    """Outbox rows written straight through the store, in this order, in one transaction, as
    ``enqueue_event`` writes them: ``(conversation, label)`` each, the label in ``message_id``.
    Returns the stored payloads, as bytes."""
    site = env.server.core.site("ke")
    payloads = [
        json.dumps(
            build_flow_start(
                site.rapidpro, {"urns": ["telegram:1"]}, {"event": "queued", "conversation_id": c, "message_id": m}
            ),
            ensure_ascii=False,
        )
        for c, m in events
    ]

    async def go() -> None:
        async with env.server.core.tx() as tx:
            t = time.time()
            for (conv, _), payload in zip(events, payloads, strict=True):
                tx.session.add(
                    OutboxEvent(
                        conversation_id=conv,
                        site="ke",
                        target="rapidpro",
                        event="queued",
                        message_ref=None,
                        payload=payload,
                        status="pending",
                        attempts=0,
                        next_attempt_at=t,
                        claimed_until=0.0,
                        created_at=t,
                    )
                )
            tx.wake_outbox = True

    env.server.call(go())
    return [p.encode() for p in payloads]


def label(start: ReceivedStart) -> str:
    return str(params(start)["message_id"])


def of_conv(starts: list[ReceivedStart], conv: str) -> list[ReceivedStart]:
    return [s for s in starts if params(s).get("conversation_id") == conv]


def most_at_once(starts: list[ReceivedStart]) -> int:
    """The most requests the fake was handling at the same time (arrival to answer)."""
    edges = sorted([(s.at, 1) for s in starts] + [(s.answered_at, -1) for s in starts])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def assert_one_at_a_time_in_order(starts: list[ReceivedStart], conv: str, labels: list[str]) -> None:
    """A conversation's requests never overlap; each label is accepted once, in order, and none is
    tried before the previous label got its 201."""
    mine = of_conv(starts, conv)
    for before, after in itertools.pairwise(mine):
        assert after.at >= before.answered_at, f"{conv}: {label(after)} sent before {label(before)} was answered"
    assert [label(s) for s in mine if s.accepted] == labels
    for before, after in itertools.pairwise(mine):
        if label(after) != label(before):
            assert before.accepted, f"{conv}: {label(after)} tried before {label(before)} was accepted"


def test_sends_are_pipelined_with_at_most_outbox_concurrency_in_flight(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(settings={"outbox_concurrency": 4})
    # A long poll: a worker that waited for it between batches would take 5 s per batch.
    monkeypatch.setattr(env.server.core.settings, "poll_interval_s", 5.0)
    time.sleep(0.6)  # the poll armed at start-up (0.5 s) has gone by
    env.rapidpro.set_delay(0.1)
    convs = [f"pipe-{i}" for i in range(12)]
    events = [(c, f"{c}-{k}") for k in range(3) for c in convs]  # interleaved, like a busy helpline
    started = time.monotonic()
    payloads = enqueue(env, events)

    starts = env.rapidpro.wait_for(len(events), timeout=15)
    took = time.monotonic() - started
    assert len(env.rapidpro.received) == len(events)
    assert most_at_once(starts) == 4  # bounded by outbox_concurrency, and all of it used
    # 36 answers of 100 ms, 4 at a time: ~0.9 s, the next claims going out as the previous return.
    assert took < 4.0, f"{len(events)} events took {took:.1f}s"
    for c in convs:
        assert_one_at_a_time_in_order(starts, c, [f"{c}-{k}" for k in range(3)])
    # The stored JSON goes out as it is: the very bytes written with the event.
    sent = {label(s): s.raw for s in starts}
    assert [sent[m] for _, m in events] == payloads


def test_order_is_kept_under_concurrency_and_failures(make_env: Callable[..., Env]) -> None:
    env = make_env(settings={"outbox_concurrency": 16})
    env.rapidpro.set_delay(0.01)
    convs = [f"mix-{i}" for i in range(10)]
    events = [(c, f"{c}-{k}") for k in range(5) for c in convs]
    env.rapidpro.fail_next(6, 503)
    env.rapidpro.fail_next(3, 500)
    enqueue(env, events)

    env.rapidpro.wait_for(len(events), timeout=20)
    received = env.rapidpro.received
    assert len(received) == len(events) + 9  # each failure retried once: nothing more, nothing less
    for c in convs:
        assert_one_at_a_time_in_order(received, c, [f"{c}-{k}" for k in range(5)])
    accepted = [label(s) for s in env.rapidpro.accepted]
    assert len(accepted) == len(set(accepted)) == len(events)

    def recorded() -> None:
        rows = outbox_rows(env)
        assert {r.status for r in rows} == {"sent"} and sum(r.attempts for r in rows) == len(events) + 9

    eventually(recorded)


def test_backoff_is_cut_short_when_rapidpro_answers_again(env: Env) -> None:
    rp = env.rapidpro
    # A throttled head: RapidPro works and asked for 3 s; that wish is kept.
    rp.fail_next(1, 429, retry_after=3)
    enqueue(env, [("slow", "slow-0")])
    throttled_at = rp.wait_for(1, accepted_only=False)[0].answered_at
    # Three heads answered 503 with Retry-After: 30 (RapidPro restarting behind its proxy, say).
    rp.fail_next(3, 503, retry_after=30)
    enqueue(env, [(c, f"{c}-{k}") for k in range(2) for c in ("a", "b", "c")])
    rp.wait_for(4, accepted_only=False)

    def backed_off() -> None:
        rows = [r for r in outbox_rows(env, status="pending") if r.attempts and r.conversation_id != "slow"]
        assert len(rows) == 3 and all(r.next_attempt_at > time.time() + 20 for r in rows)

    eventually(backed_off)
    # A new conversation's event goes out at once and gets its 201: RapidPro is back.
    enqueue(env, [("d", "d-0")])
    back = rp.wait_for(lambda rs: any(label(s) == "d-0" for s in rs))
    back_at = next(s for s in back if label(s) == "d-0").answered_at

    starts = rp.wait_for(8, timeout=10)  # d-0, a/b/c x 2, slow-0: not 30 s later
    for c in ("a", "b", "c"):
        assert_one_at_a_time_in_order(rp.received, c, [f"{c}-0", f"{c}-1"])
        retry = next(s for s in of_conv(starts, c) if label(s) == f"{c}-0")
        assert back_at <= retry.at < back_at + 2.0, f"{c}-0 retried {retry.at - back_at:.2f}s after RapidPro's return"
    slow = [s for s in of_conv(rp.received, "slow")]
    assert [s.status for s in slow] == [429, 201]
    assert slow[1].at - throttled_at >= 2.95, "the 429's Retry-After was cut short"


# --------------------------------------------------------------------------- the HTTP transport


Answer = Callable[[int, bytes], bytes | None]  # (request number, request) -> bytes to send, None: hang up


class ScriptedServer:
    """A raw HTTP/1.1 server on loopback answering each request with ``answer``'s bytes."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.tls: ssl.SSLContext | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/api/v2/flow_starts.json"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                data = self.answer(len(self.requests), request)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
                if (
                    any(m in data.lower() for m in (b"connection: close", b"x-then: hang-up"))
                    or data[:8] == b"HTTP/1.0"
                ):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"uuid":"x"}', *extra: bytes) -> bytes:
    return b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        b"".join(h + b"\r\n" for h in extra),
        body,
    )


async def post(
    client: httpx.AsyncClient, url: str, body: bytes = b'{"a":1}', read_timeout: float = 5.0
) -> httpx.Response:
    return await client.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=read_timeout)


def test_the_transport_keeps_connections_alive_and_bounded() -> None:
    chunked = b'HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'

    async def go() -> None:
        server = ScriptedServer(lambda n, _: chunked if n % 2 else ok())
        async with server as url, http_client(max_connections=2) as client:
            answers = await asyncio.gather(*(post(client, url, b'{"n":%d}' % i) for i in range(10)))
            assert [r.status_code for r in answers] == [201] * 10
            assert {r.content for r in answers} == {b'{"a":1}', b'{"uuid":"x"}'}
            assert server.connections == 2  # 10 requests, never more than 2 connections
            assert sorted(r.split(b"\r\n\r\n")[1] for r in server.requests) == sorted(
                b'{"n":%d}' % i for i in range(10)
            )
            head = server.requests[0].decode().lower()
            assert head.startswith("post /api/v2/flow_starts.json http/1.1\r\nhost: 127.0.0.1:")
            assert "\r\ncontent-length: 7\r\n" in head and "transfer-encoding" not in head

    asyncio.run(go())


def test_the_transport_replaces_connections_the_peer_closed() -> None:
    async def go() -> None:
        answers: dict[int, bytes | None] = {
            1: ok(b"one", b"connection: close"),  # closed after this answer
            2: b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close",  # no length: ends at EOF
            3: ok(b"three", b"x-then: hang-up"),  # kept alive, then dropped by the server while idle
        }
        server = ScriptedServer(lambda n, _: answers.get(n, ok(b"later")))
        async with server as url, http_client() as client:
            assert (await post(client, url)).content == b"one"
            r = await post(client, url)
            assert (r.status_code, r.content) == (200, b"until close")
            assert (await post(client, url)).content == b"three"
            await asyncio.sleep(0.05)
            assert (await post(client, url)).content == b"later"  # on a new connection, no error
            assert (await post(client, url)).content == b"later"  # and that one is kept
            assert server.connections == 4

    asyncio.run(go())


def test_the_transport_turns_peer_faults_into_httpx_errors() -> None:
    async def go() -> None:
        script: dict[int, bytes | None] = {
            1: b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100"),  # an interim answer, then the real one
            2: b"this is not HTTP\r\n\r\n",
            3: None,  # hangs up without answering
            4: b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\nx-then: hang-up\r\n\r\ncut",  # hangs up mid-body
        }
        server = ScriptedServer(lambda n, _: script.get(n, ok()))
        async with server as url, http_client() as client:
            assert (await post(client, url)).content == b"after 100"
            with pytest.raises(httpx.RemoteProtocolError):  # not HTTP
                await post(client, url)
            with pytest.raises(httpx.RemoteProtocolError):  # no answer at all
                await post(client, url)
            with pytest.raises(httpx.ReadError):  # a body cut short
                await post(client, url)
            assert (await post(client, url)).status_code == 201  # and the pool is still usable
            server.answer = lambda n, _: ok(b"asked") + ok(b"never asked")  # one answer too many
            assert (await post(client, url)).content == b"asked"
            before = server.connections
            assert (await post(client, url)).content == b"asked"
            assert server.connections == before + 1  # that connection was not trusted again

        slow = ScriptedServer(lambda n, _: b"" if n == 1 else ok())  # never answers the first
        async with slow as url, http_client() as client:
            began = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await post(client, url, read_timeout=0.3)
            assert 0.25 < time.monotonic() - began < 2
            assert (await post(client, url)).status_code == 201

        closed = free_socket()
        port = closed.getsockname()[1]
        closed.close()
        async with http_client() as client:
            with pytest.raises(httpx.ConnectError):
                await post(client, f"http://127.0.0.1:{port}/x")

    asyncio.run(go())


def test_the_transport_speaks_tls_and_checks_the_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    make += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(make, check=True, capture_output=True)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    gzipped = gzip.compress(b'{"uuid":"tls"}')

    async def go() -> None:
        server = ScriptedServer(lambda n, _: ok(gzipped, b"content-encoding: gzip"))
        server.tls = served
        async with server as url:
            url = url.replace("http://", "https://")
            trusting = ssl.create_default_context(cafile=str(cert))
            limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
            async with httpx.AsyncClient(transport=Transport(verify=trusting, limits=limits)) as client:
                r = await post(client, url)
                assert (r.status_code, r.json()) == (201, {"uuid": "tls"})  # decrypted, then gunzipped
                assert (await post(client, url)).status_code == 201
            assert server.connections == 1
            async with http_client() as client:  # the system's CAs: the self-signed certificate is refused
                with pytest.raises(httpx.ConnectError):
                    await post(client, url)

    asyncio.run(go())


def test_a_slow_scan_does_not_hold_new_events_back(env: Env) -> None:
    """The outbox spaces its scans of all heads by 9x the last one's duration (~10 % of the time),
    but a slow one (here the event loop held for 1 s, as a long pause would) must not make new events
    wait that long: the next scan comes within the poll interval."""
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    conv = take(env, bot, amina, "sess-slow-scan")
    settle(env, conv)
    engine = env.server.core.read_engine.sync_engine  # the outbox scans with the read sessions
    stalls = [1]

    def stall(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if stalls and "GROUP BY outbox.conversation_id" in statement:  # the scan of all heads
            stalls.pop()
            time.sleep(1.0)

    event.listen(engine, "before_cursor_execute", stall)
    try:

        def stalled() -> None:
            assert not stalls, "no scan of all heads yet"

        eventually(stalled, timeout=5)  # a scan (a poll) is stalling
        mid = reply(amina, conv, "are you still there?")  # handled once the loop is free again
        wait_status(amina, mid, "sent", timeout=3)  # 9x the stalled scan would be 9 s
    finally:
        event.remove(engine, "before_cursor_execute", stall)
