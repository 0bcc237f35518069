"""Transfers: counselor -> counselor and counselor -> another site, with the whole history carried
along, the chatbot's later messages following the conversation and RapidPro told who has it now."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from conftest import Env
from helpline.testing.fake_counselor import FakeCounselor
from routing_support import (
    assert_params_valid,
    cheap_passwords,  # noqa: F401  (autouse)
    events_of,
    notices,
    offer_for,
    wait_notice,
)
from support import assert_no_event, wait_event


def transfer(c: FakeCounselor, conversation_id: str, **target: str) -> httpx.Response:
    return c.http.post(f"/api/conversations/{conversation_id}/transfer/", json=target)


def history(messages: list[dict[str, object]]) -> list[tuple[object, object, object]]:
    return [(m["direction"], m["text"], m["counselor_name"]) for m in messages]


def test_counselor_to_counselor_the_target_gets_it_with_the_history(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5)
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    baraka = env.counselor("baraka", name="Baraka", join=False)  # not hunted; a transfer still reaches him
    bot.send("hand", "I need to talk", message_id="in-1", contact_urn="telegram:77")
    bot.send("hand", "it is about school", message_id="in-2")
    r = amina.read_offer(offer_for(amina, "hand")["id"])
    assert r.status_code == 200, r.text
    conv = r.json()["conversation"]["id"]
    assert amina.reply(conv, "I am listening").status_code == 201

    # Bad targets: nobody by that name, oneself, another site's counselor.
    env.counselor("zawadi", site="tz", name="Zawadi", join=False)
    for who in ("nobody", "amina", "zawadi"):
        assert transfer(amina, conv, counselor=who).status_code == 404, who
    assert transfer(amina, conv).status_code == 422
    assert transfer(amina, conv, counselor="baraka", site="tz").status_code == 422

    r = transfer(amina, conv, counselor="baraka")
    assert r.status_code == 200, r.text
    assert r.json()["conversation"]["status"] == "offered"  # to Baraka, and nobody else
    gone = wait_event(amina, "conversation_closed")
    assert gone == {
        "type": "conversation_closed",
        "conversation_id": conv,
        "closed_by": "transfer",
        "reason": "transferred",
    }
    # No longer hers: she cannot see it, write in it or transfer it again.
    assert amina.reply(conv, "still here?").status_code == 404
    assert amina.messages(conv).status_code == 404
    assert transfer(amina, conv, counselor="baraka").status_code == 404

    # While it is on its way the client writes again: waiting for the new counselor.
    r = bot.send("hand", "hello?", message_id="in-3")
    assert r.status_code == 201 and r.json()["delivery"] == "queued"
    offer = offer_for(baraka, "hand")
    assert offer["conversation"]["id"] == conv and offer["conversation"]["counselor_id"] is None
    r = baraka.read_offer(offer["id"])
    assert r.status_code == 200, r.text
    assert history(r.json()["messages"]) == [
        ("in", "I need to talk", None),
        ("in", "it is about school", None),
        ("out", "I am listening", "Amina"),
        ("in", "hello?", None),
    ]
    assert history(baraka.messages(conv).json()["results"]) == history(r.json()["messages"])

    # RapidPro: assigned again, with the new counselor's name, and the waiting message acknowledged.
    assigned = wait_notice(env.rapidpro, "hand", "assigned", lambda p: p["counselor_name"] == "Baraka")
    assert assigned == {"event": "assigned", "conversation_id": "hand", "counselor_name": "Baraka"}
    wait_notice(env.rapidpro, "hand", "ack", lambda p: p["message_id"] == "in-3")
    assert [p["counselor_name"] for p in notices(env.rapidpro, "hand", "assigned")] == ["Amina", "Baraka"]

    # The chatbot's later messages follow the conversation: Baraka gets them, Amina does not.
    r = bot.send("hand", "are you new?", message_id="in-4")
    assert r.json()["delivery"] == "delivered"
    assert wait_event(baraka, "message", lambda e: e["message"]["text"] == "are you new?")
    assert_no_event(amina, "message", lambda e: e["message"]["direction"] == "in", within=0.3)
    r = baraka.reply(conv, "I am Baraka, Amina asked me to help")
    assert r.status_code == 201
    reply = wait_notice(env.rapidpro, "hand", "message", lambda p: p["message_id"] == r.json()["message_id"])
    assert reply["counselor_name"] == "Baraka"
    assert events_of(env.rapidpro, "hand") == [
        "queued",
        "assigned",
        "ack",
        "ack",
        "message",
        "assigned",
        "ack",
        "message",
    ]
    assert_params_valid(env.rapidpro)


def test_counselor_to_site_queued_there_and_taken_with_the_history(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5)
    bot = env.chatbot("weni-ke", site="ke", prefix="/sites/ke/api")  # this chatbot only knows the ke path
    amina = env.counselor("amina", name="Amina")
    zawadi = env.counselor("zawadi", site="tz", name="Zawadi")
    bot.send("cross", "nisaidie tafadhali", message_id="in-1", sender="9911")
    r = amina.read_offer(offer_for(amina, "cross")["id"])
    assert r.status_code == 200, r.text
    conv = r.json()["conversation"]["id"]
    assert amina.reply(conv, "Let me find a Swahili-speaking counselor").status_code == 201

    assert transfer(amina, conv, site="nowhere").status_code == 404
    r = transfer(amina, conv, site="tz")
    assert r.status_code == 200, r.text
    assert r.json()["conversation"]["site"] == "tz" and r.json()["conversation"]["status"] == "queued"
    assert wait_event(amina, "conversation_closed")["closed_by"] == "transfer"

    offer = offer_for(zawadi, "cross")
    assert offer["conversation"]["site"] == "tz"
    assert amina.of_type("offer")[1:] == []  # ke's counselors are no longer offered it
    r = zawadi.read_offer(offer["id"])
    assert r.status_code == 200, r.text
    assert history(r.json()["messages"]) == [
        ("in", "nisaidie tafadhali", None),
        ("out", "Let me find a Swahili-speaking counselor", "Amina"),
    ]

    # RapidPro is told through the site the chatbot came in by (ke: params, telegram), Zawadi's name.
    assert wait_notice(env.rapidpro, "cross", "assigned", lambda p: p["counselor_name"] == "Zawadi")
    for s in env.rapidpro.accepted:
        if (s.params or {}).get("conversation_id") == "cross":
            assert "params" in s.body and s.urns == ["telegram:9911"], s.body

    # The chatbot keeps using its ke path: messages, listing and close all still find the conversation.
    r = bot.send("cross", "asante", message_id="in-2")
    assert r.status_code == 201 and r.json()["delivery"] == "delivered", r.text
    assert wait_event(zawadi, "message", lambda e: e["message"]["text"] == "asante")
    assert_no_event(amina, "message", lambda e: e["message"]["direction"] == "in", within=0.3)
    listed = bot.chats(chat_session="cross").json()["results"]
    assert [(c["site"], c["status"]) for c in listed] == [("tz", "assigned")]
    assert bot.messages("cross").status_code == 200
    r = zawadi.reply(conv, "Karibu, nipo hapa")
    assert r.status_code == 201
    wait_notice(env.rapidpro, "cross", "message", lambda p: p["counselor_name"] == "Zawadi")
    assert bot.close("cross").status_code == 200
    assert wait_event(zawadi, "conversation_closed")["closed_by"] == "chatbot"
    assert events_of(env.rapidpro, "cross")[:5] == ["queued", "assigned", "ack", "message", "assigned"]
    assert_params_valid(env.rapidpro)
