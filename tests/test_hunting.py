"""Hunting, as counselors see it: offers, lapses, re-offers, capacity, ringall and restarts.

Everything runs over real HTTP and WebSocket on loopback; assertions are on the events each
counselor's WebSocket received and on the HTTP answers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

import httpx
import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import select

from conftest import PASSWORD, Env
from helpline.config.sites import SiteRegistry
from helpline.domain import auth
from helpline.store.models import Offer
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.live import LiveServer
from support import Event, Pred, assert_no_event, find, wait_event, wait_until_sync

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here makes users and logs them in; argon2's real cost is for the auth tests."""
    monkeypatch.setattr(auth, "_hasher", PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1),)))


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def wait_any(
    counselors: Sequence[FakeCounselor], type_: str, pred: Pred | None = None, timeout: float = 5.0
) -> tuple[FakeCounselor, Event]:
    """The first counselor (of several) who received a matching event, and that event."""

    def first() -> tuple[FakeCounselor, Event] | None:
        return next(((c, e) for c in counselors if (e := find(c, type_, pred)) is not None), None)

    return wait_until_sync(first, timeout=timeout, interval=0.01, message=f"a {type_!r} event to anybody")


def offers(c: FakeCounselor) -> list[Event]:
    return [e["offer"] for e in c.of_type("offer")]


def for_session(session: str) -> Pred:
    return lambda e: bool(e["offer"]["conversation"]["chat_session"] == session)


def withdrawn(offer_id: int, reason: str | None = None) -> Pred:
    return lambda e: e["offer_id"] == offer_id and (reason is None or e["reason"] == reason)


def about(conversation_id: str) -> Pred:
    return lambda e: bool(e["conversation_id"] == conversation_id)


def is_conflict(r: httpx.Response) -> bool:
    return bool(r.status_code == 409 and r.json()["error"]["code"] == "conflict")


def other(pair: Sequence[FakeCounselor], one: FakeCounselor) -> FakeCounselor:
    return next(c for c in pair if c is not one)


def at_once(*calls: Callable[[], int]) -> list[int]:
    """Run the calls at the same instant, each in its own thread; their HTTP statuses, in order."""
    barrier = threading.Barrier(len(calls))
    answers: list[int] = [0] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        answers[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return answers


def status(call: Callable[..., httpx.Response], *args: Any) -> int:
    return call(*args).status_code


# --------------------------------------------------------------------------- offers


def test_a_queued_conversation_is_offered_over_the_websocket(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5)
    bot = env.chatbot()
    amina = env.counselor("amina")
    before = time.time()
    r = bot.send("sess-offer", "hello?", risk="medium", client_name="Kid 7", location="KE")
    assert r.status_code == 201, r.text

    offer = wait_event(amina, "offer")["offer"]
    assert offer["status"] == "pending"
    assert offer["expires_in_s"] == 5
    assert before - 0.01 <= ts(offer["created_at"]) <= time.time()
    assert ts(offer["deadline"]) == pytest.approx(ts(offer["created_at"]) + 5, abs=0.01)
    conv = offer["conversation"]
    assert conv["chat_session"] == "sess-offer"
    assert conv["client_name"] == "Kid 7"
    assert conv["risk"] == "medium"
    assert conv["site"] == "ke"
    assert conv["location"] == "KE"
    assert conv["source"] == "WENI"
    assert conv["status"] == "offered"
    assert conv["counselor_id"] is None

    r = amina.http.get("/api/offers/")
    assert r.status_code == 200
    assert [o["id"] for o in r.json()["results"]] == [offer["id"]]
    # The chatbot sees it still waiting for a counselor.
    chats = bot.chats(chat_session="sess-offer").json()["results"]
    assert [c["status"] for c in chats] == ["offered"]


def test_an_unread_offer_lapses_pauses_the_counselor_and_goes_to_another(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=0.5, autopause=True)
    bot = env.chatbot()
    pair = [env.counselor("amina"), env.counselor("bob")]
    assert bot.send("sess-lapse", "anyone there?").status_code == 201

    first_c, ev = wait_any(pair, "offer", for_session("sess-lapse"))
    first = ev["offer"]
    lapsed = wait_event(first_c, "offer_withdrawn", withdrawn(first["id"]), timeout=3)
    assert lapsed["reason"] == "timed_out"
    assert lapsed["conversation_id"] == first["conversation"]["id"]
    assert time.time() >= ts(first["deadline"])
    presence = wait_event(first_c, "presence", lambda e: e["presence"]["status"] == "paused")
    assert presence["presence"]["reason"] == "no answer"
    me = first_c.http.get("/api/agents/me").json()
    assert me["presence"]["status"] == "paused" and me["presence"]["reason"] == "no answer"

    second_c = other(pair, first_c)
    second = wait_event(second_c, "offer", for_session("sess-lapse"), timeout=3)["offer"]
    assert second["id"] != first["id"]
    assert second["conversation"]["id"] == first["conversation"]["id"]
    assert ts(second["created_at"]) >= ts(first["deadline"])
    # (Not read here: with a 0.5 s deadline a loaded machine could let it lapse first.)
    # The paused counselor was never offered it again.
    assert [o["id"] for o in offers(first_c)] == [first["id"]]


def test_without_autopause_offers_alternate_between_two_silent_counselors(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=0.5, autopause=False)
    bot = env.chatbot()
    pair = [env.counselor("amina"), env.counselor("bob")]
    assert bot.send("sess-alt", "please").status_code == 201

    def all_offers() -> list[tuple[str, Event]]:
        got = [(c.username, o) for c in pair for o in offers(c)]
        return sorted(got, key=lambda x: int(x[1]["id"]))

    # Three rounds lapsed, a fourth offer made: no hunt is only once.
    wait_until_sync(
        lambda: len(all_offers()) >= 4, timeout=6, message=lambda: f"4 offers (only {len(all_offers())} were made)"
    )
    made = all_offers()[:4]
    who = [name for name, _ in made]
    assert who[0] != who[1] and who == [who[0], who[1], who[0], who[1]], who
    assert {o["conversation"]["chat_session"] for _, o in made} == {"sess-alt"}
    for (name, o), (_, nxt) in itertools.pairwise(made):
        c = next(x for x in pair if x.username == name)
        # On its own socket: it may arrive just after the next offer reached the other counselor.
        assert wait_event(c, "offer_withdrawn", withdrawn(o["id"], "timed_out"), timeout=2.0)
        assert ts(nxt["created_at"]) >= ts(o["deadline"])
    # Nobody was paused: autopause is off.
    for c in pair:
        assert c.of_type("presence") == [e for e in c.of_type("presence") if e["presence"]["status"] == "available"]
        assert c.http.get("/api/agents/me").json()["presence"]["status"] == "available"


def test_a_lone_counselor_gets_it_again_after_the_retry_gap(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=0.5, autopause=False, retry_gap_s=0.6)
    bot = env.chatbot()
    amina = env.counselor("amina")
    assert bot.send("sess-retry", "hello").status_code == 201

    first = wait_event(amina, "offer")["offer"]
    wait_event(amina, "offer_withdrawn", withdrawn(first["id"], "timed_out"), timeout=3)
    second = wait_event(amina, "offer", lambda e: e["offer"]["id"] != first["id"], timeout=4)["offer"]
    assert second["conversation"]["id"] == first["conversation"]["id"]
    gap = ts(second["created_at"]) - ts(first["deadline"])
    assert gap >= 0.6 - 0.02, f"offered again {gap:.3f}s after the lapse"
    assert second["status"] == "pending"


def test_high_risk_is_offered_before_older_low_risk_when_a_counselor_joins(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, max_chats=4)
    bot = env.chatbot()
    amina = env.counselor("amina", join=False)
    for session, risk in [("low-old", "low"), ("high", "high"), ("low-new", "low"), ("medium", "medium")]:
        assert bot.send(session, f"{risk} here", risk=risk).status_code == 201
    assert_no_event(amina, "offer", within=0.3)  # not in the queue yet

    assert amina.join_queue().status_code == 200
    wait_until_sync(lambda: len(offers(amina)) >= 4, message=lambda: f"4 offers to Amina; got {offers(amina)}")
    got = [o["conversation"]["chat_session"] for o in offers(amina)]
    assert got == ["high", "medium", "low-old", "low-new"]


def test_high_risk_first_with_room_for_one(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, max_chats=1)
    bot = env.chatbot()
    amina = env.counselor("amina", join=False)
    assert bot.send("old-low", "hi", risk="low").status_code == 201
    assert bot.send("new-high", "help", risk="high").status_code == 201
    assert amina.join_queue().status_code == 200
    first = wait_event(amina, "offer")["offer"]
    assert first["conversation"]["chat_session"] == "new-high"
    assert amina.read_offer(first["id"]).status_code == 200
    assert amina.close(first["conversation"]["id"]).status_code == 200
    nxt = wait_event(amina, "offer", lambda e: e["offer"]["id"] != first["id"])["offer"]
    assert nxt["conversation"]["chat_session"] == "old-low"


def test_capacity_a_full_counselor_gets_nothing_until_a_conversation_closes(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, max_chats=1)
    bot = env.chatbot()
    amina = env.counselor("amina")
    assert bot.send("cap-1", "first").status_code == 201
    first = wait_event(amina, "offer", for_session("cap-1"))["offer"]
    r = amina.read_offer(first["id"])
    assert r.status_code == 200, r.text
    conv1 = r.json()["conversation"]["id"]
    assert amina.http.get("/api/agents/me").json()["active_conversations"] == 1

    assert bot.send("cap-2", "second").status_code == 201
    assert_no_event(amina, "offer", for_session("cap-2"), within=0.8)
    assert amina.http.get("/api/offers/").json()["results"] == []
    assert bot.chats(chat_session="cap-2").json()["results"][0]["status"] == "queued"

    assert amina.close(conv1).status_code == 200
    second = wait_event(amina, "offer", for_session("cap-2"), timeout=3)["offer"]
    r = amina.read_offer(second["id"])
    assert r.status_code == 200, r.text
    assert amina.http.get("/api/agents/me").json()["active_conversations"] == 1


# --------------------------------------------------------------------------- wake-ups, timers, one round


def offer_rows(env: Env, *ids: int) -> dict[int, tuple[str, float, float | None]]:
    """The stored status, created_at and resolved_at of offers ``ids``."""

    async def run() -> dict[int, tuple[str, float, float | None]]:
        async with env.server.core.sessionmaker() as s:
            rows = await s.execute(
                select(Offer.id, Offer.status, Offer.created_at, Offer.resolved_at).where(Offer.id.in_(ids))
            )
            return {i: (st, c, r) for i, st, c, r in rows}

    return env.server.call(run())


def test_hunting_needs_no_polling_joins_wake_it_deadlines_and_retry_gaps_are_timers(
    make_env: Callable[..., Env],
) -> None:
    # A poll interval of an hour: nothing but wake-ups and timers can drive the hunter.
    env = make_env(settings={"poll_interval_s": 3600.0}, offer_timeout_s=0.5, autopause=False, retry_gap_s=0.3)
    bot = env.chatbot()
    amina = env.counselor("amina", join=False)
    assert bot.send("sess-wake", "hello").status_code == 201
    assert_no_event(amina, "offer", within=0.2)  # not in the queue yet

    assert amina.join_queue().status_code == 200  # a counselor joining wakes the hunter
    first = wait_event(amina, "offer")["offer"]
    # Her only offer lapses at its deadline (a timer, not a poll an hour later) and, once the retry
    # gap has passed (another timer), she is offered it again: nobody else is there.
    wait_event(amina, "offer_withdrawn", withdrawn(first["id"], "timed_out"), timeout=5)
    second = wait_event(amina, "offer", lambda e: e["offer"]["id"] != first["id"], timeout=5)["offer"]
    assert ts(second["created_at"]) >= ts(first["deadline"]) + 0.3 - 0.01

    bob = env.counselor("bob")  # in line before amina, who let it lapse
    third = wait_event(bob, "offer", for_session("sess-wake"), timeout=5)["offer"]
    assert third["conversation"]["id"] == first["conversation"]["id"]
    rows = offer_rows(env, second["id"], third["id"])
    if rows[second["id"]][0] == "timed_out":  # (bob may have joined before it lapsed, or after)
        assert rows[third["id"]][1] >= ts(second["deadline"]) - 1e-6


def test_a_lapse_and_the_next_offer_are_one_transaction(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=0.5, autopause=True)
    bot = env.chatbot()
    pair = [env.counselor("amina"), env.counselor("bob")]
    assert bot.send("sess-one-tx", "anyone?").status_code == 201

    first_c, ev = wait_any(pair, "offer", for_session("sess-one-tx"))
    first = ev["offer"]
    second_c = other(pair, first_c)
    second = wait_event(second_c, "offer", for_session("sess-one-tx"), timeout=5)["offer"]
    rows = offer_rows(env, first["id"], second["id"])
    status, _, lapsed_at = rows[first["id"]]
    assert status == "timed_out" and lapsed_at is not None
    assert lapsed_at >= ts(first["deadline"]) - 1e-6
    # The lapse, the pause of the counselor who let it lapse and the next offer: one round, one
    # transaction, one instant.
    assert rows[second["id"]][1] == lapsed_at
    assert ts(second["created_at"]) == pytest.approx(lapsed_at, abs=1e-5)
    presence = wait_event(first_c, "presence", lambda e: e["presence"]["status"] == "paused")["presence"]
    assert presence["reason"] == "no answer"
    since = first_c.http.get("/api/agents/me").json()["presence"]["since"]
    assert ts(since) == pytest.approx(lapsed_at, abs=1e-5)


# --------------------------------------------------------------------------- read / decline


def test_reading_or_declining_a_lapsed_offer_is_a_conflict(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=0.5, autopause=True)
    bot = env.chatbot()
    amina = env.counselor("amina")
    assert bot.send("sess-late", "hello").status_code == 201
    offer = wait_event(amina, "offer")["offer"]
    wait_event(amina, "offer_withdrawn", withdrawn(offer["id"], "timed_out"), timeout=3)

    r = amina.read_offer(offer["id"])
    assert is_conflict(r), r.text
    r = amina.decline_offer(offer["id"])
    assert is_conflict(r), r.text
    # Still not hers, still waiting.
    assert amina.http.get("/api/conversations/").json()["results"] == []
    assert bot.chats(chat_session="sess-late").json()["results"][0]["status"] == "queued"
    # Someone else's offer is not found.
    bob = env.counselor("bob")
    assert bob.read_offer(offer["id"]).status_code == 404


def test_declining_hands_the_conversation_to_someone_else(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, autopause=True)
    bot = env.chatbot()
    pair = [env.counselor("amina"), env.counselor("bob")]
    assert bot.send("sess-decline", "hi").status_code == 201

    first_c, ev = wait_any(pair, "offer", for_session("sess-decline"))
    first = ev["offer"]
    r = first_c.decline_offer(first["id"])
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "declined"

    second_c = other(pair, first_c)
    second = wait_event(second_c, "offer", for_session("sess-decline"), timeout=3)["offer"]
    assert second["conversation"]["id"] == first["conversation"]["id"]
    # Declining is an answer, not silence: no pause.
    assert first_c.http.get("/api/agents/me").json()["presence"]["status"] == "available"
    # A declined offer cannot be read or declined again.
    assert is_conflict(first_c.read_offer(first["id"]))
    assert is_conflict(first_c.decline_offer(first["id"]))
    assert second_c.read_offer(second["id"]).status_code == 200
    assert [o["id"] for o in offers(first_c)] == [first["id"]]


def test_going_offline_withdraws_offers_and_the_conversation_goes_to_another(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5)
    bot = env.chatbot()
    pair = [env.counselor("amina"), env.counselor("bob")]
    assert bot.send("sess-offline", "hi").status_code == 201

    first_c, ev = wait_any(pair, "offer", for_session("sess-offline"))
    first = ev["offer"]
    r = first_c.presence("offline", "end of shift")
    assert r.status_code == 200, r.text
    gone = wait_event(first_c, "offer_withdrawn", withdrawn(first["id"]))
    assert gone["reason"] == "offline"
    assert gone["conversation_id"] == first["conversation"]["id"]

    second_c = other(pair, first_c)
    second = wait_event(second_c, "offer", for_session("sess-offline"), timeout=2)["offer"]
    # Re-offered at once, not after the first offer's deadline.
    assert ts(second["created_at"]) < ts(first["deadline"])
    assert is_conflict(first_c.read_offer(first["id"]))
    assert second_c.read_offer(second["id"]).status_code == 200
    assert first_c.http.get("/api/offers/").json()["results"] == []


# --------------------------------------------------------------------------- strategies end to end


def test_ringall_the_first_to_read_wins(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, strategy="ringall")
    bot = env.chatbot()
    amina, bob = env.counselor("amina"), env.counselor("bob")
    assert bot.send("sess-ring", "hello").status_code == 201

    a = wait_event(amina, "offer", for_session("sess-ring"))["offer"]
    b = wait_event(bob, "offer", for_session("sess-ring"))["offer"]
    assert a["id"] != b["id"]
    assert a["conversation"]["id"] == b["conversation"]["id"]

    r = bob.read_offer(b["id"])
    assert r.status_code == 200, r.text
    assert r.json()["conversation"]["counselor_id"] is not None
    lost = wait_event(amina, "offer_withdrawn", withdrawn(a["id"]))
    assert lost["reason"] == "taken"
    r = amina.read_offer(a["id"])
    assert is_conflict(r), r.text
    assert [c["id"] for c in bob.http.get("/api/conversations/").json()["results"]] == [a["conversation"]["id"]]
    assert amina.http.get("/api/conversations/").json()["results"] == []
    assert amina.http.get("/api/offers/").json()["results"] == []


def test_roundrobin_offers_in_turn(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, strategy="roundrobin", max_chats=3)
    bot = env.chatbot()
    team = [env.counselor("amina"), env.counselor("bob"), env.counselor("chidi")]
    order: list[str] = []
    for i in range(4):
        assert bot.send(f"rr-{i}", "hi").status_code == 201
        c, _ = wait_any(team, "offer", for_session(f"rr-{i}"))
        order.append(c.username)
    assert order == ["amina", "bob", "chidi", "amina"]


# --------------------------------------------------------------------------- restart


@pytest.mark.parametrize("restart", ["before_deadline", "after_deadline"])
def test_offer_deadlines_survive_a_restart(make_env: Callable[..., Env], restart: str) -> None:
    # Long enough for a stop and a start before the deadline (even on a loaded machine), short
    # enough to keep the test quick; "after" sleeps the deadline out while no server runs.
    timeout_s = 2.5 if restart == "before_deadline" else 1.0
    env = make_env(offer_timeout_s=timeout_s, autopause=True)
    bot = env.chatbot()
    amina = env.counselor("amina")
    env.user("bob", "counselor", name="Bob")
    assert bot.send("sess-restart", "are you there?").status_code == 201
    first = wait_event(amina, "offer")["offer"]
    deadline = ts(first["deadline"])

    amina.close_all()
    env.server.stop()
    if restart == "after_deadline":
        time.sleep(max(0.0, deadline - time.time()) + 0.3)  # the deadline passes while nobody runs

    settings = env.server.settings
    server = LiveServer(settings, SiteRegistry.from_toml(settings.sites)).start()
    clients: list[FakeCounselor] = []
    try:

        def counselor(username: str) -> FakeCounselor:
            c = FakeCounselor(server.url, username, PASSWORD)
            clients.append(c)
            c.login()
            c.connect()
            return c

        if restart == "before_deadline":
            assert time.time() < deadline, "the new server took too long to start for this case"
            amina2 = counselor("amina")  # still "available" in the store
        bob = counselor("bob")
        assert bob.join_queue().status_code == 200

        if restart == "before_deadline":
            lapsed = wait_event(amina2, "offer_withdrawn", withdrawn(first["id"]), timeout=timeout_s + 3)
            assert lapsed["reason"] == "timed_out"
            assert time.time() >= deadline
            assert wait_event(amina2, "presence")["presence"]["status"] == "paused"

        second = wait_event(bob, "offer", for_session("sess-restart"), timeout=timeout_s + 3)["offer"]
        assert second["id"] != first["id"]
        assert second["conversation"]["id"] == first["conversation"]["id"]
        assert ts(second["created_at"]) >= deadline

        async def offer_status(offer_id: int) -> str | None:
            async with server.core.sessionmaker() as s:
                return await s.scalar(select(Offer.status).where(Offer.id == offer_id))

        assert server.call(offer_status(first["id"])) == "timed_out"
        assert server.call(offer_status(second["id"])) in ("pending", "timed_out")
    finally:
        for c in clients:
            c.close_all()
        server.stop()


def test_ringall_two_simultaneous_reads_one_wins_the_other_gets_409(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, strategy="ringall", max_chats=5)
    bot = env.chatbot()
    amina, bob = env.counselor("amina"), env.counselor("bob")
    for i in range(5):
        session = f"race-{i}"
        assert bot.send(session, "hello").status_code == 201
        a = wait_event(amina, "offer", for_session(session))["offer"]
        b = wait_event(bob, "offer", for_session(session))["offer"]
        answers = at_once(partial(status, amina.read_offer, a["id"]), partial(status, bob.read_offer, b["id"]))
        assert sorted(answers) == [200, 409], answers


def test_a_read_racing_a_close_a_decline_or_going_offline_is_never_a_server_error(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(offer_timeout_s=5, strategy="ringall", max_chats=10)
    bot = env.chatbot()
    amina, bob = env.counselor("amina"), env.counselor("bob")
    for i in range(4):
        session = f"close-race-{i}"
        assert bot.send(session, "hello").status_code == 201
        a = wait_event(amina, "offer", for_session(session))["offer"]
        wait_event(bob, "offer", for_session(session))
        read, closed = at_once(partial(status, amina.read_offer, a["id"]), partial(status, bot.close, session))
        assert closed == 200 and read in (200, 409), (read, closed)
        if read == 200:  # read first, then closed under the counselor's eyes
            closed_ev = wait_event(amina, "conversation_closed", about(a["conversation"]["id"]))
            assert closed_ev["closed_by"] == "chatbot"
        else:  # closed first: the offer went with it
            assert wait_event(amina, "offer_withdrawn", withdrawn(a["id"]))["reason"] == "closed"
    for i in range(4):
        session = f"decline-race-{i}"
        assert bot.send(session, "hello").status_code == 201
        a = wait_event(amina, "offer", for_session(session))["offer"]
        b = wait_event(bob, "offer", for_session(session))["offer"]
        read, declined = at_once(
            partial(status, amina.read_offer, a["id"]), partial(status, bob.decline_offer, b["id"])
        )
        assert read == 200 and declined in (200, 409), (read, declined)
    session = "offline-race"
    assert bot.send(session, "hello").status_code == 201
    a = wait_event(amina, "offer", for_session(session))["offer"]
    wait_event(bob, "offer", for_session(session))
    read, offline = at_once(partial(status, amina.read_offer, a["id"]), partial(status, bob.presence, "offline"))
    assert read == 200 and offline == 200, (read, offline)
