"""Overflow: a conversation unanswered for max_wait_s, or at a site with nobody logged in, moves to
the site's overflow_site (depth limited, never back to a site it left) and the chatbot is told.

The pure decisions first, then end to end on loopback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from conftest import Env
from helpline.config.sites import RoutingConfig, Site, SiteRegistry
from helpline.routing.overflow import due_at, overflow_due, overflow_target
from helpline.store.models import Conversation
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro
from routing_support import (
    assert_params_valid,
    cheap_passwords,  # noqa: F401  (autouse)
    events_of,
    notices,
    offer_for,
    site_toml,
    ts,
    wait_notice,
)
from support import assert_no_event, wait_event

# --------------------------------------------------------------------------- pure decisions


def site(slug: str, *, closed: bool = False, **routing: Any) -> Site:
    hours = {"mon": ["00:00-00:01"], "holidays": []} if closed else {}
    return Site.model_validate(
        {
            "slug": slug,
            "name": slug.upper(),
            "rapidpro": {"base_url": "http://rp", "flow": "f"},
            "routing": routing,
            "hours": hours,
        }
    )


def test_when_a_conversation_is_due_to_overflow() -> None:
    t = 1000.0
    assert overflow_due(since=t, open_since=-math.inf, max_wait_s=0, nobody_logged_in=True, t=t)
    assert not overflow_due(since=0, open_since=-math.inf, max_wait_s=0, nobody_logged_in=False, t=t)
    assert overflow_due(since=t - 30, open_since=-math.inf, max_wait_s=30, nobody_logged_in=False, t=t)
    assert not overflow_due(since=t - 29, open_since=-math.inf, max_wait_s=30, nobody_logged_in=False, t=t)
    # Waiting overnight does not count: the clock starts at the opening.
    assert not overflow_due(since=t - 9999, open_since=t - 10, max_wait_s=30, nobody_logged_in=False, t=t)
    assert due_at(since=t - 9999, open_since=t - 10, max_wait_s=30) == t + 20
    assert due_at(since=t, open_since=-math.inf, max_wait_s=0) is None


def test_where_a_conversation_overflows_to() -> None:
    a, b = site("a", overflow_site="b", max_wait_s=30), site("b", overflow_site="a", max_wait_s=30)
    sites = SiteRegistry([a, b, site("c"), site("shut", closed=True)])
    t = 1_767_225_600.0  # a Thursday: "shut" opens one minute on Mondays

    def target(s: Site, *, depth: int = 0, been_at: tuple[str, ...] = (), staffed: bool = True) -> str | None:
        found = overflow_target(s, sites, depth=depth, been_at=(*been_at, s.slug), t=t, staffed=lambda _slug: staffed)
        return None if found is None else found.slug

    assert target(a) == "b"
    assert target(b, depth=1, been_at=("a",)) is None  # never back: no A -> B -> A
    assert target(a, depth=2) is None  # max_overflow_depth (2 by default)
    assert target(a, staffed=False) is None  # nobody logged in there either: stay
    assert target(site("c")) is None  # no overflow_site
    assert target(site("x", overflow_site="shut")) is None  # closed: stay
    assert target(site("y", overflow_site="c", max_overflow_depth=0)) is None


def test_overflow_settings_are_checked_when_loading() -> None:
    with pytest.raises(ValidationError, match="max_wait_s needs an overflow_site"):
        RoutingConfig(max_wait_s=30)
    assert RoutingConfig(overflow_site="b").max_overflow_depth == 2
    with pytest.raises(ValueError, match="overflow_site 'nowhere' must be another configured site"):
        SiteRegistry([site("a", overflow_site="nowhere")])
    with pytest.raises(ValueError, match="overflow_site 'a' must be another configured site"):
        SiteRegistry([site("a", overflow_site="a")])


# --------------------------------------------------------------------------- end to end


def test_unanswered_for_max_wait_s_it_moves_keeping_its_place(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=10, max_chats=1, extra='max_wait_s = 1.0\noverflow_site = "ke"\n')
    bot = env.chatbot()
    zawadi = env.counselor("zawadi", site="tz", name="Zawadi")  # is offered it, never reads it
    amina = env.counselor("amina", site="ke", name="Amina", join=False)
    assert amina.presence("paused", "meeting").status_code == 200  # logged in at ke: it may go there

    t0 = time.time()
    assert bot.send("slow", "is anyone there?", location="TZ", risk="medium").status_code == 201
    first = offer_for(zawadi, "slow")
    queued_at = first["conversation"]["queued_at"]
    time.sleep(0.3)
    assert bot.send("ke-later", "hi", location="KE", risk="medium").status_code == 201  # at ke, but later

    withdrawn = wait_event(zawadi, "offer_withdrawn", lambda e: e["offer_id"] == first["id"], timeout=4)
    assert withdrawn["reason"] == "overflow"
    moved = wait_notice(env.rapidpro, "slow", "overflow")
    assert time.time() - t0 >= 1.0
    assert moved == {
        "event": "overflow",
        "conversation_id": "slow",
        "site": "Childline Kenya",
        "position": "1",  # ahead of the later ke conversation: its original queued_at kept
        "estimated_wait_s": "60",
    }
    assert is_conflict(zawadi.read_offer(first["id"]))

    # Amina joins with room for one: the overflowed conversation first.
    assert amina.join_queue().status_code == 200
    offer = offer_for(amina, "slow")
    assert offer["conversation"]["site"] == "ke" and offer["conversation"]["queued_at"] == queued_at
    r = amina.read_offer(offer["id"])
    assert r.status_code == 200, r.text
    assert [m["text"] for m in r.json()["messages"]] == ["is anyone there?"]
    assert wait_notice(env.rapidpro, "slow", "assigned")["counselor_name"] == "Amina"
    wait_notice(env.rapidpro, "slow", "ack")
    assert events_of(env.rapidpro, "slow")[:4] == ["queued", "overflow", "assigned", "ack"]
    # Every event went through the RapidPro of the site the chatbot brought it to (tz: extra, whatsapp).
    for s in env.rapidpro.accepted:
        if (s.params or {}).get("conversation_id") == "slow":
            assert "extra" in s.body and s.urns == ["whatsapp:23343411"], s.body
    assert_params_valid(env.rapidpro)
    # The chatbot's next message reaches Amina.
    assert bot.send("slow", "thank you", location="TZ").json()["delivery"] == "delivered"
    assert wait_event(amina, "message", lambda e: e["message"]["text"] == "thank you")
    assert_no_event(zawadi, "message", within=0.1)
    assert [o["offer"]["conversation"]["chat_session"] for o in zawadi.of_type("offer")] == ["slow"]


def is_conflict(r: Any) -> bool:
    return bool(r.status_code == 409)


def moved_after(env: Env, session: str) -> float:
    """Seconds from the conversation's queueing to its move to the site it is at now."""

    async def go() -> float:
        async with env.server.core.sessionmaker() as s:
            queued_at, since = (
                await s.execute(
                    select(Conversation.queued_at, Conversation.site_since).where(Conversation.chat_session == session)
                )
            ).one()
        assert since is not None, "it never moved"
        return float(since - queued_at)

    return env.server.call(go())


def test_nobody_logged_in_moves_at_once_never_back_and_only_so_deep(
    make_env: Callable[..., Env], rapidpro: FakeRapidPro
) -> None:
    wait = "max_wait_s = 0.4\n"
    extra = (
        'overflow_site = "ug"\n'  # tz: nobody logs in; over to ug
        + site_toml(rapidpro, "ug", countries=("UG",), routing=wait + 'overflow_site = "tz"\n')  # never back
        + site_toml(rapidpro, "rw", countries=("RW",), routing=wait + 'overflow_site = "bi"\n')
        + site_toml(rapidpro, "bi", routing=wait + 'overflow_site = "cd"\n')
        + site_toml(rapidpro, "cd", routing=wait + 'overflow_site = "ug"\n')  # depth 2 reached: stays
    )
    env = make_env(offer_timeout_s=5, extra=extra)
    bot = env.chatbot()
    staff: dict[str, FakeCounselor] = {}
    for slug in ("ug", "rw", "bi", "cd"):  # logged in everywhere but tz, paused: nobody answers
        staff[slug] = env.counselor(f"c-{slug}", site=slug, join=False)
        assert staff[slug].presence("paused", "training").status_code == 200

    assert bot.send("loop", "hello", location="TZ").status_code == 201
    chain_sent = time.time()
    assert bot.send("chain", "hello", location="RW").status_code == 201
    chain_answered = time.time()
    first = wait_notice(rapidpro, "loop", "overflow")
    assert first["site"] == "UG helpline"
    # Timed in the store (queued -> moved), not by the notice's arrival, which adds the outbox's
    # delivery and this test's polling. The hunter's passes over the five sites take ~0.2 s on
    # PostgreSQL on a slow machine; waiting for anything (a poll, a max_wait_s) would add more.
    assert moved_after(env, "loop") < 1.0, "nobody at tz: it should not wait for anything"
    # Someone logs in at tz now: ug's max_wait_s passes, tz is staffed and open, but it came from there.
    zuhura = env.counselor("zuhura", site="tz", join=False)
    assert zuhura.presence("paused", "briefing").status_code == 200
    wait_notice(rapidpro, "chain", "overflow", lambda p: p["site"] == "CD helpline", timeout=4)

    time.sleep(1.2)  # three more max_wait_s periods: nothing else moves
    assert [p["site"] for p in notices(rapidpro, "loop", "overflow")] == ["UG helpline"]
    assert [p["site"] for p in notices(rapidpro, "chain", "overflow")] == ["BI helpline", "CD helpline"]
    assert events_of(rapidpro, "loop") == ["queued", "overflow"]
    assert events_of(rapidpro, "chain") == ["queued", "overflow", "overflow"]
    chats = {c["chat_session"]: c for c in bot.chats().json()["results"]}
    assert (chats["loop"]["site"], chats["chain"]["site"]) == ("ug", "cd")
    assert {c["status"] for c in chats.values()} == {"queued"}

    # Someone at cd takes it: the chain's last site hunts it as its own.
    assert staff["cd"].join_queue().status_code == 200
    offer = offer_for(staff["cd"], "chain")
    assert staff["cd"].read_offer(offer["id"]).status_code == 200
    assert wait_notice(rapidpro, "chain", "assigned")["counselor_name"] == "C-Cd"
    for c in (staff["ug"], staff["rw"], staff["bi"], zuhura):
        assert c.of_type("offer") == []
    assert_params_valid(rapidpro)
    # Two moves later, still its place in the queue of when the chatbot sent it (the server's clock
    # is this process's: the server runs in a thread of the test).
    assert chain_sent <= ts(offer["conversation"]["queued_at"]) <= chain_answered
