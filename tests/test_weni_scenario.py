"""Weni opens a ticket and a counselor takes it, end to end on real loopback peers (both ways).

Weni (FakeWeni, playing mailroom's generic ticketer) opens a high-priority ticket and sends the
history; a counselor is hunted and reads it; messages go both ways with attachments; Weni goes down
and comes back with nothing lost and nothing twice; then the counselor closes (reason resolved) —
or, in the second test, Weni closes first.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterator

import pytest

from conftest import Env
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_weni import FakeTicket, FakeWeni
from weni_support import RFC3339, SECRET, conversation, messages, reply, start_weni, weni_env


@pytest.fixture
def weni() -> Iterator[FakeWeni]:
    yield from start_weni()


def open_with_history(weni: FakeWeni, amina: FakeCounselor) -> tuple[FakeTicket, str]:
    """Steps shared by both tests: open (priority high), history, hunt, read, messages both ways."""
    ticket, r = weni.open_ticket(name="Kid 42", urn="whatsapp:254700123456", priority="high", topic="ke")
    assert r.status == 201, r.body
    assert ticket is not None and ticket.external_id is not None
    assert r.body == {"external_id": ticket.external_id, "status": "open", "created_at": r.body["created_at"]}
    assert RFC3339.match(r.body["created_at"])
    ext = ticket.external_id

    # The history arrives (mailroom sends it after the open): the bot's and the contact's messages.
    (h,) = weni.send_history(
        ticket,
        [
            {"direction": "outgoing", "text": "Hi! I am the Childline bot.", "sent_at": "2026-05-20T14:20:00Z"},
            {"direction": "incoming", "text": "I need to talk to someone", "sent_at": "2026-05-20T14:21:00Z"},
        ],
    )
    assert (h.status, h.body) == (200, {"status": "history_received", "messages_received": 2})

    # A counselor is hunted: the offer shows a high-risk conversation with the contact's name.
    offer = amina.wait_for("offer", lambda e: e["offer"]["conversation"]["id"] == ext)["offer"]
    assert offer["conversation"]["risk"] == "high"
    assert offer["conversation"]["client_name"] == "Kid 42"
    assert offer["conversation"]["site"] == "ke"
    read = amina.read_offer(offer["id"])
    assert read.status_code == 200, read.text
    assert [(m["sender"], m["direction"], m["text"]) for m in read.json()["messages"]] == [
        ("bot", "out", "Hi! I am the Childline bot."),
        ("contact", "in", "I need to talk to someone"),
    ]
    assert all(m["attachments"] == [] for m in read.json()["messages"])

    # The contact writes, with a photo: the counselor's console gets it live, attachment included.
    photo = weni.add_file("bruise.jpg", b"\xff\xd8\xff" + b"0" * 2048, "image/jpeg")
    r = weni.forward(ticket, "this is what he did", attachments=[photo])
    assert r.status == 200 and r.body["status"] == "received", r.body
    live = amina.wait_for("message", lambda e: e["message"]["text"] == "this is what he did")["message"]
    assert live["sender"] == "contact" and live["direction"] == "in" and live["status"] == "delivered"
    assert live["attachments"] == [photo]

    # The counselor answers with text and a leaflet: Weni gets a signed webhook it verifies.
    leaflet = weni.add_file("safety-plan.pdf", b"%PDF-1.4 safety plan", "application/pdf")
    r = reply(amina, ext, "I am here with you. Here is a safety plan.", attachments=[leaflet])
    assert r.status_code == 201, r.text
    assert r.json()["attachments"] == [leaflet] and r.json()["sender"] == "counselor"
    reply_id = r.json()["message_id"]
    assert amina.wait_for("message_status", lambda e: e["message_id"] == reply_id)["status"] == "sent"
    (hook,) = [h for h in weni.accepted("messages") if h.body and h.body["message_external_id"] == reply_id]
    assert hook.signature_ok and hook.timestamp_ok and hook.secret_index == 0
    expected = "sha256=" + hmac.new(SECRET.encode(), hook.raw, hashlib.sha256).hexdigest()
    assert hook.headers["x-webhook-signature"] == expected
    assert RFC3339.match(hook.headers["x-webhook-timestamp"])
    assert json.loads(hook.raw) == {
        "external_id": ext,
        "message_external_id": reply_id,
        "direction": "outgoing",
        "sender": {"type": "agent", "id": hook.body["sender"]["id"], "name": "Amina"},
        "text": "I am here with you. Here is a safety plan.",
        "attachments": [leaflet],
        "metadata": {"source": "helpline", "conversation_id": ext},
        "sent_at": hook.body["sent_at"],
    }
    assert ticket.replies[-1]["fetched"] == [leaflet]  # Weni could download the attachment
    return ticket, ext


def outage(weni: FakeWeni, amina: FakeCounselor, ticket: FakeTicket, ext: str) -> None:
    """Weni goes down while the counselor writes; it comes back: each reply once, in order."""
    weni.go_down()
    ids = []
    for i in range(1, 4):
        r = reply(amina, ext, f"reply {i} while Weni is down")
        assert r.status_code == 201
        ids.append(r.json()["message_id"])
    assert amina.http.get(f"/api/conversations/{ext}/messages/").json()["results"][-1]["status"] == "pending"
    before = len(weni.received)
    weni.come_back()
    weni.wait_for(lambda hs: sum(h.accepted and h.body["message_external_id"] in ids for h in hs) >= 3, timeout=15)
    for mid in ids:
        assert amina.wait_for("message_status", lambda e, m=mid: e["message_id"] == m)["status"] == "sent"
    after = [h.body["message_external_id"] for h in weni.received[before:] if h.kind == "messages"]
    assert after == ids  # nothing lost, nothing twice, in order
    assert [r["text"] for r in ticket.replies[-3:]] == [f"reply {i} while Weni is down" for i in range(1, 4)]
    # and the contact keeps writing meanwhile
    r = weni.forward(ticket, "thank you")
    assert r.status == 200
    assert amina.wait_for("message", lambda e: e["message"]["text"] == "thank you")


def test_ticket_counselor_closes(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    env = weni_env(make_env, weni, offer_timeout_s=5.0)
    amina = env.counselor("amina", name="Amina")
    ticket, ext = open_with_history(weni, amina)
    outage(weni, amina, ticket, ext)

    # The counselor closes with reason "resolved": Weni hears it once, signed, as the agent's close.
    r = amina.close(ext, reason="resolved")
    assert r.status_code == 200 and r.json()["already_closed"] is False
    hooks = weni.wait_for(lambda hs: any(h.kind == "close" and h.accepted for h in hs))
    (close,) = [h for h in hooks if h.kind == "close"]
    assert close.signature_ok and close.timestamp_ok
    assert close.body == {
        "external_id": ext,
        "closed_by": {"type": "agent", "id": close.body["closed_by"]["id"], "name": "Amina"},
        "reason": "resolved",
        "metadata": {"source": "helpline"},
        "closed_at": close.body["closed_at"],
    }
    assert ticket.status == "closed" and ticket.closed_by == close.body["closed_by"]
    # Weni's own close afterwards: 409 ticket_already_closed (mailroom takes it as done).
    r = weni.close(ticket)
    assert (r.status, r.body) == (
        409,
        {"error": "ticket_already_closed", "message": "Ticket is already closed", "details": {"external_id": ext}},
    )
    assert conversation(env, ext).closed_by == "counselor" and conversation(env, ext).close_reason == "resolved"

    # Every message stored once: 2 history + 2 from the contact + 4 replies.
    stored = messages(env, ext)
    assert len(stored) == len({m.external_id for m in stored}) == 8
    assert len(weni.accepted("messages")) == 4
    assert len(weni.accepted("close")) == 1
    # Nothing went to RapidPro for a Weni ticket.
    assert env.rapidpro.received == []


def test_ticket_weni_closes_first(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    env = weni_env(make_env, weni, offer_timeout_s=5.0)
    amina = env.counselor("amina", name="Amina")
    ticket, ext = open_with_history(weni, amina)
    outage(weni, amina, ticket, ext)

    # Weni closes (the contact ended it in the flow): the counselor is told at once.
    r = weni.close(ticket)
    assert (r.status, r.body) == (200, {"status": "closed"})
    closed = amina.wait_for("conversation_closed", lambda e: e["conversation_id"] == ext)
    assert closed["closed_by"] == "chatbot"
    assert amina.reply(ext, "are you there?").status_code == 409
    # The counselor's close comes too late: already closed, and nothing goes back to Weni.
    r = amina.close(ext, reason="resolved")
    assert r.status_code == 200 and r.json()["already_closed"] is True
    r = weni.forward(ticket, "hello?")
    assert r.status == 409 and r.body["error"] == "ticket_closed"
    r = weni.close(ticket)
    assert r.status == 409 and r.body["error"] == "ticket_already_closed"
    assert weni.accepted("close") == []
    stored = messages(env, ext)
    assert len(stored) == len({m.external_id for m in stored}) == 8
    assert len(weni.accepted("messages")) == 4
    assert env.rapidpro.received == []
