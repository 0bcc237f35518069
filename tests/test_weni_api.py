"""The Weni ticketer contract v1 as helpline serves it: exact status codes and bodies on a real server."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from conftest import PASSWORD, Env
from helpline.testing.fake_weni import FakeTicket, FakeWeni
from weni_support import RFC3339, conversation, messages, start_weni, tickets, weni_env


@pytest.fixture
def weni() -> Iterator[FakeWeni]:
    yield from start_weni()


def post(weni: FakeWeni, path: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
    r = weni.call(path, body, retry=False, **kwargs)
    return r.status, r.body


def opened(weni: FakeWeni, **kwargs: Any) -> FakeTicket:
    ticket, r = weni.open_ticket(**kwargs)
    assert r.status == 201, r.body
    assert ticket is not None
    return ticket


def open_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ticket_id": str(uuid.uuid4()),
        "contact": {"uuid": str(uuid.uuid4()), "urn": "whatsapp:254700999001", "name": "Kid"},
        "metadata": {"webhook_base_url": "http://127.0.0.1:9/mr/tickets/types/generic/event_callback/x"},
        "opened_at": "2026-05-20T14:30:00Z",
    }
    return body | overrides


def test_open_ticket(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    env = weni_env(make_env, weni)

    # 201 with the contract's body; the ticket is a queued conversation of the topic's site.
    ticket, r = weni.open_ticket(name="Kid 7", urn="whatsapp:254700000777", priority="high", topic="ke")
    assert ticket is not None and r.status == 201
    assert r.body == {"external_id": ticket.external_id, "status": "open", "created_at": r.body["created_at"]}
    assert RFC3339.match(r.body["created_at"])
    ext = str(ticket.external_id)
    conv = conversation(env, ext)
    assert (conv.site, conv.risk, conv.client_name, conv.status) == ("ke", "high", "Kid 7", "queued")
    assert (conv.contact_urn, conv.contact_uuid, conv.source) == (
        "whatsapp:254700000777",
        ticket.contact_uuid,
        "weni-ticketer",
    )

    # The same Idempotency-Key again: 201 with the same external_id, nothing created.
    again = weni.call("/v1/tickets", open_body(), idempotency_key=f"open-{ticket.uuid}")
    assert (again.status, again.body) == (201, r.body)
    # The same X-Request-Id again (a retry whose answer was lost): the first answer.
    first = weni.call("/v1/tickets", open_body(), request_id="req-1")
    assert first.status == 201
    assert weni.call("/v1/tickets", open_body(), request_id="req-1").body == first.body
    # The same ticket_id under another key: the same ticket.
    same = open_body(ticket_id=ticket.uuid)
    assert weni.call("/v1/tickets", same, idempotency_key="other").body["external_id"] == ext
    assert len(tickets(env)) == 2

    # An open ticket for that contact already: 409 ticket_already_open with details.external_id.
    twin = open_body(contact={"uuid": ticket.contact_uuid, "urn": ticket.contact_urn})
    assert post(weni, "/v1/tickets", twin, idempotency_key="open-twin") == (
        409,
        {
            "error": "ticket_already_open",
            "message": "An open ticket already exists for this contact",
            "details": {"external_id": ext},
        },
    )
    # mailroom takes that 409 as success and reuses the external_id
    reused, _ = weni.open_ticket(contact_uuid=ticket.contact_uuid, urn=ticket.contact_urn)
    assert reused is not None and reused.external_id == ext

    # Priority -> risk; topic or path -> site.
    assert conversation(env, str(opened(weni, priority="low").external_id)).risk == "low"
    assert conversation(env, str(opened(weni, priority="urgent").external_id)).risk == "high"
    assert conversation(env, str(opened(weni, priority=None).external_id)).risk == "medium"
    assert conversation(env, str(opened(weni, priority="normal", topic="TZ").external_id)).site == "tz"
    assert conversation(env, str(opened(weni, topic="C-Sema Tanzania").external_id)).site == "tz"
    assert conversation(env, str(opened(weni, topic="Other topic").external_id)).site == "ke"
    in_tz = weni.call("/sites/tz/v1/tickets", open_body())
    assert in_tz.status == 201 and conversation(env, in_tz.body["external_id"]).site == "tz"

    # The body of the ticket is shown to the counselor as a note, not as the child's words.
    noted = opened(weni, body="Child asked for a counselor")
    (note,) = messages(env, str(noted.external_id))
    assert (note.sender, note.direction, note.text) == ("system", "in", "Child asked for a counselor")


def test_open_ticket_errors(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    env = weni_env(make_env, weni)
    url = f"{env.url}/v1/tickets"
    auth = {"Authorization": f"Bearer {weni.api_token}"}

    assert post(weni, "/v1/tickets", {k: v for k, v in open_body().items() if k != "ticket_id"}) == (
        400,
        {
            "error": "invalid_payload",
            "message": "ticket_id is required",
            "details": {"fields": {"ticket_id": ["is required"]}},
        },
    )
    no_uuid = open_body(contact={"urn": "whatsapp:1"})
    assert post(weni, "/v1/tickets", no_uuid) == (
        400,
        {
            "error": "invalid_payload",
            "message": "contact.uuid is required",
            "details": {"fields": {"contact.uuid": ["is required"]}},
        },
    )
    status, body = post(weni, "/v1/tickets", open_body(opened_at="yesterday"))
    assert status == 400 and body["error"] == "invalid_payload" and "opened_at" in body["details"]["fields"]
    status, body = post(weni, "/v1/tickets", b"{not json")
    assert status == 400 and body["error"] == "invalid_payload"
    assert post(weni, "/v1/tickets", [1, 2]) == (
        400,
        {"error": "invalid_payload", "message": "the body must be a JSON object"},
    )
    r = httpx.post(url, content=b"x", headers=auth | {"Content-Type": "text/plain"})
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")
    r = httpx.post(url, content=b"{" + b" " * (1024 * 1024) + b"}", headers=auth | {"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")

    # Authentication: Bearer <api_token>; a chatbot account only.
    r = httpx.post(url, json=open_body())
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": "unauthorized", "message": "missing Authorization header (Token <key>)"}
    r = httpx.post(url, json=open_body(), headers={"Authorization": "Bearer " + "0" * 40})
    assert (r.status_code, r.json()) == (401, {"error": "unauthorized", "message": "invalid token"})
    env.user("amina", "counselor")
    token = httpx.post(f"{env.url}/api/token/", json={"username": "amina", "password": PASSWORD}).json()["token"]
    r = httpx.post(url, json=open_body(), headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"

    # Headers of the contract.
    status, body = post(weni, "/v1/tickets", open_body(), headers={"X-API-Version": "2"})
    assert (status, body["error"]) == (400, "unsupported_api_version")
    status, body = post(weni, "/v1/tickets", open_body(), idempotency_key="k" * 256)
    assert (status, body["error"]) == (400, "invalid_header")

    # Routing errors keep the contract's body under /v1; the OpenCHS API keeps its own.
    r = httpx.post(f"{env.url}/v1/nowhere", json={}, headers=auth)
    assert (r.status_code, r.json()) == (404, {"error": "not_found", "message": "no such resource"})
    r = httpx.get(url, headers=auth)
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
    status, body = post(weni, "/sites/zz/v1/tickets", open_body())
    assert (status, body) == (404, {"error": "unknown_site", "message": "unknown site 'zz'"})
    r = httpx.post(f"{env.url}/api/chat/", json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "not_authenticated"

    # Replies could not reach Weni: no webhook_base_url sent and none configured.
    _, r2 = weni.open_ticket(send_webhook_base_url=False)
    assert (r2.status, r2.body["error"]) == (422, "webhook_base_url_required")
    assert tickets(env) == []


def test_messages_close_reopen_history(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    env = weni_env(make_env, weni)
    ticket = opened(weni)
    ext = str(ticket.external_id)
    path = f"/v1/tickets/{ext}"

    # A message: 200 {message_external_id, status: received}; the same message_id again: the same.
    mid = str(uuid.uuid4())
    r = weni.forward(ticket, "hello", message_uuid=mid)
    assert r.status == 200 and r.body == {"message_external_id": r.body["message_external_id"], "status": "received"}
    assert weni.forward(ticket, "hello", message_uuid=mid).body == r.body
    assert [m.text for m in messages(env, ext)] == ["hello"]

    def msg(**overrides: Any) -> dict[str, Any]:
        return {
            "ticket_id": ticket.uuid,
            "external_id": ext,
            "message_id": str(uuid.uuid4()),
            "direction": "incoming",
            "sender": {"type": "contact", "id": ticket.contact_uuid},
            "text": "hi",
            "sent_at": "2026-05-20T14:32:00Z",
        } | overrides

    assert post(weni, f"{path}/messages", msg(text="  ")) == (
        400,
        {"error": "empty_message", "message": "text or attachments are required"},
    )
    status, body = post(weni, f"{path}/messages", msg(external_id="other"))
    assert (status, body["error"]) == (400, "invalid_payload")
    status, body = post(weni, f"{path}/messages", msg(direction="outgoing"))  # the contact's, outgoing?
    assert (status, body["error"]) == (422, "unsupported_sender"), body
    assert post(weni, "/v1/tickets/nope/messages", msg(external_id="nope")) == (
        404,
        {"error": "ticket_not_found", "message": "Ticket nope was not found", "details": {"external_id": "nope"}},
    )
    big = {"url": "https://files.example.org/v.mp4", "content_type": "video/mp4", "size": 11 * 1024 * 1024}
    status, body = post(weni, f"{path}/messages", msg(attachments=[big]))
    assert (status, body["error"]) == (422, "attachment_too_large")
    status, body = post(weni, f"{path}/messages", msg(attachments=[{"url": "ftp://x/y"}]))
    assert (status, body["error"]) == (400, "invalid_payload")
    doc = {"url": "https://files.example.org/a.bin", "content_type": "application/x-whatever", "size": 10}
    assert post(weni, f"{path}/messages", msg(text=None, attachments=[doc]))[0] == 200  # kept, whatever its type
    assert messages(env, ext)[-1].text == "" and "a.bin" in str(messages(env, ext)[-1].attachments)

    # History: batches of at most 50; a repeat adds nothing; 200 {status, messages_received}.
    history = [{"direction": "incoming", "text": f"h{i}", "message_id": f"h-{i}"} for i in range(3)]
    assert [(h.status, h.body) for h in weni.send_history(ticket, history)] == [
        (200, {"status": "history_received", "messages_received": 3})
    ]
    assert weni.send_history(ticket, history)[0].status == 200
    assert sorted(m.text for m in messages(env, ext) if m.text.startswith("h")) == ["h0", "h1", "h2", "hello"]
    too_many = {"messages": [{"direction": "incoming", "text": "x"}] * 51}
    status, body = post(weni, f"{path}/history", too_many)
    assert (status, body["error"]) == (400, "invalid_payload")

    # Close: 200 {status: closed}; again: 409 ticket_already_closed; the first request's id: its answer.
    assert post(weni, f"{path}/close", {"reason": "resolved"}, request_id="close-1") == (200, {"status": "closed"})
    assert post(weni, f"{path}/close", {}) == (
        409,
        {"error": "ticket_already_closed", "message": "Ticket is already closed", "details": {"external_id": ext}},
    )
    assert post(weni, f"{path}/close", {}, request_id="close-1") == (200, {"status": "closed"})
    assert conversation(env, ext).close_reason == "resolved"
    status, body = post(weni, f"{path}/messages", msg())
    assert (status, body["error"]) == (409, "ticket_closed")
    status, body = post(weni, f"{path}/close", {"reason": "finished"})
    assert (status, body["error"]) == (400, "invalid_payload")

    # The contact may open a new ticket once the first is closed ...
    second = opened(weni, contact_uuid=ticket.contact_uuid, urn=ticket.contact_urn)
    assert second.external_id != ext
    # ... and the first cannot be reopened while the second is open.
    assert post(weni, f"{path}/reopen", {}) == (
        409,
        {
            "error": "ticket_already_open",
            "message": "An open ticket already exists for this contact",
            "details": {"external_id": second.external_id},
        },
    )
    assert weni.close(second).status == 200
    # Reopen (body optional): 200 {status: open}; queued for a counselor again; messages accepted.
    assert post(weni, f"{path}/reopen", b"") == (200, {"status": "open"})
    assert conversation(env, ext).status == "queued"
    assert post(weni, f"{path}/reopen", {}) == (200, {"status": "open"})
    assert post(weni, f"{path}/messages", msg(text="back again"))[0] == 200
    assert post(weni, "/v1/tickets/nope/reopen", {})[0] == 404


def test_tickets_of_another_project_are_not_found(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    env = weni_env(make_env, weni)
    ticket = opened(weni)
    env.user("weni-other", "chatbot", site="ke")
    other = FakeWeni(secrets=["x"])
    try:
        other.start()
        token = httpx.post(f"{env.url}/api/token/", json={"username": "weni-other", "password": PASSWORD})
        other.connect(env.url, token.json()["token"])
        r = other.forward(ticket, "not yours")
        assert (r.status, r.body["error"]) == (404, "ticket_not_found")
        # a project bound to a site may not open tickets elsewhere
        r = other.call("/sites/tz/v1/tickets", open_body())
        assert (r.status, r.body["error"]) == (403, "forbidden")
    finally:
        other.shutdown()


def test_mailroom_history_one_by_one_and_a_shared_location(make_env: Callable[..., Env], weni: FakeWeni) -> None:
    """mailroom's history_mode one_by_one posts the bot's earlier messages to /messages, outgoing, sender
    bot (history.go; sendHistoryOneByOne takes any status >= 400 as an error); a location comes as
    RapidPro writes it, geo:LAT,LON. Both are stored, neither loses the message (issue 15)."""
    env = weni_env(make_env, weni)
    ticket = opened(weni)
    ext = str(ticket.external_id)

    def body(direction: str, sender: str, text: str | None, **more: Any) -> dict[str, Any]:
        return {
            "ticket_id": ticket.uuid,
            "external_id": ext,
            "message_id": str(uuid.uuid4()),
            "direction": direction,
            "sender": {"type": sender, "id": "bot" if sender == "bot" else ticket.contact_uuid},
            "text": text,
            "sent_at": "2026-05-20T14:31:00Z",
        } | more

    bot_lines = [body("outgoing", "bot", "Hi! I am the helpline bot."), body("outgoing", "bot", "Are you safe?")]
    for line in bot_lines:
        status, answer = post(weni, f"/v1/tickets/{ext}/messages", line)
        assert status == 200 and answer["status"] == "received" and answer["message_external_id"], answer
    again = post(weni, f"/v1/tickets/{ext}/messages", bot_lines[0])  # mailroom retried it
    assert again[0] == 200
    stored = [(m.direction, m.sender, m.text, m.status) for m in messages(env, ext)]
    assert stored == [
        ("out", "bot", "Hi! I am the helpline bot.", "sent"),
        ("out", "bot", "Are you safe?", "sent"),
    ]
    # Never sent again: history is the past, not the counselor's words.
    assert not [s for s in weni.received if "Are you safe?" in str(s)]

    location = {"url": "geo:-2.9,-79.0", "content_type": "geo"}
    status, answer = post(
        weni, f"/v1/tickets/{ext}/messages", body("incoming", "contact", "I am here", attachments=[location])
    )
    assert status == 200, answer
    last = messages(env, ext)[-1]
    assert last.text == "I am here" and "geo:-2.9,-79.0" in str(last.attachments)
    status, answer = post(
        weni, f"/v1/tickets/{ext}/messages", body("incoming", "contact", "and this", attachments=[{"url": "ftp://x/y"}])
    )
    assert (status, answer["error"]) == (400, "invalid_payload") and "attachments.0.url" in answer["details"]["fields"]
