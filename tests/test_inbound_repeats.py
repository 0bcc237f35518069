"""Handovers as RapidPro really sends them (issue 15): no ``risk``, no ``message_id``, retried on a timeout.

- A handover without ``risk`` is queued at the site's ``default_risk`` (``high`` unless configured:
  the chatbot hands over the cases it judges high-risk).
- A retry without ``message_id`` carries the ``Idempotency-Key`` header, or nothing: with the header,
  the key is the message's; without, the same text as the session's previous message within
  ``dedupe_window_s`` is that message again (200, the first answer, ``"duplicate": true``,
  nothing stored). A site can turn that off (0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from conftest import Env

# A RapidPro "Call webhook" body: what a flow posts, no message_id.
WEBHOOK_BODY = {
    "chat_sender": "23343411",
    "chat_session": "tg-23343411-1",
    "chat_source": "WENI",
    "chat_message": "I don't feel safe at home",
    "location": "KE",
}


class Bot:
    """The chatbot of one environment, posting raw bodies as a RapidPro webhook does."""

    def __init__(self, env: Env) -> None:
        self.chatbot = env.chatbot()

    def post(self, body: dict[str, Any], **headers: str) -> Any:
        return self.chatbot.http.post("/api/chat/", json=body, headers=headers)

    def stored(self, session: str) -> list[str]:
        r = self.chatbot.messages(session)
        assert r.status_code == 200, r.text
        return [m["text"] for m in r.json()["results"]]

    def risks(self) -> dict[str, str]:
        return {c["chat_session"]: c["risk"] for c in self.chatbot.chats().json()["results"]}


def test_a_handover_without_risk_is_high(make_env: Callable[..., Env]) -> None:
    bot = Bot(make_env())
    assert bot.post(WEBHOOK_BODY).status_code == 201
    assert bot.post({**WEBHOOK_BODY, "chat_session": "low-1", "risk": "low"}).status_code == 201
    assert bot.risks() == {"tg-23343411-1": "high", "low-1": "low"}


def test_a_site_whose_chatbot_hands_over_every_case_sets_its_default_risk(make_env: Callable[..., Env]) -> None:
    bot = Bot(make_env(ke_keys='default_risk = "low"'))
    assert bot.post(WEBHOOK_BODY).status_code == 201
    assert bot.post({**WEBHOOK_BODY, "chat_session": "tz-1", "location": "TZ"}).status_code == 201
    assert bot.risks() == {"tg-23343411-1": "low", "tz-1": "high"}  # tz keeps the default


def test_a_webhook_retried_after_a_timeout_is_stored_once(make_env: Callable[..., Env]) -> None:
    bot = Bot(make_env())
    first = bot.post(WEBHOOK_BODY)
    assert first.status_code == 201, first.text
    retry = bot.post(WEBHOOK_BODY)
    assert retry.status_code == 200, retry.text
    assert retry.json() == {**first.json(), "duplicate": True}
    assert bot.stored(WEBHOOK_BODY["chat_session"]) == [WEBHOOK_BODY["chat_message"]]
    # The child's next words are new, and so is the same text once the previous message differs.
    nxt = bot.post({**WEBHOOK_BODY, "chat_message": "hello?"})
    assert nxt.status_code == 201 and "duplicate" not in nxt.json()
    again = bot.post(WEBHOOK_BODY)
    assert again.status_code == 201, again.text
    assert bot.stored(WEBHOOK_BODY["chat_session"]) == [
        WEBHOOK_BODY["chat_message"],
        "hello?",
        WEBHOOK_BODY["chat_message"],
    ]
    # A message_id is its own key: the same text with a new id is a new message.
    keyed = bot.post({**WEBHOOK_BODY, "message_id": "rp-1"})
    assert keyed.status_code == 201 and keyed.json()["message_id"] == "rp-1"


def test_the_window_ends(make_env: Callable[..., Env]) -> None:
    bot = Bot(make_env(ke_keys="dedupe_window_s = 0.5"))
    assert bot.post(WEBHOOK_BODY).status_code == 201
    time.sleep(0.7)  # past the window: the child said it again
    assert bot.post(WEBHOOK_BODY).status_code == 201
    assert len(bot.stored(WEBHOOK_BODY["chat_session"])) == 2


def test_a_site_can_turn_the_window_off(make_env: Callable[..., Env]) -> None:
    bot = Bot(make_env(ke_keys="dedupe_window_s = 0"))
    for _ in range(2):
        assert bot.post(WEBHOOK_BODY).status_code == 201
    assert len(bot.stored(WEBHOOK_BODY["chat_session"])) == 2


def test_a_retry_within_one_batch_is_stored_once(make_env: Callable[..., Env]) -> None:
    """Both copies of a new chat's first message in flight at once: one transaction, one message."""
    bot = Bot(make_env())
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: bot.post(WEBHOOK_BODY), range(4)))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 201], [a.text for a in answers]
    first = next(a for a in answers if a.status_code == 201).json()
    assert all(a.json() == {**first, "duplicate": True} for a in answers if a.status_code == 200)
    assert bot.stored(WEBHOOK_BODY["chat_session"]) == [WEBHOOK_BODY["chat_message"]]


def test_the_idempotency_key_header_is_the_message_id(make_env: Callable[..., Env]) -> None:
    bot = Bot(make_env(ke_keys="dedupe_window_s = 0"))  # the key alone must do it
    first = bot.post(WEBHOOK_BODY, **{"Idempotency-Key": "rp-run-42"})
    assert first.status_code == 201 and first.json()["message_id"] == "rp-run-42", first.text
    retry = bot.post({**WEBHOOK_BODY, "chat_message": "edited on the way"}, **{"Idempotency-Key": "rp-run-42"})
    assert retry.status_code == 200 and retry.json() == first.json()
    other = bot.post(WEBHOOK_BODY, **{"Idempotency-Key": "rp-run-43"})
    assert other.status_code == 201
    # The body's message_id wins over the header.
    body_id = bot.post({**WEBHOOK_BODY, "message_id": "m-9"}, **{"Idempotency-Key": "rp-run-42"})
    assert body_id.status_code == 201 and body_id.json()["message_id"] == "m-9"
    assert len(bot.stored(WEBHOOK_BODY["chat_session"])) == 3
    bad = bot.post(WEBHOOK_BODY, **{"Idempotency-Key": "x" * 129})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error", bad.text


def test_a_chat_cannot_pose_as_a_weni_ticket(make_env: Callable[..., Env]) -> None:
    """Its counselor's replies would go to a ticket that does not exist: refused, not lost later."""
    bot = Bot(make_env())
    r = bot.post({**WEBHOOK_BODY, "chat_source": "weni-ticketer"})
    assert r.status_code == 422 and "chat_source" in r.json()["error"]["fields"], r.text
    assert bot.chatbot.chats().json()["results"] == []
