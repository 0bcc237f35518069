"""Client notices through RapidPro (queued, position, assigned) and the counselor's wrap-up time.

Assertions are on what the fake RapidPro accepted (in order, per conversation) and on what the
counselors' WebSockets received.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from conftest import PASSWORD, Env
from helpline.domain.notices import estimate_wait
from helpline.testing.fake_counselor import FakeCounselor
from routing_support import (
    assert_params_valid,
    cheap_passwords,  # noqa: F401  (autouse)
    events_of,
    notices,
    offer_for,
    ts,
    wait_notice,
)
from support import assert_no_event, wait_until_sync


def at_position(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda p: bool(p["position"] == str(n))


def test_the_estimate_is_the_median_of_recent_waits_or_a_minute() -> None:
    assert estimate_wait([]) == 60
    assert estimate_wait([], default=30) == 30
    assert estimate_wait([12.4]) == 12
    assert estimate_wait([10, 95, 20]) == 20
    assert estimate_wait([10, 20, 30, 40]) == 25


def test_queued_then_position_updates_only_when_the_position_changed(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, extra="position_notice_s = 0.5\nmax_chats_per_counselor = 1\n")
    bot = env.chatbot()
    zawadi = env.counselor("zawadi", site="tz", name="Zawadi", join=False)
    rp = env.rapidpro

    # Three in line at tz: queued with their positions and the default estimate (nothing assigned yet).
    for i in (1, 2, 3):
        assert bot.send(f"low-{i}", "hello", location="TZ", risk="low").status_code == 201
        assert wait_notice(rp, f"low-{i}", "queued") == {
            "event": "queued",
            "conversation_id": f"low-{i}",
            "position": str(i),
            "estimated_wait_s": "60",
            "site": "C-Sema Tanzania",
        }
    # At ke (position_notice_s = 0) a low-risk one overtaken by a high-risk one hears nothing more.
    assert bot.send("ke-low", "hi", location="KE", risk="low").status_code == 201
    assert bot.send("ke-high", "help", location="KE", risk="high").status_code == 201
    assert wait_notice(rp, "ke-high", "queued")["position"] == "1"

    # A high-risk conversation goes first: everyone behind moves down one, and is told once.
    t0 = time.time()
    assert bot.send("high", "please help", location="TZ", risk="high").status_code == 201
    assert wait_notice(rp, "high", "queued")["position"] == "1"
    for i in (1, 2, 3):
        moved = wait_notice(rp, f"low-{i}", "position", timeout=3)
        assert moved == {
            "event": "position",
            "conversation_id": f"low-{i}",
            "position": str(i + 1),
            "estimated_wait_s": "60",
            "site": "C-Sema Tanzania",
        }
    assert time.time() - t0 < 2.5
    time.sleep(1.2)  # two more periods: nothing changed, nothing told
    for i in (1, 2, 3):
        assert events_of(rp, f"low-{i}") == ["queued", "position"]
    assert events_of(rp, "high") == ["queued"]
    assert events_of(rp, "ke-low") == ["queued"]

    # Zawadi joins (room for one): the high-risk one first; reading it tells RapidPro "assigned".
    assert zawadi.join_queue().status_code == 200
    offer = offer_for(zawadi, "high")
    r = zawadi.read_offer(offer["id"])
    assert r.status_code == 200, r.text
    conv = r.json()["conversation"]
    assert wait_notice(rp, "high", "assigned") == {
        "event": "assigned",
        "conversation_id": "high",
        "counselor_name": "Zawadi",
    }
    assert [o["offer"]["conversation"]["chat_session"] for o in zawadi.of_type("offer")] == ["high"]

    # Everyone moves up: told again, with an estimate from the wait just measured.
    waited = round(ts(conv["assigned_at"]) - ts(conv["queued_at"]))
    for i in (1, 2, 3):
        p = wait_notice(rp, f"low-{i}", "position", at_position(i), timeout=3)
        assert p["estimated_wait_s"] == str(waited)
    # Each conversation's events in order: no notice ever overtakes another.
    wait_notice(rp, "high", "ack")
    assert events_of(rp, "high")[:3] == ["queued", "assigned", "ack"]
    for i in (1, 2, 3):
        assert [(p["event"], p["position"]) for p in notices(rp, f"low-{i}")] == [
            ("queued", str(i)),
            ("position", str(i + 1)),
            ("position", str(i)),
        ]
    assert_params_valid(rp)
    starts = [s for s in rp.accepted if (s.params or {}).get("conversation_id") == "low-1"]
    assert all("extra" in s.body and s.urns == ["whatsapp:23343411"] for s in starts)  # tz's RapidPro


def test_wrapup_no_offer_until_it_ends_whoever_closed(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=5, extra="wrapup_s = 1.2\nmax_chats_per_counselor = 1\n")
    bot = env.chatbot()
    zawadi = env.counselor("zawadi", site="tz", name="Zawadi")
    env.user("sup", "supervisor", site="tz", name="Supervisor")
    sup = FakeCounselor(env.url, "sup", PASSWORD)
    sup.login()

    def take(session: str) -> str:
        offer = offer_for(zawadi, session)
        r = zawadi.read_offer(offer["id"])
        assert r.status_code == 200, r.text
        return str(r.json()["conversation"]["id"])

    def wrapup_after(closing: Callable[[], object], nxt: str) -> None:
        """``closing`` ends her conversation while ``nxt`` waits: it is offered once wrap-up is over."""
        before = len(zawadi.of_type("presence"))
        closing()
        wait_until_sync(lambda: len(zawadi.of_type("presence")) > before, message="a presence event")
        presence = zawadi.of_type("presence")[before]["presence"]
        assert presence["status"] == "available" and presence["wrapup_until"] is not None
        ends = ts(presence["wrapup_until"])
        assert ends - time.time() > 0.8
        me = zawadi.http.get("/api/agents/me").json()["presence"]
        assert me["wrapup_until"] == presence["wrapup_until"]
        assert_no_event(zawadi, "offer", lambda e: e["offer"]["conversation"]["chat_session"] == nxt, within=0.6)
        offer = offer_for(zawadi, nxt, timeout=3)
        assert ends <= ts(offer["created_at"]) < ends + 0.5  # at the end of the wrap-up, not a poll later

    for s in ("w-1", "w-2", "w-3", "w-4"):
        assert bot.send(s, "hello", location="TZ").status_code == 201
    first = take("w-1")
    # She closes it.
    wrapup_after(lambda: zawadi.close(first), "w-2")
    # The chatbot closes the next one: she still gets her wrap-up.
    take("w-2")
    wrapup_after(lambda: bot.close("w-2"), "w-3")
    # A supervisor closes it: the wrap-up is hers, not the supervisor's.
    third = take("w-3")
    wrapup_after(lambda: sup.close(third), "w-4")
    sup.close_all()
