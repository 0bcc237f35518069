"""The chatbot-facing API (OpenCHS-compatible), over the real HTTP server."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from conftest import PASSWORD, Env
from helpline.testing.fake_chatbot import FakeChatbot

PREFIXES = ("/api", "/open/api", "/sites/ke/api", "/sites/tz/api", "/sites/ke/open/api", "/sites/tz/open/api")
ANSWER_KEYS = {"status", "uuid", "chat_session", "message_id", "delivery", "created"}


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert ``r`` is the one error body with ``status`` (and ``code``); return its ``error``."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"code", "message", "fields"}, err
    assert isinstance(err["code"], str) and err["code"], err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["fields"], dict), err
    if code is not None:
        assert err["code"] == code, err
    return err


def invalid(r: httpx.Response, field: str) -> dict[str, Any]:
    """A 422 naming ``field``."""
    err = error_of(r, 422, "validation_error")
    assert field in err["fields"], err
    assert all(isinstance(m, str) for m in err["fields"][field]), err
    return err


def chat(session: str = "s1", text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"chat_sender": "23343411", "chat_message": text, "chat_session": session, "chat_source": "WENI", **extra}


def texts(bot: FakeChatbot, session: str, prefix: str = "/api") -> list[str]:
    r = bot.http.get(f"{prefix}/chat/{session}/messages/")
    assert r.status_code == 200, r.text
    return [m["text"] for m in r.json()["results"]]


def sessions(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [c["chat_session"] for c in r.json()["results"]]


# -- posting messages -----------------------------------------------------------------------------


def test_new_continue_and_repeat_of_a_message_id(env: Env) -> None:
    bot = env.chatbot()
    first = bot.send("s1", "hello", message_id="m1", risk="high", client_name="Kid A")
    assert first.status_code == 201, first.text
    body = first.json()
    assert set(body) == ANSWER_KEYS
    assert body["status"] == "success" and body["created"] is True and body["delivery"] == "queued"
    assert body["chat_session"] == "s1" and body["message_id"] == "m1"
    uuid.UUID(body["uuid"])

    second = bot.send("s1", "are you there?", message_id="m2")
    assert second.status_code == 201, second.text
    assert second.json()["created"] is False and second.json()["uuid"] != body["uuid"]

    for text in ("hello", "a retry may even carry other text"):
        again = bot.send("s1", text, message_id="m1")
        assert again.status_code == 200, again.text
        assert again.json() == body
    assert texts(bot, "s1") == ["hello", "are you there?"]
    # The same message_id for another session is no retry: refused, not answered with s1's answer.
    err = error_of(bot.send("s2", "hello", message_id="m1"), 409, "conflict")
    assert "message_id" in err["fields"], err
    assert sessions(bot.chats()) == ["s1"]
    r = bot.messages("s1").json()
    assert r["chat_session"] == "s1" and r["conversation_status"] == "queued"
    assert [(m["message_id"], m["direction"], m["status"]) for m in r["results"]] == [
        ("m1", "in", "queued"),
        ("m2", "in", "queued"),
    ]

    # Without a message_id the server makes one up; the same text again at once is a retry of it
    # (the site's dedupe window, tests/test_inbound_repeats.py), another text a new message.
    plain = chat("s1", "no id")
    a, b = bot.http.post("/api/chat/", json=plain), bot.http.post("/api/chat/", json=plain)
    assert (a.status_code, b.status_code) == (201, 200), (a.text, b.text)
    assert b.json() == {**a.json(), "duplicate": True}
    c = bot.http.post("/api/chat/", json=chat("s1", "another"))
    assert c.status_code == 201 and c.json()["message_id"] != a.json()["message_id"]
    assert texts(bot, "s1") == ["hello", "are you there?", "no id", "another"]
    assert len(sessions(bot.chats())) == 1


def test_malformed_unsupported_and_oversized_bodies(env: Env) -> None:
    bot = env.chatbot()
    as_json = {"content-type": "application/json"}
    for raw in (b'{"chat_session": ', b"", b"{'single': 'quotes'}", b"\xff\xfe", b"nul", b'{"a": 1} trailing'):
        error_of(bot.http.post("/api/chat/", content=raw, headers=as_json), 400, "malformed_json")
    good = json.dumps(chat("s1")).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"):
        error_of(bot.http.post("/api/chat/", content=good, headers={"content-type": ctype}), 415)
    error_of(bot.http.post("/api/chat/", data={"chat_session": "s1"}), 415, "unsupported_media_type")

    big = b'{"chat_message": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    error_of(bot.http.post("/api/chat/", content=big, headers=as_json), 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield b'{"chat_message": "'
        for _ in range(64):
            yield b"y" * 65536
        yield b'"}'

    error_of(bot.http.post("/api/chat/", content=chunks(), headers=as_json), 413, "body_too_large")

    for not_an_object in ([chat("s1")], "text", 42, None, True):
        invalid(bot.http.post("/api/chat/", content=json.dumps(not_an_object), headers=as_json), "__root__")

    # None of these left anything behind; a well-formed one still works.
    assert sessions(bot.chats()) == []
    ctypes: list[str | None] = ["application/json; charset=utf-8", "application/vnd.weni+json", None]
    for i, accepted in enumerate(ctypes):
        headers = {"content-type": accepted} if accepted else {}
        r = bot.http.post("/api/chat/", content=json.dumps(chat("ok", f"hello {i}")).encode(), headers=headers)
        assert r.status_code == 201, (accepted, r.text)
        assert "content-type" in r.request.headers or accepted is None
    assert texts(bot, "ok") == ["hello 0", "hello 1", "hello 2"]


def test_missing_required_fields_are_named(env: Env) -> None:
    bot = env.chatbot()
    required = ("chat_session", "chat_message", "chat_sender", "chat_source")
    for field in required:
        body = chat("s1")
        del body[field]
        err = invalid(bot.http.post("/api/chat/", json=body), field)
        assert set(err["fields"]) == {field}, err
        body[field] = None
        invalid(bot.http.post("/api/chat/", json=body), field)
    err = invalid(bot.http.post("/api/chat/", json={}), "chat_session")
    assert set(required) <= set(err["fields"]), err
    assert sessions(bot.chats()) == []


def test_wrong_types_and_values_are_422(env: Env) -> None:
    bot = env.chatbot()
    cases: list[tuple[str, Any]] = [
        ("chat_message", 5),
        ("chat_message", ""),
        ("chat_message", "x" * 4097),
        ("chat_message", ["hi"]),
        ("chat_sender", True),
        ("chat_sender", False),
        ("chat_sender", [23343411]),
        ("chat_sender", {"id": 1}),
        ("chat_sender", 1.5),
        ("chat_sender", ""),
        ("chat_sender", "9" * 129),
        ("chat_receiver", True),
        ("chat_receiver", "r" * 129),
        ("chat_session", "has space"),
        ("chat_session", "x" * 129),
        ("chat_session", ""),
        ("chat_session", "a/b"),
        ("chat_session", "a?b"),
        ("chat_session", 12345),
        ("chat_source", ""),
        ("chat_source", 7),
        ("message_id", ""),
        ("message_id", 7),
        ("message_id", "m" * 129),
        ("client_name", 7),
        ("risk", "extreme"),
        ("risk", "HIGH"),
        ("risk", 2),
        ("location", "Kenya"),
        ("location", "K"),
        ("location", "K1"),
        ("location", 254),
        ("contact_urn", "23343411"),
        ("contact_uuid", "not-a-uuid"),
    ]
    for field, value in cases:
        invalid(bot.http.post("/api/chat/", json=chat("s1", **{field: value})), field)
    assert sessions(bot.chats()) == [], "no invalid message may start a conversation"

    accepted: list[dict[str, Any]] = [
        chat(str(uuid.uuid4())),
        chat(str(uuid.uuid4()).upper()),
        chat("a" * 128),
        chat("A.b~c_d-1"),
        chat("s-int", chat_sender=23343411, chat_receiver=254),
        chat("s-long", "x" * 4096),
        chat("s-risk", risk="medium", location="ke", message_id="m" * 128, client_name="Kid"),
        chat("s-urn", contact_urn="telegram:23343411", contact_uuid=str(uuid.uuid4()), unknown_field=1),
        chat("s-sender", chat_sender="9" * 128),
    ]
    for body in accepted:
        r = bot.http.post("/api/chat/", json=body)
        assert r.status_code == 201, (body["chat_session"], r.text)
        assert r.json()["chat_session"] == body["chat_session"]
        assert texts(bot, body["chat_session"]) == [body["chat_message"]]


def test_concurrent_posts_neither_duplicate_nor_fail(env: Env) -> None:
    bot = env.chatbot()
    n = 8
    barrier = threading.Barrier(n)

    def post(body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(base_url=env.url, headers=dict(bot.http.headers), timeout=30) as http:
            barrier.wait(timeout=10)
            return http.post("/api/chat/", json=body)

    # The same message_id at once, for a new session: one answer made, the others repeat it.
    with ThreadPoolExecutor(n) as pool:
        same = list(pool.map(post, [chat("race-1", "hi", message_id="m1")] * n))
    assert sorted(r.status_code for r in same) == [200] * (n - 1) + [201], [r.text for r in same]
    assert all(r.json() == same[0].json() for r in same)
    assert texts(bot, "race-1") == ["hi"]

    # Different message_ids at once, for a new session: one conversation, every message kept.
    with ThreadPoolExecutor(n) as pool:
        many = list(pool.map(post, [chat("race-2", f"m{i}", message_id=f"r2-{i}") for i in range(n)]))
    assert [r.status_code for r in many] == [201] * n, [r.text for r in many]
    assert sum(r.json()["created"] for r in many) == 1
    assert sorted(texts(bot, "race-2")) == sorted(f"m{i}" for i in range(n))
    assert sorted(sessions(bot.chats())) == ["race-1", "race-2"]


# -- sites and prefixes ---------------------------------------------------------------------------


def test_unknown_site_path_is_404(env: Env) -> None:
    bot = env.chatbot()
    for prefix in ("/sites/zz/api", "/sites/zz/open/api", "/sites/KE/api"):
        error_of(bot.http.post(f"{prefix}/chat/", json=chat("s1")), 404, "unknown_site")
        error_of(bot.http.get(f"{prefix}/chat/"), 404, "unknown_site")
        error_of(bot.http.get(f"{prefix}/chat/s1/messages/"), 404, "unknown_site")
        error_of(bot.http.post(f"{prefix}/token/", json={"username": "weni", "password": "x" * 8}), 404)
    error_of(bot.http.post("/nowhere/api/chat/", json=chat("s1")), 404, "not_found")
    assert sessions(bot.chats()) == []


def test_site_comes_from_the_path_then_location_then_default(env: Env) -> None:
    bot = env.chatbot()
    posts = [
        ("/api", "loc-tz", "TZ"),
        ("/api", "loc-tz-lower", "tz"),
        ("/api", "loc-fr", "FR"),
        ("/api", "loc-ke", "KE"),
        ("/api", "loc-none", None),
        ("/sites/tz/api", "path-tz-loc-ke", "KE"),
        ("/sites/ke/open/api", "path-ke-loc-tz", "TZ"),
    ]
    for prefix, session, location in posts:
        extra = {"location": location} if location else {}
        r = bot.http.post(f"{prefix}/chat/", json=chat(session, **extra))
        assert r.status_code == 201, r.text
    r = bot.chats()
    assert r.status_code == 200, r.text
    found = {c["chat_session"]: (c["site"], c["location"]) for c in r.json()["results"]}
    assert found == {
        "loc-tz": ("tz", "TZ"),
        "loc-tz-lower": ("tz", "TZ"),
        "loc-fr": ("ke", "FR"),
        "loc-ke": ("ke", "KE"),
        "loc-none": ("ke", None),
        "path-tz-loc-ke": ("tz", "KE"),
        "path-ke-loc-tz": ("ke", "TZ"),
    }
    # A per-site path lists only that site's chats.
    assert sorted(sessions(bot.http.get("/sites/tz/api/chat/"))) == ["loc-tz", "loc-tz-lower", "path-tz-loc-ke"]
    assert sessions(bot.http.get("/sites/tz/open/api/chat/", params={"chat_session": "loc-fr"})) == []
    # ...and does not reach another site's conversation.
    error_of(bot.http.get("/sites/tz/api/chat/loc-fr/messages/"), 404, "not_found")
    error_of(bot.http.post("/sites/tz/api/chat/loc-fr/close/", json={}), 404, "not_found")
    error_of(bot.http.post("/sites/tz/api/chat/loc-fr/ack/", json={"message_id": "x", "status": "read"}), 404)
    error_of(bot.http.post("/sites/tz/api/chat/", json=chat("loc-fr", "again")), 409, "conflict")
    assert texts(bot, "loc-fr") == ["hello"]


def test_the_same_api_under_every_prefix(env: Env) -> None:
    token = env.chatbot().token  # a token works under every prefix: one login is enough
    for i, prefix in enumerate(PREFIXES):
        bot = FakeChatbot(env.url, "weni", "", prefix=prefix)
        bot.http.headers["Authorization"] = f"Token {token}"
        try:
            session = f"p{i}"
            r = bot.send(session, "hello", message_id=f"{session}-1")
            assert r.status_code == 201 and r.json()["created"] is True, (prefix, r.text)
            again = bot.send(session, "hello", message_id=f"{session}-1")
            assert again.status_code == 200 and again.json() == r.json(), prefix
            assert bot.send(session, "more").status_code == 201
            assert texts(bot, session, prefix) == ["hello", "more"], prefix
            assert sessions(bot.chats(chat_session=session)) == [session], prefix
            error_of(bot.ack(session, "no-such-message", "read"), 404, "not_found")
            closed = bot.close(session)
            assert closed.status_code == 200, (prefix, closed.text)
            error_of(bot.send(session, "after close"), 409, "conflict")
            expected_site = prefix.split("/")[2] if prefix.startswith("/sites/") else "ke"
            assert bot.chats(chat_session=session).json()["results"][0]["site"] == expected_site
            error_of(bot.http.get(f"{prefix}/chat/", headers={"Authorization": "Token " + "0" * 40}), 401)
        finally:
            bot.aclose()
    # Each prefix's token call works too (and revokes under its own prefix).
    for prefix in ("/open/api", "/sites/tz/open/api"):
        bot = FakeChatbot(env.url, "weni", PASSWORD, prefix=prefix)
        try:
            bot.login()
            assert sessions(bot.chats(limit=1)) == [f"p{len(PREFIXES) - 1}"]
            assert bot.http.delete(f"{prefix}/token/").status_code == 204
            error_of(bot.chats(), 401, "not_authenticated")
        finally:
            bot.aclose()


# -- close and ack --------------------------------------------------------------------------------


def test_close_is_idempotent_and_a_closed_conversation_refuses_messages(env: Env) -> None:
    bot = env.chatbot()
    first = bot.send("s1", "hello", message_id="m1")
    assert first.status_code == 201
    r = bot.close("s1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success" and body["conversation_status"] == "closed"
    assert body["already_closed"] is False and body["closed_at"]
    again = bot.close("s1")
    assert again.status_code == 200, again.text
    assert again.json()["already_closed"] is True and again.json()["closed_at"] == body["closed_at"]
    no_body = bot.http.post("/api/chat/s1/close/")
    assert no_body.status_code == 200, no_body.text

    error_of(bot.send("s1", "still there?"), 409, "conflict")
    error_of(bot.send("s1", "still there?", message_id="m2"), 409, "conflict")
    replay = bot.send("s1", "hello", message_id="m1")
    assert replay.status_code == 200 and replay.json() == first.json()
    r = bot.messages("s1")
    assert r.json()["conversation_status"] == "closed"
    assert [m["text"] for m in r.json()["results"]] == ["hello"]
    assert sessions(bot.chats(status="closed")) == ["s1"]

    error_of(bot.close("unknown"), 404, "not_found")
    error_of(bot.messages("unknown"), 404, "not_found")
    # A close is never refused over its body (issue 15): whatever it holds, the answer is the close's.
    for body, ctype in (
        (b'{"chat_source": 5}', "application/json"),
        (b"{", "application/json"),
        (b"x", "text/plain"),
        (b"\x00\xff", "application/octet-stream"),
    ):
        r = bot.http.post("/api/chat/s1/close/", content=body, headers={"content-type": ctype})
        assert r.status_code == 200 and r.json()["already_closed"] is True, (body, ctype, r.text)
    # Other endpoints still refuse a body that is not JSON.
    error_of(bot.http.post("/api/chat/s1/ack/", content=b"x", headers={"content-type": "text/plain"}), 415)


def test_the_seeds_close_request_as_postman_sends_it(make_env: Callable[..., Env]) -> None:
    """The seed documents the close as raw text ``{"chat_source":"WENI"}``: Postman sends it as text/plain."""
    env = make_env()
    bot = env.chatbot()
    for session in ("seed-1", "seed-2"):
        assert bot.send(session, "hello").status_code == 201
    as_text = bot.http.post(
        "/open/api/chat/seed-1/close/", content=b'{"chat_source":"WENI"}', headers={"Content-Type": "text/plain"}
    )
    assert as_text.status_code == 200, as_text.text
    assert as_text.json()["conversation_status"] == "closed" and as_text.json()["already_closed"] is False
    untyped = bot.http.build_request("POST", "/open/api/chat/seed-2/close/", content=b'{"chat_source":"WENI"}')
    assert "content-type" not in untyped.headers  # raw bytes: httpx sends no content type at all
    sent = bot.http.send(untyped)
    assert sent.status_code == 200 and sent.json()["already_closed"] is False, sent.text
    assert bot.chats(status="closed").json()["results"]
    error_of(bot.send("seed-1", "still there?"), 409, "conflict")


def test_ack_of_counselor_messages(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=30.0)  # a busy machine must not let the offer lapse
    bot = env.chatbot()
    amina = env.counselor("amina")
    assert bot.send("s1", "hello", message_id="in-1").status_code == 201
    offer = amina.wait_for("offer")["offer"]
    assert amina.read_offer(offer["id"]).status_code == 200
    reply = amina.reply(offer["conversation"]["id"], "I am here")
    assert reply.status_code == 201, reply.text
    out_id = reply.json()["message_id"]

    for status, expected in (("delivered", "delivered"), ("read", "read"), ("delivered", "read")):
        r = bot.ack("s1", out_id, status)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "success", "chat_session": "s1", "message_id": out_id, "delivery": expected}
    event = amina.wait_for("message_status", lambda e: e["status"] == "read")
    assert event["message_id"] == out_id
    outgoing = [m for m in bot.messages("s1").json()["results"] if m["direction"] == "out"]
    assert [(m["message_id"], m["status"], m["text"]) for m in outgoing] == [(out_id, "read", "I am here")]

    error_of(bot.ack("s1", "no-such-message", "read"), 404, "not_found")
    error_of(bot.ack("s1", "in-1", "read"), 404, "not_found")  # the client's own message is not ackable
    error_of(bot.ack("unknown", out_id, "read"), 404, "not_found")
    for bad in ("seen", "", None, 1):
        invalid(bot.http.post("/api/chat/s1/ack/", json={"message_id": out_id, "status": bad}), "status")
    invalid(bot.http.post("/api/chat/s1/ack/", json={"status": "read"}), "message_id")
    invalid(bot.http.post("/api/chat/s1/ack/", json={"message_id": "", "status": "read"}), "message_id")
    error_of(bot.http.post("/api/chat/s1/ack/", content=b"[", headers={"content-type": "application/json"}), 400)
    error_of(bot.http.post("/api/chat/s1/ack/"), 400, "malformed_json")


# -- listing --------------------------------------------------------------------------------------


def test_list_is_newest_first_paginated_and_filtered(env: Env) -> None:
    bot = env.chatbot()
    names = [f"s{i}" for i in range(7)]
    for name in names:
        assert bot.send(name, "hello").status_code == 201
    newest_first = names[::-1]
    r = bot.chats()
    assert sessions(r) == newest_first and r.json()["next_cursor"] is None

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        r = bot.chats(**params)
        pages.append(sessions(r))
        if len(pages) == 1:
            # A conversation started while paging is newer than the cursor: it never shows up later.
            assert bot.send("late", "hello").status_code == 201
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str) and cursor
        assert len(pages) < 10
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:7]]
    assert sessions(bot.chats(limit=7))[0] == "late"
    r = bot.chats(limit=8)
    assert sessions(r) == ["late", *newest_first] and r.json()["next_cursor"] is None

    assert bot.close("s2").status_code == 200
    assert sessions(bot.chats(chat_session="s3")) == ["s3"]
    assert sessions(bot.chats(chat_session="nope")) == []
    assert sessions(bot.chats(status="closed")) == ["s2"]
    assert sessions(bot.chats(status="queued")) == [s for s in ["late", *newest_first] if s != "s2"]
    assert sessions(bot.chats(status="closed", chat_session="s3")) == []
    assert sessions(bot.chats(status="queued", limit=2)) == ["late", "s6"]

    for bad in ("!!!", "abc", "W10", "WzEsMiwzXQ", "eyJhIjoxfQ", "bnVsbA", "x" * 513):
        invalid(bot.chats(cursor=bad), "cursor")
    for limit in (0, -1, 201, "x"):
        invalid(bot.chats(limit=limit), "limit")
    invalid(bot.chats(status="bogus"), "status")
    invalid(bot.chats(chat_session="has space"), "chat_session")


def test_a_chatbot_never_sees_another_chatbots_chats(env: Env) -> None:
    weni = env.chatbot("weni")
    other = env.chatbot("other")
    assert weni.send("shared", "from weni", message_id="m1").status_code == 201
    assert weni.send("weni-only", "secret").status_code == 201
    r = other.send("shared", "from other", message_id="m1")  # same session and message ids: its own
    assert r.status_code == 201, r.text
    assert r.json()["created"] is True

    assert sorted(sessions(weni.chats())) == ["shared", "weni-only"]
    assert sessions(other.chats()) == ["shared"]
    assert sessions(other.chats(chat_session="weni-only")) == []
    assert texts(weni, "shared") == ["from weni"]
    assert texts(other, "shared") == ["from other"]
    weni_ids = {c["id"] for c in weni.chats().json()["results"]}
    assert not weni_ids & {c["id"] for c in other.chats().json()["results"]}

    error_of(other.messages("weni-only"), 404, "not_found")
    error_of(other.close("weni-only"), 404, "not_found")
    error_of(other.ack("weni-only", "x", "read"), 404, "not_found")
    assert weni.chats(chat_session="weni-only").json()["results"][0]["status"] == "queued"


# -- OpenAPI --------------------------------------------------------------------------------------


def test_openapi_documents_post_chat(env: Env) -> None:
    r = httpx.get(f"{env.url}/openapi.json", timeout=30)
    assert r.status_code == 200, r.text
    spec = r.json()
    op = spec["paths"]["/api/chat/"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    fields = {
        "chat_sender",
        "chat_receiver",
        "chat_message",
        "chat_session",
        "chat_source",
        "message_id",
        "client_name",
        "location",
        "risk",
        "contact_urn",
        "contact_uuid",
    }
    assert fields <= set(schema["properties"]), schema
    assert set(schema["required"]) == {"chat_sender", "chat_message", "chat_session", "chat_source"}
    assert schema["properties"]["chat_message"]["maxLength"] == 4096
    assert {"201", "200", "400", "401", "403", "409", "413", "415", "422"} <= set(op["responses"])
    for status in ("400", "401", "409", "413", "415", "422"):
        err = op["responses"][status]["content"]["application/json"]["schema"]
        assert err["required"] == ["error"]
        assert set(err["properties"]["error"]["required"]) == {"code", "message", "fields"}
    for path in ("/api/token/", "/api/chat/{chat_session}/close/", "/api/chat/{chat_session}/ack/"):
        assert "requestBody" in spec["paths"][path]["post"], path

    # Every reference in the document resolves (the risk enum included).
    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in set(refs(spec)):
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
            node = node[part]
