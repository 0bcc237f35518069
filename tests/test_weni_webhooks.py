"""helpline -> Weni: signed webhooks through the outbox (retries, dead letters, secret rotation)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from conftest import Env
from helpline.config.settings import Settings, WeniProject
from helpline.delivery.weni import Webhook, WeniClient, classify, rfc3339, secrets_for, sign, webhook_base_url
from helpline.testing.fake_weni import FakeWeni, ReceivedWebhook, verify_signature, verify_timestamp
from weni_support import OLD_SECRET, RFC3339, SECRET, reply, start_weni, take_offer, weni_env


@pytest.fixture
def weni() -> Iterator[FakeWeni]:
    yield from start_weni()


def hooks_of(weni: FakeWeni, message_id: str) -> list[ReceivedWebhook]:
    return [h for h in weni.received if h.body and h.body.get("message_external_id") == message_id]


def sent(amina: Any, r: httpx.Response, status: str = "sent") -> str:
    assert r.status_code == 201, r.text
    mid: str = r.json()["message_id"]
    assert amina.wait_for("message_status", lambda e: e["message_id"] == mid, timeout=15)["status"] == status
    return mid


def test_retries_dead_letters_and_rotation(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    env = weni_env(make_env, weni, settings={"weni_webhook_secrets": f"{SECRET},{OLD_SECRET}"})
    amina = env.counselor("amina", name="Amina")
    ticket, _ = weni.open_ticket()
    assert ticket is not None and ticket.external_id is not None
    ext = ticket.external_id
    take_offer(amina, ext)

    # 503 with Retry-After twice, then accepted: three attempts, one X-Request-Id, the wait honoured.
    weni.fail_next(2, status=503, retry_after=0.3)
    mid = sent(amina, reply(amina, ext, "one"))
    attempts = hooks_of(weni, mid)
    assert [h.status for h in attempts] == [503, 503, 200]
    assert len({h.headers["x-request-id"] for h in attempts}) == 1
    assert all(b.at - a.at >= 0.29 for a, b in itertools.pairwise(attempts))
    assert all(h.raw == attempts[0].raw for h in attempts)  # the exact same bytes every time
    assert all(RFC3339.match(h.headers["x-webhook-timestamp"]) for h in attempts)

    # 429: retried too.
    weni.fail_next(1, status=429, retry_after=0.2)
    mid = sent(amina, reply(amina, ext, "two"))
    assert [h.status for h in hooks_of(weni, mid)] == [429, 200]

    # Another 4xx: no retry, a dead letter (the message is failed), and the next one still goes.
    weni.fail_next(1, status=400, body={"error": "invalid_payload", "message": "nope"})
    mid = sent(amina, reply(amina, ext, "three"), status="failed")
    time.sleep(0.3)
    assert [h.status for h in hooks_of(weni, mid)] == [400]
    mid4 = sent(amina, reply(amina, ext, "four"))
    assert [h.status for h in hooks_of(weni, mid4)] == [200]

    # Rotation, helpline first: it signs with the new secret, Weni still has the old one only;
    # the 401 invalid_signature makes helpline try the previous secret at once.
    weni.set_secrets(OLD_SECRET)
    mid = sent(amina, reply(amina, ext, "five"))
    first, second = hooks_of(weni, mid)
    assert (first.status, first.response["error"], second.status) == (401, "invalid_signature", 200)
    assert (
        first.headers["x-webhook-signature"]
        == "sha256=" + hmac.new(SECRET.encode(), first.raw, hashlib.sha256).hexdigest()
    )
    assert second.headers["x-webhook-signature"] == sign(OLD_SECRET, second.raw)
    # Weni now accepts both during its window, then only the new one: no more failures.
    weni.set_secrets(SECRET, OLD_SECRET)
    mid = sent(amina, reply(amina, ext, "six"))
    assert [(h.status, h.secret_index) for h in hooks_of(weni, mid)] == [(200, 0)]
    weni.set_secrets(SECRET)
    mid = sent(amina, reply(amina, ext, "seven"))
    assert [h.status for h in hooks_of(weni, mid)] == [200]

    # A secret Weni never knew: dead letter after both secrets were refused.
    weni.set_secrets("something-else")
    mid = sent(amina, reply(amina, ext, "eight"), status="failed")
    assert [h.status for h in hooks_of(weni, mid)] == [401, 401]
    # Replayed by a supervisor once fixed: delivered.
    weni.set_secrets(SECRET)
    env.user("sam", "supervisor", site="ke")
    sup = httpx.Client(base_url=env.url)
    token = sup.post("/api/token/", json={"username": "sam", "password": "correct-horse-battery"}).json()["token"]
    sup.headers["Authorization"] = f"Token {token}"
    dead = sup.get("/api/supervisor/dead-letters").json()
    ids = [d["id"] for d in dead["results"] if d.get("conversation_id") == ext]
    assert len(ids) == 2  # "three" (400) and "eight" (401)
    assert sup.post(f"/api/supervisor/dead-letters/{max(ids)}/replay").status_code == 200  # "eight"
    weni.wait_for(lambda hs: any(h.accepted and h.body and h.body.get("message_external_id") == mid for h in hs))
    sup.close()
    assert [r["text"] for r in ticket.replies] == ["one", "two", "four", "five", "six", "seven", "eight"]


def test_attachments_and_counselor_reopen(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    env = weni_env(make_env, weni, settings={"attachment_max_bytes": 1000})
    amina = env.counselor("amina", name="Amina")
    ticket, _ = weni.open_ticket()
    assert ticket is not None and ticket.external_id is not None
    ext = ticket.external_id
    take_offer(amina, ext)

    # Counselor attachments: http(s) URL, an allowed content type, within the size limit.
    ok = weni.add_file("card.png", b"\x89PNG" + b"0" * 100, "image/png")
    r = reply(amina, ext, "", attachments=[ok])
    mid = sent(amina, r)
    (hook,) = hooks_of(weni, mid)
    assert "text" not in hook.body and hook.body["attachments"] == [ok]
    r = reply(amina, ext, "x", attachments=[ok | {"size": 1001}])
    assert r.status_code == 422 and r.json()["error"]["code"] == "attachment_too_large"
    r = reply(amina, ext, "x", attachments=[ok | {"content_type": "application/x-msdownload"}])
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_attachment"
    r = reply(amina, ext, "x", attachments=[{"url": "ftp://files/x.png", "content_type": "image/png"}])
    assert r.status_code == 422
    r = reply(amina, ext, "")
    assert r.status_code == 422
    # A file Weni cannot download: 502 attachment_fetch_failed, retried (5xx) until it can.
    missing = {"url": f"{weni.url}/files/later.jpg", "content_type": "image/jpeg"}
    r = reply(amina, ext, "photo", attachments=[missing])
    assert r.status_code == 201
    mid = r.json()["message_id"]
    weni.wait_for(lambda hs: sum(h.status == 502 for h in hs) >= 2)
    weni.add_file("later.jpg", b"\xff\xd8", "image/jpeg")
    assert amina.wait_for("message_status", lambda e: e["message_id"] == mid, timeout=15)["status"] == "sent"

    # The counselor closes with a reason outside the contract's list: "other" + reason_text.
    assert amina.close(ext, reason="referred to police").status_code == 200
    hooks = weni.wait_for(lambda hs: any(h.kind == "close" and h.accepted for h in hs))
    (close,) = [h for h in hooks if h.kind == "close"]
    assert close.body["reason"] == "other"
    assert close.body["metadata"] == {"source": "helpline", "reason_text": "referred to police"}
    assert ticket.status == "closed"

    # ... and reopens it: it is hers again, and Weni hears it (signed).
    r = amina.http.post(f"/api/conversations/{ext}/reopen/")
    assert r.status_code == 200, r.text
    assert r.json()["conversation"]["status"] == "assigned" and r.json()["already_open"] is False
    hooks = weni.wait_for(lambda hs: any(h.kind == "reopen" and h.accepted for h in hs))
    (reopen,) = [h for h in hooks if h.kind == "reopen"]
    assert reopen.signature_ok and reopen.body["external_id"] == ext
    assert reopen.body["reopened_by"]["type"] == "agent" and reopen.body["reopened_by"]["name"] == "Amina"
    assert ticket.status == "open" and ticket.reopened == 1
    assert amina.http.post(f"/api/conversations/{ext}/reopen/").json()["already_open"] is True
    assert sent(amina, reply(amina, ext, "I am back"))
    assert weni.forward(ticket, "me too").status == 200

    # Only Weni tickets reopen; attachments only go to Weni tickets.
    bot = env.chatbot("openchs-bot")
    assert bot.send("plain-1", "hello", risk="high").status_code == 201
    plain = amina.wait_for("offer", lambda e: e["offer"]["conversation"]["chat_session"] == "plain-1")["offer"]
    conv = amina.read_offer(plain["id"]).json()["conversation"]["id"]
    r = reply(amina, conv, "see", attachments=[ok])
    assert r.status_code == 422 and r.json()["error"]["fields"] == {"attachments": ["not supported"]}
    assert amina.close(conv).status_code == 200
    r = amina.http.post(f"/api/conversations/{conv}/reopen/")
    assert r.status_code == 422 and r.json()["error"]["code"] == "reopen_not_supported"


def test_fake_weni_checks_like_mailroom(weni: FakeWeni) -> None:
    """The fake refuses what mailroom's readWebhook refuses (so passing tests mean something)."""
    ticket_hook = f"{weni.webhook_base_url}/messages"
    body = b'{"external_id":"nope","text":"hi"}'

    def send(headers: dict[str, str], content: bytes = body, url: str = ticket_hook) -> httpx.Response:
        return httpx.post(url, content=content, headers={"Content-Type": "application/json", **headers})

    good = {"X-Webhook-Signature": sign(SECRET, body), "X-Webhook-Timestamp": rfc3339()}
    assert send({}).json() == {"error": "invalid_signature", "message": "HMAC verification failed"}
    assert send(good | {"X-Webhook-Signature": sign("wrong", body)}).status_code == 401
    r = send(good | {"X-Webhook-Timestamp": rfc3339(time.time() - 301)})
    assert (r.status_code, r.json()["error"]) == (401, "expired_request")
    assert send(good | {"X-Webhook-Timestamp": str(int(time.time()) + 299)}).status_code == 404  # unix seconds ok
    assert send({"X-Webhook-Signature": sign(SECRET, body).removeprefix("sha256=")}).status_code == 404  # bare hex
    r = send(good)
    assert (r.status_code, r.json()["error"]) == (404, "ticket_not_found")
    r = send(good, url=weni.url + "/webhooks/ticketer/other-ticketer/messages")
    assert (r.status_code, r.json()["error"]) == (404, "ticketer_not_found")
    empty = b'{"external_id":"nope"}'
    r = send({"X-Webhook-Signature": sign(SECRET, empty)}, content=empty)
    assert (r.status_code, r.json()["error"]) == (400, "empty_message")
    # one byte changed after signing: refused
    assert send(good, content=body.replace(b"hi", b"ho")).status_code == 401
    assert verify_signature(SECRET, body, sign(SECRET, body).upper().replace("SHA256=", "sha256="))
    assert not verify_timestamp("2026-05-20T14:35:00", time.time())  # no zone
    assert [h.signature_ok for h in weni.received][:2] == [False, False]


def test_weni_client_and_settings() -> None:
    s = Settings(
        weni_webhook_secrets=" new , old ",
        weni_webhook_base_url="https://weni.example/mr/tickets/types/generic/event_callback/t0/",
        weni_projects={"weni-tz": WeniProject(webhook_secrets="tz1", webhook_base_url="https://tz.example/cb/")},
    )
    assert secrets_for(s, "weni-ke") == ["new", "old"]
    assert secrets_for(s, "weni-tz") == ["tz1"]
    assert webhook_base_url(s, "weni-tz", "https://from-weni/x") == "https://tz.example/cb"  # configured wins
    assert webhook_base_url(s, "weni-ke", "https://from-weni/x/") == "https://from-weni/x"
    assert webhook_base_url(s, "weni-ke", None) == "https://weni.example/mr/tickets/types/generic/event_callback/t0"
    assert webhook_base_url(Settings(), "weni-ke", None) is None
    assert sign("k", b"body") == "sha256=" + hmac.new(b"k", b"body", hashlib.sha256).hexdigest()
    assert RFC3339.match(rfc3339()) and rfc3339(0) == "1970-01-01T00:00:00Z"
    hook = Webhook.new("https://x/messages", {"text": "olá", "n": 1}, "weni-ke")
    assert hook.body == '{"text":"olá","n":1}'
    assert Webhook.from_payload(hook.to_payload()) == hook

    def outcome(status: int, headers: dict[str, str] | None = None) -> tuple[str, float | None]:
        o = classify(httpx.Response(status, headers=headers, json={"error": "x"}))
        return o.kind, o.retry_after

    assert outcome(200) == ("sent", None)
    assert outcome(503, {"Retry-After": "7"}) == ("retry", 7.0)
    assert outcome(429) == ("retry", None)
    assert outcome(408)[0] == "retry"
    assert outcome(400)[0] == outcome(404)[0] == outcome(409)[0] == outcome(401)[0] == "dead"

    async def unreachable() -> tuple[str, str]:
        async with WeniClient() as client:
            down = await client.send(Webhook.new("http://127.0.0.1:9/messages", {}, "p"), ["k"])
            bad = await client.send(Webhook.new("nowhere/messages", {}, "p"), ["k"])
            junk = await client.deliver(s, "not json")
        return down.kind, bad.kind + junk.kind

    assert asyncio.run(unreachable()) == ("retry", "deaddead")


def test_issuetoken_cli(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpline.cli import app

    sites = tmp_path / "sites.toml"
    sites.write_text(
        '[[site]]\nslug = "ke"\nname = "Childline Kenya"\n'
        '[site.rapidpro]\nbase_url = "http://127.0.0.1:9"\nflow = "f"\n'
    )
    monkeypatch.setenv("HELPLINE_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("HELPLINE_SITES", str(sites))
    runner = CliRunner()
    r = runner.invoke(app, ["createuser", "--role", "chatbot", "--username", "weni-acme", "--password", "x" * 12])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["issuetoken", "--username", "weni-acme", "--ttl-days", "90"])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[0]
    assert len(token) == 40 and all(c in "0123456789abcdef" for c in token)
    r = runner.invoke(app, ["issuetoken", "--username", "nobody"])
    assert r.exit_code == 2 and "no active user" in r.output
