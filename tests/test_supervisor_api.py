"""The supervisor API over HTTP: roles, site scoping, live numbers, dead letters and their replay, stats."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from conftest import PASSWORD, Env, staff
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import ReceivedStart
from support import eventually

ROUTES = [
    ("GET", "/api/supervisor/overview"),
    ("GET", "/api/supervisor/dead-letters"),
    ("GET", "/api/supervisor/stats"),
    ("POST", "/api/supervisor/dead-letters/1/replay"),
]


def site_of(overview: dict[str, Any], slug: str) -> dict[str, Any]:
    found = [s for s in overview["sites"] if s["slug"] == slug]
    assert len(found) == 1, overview
    return found[0]


def counselor(site: dict[str, Any], username: str) -> dict[str, Any]:
    return next(c for c in site["counselors"] if c["username"] == username)


def params(starts: list[ReceivedStart], session: str) -> list[dict[str, Any]]:
    return [s.params for s in starts if s.params and s.params.get("conversation_id") == session]


def test_only_supervisors_and_admins(env: Env, clients: list[httpx.Client]) -> None:
    env.chatbot("weni")
    bot = httpx.Client(base_url=env.url, timeout=30)
    clients.append(bot)
    token = bot.post("/api/token/", json={"username": "weni", "password": PASSWORD}).json()["token"]
    bot.headers["Authorization"] = f"Token {token}"
    amina = staff(env, clients, "amina", "counselor", site="ke")
    sam = staff(env, clients, "sam", "supervisor", site="ke")
    root = staff(env, clients, "root", "admin", site="ke")
    anonymous = httpx.Client(base_url=env.url, timeout=30)
    clients.append(anonymous)

    for method, path in ROUTES:
        assert anonymous.request(method, path).status_code == 401
        for who in (bot, amina):
            r = who.request(method, path)
            assert r.status_code == 403, (path, r.text)
            assert r.json()["error"]["code"] == "permission_denied"
    for who in (sam, root):
        for path in ("/api/supervisor/overview", "/api/supervisor/dead-letters", "/api/supervisor/stats"):
            assert who.get(path).status_code == 200, path
        assert who.post("/api/supervisor/dead-letters/999/replay").status_code == 404


def test_sites_are_kept_apart(make_env: Callable[..., Env], clients: list[httpx.Client]) -> None:
    env = make_env(offer_timeout_s=30.0)
    bot = env.chatbot()
    sam = staff(env, clients, "sam", "supervisor", site="ke")
    zawadi = staff(env, clients, "zawadi", "supervisor", site="tz")
    everywhere = staff(env, clients, "eve", "supervisor", site="*")
    root = staff(env, clients, "root", "admin", site="ke")
    tumaini = env.counselor("tumaini", site="tz")
    listeners: dict[str, FakeCounselor] = {}
    for name, client in (("sam", sam), ("eve", everywhere)):
        listener = FakeCounselor(env.url, name, PASSWORD)
        listener.token = client.headers["Authorization"].removeprefix("Token ")
        listener.connect()
        listeners[name] = listener

    # A dead letter at the Tanzanian site.
    env.rapidpro.fail_next(1, 400)
    assert bot.send("tz-1", "habari", location="TZ", contact_urn="whatsapp:255700000001").status_code == 201
    offer = tumaini.wait_for("offer")["offer"]
    assert tumaini.read_offer(offer["id"]).status_code == 200

    def one_dead_letter() -> int:
        r = zawadi.get("/api/supervisor/dead-letters")
        assert r.status_code == 200
        assert r.json()["count"] == 1
        return int(r.json()["results"][0]["id"])

    dead_id = eventually(one_dead_letter)

    assert [s["slug"] for s in sam.get("/api/supervisor/overview").json()["sites"]] == ["ke"]
    assert [s["slug"] for s in zawadi.get("/api/supervisor/overview").json()["sites"]] == ["tz"]
    assert [s["slug"] for s in everywhere.get("/api/supervisor/overview").json()["sites"]] == ["ke", "tz"]
    assert [s["slug"] for s in root.get("/api/supervisor/overview").json()["sites"]] == ["ke", "tz"]
    assert [s["slug"] for s in root.get("/api/supervisor/overview?site=tz").json()["sites"]] == ["tz"]
    assert [s["slug"] for s in root.get("/api/supervisor/stats?site=tz").json()["sites"]] == ["tz"]

    # Another site's data: 403 when asked by name, invisible otherwise, 404 to replay.
    for path in ("/api/supervisor/overview", "/api/supervisor/dead-letters", "/api/supervisor/stats"):
        assert sam.get(f"{path}?site=tz").status_code == 403, path
        assert root.get(f"{path}?site=nowhere").status_code == 404, path
    assert sam.get("/api/supervisor/dead-letters").json() == {"results": [], "count": 0}
    assert site_of(sam.get("/api/supervisor/overview").json(), "ke")["dead_letters"] == 0
    assert site_of(zawadi.get("/api/supervisor/overview").json(), "tz")["dead_letters"] == 1
    r = sam.post(f"/api/supervisor/dead-letters/{dead_id}/replay")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert [d["id"] for d in everywhere.get("/api/supervisor/dead-letters").json()["results"]] == [dead_id]
    assert everywhere.get("/api/supervisor/dead-letters?site=ke").json()["count"] == 0

    assert zawadi.post(f"/api/supervisor/dead-letters/{dead_id}/replay").status_code == 200
    env.rapidpro.wait_for(lambda rs: any(p["event"] == "assigned" for p in params(rs, "tz-1")))

    # Live events: a "*" supervisor hears every site's (tagged with the site); a ke one, ke's only.
    event = listeners["eve"].wait_for("queue_changed")
    assert event["site"] == "tz"
    assert bot.send("ke-1", "jambo", contact_urn="telegram:1").status_code == 201
    assert listeners["sam"].wait_for("queue_changed")["site"] == "ke"
    assert all(e["site"] == "ke" for e in listeners["sam"].of_type("queue_changed"))
    for listener in listeners.values():
        listener.close_all()


def test_overview_counts_the_queue_and_the_counselors(
    make_env: Callable[..., Env], clients: list[httpx.Client]
) -> None:
    env = make_env(offer_timeout_s=30.0, max_chats=1)
    bot = env.chatbot()
    sam = staff(env, clients, "sam", "supervisor", site="ke")
    amina = env.counselor("amina", site="ke", name="Amina")
    baraka = env.counselor("baraka", site="ke", name="Baraka", join=False)

    empty = site_of(sam.get("/api/supervisor/overview").json(), "ke")
    assert empty["queue"] == {
        "waiting": 0,
        "queued": 0,
        "offered": 0,
        "assigned": 0,
        "high_risk_waiting": 0,
        "longest_wait_s": None,
    }
    assert empty["name"] == "Childline Kenya"
    assert empty["outbox"] == {"pending": 0, "oldest_pending_age_s": None}

    # Amina takes the first conversation; with one chat each, the next two wait.
    assert bot.send("ke-1", "first", risk="high", contact_urn="telegram:1").status_code == 201
    offer = amina.wait_for("offer")["offer"]
    assert amina.read_offer(offer["id"]).status_code == 200
    assert bot.send("ke-2", "second", risk="high", contact_urn="telegram:2").status_code == 201
    assert bot.send("ke-3", "third", risk="low", contact_urn="telegram:3").status_code == 201
    assert bot.send("tz-1", "elsewhere", location="TZ", contact_urn="whatsapp:255700000001").status_code == 201
    time.sleep(0.3)

    ke = site_of(sam.get("/api/supervisor/overview").json(), "ke")
    assert ke["queue"] | {"longest_wait_s": None} == {
        "waiting": 2,
        "queued": 2,
        "offered": 0,
        "assigned": 1,
        "high_risk_waiting": 1,
        "longest_wait_s": None,
    }
    assert 0 < ke["queue"]["longest_wait_s"] < 30
    assert ke["counselors_summary"] == {"available": 1, "paused": 0, "offline": 1}
    a = counselor(ke, "amina")
    assert a | {"id": None, "since": None} == {
        "id": None,
        "username": "amina",
        "name": "Amina",
        "status": "available",
        "reason": None,
        "since": None,
        "in_wrapup": False,
        "active_conversations": 1,
        "pending_offers": 0,
    }
    assert counselor(ke, "baraka")["status"] == "offline"

    # Baraka joins: the high-risk one is offered to him first.
    assert baraka.join_queue().status_code == 200
    assert baraka.wait_for("offer")["offer"]["conversation"]["chat_session"] == "ke-2"
    ke = site_of(sam.get("/api/supervisor/overview").json(), "ke")
    assert (ke["queue"]["waiting"], ke["queue"]["queued"], ke["queue"]["offered"]) == (2, 1, 1)
    assert ke["queue"]["high_risk_waiting"] == 1
    assert counselor(ke, "baraka")["pending_offers"] == 1

    # Pausing with a reason shows.
    assert amina.presence("paused", "Case notes").status_code == 200
    ke = site_of(sam.get("/api/supervisor/overview").json(), "ke")
    assert (counselor(ke, "amina")["status"], counselor(ke, "amina")["reason"]) == ("paused", "Case notes")
    assert ke["counselors_summary"] == {"available": 1, "paused": 1, "offline": 0}

    # RapidPro is down: events wait in the outbox, and the overview says how many and how old.
    env.rapidpro.go_down()
    try:
        r = amina.reply(offer["conversation"]["id"], "are you there?")
        assert r.status_code == 201

        def outbox_waits() -> None:
            ob = site_of(sam.get("/api/supervisor/overview").json(), "ke")["outbox"]
            assert ob["pending"] >= 1 and ob["oldest_pending_age_s"] > 0

        eventually(outbox_waits)
    finally:
        env.rapidpro.come_back()

    def outbox_empties() -> None:
        assert site_of(sam.get("/api/supervisor/overview").json(), "ke")["outbox"]["pending"] == 0

    eventually(outbox_empties)


def test_lapsed_offers_in_the_last_hour(make_env: Callable[..., Env], clients: list[httpx.Client]) -> None:
    env = make_env(offer_timeout_s=0.3, autopause=True)
    bot = env.chatbot()
    sam = staff(env, clients, "sam", "supervisor", site="ke")
    amina = env.counselor("amina", site="ke")
    assert bot.send("ke-1", "hello", contact_urn="telegram:1").status_code == 201
    amina.wait_for("offer_withdrawn", timeout=5)

    def lapsed() -> None:
        ke = site_of(sam.get("/api/supervisor/overview").json(), "ke")
        assert ke["offers_lapsed_last_hour"] == 1
        assert (counselor(ke, "amina")["status"], counselor(ke, "amina")["reason"]) == ("paused", "no answer")
        assert ke["queue"]["queued"] == 1

    eventually(lapsed)


def test_dead_letter_shows_and_replay_sends_it_again(make_env: Callable[..., Env], clients: list[httpx.Client]) -> None:
    env = make_env(offer_timeout_s=30.0)
    rapidpro = env.rapidpro
    bot = env.chatbot()
    sam = staff(env, clients, "sam", "supervisor", site="ke")
    amina = env.counselor("amina", site="ke", name="Amina")
    assert bot.send("ke-dead", "hello", message_id="in-1", contact_urn="telegram:42").status_code == 201
    offer = amina.wait_for("offer")["offer"]
    r = amina.read_offer(offer["id"])
    assert r.status_code == 200
    conv = r.json()["conversation"]["id"]
    rapidpro.wait_for(lambda rs: len(params(rs, "ke-dead")) >= 3)  # queued + assigned + ack

    # RapidPro refuses the counselor's message with a 400: dead letter, message failed.
    rapidpro.fail_next(1, 400)
    r = amina.reply(conv, "a secret the supervisor must not read")
    assert r.status_code == 201
    message_id = r.json()["message_id"]
    assert amina.wait_for("message_status", lambda e: e["message_id"] == message_id)["status"] == "failed"

    def listed() -> dict[str, Any]:
        body = sam.get("/api/supervisor/dead-letters").json()
        assert body["count"] == 1
        return dict(body["results"][0])

    dead = eventually(listed)
    assert set(dead) == {
        "id",
        "site",
        "conversation_id",
        "chat_session",
        "event",
        "last_error",
        "attempts",
        "created_at",
    }
    assert dead | {"id": None, "created_at": None} == {
        "id": None,
        "site": "ke",
        "conversation_id": conv,
        "chat_session": "ke-dead",
        "event": "message",
        "last_error": dead["last_error"],
        "attempts": 1,
        "created_at": None,
    }
    assert "400" in dead["last_error"]
    assert "secret" not in sam.get("/api/supervisor/dead-letters").text
    assert site_of(sam.get("/api/supervisor/overview").json(), "ke")["dead_letters"] == 1

    # Replay: RapidPro gets the message once more, the counselor sees pending then sent.
    before = len([p for p in params(rapidpro.accepted, "ke-dead") if p["event"] == "message"])
    assert before == 0
    r = sam.post(f"/api/supervisor/dead-letters/{dead['id']}/replay")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": dead["id"], "site": "ke", "status": "pending"}
    starts = rapidpro.wait_for(lambda rs: any(p["event"] == "message" for p in params(rs, "ke-dead")))
    sent = [p for p in params(starts, "ke-dead") if p["event"] == "message"]
    assert len(sent) == 1 and sent[0]["message_id"] == message_id
    assert sent[0]["text"] == "a secret the supervisor must not read"
    assert amina.wait_for("message_status", lambda e: e["message_id"] == message_id)["status"] == "pending"
    assert amina.wait_for("message_status", lambda e: e["message_id"] == message_id)["status"] == "sent"
    statuses = {m["message_id"]: m["status"] for m in amina.messages(conv).json()["results"]}
    assert statuses[message_id] == "sent"
    assert sam.get("/api/supervisor/dead-letters").json()["count"] == 0
    assert site_of(sam.get("/api/supervisor/overview").json(), "ke")["dead_letters"] == 0

    # Once only: a second replay is a conflict; an unknown id is 404.
    assert sam.post(f"/api/supervisor/dead-letters/{dead['id']}/replay").status_code == 409
    assert sam.post("/api/supervisor/dead-letters/999999/replay").status_code == 404


def test_stats_per_hour(make_env: Callable[..., Env], clients: list[httpx.Client]) -> None:
    env = make_env(offer_timeout_s=30.0)
    bot = env.chatbot()
    sam = staff(env, clients, "sam", "supervisor", site="ke")
    amina = env.counselor("amina", site="ke")
    assert bot.send("ke-1", "one", contact_urn="telegram:1").status_code == 201
    offer = amina.wait_for("offer")["offer"]
    time.sleep(0.2)
    assert amina.read_offer(offer["id"]).status_code == 200
    assert bot.send("ke-2", "two", contact_urn="telegram:2").status_code == 201

    body = sam.get("/api/supervisor/stats?hours=3").json()
    assert body["hours"] == 3
    assert [s["slug"] for s in body["sites"]] == ["ke"]
    hours = body["sites"][0]["hours"]
    assert len(hours) == 3
    assert set(hours[0]) == {"start", "conversations", "assigned", "median_wait_s", "max_wait_s"}
    starts = [h["start"] for h in hours]
    assert starts == sorted(starts) and all(s.endswith(":00:00Z") for s in starts)
    current = hours[-1]
    assert (current["conversations"], current["assigned"]) == (2, 1)
    assert 0.1 <= current["median_wait_s"] == current["max_wait_s"] < 10
    assert all(h["conversations"] == 0 and h["median_wait_s"] is None for h in hours[:-1])

    assert len(sam.get("/api/supervisor/stats").json()["sites"][0]["hours"]) == 24
    for bad in ("0", "169", "x"):
        r = sam.get(f"/api/supervisor/stats?hours={bad}")
        assert r.status_code == 422, bad
        assert r.json()["error"]["code"] == "validation_error"
