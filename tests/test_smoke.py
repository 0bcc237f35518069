from __future__ import annotations

from conftest import Env


def test_chatbot_message_is_offered_to_a_counselor_who_reads_it(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina")
    r = bot.send("sess-1", "I need help", risk="high", client_name="Kid A")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "success" and body["created"] is True and body["delivery"] == "queued"
    offer = amina.wait_for("offer")["offer"]
    assert offer["conversation"]["chat_session"] == "sess-1"
    r = amina.read_offer(offer["id"])
    assert r.status_code == 200, r.text
    conv_id = r.json()["conversation"]["id"]
    assert [m["text"] for m in r.json()["messages"]] == ["I need help"]
    r = amina.reply(conv_id, "Hello, I am here")
    assert r.status_code == 201, r.text
    starts = env.rapidpro.wait_for(lambda rs: any(x.body.get("params", {}).get("event") == "message" for x in rs))
    events = [s.body["params"]["event"] for s in starts]
    assert events[:4] == ["queued", "assigned", "ack", "message"]
