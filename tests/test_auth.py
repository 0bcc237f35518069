"""Tokens, roles, sites and the login rate limit, over the real HTTP server and WebSocket."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from conftest import PASSWORD, Env, sites_toml
from helpline.store.models import ApiToken, LoginFailure
from helpline.testing.fake_rapidpro import FakeRapidPro

TOKEN_RE = re.compile(r"^[0-9a-f]{40}$")


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


def login(env: Env, username: str, password: str = PASSWORD, prefix: str = "/api") -> httpx.Response:
    return httpx.post(f"{env.url}{prefix}/token/", json={"username": username, "password": password}, timeout=30)


def client(env: Env, token: str) -> httpx.Client:
    return httpx.Client(base_url=env.url, headers={"Authorization": f"Token {token}"}, timeout=30)


def token_of(env: Env, username: str) -> str:
    r = login(env, username)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def chat_body(session: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"chat_sender": 23343411, "chat_message": text, "chat_session": session, "chat_source": "WENI", **extra}


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- tokens ---------------------------------------------------------------------------------------


def test_token_is_40_lowercase_hex_expires_in_a_day_and_is_stored_hashed(env: Env) -> None:
    env.user("bot", "chatbot")
    tokens: list[str] = []
    for prefix in ("/api", "/sites/tz/open/api"):
        before = datetime.now(UTC)
        r = login(env, "bot", prefix=prefix)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"token", "expires_at"}
        assert TOKEN_RE.match(body["token"]), body
        expires = parse_iso(body["expires_at"])
        assert expires.tzinfo is not None
        assert before + timedelta(hours=24) - timedelta(seconds=5) <= expires
        assert expires <= datetime.now(UTC) + timedelta(hours=24) + timedelta(seconds=5)
        tokens.append(body["token"])
    assert len(set(tokens)) == len(tokens), "each login issues a fresh token"
    for tok in tokens:
        with client(env, tok) as http:
            assert http.get("/api/chat/").status_code == 200

    async def stored() -> list[dict[str, Any]]:
        async with env.server.core.sessionmaker() as s:
            rows = (await s.scalars(select(ApiToken))).all()
        return [{c.key: getattr(row, c.key) for c in ApiToken.__table__.columns} for row in rows]

    rows = env.server.call(stored())
    assert len(rows) == len(tokens)
    dumped = json.dumps(rows, default=str)
    for tok in tokens:
        assert tok not in dumped, "the raw token must never be stored"
    assert {row["key_hash"] for row in rows} == {hashlib.sha256(t.encode()).hexdigest() for t in tokens}


def test_bad_password_and_unknown_user_are_401_alike(env: Env) -> None:
    env.user("bot", "chatbot")
    wrong = error_of(login(env, "bot", "not-the-password"), 401, "not_authenticated")
    unknown = error_of(login(env, "nobody", PASSWORD), 401, "not_authenticated")
    assert wrong["message"] == unknown["message"], "the answer must not reveal which usernames exist"
    assert "token" not in json.dumps(wrong)
    # A malformed token request is the caller's mistake, not a failed login.
    error_of(httpx.post(f"{env.url}/api/token/", json={"username": "bot"}), 422, "validation_error")
    error_of(
        httpx.post(f"{env.url}/api/token/", content=b"{nope", headers={"content-type": "application/json"}),
        400,
        "malformed_json",
    )
    error_of(
        httpx.post(f"{env.url}/api/token/", data={"username": "bot", "password": PASSWORD}),
        415,
        "unsupported_media_type",
    )
    assert login(env, "bot").status_code == 200


def test_an_expired_token_is_401(make_env: Callable[..., Env]) -> None:
    # 2 s rather than 1: the clock starts before the (slow, argon2) password check, and the token
    # must still be seen working once before it expires, even on a busy machine.
    env = make_env(settings={"token_ttl_s": 2})
    env.user("bot", "chatbot")
    r = login(env, "bot")
    assert r.status_code == 200, r.text
    expires = parse_iso(r.json()["expires_at"])
    assert expires - datetime.now(UTC) <= timedelta(seconds=2)
    with client(env, r.json()["token"]) as http:
        assert http.get("/api/chat/").status_code == 200
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)
        error_of(http.get("/api/chat/"), 401, "not_authenticated")
        error_of(http.post("/api/chat/", json=chat_body("late")), 401, "not_authenticated")
        error_of(http.delete("/api/token/"), 401, "not_authenticated")


def test_a_revoked_token_is_401_and_other_tokens_still_work(env: Env) -> None:
    env.user("bot", "chatbot")
    first, second = token_of(env, "bot"), token_of(env, "bot")
    with client(env, first) as http:
        assert http.get("/api/chat/").status_code == 200
        r = http.delete("/api/token/")
        assert r.status_code == 204, r.text
        assert r.content == b""
        error_of(http.get("/api/chat/"), 401, "not_authenticated")
        error_of(http.delete("/api/token/"), 401, "not_authenticated")
    with client(env, second) as http:
        assert http.get("/api/chat/").status_code == 200
        # Revocation works under every chatbot prefix.
        assert http.delete("/sites/ke/open/api/token/").status_code == 204
        error_of(http.get("/api/chat/"), 401, "not_authenticated")


def test_missing_malformed_or_unknown_tokens_are_401(env: Env) -> None:
    env.user("bot", "chatbot")
    good = token_of(env, "bot")
    headers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Token"},
        {"Authorization": "Token  x"},
        {"Authorization": "Basic Ym90OmNvcnJlY3QtaG9yc2UtYmF0dGVyeQ=="},
        {"Authorization": f"Basic {good}"},
        {"Authorization": good},
        {"Authorization": "Token " + "g" * 40},
        {"Authorization": "Token " + good.upper()},
        {"Authorization": "Token " + good[:-1]},
        {"Authorization": "Token " + good + "0"},
        {"Authorization": "Token " + "0" * 40},
        {"Authorization": "Token " + good[:20] + "\u00e9" * 20},
    ]
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/api/chat/", None),
        ("POST", "/api/chat/", chat_body("s1")),
        ("GET", "/api/chat/s1/messages/", None),
        ("POST", "/sites/ke/api/chat/s1/close/", {}),
        ("GET", "/api/agents/me", None),
        ("GET", "/api/offers/", None),
        ("DELETE", "/api/token/", None),
    ]
    with httpx.Client(base_url=env.url, timeout=30) as http:
        for h in headers:
            encoded = {k.encode(): v.encode("utf-8") for k, v in h.items()}
            for method, path, body in calls:
                r = http.request(method, path, json=body, headers=encoded)
                error_of(r, 401, "not_authenticated")
        assert http.get("/api/chat/", headers={"Authorization": f"Token {good}"}).status_code == 200


def test_wrong_role_is_403(env: Env) -> None:
    bot = env.chatbot()
    assert bot.send("s1", "hello").status_code == 201
    env.user("amina", "counselor")
    with client(env, token_of(env, "amina")) as counselor:
        error_of(counselor.post("/api/chat/", json=chat_body("s2")), 403, "permission_denied")
        error_of(counselor.get("/api/chat/"), 403, "permission_denied")
        error_of(counselor.get("/api/chat/s1/messages/"), 403, "permission_denied")
        error_of(counselor.post("/api/chat/s1/close/", json={}), 403, "permission_denied")
        error_of(counselor.post("/api/chat/s1/ack/", json={"message_id": "x", "status": "read"}), 403)
        assert counselor.get("/api/agents/me").status_code == 200
    for method, path, body in [
        ("GET", "/api/offers/", None),
        ("GET", "/api/agents/me", None),
        ("PUT", "/api/agents/me/presence", {"status": "available"}),
        ("GET", "/api/conversations/", None),
        ("POST", "/api/offers/1/read", None),
    ]:
        error_of(bot.http.request(method, path, json=body), 403, "permission_denied")


# -- login rate limit -----------------------------------------------------------------------------


def test_login_is_rate_limited_with_retry_after(make_env: Callable[..., Env]) -> None:
    window = 60.0
    env = make_env(settings={"login_max_failures": 3, "login_window_s": window})
    env.user("bot", "chatbot")
    started = time.monotonic()
    for _ in range(3):
        error_of(login(env, "bot", "wrong-password"), 401, "not_authenticated")
    for password in ("wrong-password", PASSWORD):
        r = login(env, "bot", password)
        error_of(r, 429, "rate_limited")
        retry_after = int(r.headers["Retry-After"])
        assert window - (time.monotonic() - started) - 1 <= retry_after <= window
    # The lock also holds per client address: the same client may not try other names meanwhile.
    error_of(login(env, "other"), 429, "rate_limited")
    error_of(login(env, "other", "wrong-password"), 429, "rate_limited")

    # Once the failures have left the window (aged here rather than waited for), the lock lifts.
    async def age_failures() -> int:
        async with env.server.core.tx() as tx:
            result = await tx.session.execute(update(LoginFailure).values(at=LoginFailure.at - window))
            return int(getattr(result, "rowcount", 0))

    assert env.server.call(age_failures()) == 6  # three failures, each for the user and the address
    r = login(env, "bot")
    assert r.status_code == 200, r.text
    assert TOKEN_RE.match(r.json()["token"])


# -- sites ----------------------------------------------------------------------------------------


def test_a_site_bound_chatbot_may_only_post_for_its_site(env: Env) -> None:
    bot = env.chatbot("tzbot", site="tz")
    with client(env, bot.token or "") as http:
        error_of(http.post("/sites/ke/api/chat/", json=chat_body("s1")), 403, "permission_denied")
        error_of(http.post("/sites/ke/open/api/chat/", json=chat_body("s1")), 403, "permission_denied")
        # A location of another site is refused too...
        error_of(http.post("/api/chat/", json=chat_body("s0", location="KE")), 403, "permission_denied")
        # ...but its own site, by path, by location, or as its home when neither is given, is.
        r = http.post("/sites/tz/api/chat/", json=chat_body("s1"))
        assert r.status_code == 201, r.text
        assert r.json()["created"] is True
        r = http.post("/api/chat/", json=chat_body("s2", location="TZ"))
        assert r.status_code == 201, r.text
        r = http.post("/api/chat/", json=chat_body("s3"))
        assert r.status_code == 201, r.text
        sites = {c["chat_session"]: c["site"] for c in http.get("/api/chat/").json()["results"]}
        assert sites == {"s1": "tz", "s2": "tz", "s3": "tz"}
        # Continuing its tz conversation through the ke path is still refused for the site.
        error_of(http.post("/sites/ke/api/chat/", json=chat_body("s1", "again")), 403, "permission_denied")
        error_of(http.get("/sites/ke/api/chat/"), 403, "permission_denied")
        r = http.post("/sites/tz/api/chat/", json=chat_body("s1", "again"))
        assert r.status_code == 201, r.text
        assert r.json()["created"] is False
        assert [m["text"] for m in http.get("/api/chat/s1/messages/").json()["results"]] == ["hello", "again"]


def test_counselors_see_only_their_sites_conversations(make_env: Callable[..., Env]) -> None:
    env = make_env(offer_timeout_s=30.0)  # a busy machine must not let the offer lapse
    bot = env.chatbot()
    amina = env.counselor("amina")  # site ke, in the queue
    tz = env.counselor("juma", site="tz")
    assert bot.send("ke-1", "I need help").status_code == 201
    conv_id = bot.chats().json()["results"][0]["id"]
    offer = amina.wait_for("offer")["offer"]
    assert offer["conversation"]["id"] == conv_id
    assert amina.read_offer(offer["id"]).status_code == 200
    assert amina.messages(conv_id).status_code == 200

    error_of(tz.messages(conv_id), 404, "not_found")
    error_of(tz.reply(conv_id, "hi"), 404, "not_found")
    error_of(tz.close(conv_id), 404, "not_found")
    assert all(c["id"] != conv_id for c in tz.http.get("/api/conversations/").json()["results"])
    assert not tz.of_type("offer")

    env.user("tz-super", "supervisor", site="tz")
    with client(env, token_of(env, "tz-super")) as sup:
        error_of(sup.get(f"/api/conversations/{conv_id}/messages/"), 404, "not_found")
        assert all(c["id"] != conv_id for c in sup.get("/api/conversations/").json()["results"])
    r = amina.messages(conv_id)
    assert r.status_code == 200, r.text
    assert [m["text"] for m in r.json()["results"]] == ["I need help"]


# -- WebSocket ------------------------------------------------------------------------------------


def ws_rejected(conn: ClientConnection) -> dict[str, Any]:
    """The error event the server sends, then the close with code 4401."""
    event: dict[str, Any] = json.loads(conn.recv(timeout=10))
    assert event["type"] == "error" and event["code"] == "not_authenticated", event
    with pytest.raises(ConnectionClosed) as closed:
        conn.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401, closed.value
    return event


def test_websocket_rejects_bad_tokens_with_4401(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    bot = env.chatbot()
    env.user("amina", "counselor")
    good = token_of(env, "amina")
    ws = env.server.ws_url
    for query in ("bad", "0" * 40, "", good.upper(), bot.token or ""):
        with connect(f"{ws}?token={query}", open_timeout=10) as conn:
            ws_rejected(conn)
    for first in (json.dumps({"token": "bad"}), "not json", json.dumps(["a", "list"]), json.dumps({"x": 1})):
        with connect(ws, open_timeout=10) as conn:
            conn.send(first)
            ws_rejected(conn)
    with connect(ws, open_timeout=10) as conn:
        conn.send(b"\x00binary")
        ws_rejected(conn)
    # The right token, either way, gets the hello event.
    with connect(f"{ws}?token={good}", open_timeout=10) as conn:
        assert json.loads(conn.recv(timeout=10))["type"] == "hello"
    with connect(ws, open_timeout=10) as conn:
        conn.send(json.dumps({"token": good}).encode())  # a binary frame works too
        hello = json.loads(conn.recv(timeout=10))
        assert hello["type"] == "hello" and hello["user"]["role"] == "counselor"
        conn.send(b"\xff")  # junk after the hello is ignored, the connection stays up
        conn.send(json.dumps({"type": "ping"}))
        assert json.loads(conn.recv(timeout=10)) == {"type": "pong"}
    # A client that leaves before authenticating is no server error.
    with connect(ws, open_timeout=10) as conn:
        pass
    time.sleep(0.2)
    crashes = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not crashes, [r.getMessage() for r in crashes]


# -- CLI ------------------------------------------------------------------------------------------


def run_cli(db_url: str, sites: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELPLINE_DATABASE_URL": db_url, "HELPLINE_SITES": str(sites), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "helpline.cli", "createuser", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_createuser_cli_makes_a_user_who_can_get_a_token(
    database_url: str, rapidpro: FakeRapidPro, tmp_path: Path, make_env: Callable[..., Env]
) -> None:
    sites = tmp_path / "cli-sites.toml"
    sites.write_text(sites_toml(rapidpro))
    args = ["--role", "counselor", "--username", "cli-amina", "--password", PASSWORD]
    done = run_cli(database_url, sites, *args, "--site", "tz", "--name", "Amina")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cli-amina" in done.stdout and "tz" in done.stdout
    again = run_cli(database_url, sites, *args)
    assert again.returncode == 2, again.stdout + again.stderr
    assert again.stderr.startswith("error: ") and "exists" in again.stderr, again.stderr  # errors go to stderr
    bad_site = run_cli(
        database_url, sites, "--role", "chatbot", "--username", "x", "--password", PASSWORD, "--site", "zz"
    )
    assert bad_site.returncode == 2, bad_site.stdout + bad_site.stderr
    assert bad_site.stderr == "error: unknown site 'zz'\n", bad_site.stderr

    env = make_env()  # the same database
    r = login(env, "cli-amina")
    assert r.status_code == 200, r.text
    assert TOKEN_RE.match(r.json()["token"])
    with client(env, r.json()["token"]) as http:
        me = http.get("/api/agents/me")
        assert me.status_code == 200, me.text
        text = json.dumps(me.json())
        assert '"tz"' in text and "Amina" in text
    error_of(login(env, "x"), 401, "not_authenticated")
