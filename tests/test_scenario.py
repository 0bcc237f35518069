"""The whole bridge, end to end: every hop of one conversation asserted on real loopback peers."""

from __future__ import annotations

from collections.abc import Callable

from conftest import Env
from helpline.testing.fake_rapidpro import ReceivedStart


def params_of(starts: list[ReceivedStart], conversation: str) -> list[dict[str, str]]:
    return [s.body["params"] for s in starts if s.body["params"].get("conversation_id") == conversation]


def test_full_conversation_every_hop(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=1.0, strategy="leastrecent", autopause=True)
    rapidpro = env.rapidpro
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    baraka = env.counselor("baraka", name="Baraka")

    # 1. The chatbot hands a high-risk conversation over.
    r = bot.send(
        "weni-7f3a",
        "someone is hurting me",
        message_id="in-1",
        risk="high",
        client_name="Kid 42",
        contact_urn="telegram:23343411",
    )
    assert r.status_code == 201, r.text
    assert r.json() | {"uuid": None} == {
        "status": "success",
        "uuid": None,
        "chat_session": "weni-7f3a",
        "message_id": "in-1",
        "delivery": "queued",
        "created": True,
    }

    # 2. Amina (least recent, first by id) is offered it and lets it lapse: withdrawn, auto-paused.
    first = amina.wait_for("offer")["offer"]
    assert first["conversation"]["chat_session"] == "weni-7f3a"
    assert first["conversation"]["risk"] == "high"
    lapsed = amina.wait_for("offer_withdrawn", timeout=5)
    assert lapsed["offer_id"] == first["id"] and lapsed["reason"] == "timed_out"
    assert amina.wait_for("presence")["presence"]["status"] == "paused"
    assert amina.read_offer(first["id"]).status_code == 409

    # 3. The hunt goes on: Baraka gets it and reads it.
    second = baraka.wait_for("offer", timeout=5)["offer"]
    assert second["id"] != first["id"]
    r = baraka.read_offer(second["id"])
    assert r.status_code == 200, r.text
    conv = r.json()["conversation"]["id"]
    assert r.json()["conversation"]["status"] == "assigned"
    assert [m["text"] for m in r.json()["messages"]] == ["someone is hurting me"]

    # RapidPro heard "queued" (first in line, the default estimate: nothing assigned yet), then
    # "assigned" (with the counselor's pseudonym) and the ack of the waiting message.
    rapidpro.wait_for(lambda rs: len(params_of(rs, "weni-7f3a")) >= 3)
    queued, assigned, ack = params_of(rapidpro.accepted, "weni-7f3a")[:3]
    assert queued == {
        "event": "queued",
        "conversation_id": "weni-7f3a",
        "position": "1",
        "estimated_wait_s": "60",
        "site": "Childline Kenya",
    }
    assert assigned["event"] == "assigned" and assigned["counselor_name"] == "Baraka"
    assert ack == {"event": "ack", "conversation_id": "weni-7f3a", "message_id": "in-1", "status": "delivered"}
    assert rapidpro.accepted[0].body["urns"] == ["telegram:23343411"]
    assert bot.messages("weni-7f3a").json()["results"][0]["status"] == "delivered"

    # 4. Messages both ways: the client's arrive live on Baraka's WebSocket, in order.
    for i in range(2, 5):
        r = bot.send("weni-7f3a", f"client message {i}", message_id=f"in-{i}")
        assert r.status_code == 201 and r.json()["delivery"] == "delivered"
    got = [baraka.wait_for("message", lambda e: e["message"]["direction"] == "in")["message"]["text"] for _ in range(3)]
    assert got == ["client message 2", "client message 3", "client message 4"]

    r = baraka.reply(conv, "I am here. You are safe to talk.")
    assert r.status_code == 201, r.text
    reply_id = r.json()["message_id"]
    sent = baraka.wait_for("message_status", lambda e: e["message_id"] == reply_id)
    assert sent["status"] == "sent"
    start = rapidpro.wait_for(lambda rs: any(p.get("message_id") == reply_id for p in params_of(rs, "weni-7f3a")))
    msg = next(p for p in params_of(start, "weni-7f3a") if p.get("message_id") == reply_id)
    assert msg == {
        "event": "message",
        "conversation_id": "weni-7f3a",
        "message_id": reply_id,
        "text": "I am here. You are safe to talk.",
        "counselor_name": "Baraka",
    }

    # Acks from the chatbot reach the console.
    assert bot.ack("weni-7f3a", reply_id, "delivered").status_code == 200
    assert baraka.wait_for("message_status", lambda e: e["message_id"] == reply_id)["status"] == "delivered"
    assert bot.ack("weni-7f3a", reply_id, "read").json()["delivery"] == "read"
    assert baraka.wait_for("message_status", lambda e: e["message_id"] == reply_id)["status"] == "read"

    # 5. RapidPro goes down; the counselor keeps writing; nothing is lost or reordered.
    rapidpro.go_down()
    ids = []
    for i in range(1, 6):
        r = baraka.reply(conv, f"reply {i} while RapidPro is down")
        assert r.status_code == 201
        ids.append(r.json()["message_id"])
    r = bot.send("weni-7f3a", "are you still there?", message_id="in-5")
    assert r.status_code == 201
    assert baraka.wait_for("message", lambda e: e["message"]["text"] == "are you still there?")
    before = len(rapidpro.accepted)
    rapidpro.come_back()
    rapidpro.wait_for(lambda rs: sum(p.get("message_id") in ids for p in params_of(rs, "weni-7f3a")) >= 5, timeout=15)
    delivered = [p["message_id"] for p in params_of(rapidpro.accepted[before:], "weni-7f3a") if p["event"] == "message"]
    assert delivered == ids  # each once, in order
    for mid in ids:
        assert baraka.wait_for("message_status", lambda e, m=mid: e["message_id"] == m)["status"] == "sent"

    # 6. The chatbot closes; the counselor is told and can no longer reply.
    r = bot.close("weni-7f3a")
    assert r.status_code == 200, r.text
    closed = baraka.wait_for("conversation_closed")
    assert closed["conversation_id"] == conv and closed["closed_by"] == "chatbot"
    assert baraka.reply(conv, "too late").status_code == 409
    assert bot.send("weni-7f3a", "hello?").status_code == 409

    # The chatbot's view of the conversation: every message once, with its status.
    history = bot.messages("weni-7f3a").json()
    assert history["conversation_status"] == "closed"
    texts = [(m["direction"], m["text"]) for m in history["results"]]
    assert texts[:4] == [
        ("in", "someone is hurting me"),
        ("in", "client message 2"),
        ("in", "client message 3"),
        ("in", "client message 4"),
    ]
    assert len(texts) == len(set(m["uuid"] for m in history["results"])) == 11
    # No event reached RapidPro twice.
    keys = [(p["event"], p.get("message_id"), p.get("part")) for p in params_of(rapidpro.accepted, "weni-7f3a")]
    assert len(keys) == len(set(keys))
