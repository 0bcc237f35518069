"""Signed inbound requests (HMAC-SHA256, timestamp, replay): the pure functions, then over real HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from conftest import PASSWORD, PG_URL, Env, sites_toml
from helpline import cli
from helpline.api import signing
from helpline.api.signing import ReplayCache, SignatureError
from helpline.config.sites import SiteRegistry
from helpline.domain.auth import SIGNING_SECRET, new_signing_secret, set_signing_secret
from helpline.domain.signatures import CLOCK_MARGIN_S, PURGE_EVERY_S, SeenSignatures
from helpline.runtime.core import Core
from helpline.store.models import SeenSignature, User
from helpline.testing.fake_rapidpro import FakeRapidPro
from helpline.testing.live import LiveServer

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret-0001"
OTHER = "an0ther-an0ther-an0ther-an0ther-an0ther-2"
T0 = 1_764_000_000.0


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert ``r`` is the one error body with ``status`` and ``code``; return its ``error``."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"code", "message", "fields"}, err
    assert err["code"] == code, err
    return err


# -- the pure functions -----------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_timestamp_method_target_and_body() -> None:
    body = b'{"chat_message":"hi"}'
    expected = hmac.new(SECRET.encode(), b'1764000000\nPOST\n/api/chat/?a=1\n{"chat_message":"hi"}', hashlib.sha256)
    assert signing.sign(SECRET, "1764000000", "post", "/api/chat/?a=1", body) == "sha256=" + expected.hexdigest()
    assert signing.signature_headers(SECRET, "POST", "/api/chat/?a=1", body, at=T0) == {
        "X-Helpline-Timestamp": "1764000000.000",
        "X-Helpline-Signature": signing.sign(SECRET, "1764000000.000", "POST", "/api/chat/?a=1", body),
    }
    # A bodyless request signs the same string with nothing after the last newline.
    bare = hmac.new(SECRET.encode(), b"1764000000\nGET\n/api/chat/\n", hashlib.sha256).hexdigest()
    assert signing.sign(SECRET, "1764000000", "GET", "/api/chat/") == "sha256=" + bare


def verify(
    secrets: tuple[str, ...] = (SECRET,),
    *,
    timestamp: str | None = "1764000000",
    signature: str | None = None,
    method: str = "POST",
    target: str = "/api/chat/",
    body: bytes = b"{}",
    now: float = T0,
    tolerance: float = 300,
) -> tuple[str, float]:
    if signature is None:
        signature = signing.sign(SECRET, timestamp or "", "POST", "/api/chat/", b"{}")
    return signing.verify(
        secrets,
        timestamp=timestamp,
        signature=signature,
        method=method,
        target=target,
        body=body,
        now=now,
        tolerance=tolerance,
    )


def code_of(call: Callable[[], Any]) -> str:
    with pytest.raises(SignatureError) as caught:
        call()
    return caught.value.code


def test_verify_accepts_a_good_signature_and_says_how_long_to_remember_it() -> None:
    digest, until = verify()
    assert signing.sign(SECRET, "1764000000", "POST", "/api/chat/", b"{}") == "sha256=" + digest
    assert until == T0 + 300
    # Upper-case hex, surrounding spaces, a fractional timestamp and either edge of the window pass.
    good = signing.sign(SECRET, "1764000000", "POST", "/api/chat/", b"{}")
    assert verify(signature=" sha256=" + good.removeprefix("sha256=").upper() + " ")[0] == digest
    frac = signing.sign(SECRET, "1764000000.25", "POST", "/api/chat/", b"{}")
    assert verify(timestamp="1764000000.25", signature=frac)[1] == T0 + 0.25 + 300
    verify(now=T0 + 300)
    verify(now=T0 - 300)
    # While a secret is rotated the account holds two: either one signs.
    verify((OTHER, SECRET))
    verify((SECRET, OTHER))


def test_verify_refuses_with_a_distinct_code() -> None:
    assert code_of(lambda: verify(timestamp=None)) == "signature_required"
    assert code_of(lambda: verify(signature="")) == "signature_required"
    for bad in ("sha256=", "sha256=xyz", "md5=" + "0" * 64, "0" * 64, "sha256=" + "0" * 63):
        assert code_of(partial(verify, signature=bad)) == "bad_signature", bad
    for ts in ("yesterday", "-1764000000", "1764000000.", "1e9", "1764000000.1234567"):
        assert code_of(partial(verify, timestamp=ts, signature="sha256=" + "0" * 64)) == "bad_signature", ts
    assert code_of(lambda: verify(now=T0 + 300.5)) == "stale_timestamp"
    assert code_of(lambda: verify(now=T0 - 301)) == "stale_timestamp"
    assert code_of(lambda: verify(now=T0 + 61, tolerance=60)) == "stale_timestamp"
    assert code_of(lambda: verify((OTHER,))) == "bad_signature"
    assert code_of(lambda: verify(())) == "bad_signature"
    # Anything covered by the signature, changed: another method, path, query or body.
    assert code_of(lambda: verify(method="PUT")) == "bad_signature"
    assert code_of(lambda: verify(target="/open/api/chat/")) == "bad_signature"
    assert code_of(lambda: verify(target="/api/chat/?limit=1")) == "bad_signature"
    assert code_of(lambda: verify(body=b"{} ")) == "bad_signature"
    assert code_of(lambda: verify(body=b"")) == "bad_signature"


def test_the_target_is_the_raw_path_and_query() -> None:
    scope: dict[str, Any] = {"path": "/api/chat/a b/", "raw_path": b"/api/chat/a%20b/", "query_string": b"x=1&y=%2F"}
    assert signing.target_of(scope) == "/api/chat/a%20b/?x=1&y=%2F"
    assert signing.target_of({"path": "/api/chat/", "query_string": b""}) == "/api/chat/"


def test_the_replay_cache_remembers_each_signature_until_its_window_ends() -> None:
    cache = ReplayCache()
    assert cache.seen("1:aa", until=T0 + 300, now=T0) is False
    assert cache.seen("1:aa", until=T0 + 300, now=T0 + 299) is True
    assert cache.seen("2:aa", until=T0 + 300, now=T0 + 1) is False  # another account
    assert cache.seen("1:bb", until=T0 + 100, now=T0 + 1) is False
    assert len(cache) == 3
    assert cache.seen("1:cc", until=T0 + 400, now=T0 + 200) is False  # 1:bb forgotten on the way
    assert len(cache) == 3
    assert cache.seen("1:aa", until=T0 + 700, now=T0 + 301) is False  # its window is over
    assert len(cache) == 2  # 1:aa again and 1:cc (2:aa's window is over too)


def test_a_discarded_entry_is_forgotten_at_once() -> None:
    cache = ReplayCache()
    assert cache.seen("1:aa", until=T0 + 300, now=T0) is False
    cache.discard("1:aa")
    cache.discard("1:zz")  # unknown: nothing to do
    assert len(cache) == 0
    assert cache.seen("1:aa", until=T0 + 300, now=T0 + 1) is False
    assert cache.seen("1:aa", until=T0 + 300, now=T0 + 2) is True
    assert cache.seen("1:bb", until=T0 + 700, now=T0 + 301) is False  # the stale heap entry is skipped
    assert len(cache) == 1


def test_check_refuses_a_replay_but_not_the_same_request_signed_again() -> None:
    cache = ReplayCache()
    kw: dict[str, Any] = {"method": "POST", "target": "/api/chat/", "body": b"{}", "now": T0, "tolerance": 300}
    first = signing.signature_headers(SECRET, "POST", "/api/chat/", b"{}", at=T0)
    ts, sig = first["X-Helpline-Timestamp"], first["X-Helpline-Signature"]
    key, until = signing.check(cache, (SECRET,), account="7", timestamp=ts, signature=sig, **kw)
    assert key == "7:" + sig.removeprefix("sha256=") and until == T0 + 300
    with pytest.raises(SignatureError) as caught:
        signing.check(cache, (SECRET,), account="7", timestamp=ts, signature=sig.upper().replace("SHA", "sha"), **kw)
    assert caught.value.code == "replayed"
    # A forged signature is never remembered: the real one still passes afterwards.
    later = signing.signature_headers(SECRET, "POST", "/api/chat/", b"{}", at=T0 + 1)
    with pytest.raises(SignatureError):
        signing.check(
            cache, (SECRET,), account="7", timestamp=later["X-Helpline-Timestamp"], signature="sha256=" + "0" * 64, **kw
        )
    signing.check(
        cache,
        (SECRET,),
        account="7",
        timestamp=later["X-Helpline-Timestamp"],
        signature=later["X-Helpline-Signature"],
        **kw,
    )
    # The same request made a fraction of a second later is a new signature.
    frac = "1764000000.5"
    signing.check(
        cache,
        (SECRET,),
        account="7",
        timestamp=frac,
        signature=signing.sign(SECRET, frac, "POST", "/api/chat/", b"{}"),
        **kw,
    )


def test_generated_secrets_are_valid_and_unique() -> None:
    made = {new_signing_secret() for _ in range(20)}
    assert len(made) == 20
    assert all(SIGNING_SECRET.fullmatch(s) and s.startswith("hls_") for s in made)


# -- over HTTP --------------------------------------------------------------------------------------


def chat(session: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"chat_sender": 23343411, "chat_message": text, "chat_session": session, "chat_source": "WENI", **extra}


class Signer:
    """A chatbot's HTTP client that signs what it sends (or not, or wrongly, as a test asks)."""

    def __init__(self, env: Env, username: str, secret: str | None) -> None:
        self.secret = secret
        self.last = 0.0  # each call its own millisecond: two identical calls are two signatures
        r = httpx.post(f"{env.url}/api/token/", json={"username": username, "password": PASSWORD}, timeout=30)
        assert r.status_code == 200, r.text
        self.token = str(r.json()["token"])
        self.http = httpx.Client(base_url=env.url, headers={"Authorization": f"Token {self.token}"}, timeout=30)

    def prepare(
        self,
        method: str,
        target: str,
        body: dict[str, Any] | bytes | None = None,
        *,
        secret: str | None = None,
        at: float | None = None,
        signed_as: tuple[str, str] | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if raw else {}
        key = secret or self.secret
        if key is not None:
            m, t = signed_as or (method, target)
            if at is None:
                at = self.last = max(time.time(), self.last + 0.002)
            headers |= signing.signature_headers(key, m, t, raw, at=at)
        return raw, headers

    def send(self, method: str, target: str, raw: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.http.request(method, target, content=raw, headers=headers)

    def call(self, method: str, target: str, body: dict[str, Any] | bytes | None = None, **kw: Any) -> httpx.Response:
        return self.send(method, target, *self.prepare(method, target, body, **kw))

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def signer(env: Env) -> Any:
    made: list[Signer] = []

    def make(username: str = "signer", secret: str | None = SECRET) -> Signer:
        env.user(username, "chatbot", site="*")
        if secret is not None:
            env.server.call(set_signing_secret(env.server.core, username=username, secret=secret))
        s = Signer(env, username, secret)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_a_signed_post_is_accepted_and_stored(env: Env, signer: Callable[..., Signer]) -> None:
    bot = signer()
    r = bot.call("POST", "/api/chat/", chat("s1", "hello, signed", message_id="m1", risk="high"))
    assert r.status_code == 201, r.text
    assert r.json()["created"] is True and r.json()["message_id"] == "m1"
    r = bot.call("GET", "/api/chat/s1/messages/")
    assert r.status_code == 200, r.text
    assert [(m["message_id"], m["text"]) for m in r.json()["results"]] == [("m1", "hello, signed")]
    # A query is part of what is signed; every chatbot prefix and call is covered.
    r = bot.call("GET", "/api/chat/?limit=5&chat_session=s1")
    assert r.status_code == 200, r.text
    assert [c["chat_session"] for c in r.json()["results"]] == ["s1"]
    r = bot.call("POST", "/sites/ke/open/api/chat/", chat("s2", "via a site"))
    assert r.status_code == 201, r.text
    r = bot.call("POST", "/api/chat/s1/ack/", {"message_id": "nope", "status": "read"})
    assert r.status_code == 404, r.text  # signed: on to the route, which knows no such message
    r = bot.call("POST", "/open/api/chat/s2/close/", {"chat_source": "WENI"})
    assert r.status_code == 200, r.text
    r = bot.call("POST", "/api/chat/s3/close/")  # bodyless
    assert r.status_code == 404, r.text
    r = bot.call("DELETE", "/api/token/")
    assert r.status_code == 204, r.text


def test_unsigned_wrong_secret_stale_and_malformed_are_401(env: Env, signer: Callable[..., Signer]) -> None:
    bot = signer()
    body = chat("s1")
    err = error_of(bot.http.post("/api/chat/", json=body), 401, "signature_required")
    assert "X-Helpline-Timestamp" in err["message"] and "X-Helpline-Signature" in err["message"]
    raw, headers = bot.prepare("POST", "/api/chat/", body)
    del headers["X-Helpline-Signature"]
    error_of(bot.send("POST", "/api/chat/", raw, headers), 401, "signature_required")
    error_of(bot.call("POST", "/api/chat/", body, secret=OTHER), 401, "bad_signature")
    error_of(bot.call("POST", "/api/chat/", body, at=time.time() - 301), 401, "stale_timestamp")
    error_of(bot.call("POST", "/api/chat/", body, at=time.time() + 400), 401, "stale_timestamp")
    raw, headers = bot.prepare("POST", "/api/chat/", body)
    headers["X-Helpline-Signature"] = headers["X-Helpline-Signature"].removeprefix("sha256=")
    error_of(bot.send("POST", "/api/chat/", raw, headers), 401, "bad_signature")
    raw, headers = bot.prepare("POST", "/api/chat/", body)
    error_of(bot.send("POST", "/api/chat/", raw + b" ", headers), 401, "bad_signature")  # the body changed
    # Nothing of it reached the store; the token itself is still good.
    r = bot.call("GET", "/api/chat/")
    assert r.status_code == 200 and r.json()["results"] == [], r.text
    # A bad token is still a plain 401, whatever the signature.
    bot.http.headers["Authorization"] = "Token " + "0" * 40
    error_of(bot.call("POST", "/api/chat/", body), 401, "not_authenticated")


def test_a_replay_of_the_same_signed_request_is_refused(env: Env, signer: Callable[..., Signer]) -> None:
    bot = signer()
    raw, headers = bot.prepare("POST", "/api/chat/", chat("s1", "once", message_id="m1"))
    first = bot.send("POST", "/api/chat/", raw, headers)
    assert first.status_code == 201, first.text
    error_of(bot.send("POST", "/api/chat/", raw, headers), 401, "replayed")
    # Also a replay of a GET, and of a call its route refused (404): the signature was spent all the same.
    raw, headers = bot.prepare("GET", "/api/chat/s1/messages/")
    assert bot.send("GET", "/api/chat/s1/messages/", raw, headers).status_code == 200
    error_of(bot.send("GET", "/api/chat/s1/messages/", raw, headers), 401, "replayed")
    raw, headers = bot.prepare("POST", "/api/chat/nope/close/")
    assert bot.send("POST", "/api/chat/nope/close/", raw, headers).status_code == 404
    error_of(bot.send("POST", "/api/chat/nope/close/", raw, headers), 401, "replayed")
    # The client's retry is a fresh signature: another timestamp (milliseconds keep them apart).
    retry = bot.call("POST", "/api/chat/", chat("s1", "once", message_id="m1"))
    assert retry.status_code == 200, retry.text  # the message_id's first answer, nothing duplicated
    msgs = bot.call("GET", "/api/chat/s1/messages/").json()["results"]
    assert [m["text"] for m in msgs] == ["once"]


async def seen_keys(core: Core) -> set[str]:
    async with core.sessionmaker() as session:
        return set(await session.scalars(select(SeenSignature.key)))


async def user_id(core: Core, username: str) -> int | None:
    async with core.sessionmaker() as session:
        found: int | None = await session.scalar(select(User.id).where(User.username == username))
        return found


def test_a_failed_claim_does_not_spend_the_signature(
    env: Env, signer: Callable[..., Signer], monkeypatch: pytest.MonkeyPatch
) -> None:
    bot = signer()
    raw, headers = bot.prepare("GET", "/api/chat/")

    async def down(*_args: Any) -> bool:
        raise OperationalError("INSERT INTO seen_signatures", {}, OSError("the store is down"))

    with monkeypatch.context() as m:
        m.setattr(SeenSignatures, "first_use", down)
        error_of(bot.send("GET", "/api/chat/", raw, headers), 503, "unavailable")
    # Not accepted, so not remembered: the client's copy of the same request passes once the store is back.
    assert bot.send("GET", "/api/chat/", raw, headers).status_code == 200
    error_of(bot.send("GET", "/api/chat/", raw, headers), 401, "replayed")


@pytest.mark.skipif(bool(PG_URL), reason="SQLite: one process, its memory is enough")
def test_on_sqlite_signatures_stay_in_memory(env: Env, signer: Callable[..., Signer]) -> None:
    bot = signer()
    raw, headers = bot.prepare("GET", "/api/chat/")
    assert bot.send("GET", "/api/chat/", raw, headers).status_code == 200
    error_of(bot.send("GET", "/api/chat/", raw, headers), 401, "replayed")
    assert env.server.call(seen_keys(env.server.core)) == set()


@pytest.mark.skipif(not PG_URL, reason="several instances share a database only on PostgreSQL")
def test_a_signature_accepted_by_one_instance_is_refused_by_another(
    env: Env, signer: Callable[..., Signer], tmp_path: Path
) -> None:
    bot = signer()  # talks to instance A
    me = env.server.core
    b = LiveServer(env.server.settings, SiteRegistry.from_toml(tmp_path / "sites0.toml")).start()
    to_b = httpx.Client(base_url=b.url, headers={"Authorization": f"Token {bot.token}"}, timeout=30)
    try:

        def send_b(method: str, target: str, raw: bytes, headers: dict[str, str]) -> httpx.Response:
            return to_b.request(method, target, content=raw, headers=headers)

        raw, headers = bot.prepare("POST", "/api/chat/", chat("s1", "once", message_id="m1"))
        assert bot.send("POST", "/api/chat/", raw, headers).status_code == 201
        error_of(send_b("POST", "/api/chat/", raw, headers), 401, "replayed")
        digest = headers["X-Helpline-Signature"].removeprefix("sha256=")
        account = env.server.call(user_id(me, "signer"))
        assert f"{account}:{digest}" in env.server.call(seen_keys(me))
        # The other way round: accepted by B first, refused by A (and by B again, from memory).
        raw, headers = bot.prepare("GET", "/api/chat/s1/messages/")
        assert send_b("GET", "/api/chat/s1/messages/", raw, headers).status_code == 200
        error_of(bot.send("GET", "/api/chat/s1/messages/", raw, headers), 401, "replayed")
        error_of(send_b("GET", "/api/chat/s1/messages/", raw, headers), 401, "replayed")
        # A fresh signature of the same request is accepted by B: the message_id's first answer.
        raw, headers = bot.prepare("POST", "/api/chat/", chat("s1", "once", message_id="m1"))
        assert send_b("POST", "/api/chat/", raw, headers).status_code == 200
        # Two copies sent at once to the two instances: exactly one passes.
        for _ in range(5):
            raw, headers = bot.prepare("GET", "/api/chat/")
            with ThreadPoolExecutor(2) as pool:
                both = [
                    pool.submit(bot.send, "GET", "/api/chat/", raw, headers),
                    pool.submit(send_b, "GET", "/api/chat/", raw, headers),
                ]
                codes = sorted(f.result().status_code for f in both)
            assert codes == [200, 401], codes
        msgs = bot.call("GET", "/api/chat/s1/messages/").json()["results"]
        assert [m["text"] for m in msgs] == ["once"]
    finally:
        to_b.close()
        b.stop()


@pytest.mark.skipif(not PG_URL, reason="the shared table is used only on PostgreSQL")
def test_expired_seen_signatures_are_purged_at_most_once_a_period(env: Env) -> None:
    core = env.server.core
    t = time.time()
    a, b = SeenSignatures(core), SeenSignatures(core)  # two instances' views of the table
    early = t - 1000  # a's first claim purges (nothing has expired yet), then not for PURGE_EVERY_S
    rows = {
        "9:old": t - CLOCK_MARGIN_S - 1,  # expired longer ago than the clock margin: purged at t
        "9:margin": t - CLOCK_MARGIN_S + 1,  # expired, but a slow clock could still accept it: kept
        "9:live": t + 100,
    }
    for key, until in rows.items():
        assert env.server.call(a.first_use(key, until, early)) is True
        assert env.server.call(b.first_use(key, until, early)) is False  # b: a replay
    assert env.server.call(seen_keys(core)) == set(rows)
    assert env.server.call(b.first_use("9:new", t + 300, t)) is True  # b purges now
    assert env.server.call(seen_keys(core)) == {"9:margin", "9:live", "9:new"}
    # Not again within PURGE_EVERY_S, though 9:margin is past its margin by then.
    assert env.server.call(b.first_use("9:later", t + 300, t + PURGE_EVERY_S - 1)) is True
    assert "9:margin" in env.server.call(seen_keys(core))
    assert env.server.call(b.first_use("9:next", t + 300, t + PURGE_EVERY_S)) is True
    assert env.server.call(seen_keys(core)) == {"9:live", "9:new", "9:later", "9:next"}
    # purge itself says how many rows it deleted.
    assert env.server.call(a.purge(t + 1000)) == 4


def test_a_signature_made_for_another_call_is_refused(env: Env, signer: Callable[..., Signer]) -> None:
    bot = signer()
    assert bot.call("POST", "/api/chat/", chat("a")).status_code == 201
    assert bot.call("POST", "/api/chat/", chat("b")).status_code == 201
    # Signed for one path (or prefix, or query, or method), sent to another: each time bad_signature.
    cases = [
        ("POST", "/api/chat/a/close/", ("POST", "/api/chat/b/close/")),
        ("POST", "/open/api/chat/", ("POST", "/api/chat/")),
        ("POST", "/sites/tz/api/chat/", ("POST", "/sites/ke/api/chat/")),
        ("GET", "/api/chat/?limit=1", ("GET", "/api/chat/?limit=2")),
        ("DELETE", "/api/token/", ("GET", "/api/token/")),
    ]
    for method, target, signed_as in cases:
        body = chat("c") if target.endswith("/chat/") and method == "POST" else None
        error_of(bot.call(method, target, body, signed_as=signed_as), 401, "bad_signature")
    # Both conversations are still open: the close signed for b did not close a.
    statuses = {c["chat_session"]: c["status"] for c in bot.call("GET", "/api/chat/").json()["results"]}
    assert statuses == {"a": "queued", "b": "queued"}


def test_a_chatbot_without_a_secret_is_unchanged(env: Env, signer: Callable[..., Signer]) -> None:
    plain = signer("plain", secret=None)
    assert plain.call("POST", "/api/chat/", chat("p1")).status_code == 201
    # Signature headers, even wrong ones, are ignored for it.
    r = plain.call("POST", "/api/chat/", chat("p1", "again"), secret=OTHER, at=time.time() - 10_000)
    assert r.status_code == 201, r.text
    # The fake chatbot of the other tests (no secret) works as ever beside a signing one.
    signer()
    weni = env.chatbot("weni")
    assert weni.send("w1", "hi").status_code == 201
    assert [m["text"] for m in weni.messages("w1").json()["results"]] == ["hi"]


def test_the_weni_routes_and_large_bodies_of_a_signing_account(env: Env, signer: Callable[..., Signer]) -> None:
    bot = signer()
    bot.http.headers["Authorization"] = f"Bearer {bot.token}"
    r = bot.http.post("/v1/tickets", json={"ticket_id": "t"})
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "signature_required", r.json()  # the contract's own error body under /v1
    r = bot.call("POST", "/v1/tickets", {"ticket_id": "t"})
    assert r.status_code == 400, r.text  # signed: on to the contract's validation
    big = b'{"chat_message":"' + b"x" * (1024 * 1024) + b'"}'
    error_of(bot.call("POST", "/api/chat/", big), 413, "body_too_large")


def test_a_new_secret_applies_at_once_and_rotation_keeps_the_old_one_valid(
    env: Env, signer: Callable[..., Signer]
) -> None:
    bot = signer("rotor", secret=None)
    assert bot.call("GET", "/api/chat/").status_code == 200  # its principal is now cached
    core = env.server.core
    env.server.call(set_signing_secret(core, username="rotor", secret=SECRET))
    error_of(bot.call("GET", "/api/chat/"), 401, "signature_required")  # no wait for the cache
    assert bot.call("GET", "/api/chat/", secret=SECRET).status_code == 200
    env.server.call(set_signing_secret(core, username="rotor", secret=OTHER, keep_previous=True))
    assert bot.call("GET", "/api/chat/", secret=SECRET).status_code == 200
    assert bot.call("GET", "/api/chat/", secret=OTHER).status_code == 200
    env.server.call(set_signing_secret(core, username="rotor", secret=OTHER))
    error_of(bot.call("GET", "/api/chat/", secret=SECRET), 401, "bad_signature")
    assert bot.call("GET", "/api/chat/", secret=OTHER).status_code == 200
    env.server.call(set_signing_secret(core, username="rotor", secret=None))
    assert bot.http.get("/api/chat/").status_code == 200


def test_openapi_documents_the_signature_headers(env: Env) -> None:
    spec = httpx.get(f"{env.url}/openapi.json", timeout=30).json()
    scheme = spec["components"]["securitySchemes"]["token"]
    assert scheme["type"] == "apiKey" and scheme["in"] == "header" and scheme["name"] == "Authorization"
    for word in ("X-Helpline-Timestamp", "X-Helpline-Signature", "HMAC-SHA256", "replayed", "stale_timestamp"):
        assert word in scheme["description"], word
    assert spec["paths"]["/api/chat/"]["post"]["security"] == [{"token": []}]
    assert "security" not in spec["paths"]["/api/token/"]["post"]


# -- the CLI ----------------------------------------------------------------------------------------


def test_the_cli_sets_rotates_and_clears_a_secret(
    database_url: str, rapidpro: FakeRapidPro, tmp_path: Path, make_env: Callable[..., Env]
) -> None:
    sites = tmp_path / "cli-sites.toml"
    sites.write_text(sites_toml(rapidpro))
    runner = CliRunner()
    environ = {"HELPLINE_DATABASE_URL": database_url, "HELPLINE_SITES": str(sites), "COLUMNS": "200"}

    def run(*args: str) -> Any:
        return runner.invoke(cli.app, list(args), env=environ)

    made = run("createuser", "--role", "chatbot", "--username", "cb", "--password", PASSWORD, "--signing-secret")
    assert made.exit_code == 0, made.output
    first = made.output.strip().splitlines()[-1].removeprefix("signing secret (shown once): ")
    assert SIGNING_SECRET.fullmatch(first) and first.startswith("hls_"), made.output
    refused = run("createuser", "--role", "counselor", "--username", "c", "--password", PASSWORD, "--signing-secret")
    assert refused.exit_code == 2 and "only chatbot" in refused.output, refused.output

    env = make_env()  # the same database
    bot = Signer(env, "cb", first)
    error_of(bot.http.get("/api/chat/"), 401, "signature_required")
    assert bot.call("GET", "/api/chat/").status_code == 200

    rotated = run("signing-secret", "--username", "cb", "--generate", "--keep-previous")
    assert rotated.exit_code == 0, rotated.output
    second = rotated.stdout.strip().splitlines()[0]
    assert SIGNING_SECRET.fullmatch(second) and second != first, rotated.output

    async def stored() -> str | None:
        async with env.server.core.sessionmaker() as session:
            value: str | None = await session.scalar(select(User.signing_secret).where(User.username == "cb"))
            return value

    assert env.server.call(stored()) == f"{second},{first}"
    fresh = Signer(env, "cb", second)  # a new token: not in the server's 5-second principal cache
    assert fresh.call("GET", "/api/chat/").status_code == 200
    assert fresh.call("GET", "/api/chat/", secret=first).status_code == 200

    chosen = "my-own-secret-of-thirty-two-chars-0123"
    assert run("signing-secret", "--username", "cb", "--set", chosen).exit_code == 0
    assert env.server.call(stored()) == chosen
    for bad in (
        ["--username", "cb", "--set", "too-short"],
        ["--username", "cb", "--set", "with,comma-with,comma-with,comma-with,comma"],
        ["--username", "cb"],
        ["--username", "cb", "--generate", "--clear"],
        ["--username", "cb", "--clear", "--keep-previous"],
        ["--username", "nobody", "--generate"],
    ):
        r = run("signing-secret", *bad)
        assert r.exit_code == 2, (bad, r.output)
    assert env.server.call(stored()) == chosen

    cleared = run("signing-secret", "--username", "cb", "--clear")
    assert cleared.exit_code == 0, cleared.output
    assert env.server.call(stored()) is None
    plain = Signer(env, "cb", None)
    assert plain.http.get("/api/chat/").status_code == 200
    for c in (bot, fresh, plain):
        c.close()
