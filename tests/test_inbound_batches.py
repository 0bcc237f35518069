"""Chatbot messages continuing conversations are written many per transaction (domain.inbound).

Messages handed to the batcher in the same turn of the event loop share one transaction, which
is what concurrent ``POST /api/chat/`` requests do under load. These tests hand them over that way
on the server's own loop, then look at what the chatbot, the counselor's WebSocket and the store
see: every message stored once, answers as if each had been posted alone, order kept.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import insert, select

from conftest import PG_URL, Env
from helpline.domain import inbound
from helpline.domain.auth import Principal, authenticate
from helpline.domain.errors import Conflict, PermissionDenied
from helpline.domain.inbound import Answer, ChatIn
from helpline.domain.states import Risk
from helpline.runtime import metrics
from helpline.store.models import Conversation, IdempotencyKey, Message, OutboxEvent
from helpline.testing.fake_chatbot import FakeChatbot
from helpline.testing.fake_counselor import FakeCounselor


def chat_in(session: str, text: str, message_id: str | None = None, **extra: Any) -> ChatIn:
    return ChatIn(
        chat_sender="23343411",
        chat_message=text,
        chat_session=session,
        chat_source="WENI",
        message_id=message_id,
        **extra,
    )


def principal(env: Env, bot: FakeChatbot) -> Principal:
    token = bot.token
    assert token is not None
    return env.server.call(authenticate(env.server.core, token))


def posting(env: Env, who: Principal, msg: ChatIn) -> asyncio.Task[Answer]:
    """``msg`` posted as a request of its own, on the server's loop (call it there)."""
    return asyncio.create_task(inbound.post_chat(env.server.core, who, msg, path_site=None))


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the server's loop run until ``condition`` holds."""
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


def post_together(env: Env, bot: FakeChatbot, msgs: list[ChatIn]) -> list[Answer | Exception]:
    """Post ``msgs`` at once, as concurrent requests do: all handed over before any is written."""
    who = principal(env, bot)

    async def go() -> list[Answer | Exception]:
        before = _batches()
        results = await asyncio.gather(*(posting(env, who, m) for m in msgs), return_exceptions=True)
        assert _batches() == before + 1, "the messages were not handed over together"
        return [r if isinstance(r, Answer | Exception) else Exception(repr(r)) for r in results]

    return env.server.call(go())


def _batches() -> float:
    return metrics.REGISTRY.get_sample_value("helpline_inbound_batch_messages_count") or 0.0


def _failed() -> float:
    """Transactions that failed as a whole (their messages then retried one at a time)."""
    return metrics.REGISTRY.get_sample_value("helpline_inbound_batches_failed_total") or 0.0


def assigned(env: Env, bot: FakeChatbot, counselor: FakeCounselor, session: str) -> str:
    r = bot.send(session, "hello", message_id=f"{session}-0")
    assert r.status_code == 201, r.text
    offer = counselor.wait_for("offer", lambda e: e["offer"]["conversation"]["chat_session"] == session)["offer"]
    r = counselor.read_offer(offer["id"])
    assert r.status_code == 200, r.text
    return str(r.json()["conversation"]["id"])


def stored(env: Env, conversation_id: str) -> list[tuple[str, str]]:
    async def go() -> list[tuple[str, str]]:
        async with env.server.core.sessionmaker() as s:
            rows = await s.execute(
                select(Message.external_id, Message.text)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.id)
            )
            return [(r.external_id, r.text) for r in rows]

    return env.server.call(go())


def test_one_transaction_answers_each_message_as_if_posted_alone(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    a = assigned(env, bot, amina, "batch-a")
    b = assigned(env, bot, amina, "batch-b")
    assert bot.send("batch-closed", "bye", message_id="c-0").status_code == 201
    assert bot.close("batch-closed").status_code == 200
    first_answer = bot.send("batch-a", "earlier", message_id="a-earlier")
    assert first_answer.status_code == 201, first_answer.text

    msgs = [
        chat_in("batch-a", "a1", "a-1"),
        chat_in("batch-b", "b1", "b-1"),
        chat_in("batch-a", "a2", "a-2"),
        chat_in("batch-a", "a1 again", "a-1"),  # a retry inside the same batch: the first answer
        chat_in("batch-a", "a retry of an earlier one", "a-earlier"),  # a retry of a stored message
        chat_in("batch-b", "used elsewhere", "a-2"),  # a message_id of another chat_session: 409
        chat_in("batch-closed", "too late", "c-1"),  # a closed conversation: 409
        chat_in("batch-a", "a3, no message_id"),
        chat_in("batch-b", "b2", "b-2", contact_urn="whatsapp:254700000001", risk=Risk.HIGH),
    ]
    failed = _failed()
    results = post_together(env, bot, msgs)
    assert _failed() == failed, "the batch fell back to one message at a time"

    ok = [r for r in results if isinstance(r, Answer)]
    a1, b1, a2, a1_again, earlier, elsewhere, closed, a3, b2 = results
    assert isinstance(a1, Answer) and a1.created and a1.body["delivery"] == "delivered"
    assert isinstance(a1_again, Answer) and not a1_again.created and a1_again.body == a1.body
    assert isinstance(earlier, Answer) and not earlier.created and earlier.body == first_answer.json()
    assert isinstance(elsewhere, Conflict) and "another chat_session" in str(elsewhere)
    assert isinstance(closed, Conflict) and "closed" in str(closed)
    assert isinstance(a3, Answer) and a3.created and a3.body["message_id"]
    assert all(isinstance(r, Answer) and r.created for r in (b1, a2, b2)), (b1, a2, b2)
    assert len({r.body["uuid"] for r in ok if r.created}) == 5  # a1 b1 a2 a3 b2

    assert stored(env, a) == [
        ("batch-a-0", "hello"),
        ("a-earlier", "earlier"),
        ("a-1", "a1"),
        ("a-2", "a2"),
        (a3.body["message_id"], "a3, no message_id"),
    ]
    assert stored(env, b) == [("batch-b-0", "hello"), ("b-1", "b1"), ("b-2", "b2")]

    # The counselor hears each new message once, in the order stored, with its row's id.
    def heard() -> list[str]:
        return [e["message"]["text"] for e in amina.of_type("message") if e["message"]["direction"] == "in"]

    amina.wait_for("message", lambda e: e["message"]["text"] == "b2")
    assert heard() == ["earlier", "a1", "b1", "a2", "a3, no message_id", "b2"]
    ids = [e["message"]["id"] for e in amina.of_type("message") if e["message"]["direction"] == "in"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # What the chatbot reads back over HTTP agrees, and the new contact address was kept.
    assert [m["text"] for m in bot.messages("batch-b").json()["results"]] == ["hello", "b1", "b2"]

    async def contact() -> tuple[str | None, str]:
        async with env.server.core.sessionmaker() as s:
            row = (
                await s.execute(select(Conversation.contact_urn, Conversation.risk).where(Conversation.id == b))
            ).one()
            return row.contact_urn, row.risk

    # The new contact address was kept and the risk raised (never lowered later: b1 said nothing).
    assert env.server.call(contact()) == ("whatsapp:254700000001", "high")


def test_a_new_conversation_in_a_batch_is_created_once_its_messages_in_order(env: Env) -> None:
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    a = assigned(env, bot, amina, "old")
    results = post_together(
        env, bot, [chat_in("old", "x", "o-1"), chat_in("new", "first", "n-1"), chat_in("new", "second", "n-2")]
    )
    assert all(isinstance(r, Answer) for r in results), results
    assert [r.body["created"] for r in results if isinstance(r, Answer)].count(True) == 1
    assert [t for _, t in stored(env, a)] == ["hello", "x"]
    offer = amina.wait_for("offer", lambda e: e["offer"]["conversation"]["chat_session"] == "new")
    # The first created the conversation, the second was added to it: stored once each, in order.
    assert [t for _, t in stored(env, offer["offer"]["conversation"]["id"])] == ["first", "second"]


def test_a_batch_creates_its_new_conversations_and_a_forbidden_site_fails_only_its_message(env: Env) -> None:
    """New conversations are created in the batch's own transaction, each once and told
    ``queued`` once; a repeat of the message that created one gets its answer; a message for a
    site the chatbot may not use fails alone, and the batch does not fall back."""
    bot = env.chatbot("weni-ke", site="ke")
    amina = env.counselor("amina", name="Amina")
    known = assigned(env, bot, amina, "known")
    failed = _failed()
    results = post_together(
        env,
        bot,
        [
            chat_in("fresh-1", "one", "f1-1", risk=Risk.LOW),
            chat_in("known", "x", "k-1"),
            chat_in("fresh-2", "two", "f2-1", risk=Risk.HIGH),
            chat_in("fresh-1", "one again", "f1-1"),  # a repeat of the message that created it
            chat_in("fresh-1", "one more", "f1-2"),
            chat_in("elsewhere", "hi", "e-1", location="TZ"),  # Tanzania's site: not this chatbot's
            chat_in("fresh-2", "two more"),
        ],
    )
    assert _failed() == failed, "the batch fell back to one message at a time"
    one, x, two, one_again, one_more, elsewhere, two_more = results
    assert isinstance(one, Answer) and one.created and one.body["created"] and one.body["delivery"] == "queued"
    assert isinstance(two, Answer) and two.created and two.body["created"]
    assert isinstance(one_again, Answer) and not one_again.created and one_again.body == one.body
    assert isinstance(x, Answer) and x.created and x.body["delivery"] == "delivered"
    assert all(isinstance(r, Answer) and r.created and not r.body["created"] for r in (x, one_more, two_more))
    assert isinstance(elsewhere, PermissionDenied)

    async def conversations() -> dict[str, tuple[str, str, list[str]]]:
        async with env.server.core.sessionmaker() as s:
            rows = (await s.execute(select(Conversation.chat_session, Conversation.id, Conversation.risk))).all()
            notices = (await s.scalars(select(OutboxEvent.conversation_id).where(OutboxEvent.event == "queued"))).all()
            return {r.chat_session: (r.id, r.risk, [n for n in notices if n == r.id]) for r in rows}

    convs = env.server.call(conversations())
    assert sorted(convs) == ["fresh-1", "fresh-2", "known"]
    (f1, f1_risk, f1_told), (f2, f2_risk, f2_told) = convs["fresh-1"], convs["fresh-2"]
    assert (f1_risk, f2_risk) == ("low", "high")
    assert len(f1_told) == 1 and len(f2_told) == 1
    assert [t for _, t in stored(env, f1)] == ["one", "one more"]
    assert [t for _, t in stored(env, f2)] == ["two", "two more"]
    assert [t for _, t in stored(env, known)] == ["hello", "x"]
    # The hunter was woken: the riskier one is offered.
    amina.wait_for("offer", lambda e: e["offer"]["conversation"]["chat_session"] == "fresh-2")


def plant_a_clash(env: Env, conversation_id: str) -> None:
    """A message with id "clash" stored without its idempotency record: a batch storing a
    message with that id fails as a whole (the unique constraint of message ids)."""

    async def plant() -> None:
        async with env.server.core.tx() as tx:
            await tx.session.execute(
                insert(Message).values(
                    uuid="00000000-0000-4000-8000-000000000001",
                    conversation_id=conversation_id,
                    direction="in",
                    external_id="clash",
                    text="planted",
                    status="delivered",
                    created_at=0.0,
                    status_at=0.0,
                )
            )

    env.server.call(plant())


def test_a_batch_that_fails_is_retried_one_message_at_a_time(env: Env) -> None:
    """A message the store refuses fails alone; the others of its transaction are written once
    each, in the order they arrived."""
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    a = assigned(env, bot, amina, "fails")
    plant_a_clash(env, a)
    failed = _failed()
    texts = [f"m{n}" for n in range(1, 9)]  # several: alone, they would race for connections
    msgs = [chat_in("fails", text, f"f-{n}") for n, text in enumerate(texts)]
    results = post_together(env, bot, [*msgs[:4], chat_in("fails", "boom", "clash"), *msgs[4:]])
    boom = results.pop(4)
    assert _failed() == failed + 1
    assert all(isinstance(r, Answer) and r.created for r in results), results
    assert isinstance(boom, Exception) and not isinstance(boom, Answer)
    assert [t for _, t in stored(env, a)] == ["hello", "planted", *texts]

    async def keys() -> list[str]:
        async with env.server.core.sessionmaker() as s:
            return list(await s.scalars(select(IdempotencyKey.message_id).order_by(IdempotencyKey.id)))

    assert "clash" not in env.server.call(keys())
    # The chatbot's retry of a stored message is a repeat, not a new row.
    assert bot.send("fails", "m1", message_id="f-0").status_code == 200
    assert [t for _, t in stored(env, a)] == ["hello", "planted", *texts]


def test_a_message_after_a_failed_batch_waits_for_the_ones_retried_alone(env: Env) -> None:
    """The chat's next message, arriving while the failed batch's messages are stored one at a
    time, is stored after them, not in the gap between two of them."""
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    a = assigned(env, bot, amina, "after")
    plant_a_clash(env, a)
    who = principal(env, bot)

    async def go() -> list[Answer | BaseException]:
        failed = _failed()
        sent = (("one", "f-1"), ("boom", "clash"), ("two", "f-2"))
        first = [posting(env, who, chat_in("after", text, message_id)) for text, message_id in sent]
        await until(lambda: _failed() != failed, "the batch failed, and handed its messages back")
        three = posting(env, who, chat_in("after", "three", "f-3"))
        return await asyncio.gather(*first, three, return_exceptions=True)

    one, boom, two, three = env.server.call(go())
    assert isinstance(boom, Exception) and not isinstance(boom, Answer)
    assert all(isinstance(r, Answer) and r.created for r in (one, two, three)), (one, two, three)
    assert [t for _, t in stored(env, a)] == ["hello", "planted", "one", "two", "three"]
    # The counselor's screen shows them in that order too.
    amina.wait_for("message", lambda e: e["message"]["text"] == "three")
    assert [e["message"]["text"] for e in amina.of_type("message")][-3:] == ["one", "two", "three"]


def test_a_request_cancelled_while_waiting_its_turn_neither_blocks_nor_skips_the_queue(env: Env) -> None:
    """A handed-back message whose request goes away (the chatbot hung up) is not stored, and
    the chat's next message still waits for the ones before it, then is stored."""
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    a = assigned(env, bot, amina, "gone")
    plant_a_clash(env, a)
    who = principal(env, bot)
    texts = ["m1", "m2", "boom", "gone", "m3", "m4"]

    async def go() -> list[Answer | BaseException]:
        failed = _failed()
        tasks = [posting(env, who, chat_in("gone", t, "clash" if t == "boom" else t)) for t in texts]
        await until(lambda: _failed() != failed, "the batch failed, and handed its messages back")
        tasks[3].cancel()  # handed back, waiting for m1, m2 and boom
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    results = env.server.call(go())
    assert isinstance(results[3], asyncio.CancelledError)
    assert isinstance(results[2], Exception) and not isinstance(results[2], Answer)
    assert all(isinstance(results[i], Answer) for i in (0, 1, 4, 5)), results
    assert [t for _, t in stored(env, a)] == ["hello", "planted", "m1", "m2", "m3", "m4"]


@pytest.mark.skipif(not PG_URL, reason="batches run one at a time on SQLite (one writer)")
def test_a_batch_waits_for_a_running_batch_with_the_same_chat(env: Env) -> None:
    """A batch running with a message for conversation B, itself waiting for conversation A's row
    lock, has not locked B yet: the next batch, with B's next message, must not store it first."""
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    ids = {assigned(env, bot, amina, "wait-1"): "wait-1", assigned(env, bot, amina, "wait-2"): "wait-2"}
    a, b = sorted(ids)  # a batch locks its conversations in id order: A, then B
    core = env.server.core
    who = principal(env, bot)

    async def go() -> list[Answer | BaseException]:
        before = _batches()
        async with core.sessionmaker() as s, s.begin():  # someone else holds A's row for a while
            await s.execute(select(Conversation.id).where(Conversation.id == a).with_for_update())
            first = [posting(env, who, chat_in(ids[a], "a1", "w-a1")), posting(env, who, chat_in(ids[b], "b1", "w-b1"))]
            await until(lambda: _batches() != before, "the first batch started")
            second = posting(env, who, chat_in(ids[b], "b2", "w-b2"))
            await asyncio.sleep(0.5)  # time enough for a batch not waiting to store b2
            assert not second.done()
        return await asyncio.gather(*first, second, return_exceptions=True)

    results = env.server.call(go())
    assert all(isinstance(r, Answer) and r.created for r in results), results
    assert [t for _, t in stored(env, b)] == ["hello", "b1", "b2"]
    assert [t for _, t in stored(env, a)] == ["hello", "a1"]


@pytest.mark.skipif(
    not PG_URL, reason="another writer creating a conversation meanwhile: another instance (PostgreSQL)"
)
def test_a_conversation_another_instance_creates_meanwhile_fails_the_batch_and_its_messages_are_stored_alone(
    env: Env,
) -> None:
    """Another instance creates the batch's new conversation first, committing only after the
    batch has read: the batch's INSERT trips the unique constraint and the batch fails as a
    whole; each of its messages is then stored alone, in order, the new chat's into the
    conversation the other instance made."""
    bot = env.chatbot()
    amina = env.counselor("amina", name="Amina")
    known = assigned(env, bot, amina, "race-known")
    core = env.server.core
    who = principal(env, bot)
    other = str(uuid.uuid4())

    async def go() -> list[Answer | BaseException]:
        failed, before = _failed(), _batches()
        async with core.sessionmaker() as s, s.begin():  # the other instance's transaction
            t = time.time()
            s.add(
                Conversation(
                    id=other,
                    site="ke",
                    chatbot_id=who.id,
                    chat_session="race-new",
                    source="WENI",
                    client_id="23343411",
                    status="queued",
                    created_at=t,
                    queued_at=t,
                )
            )
            await s.flush()
            sent = (("race-known", "x", "r-x"), ("race-new", "first", "r-1"), ("race-new", "second", "r-2"))
            tasks = [posting(env, who, chat_in(session, text, message_id)) for session, text, message_id in sent]
            await until(lambda: _batches() != before, "the batch started")
            await asyncio.sleep(0.5)  # it has read (no such conversation yet) and waits on the new row's key
            assert not any(t.done() for t in tasks)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert _failed() == failed + 1, "the batch did not fail"
        return results

    x, first, second = env.server.call(go())
    assert all(isinstance(r, Answer) and r.created for r in (x, first, second)), (x, first, second)
    assert isinstance(first, Answer) and not first.body["created"]  # the other instance created it
    assert [t for _, t in stored(env, known)] == ["hello", "x"]
    assert [t for _, t in stored(env, other)] == ["first", "second"]
