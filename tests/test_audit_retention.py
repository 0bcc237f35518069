"""Child-data protection: the audit trail of staff access, the case-file export and the retention purge."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from conftest import PG_URL, Env, staff
from helpline import cli
from helpline.domain import retention
from helpline.domain.outbox import PURGED_PAYLOAD
from helpline.runtime.core import now
from helpline.store.models import AuditEntry, Conversation, Message, OutboxEvent, Ticket
from helpline.testing.fake_weni import FakeWeni
from helpline.testing.live import LiveWorker
from support import eventually
from weni_support import start_weni, take_offer, weni_env

pytestmark = pytest.mark.timeout(90)

DAY = 86400.0


def call(env: Env, make: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``make(session)`` in a transaction on the server's loop."""

    async def run() -> Any:
        async with env.server.core.sessionmaker() as s, s.begin():
            return await make(s)

    return env.server.call(run())


def rows(env: Env, stmt: Any) -> list[Any]:
    async def run(s: Any) -> list[Any]:
        return list((await s.scalars(stmt)).all())

    return call(env, run)  # type: ignore[no-any-return]


def conversation(env: Env, conv_id: str) -> Conversation:
    (conv,) = rows(env, select(Conversation).where(Conversation.id == conv_id))
    assert isinstance(conv, Conversation)
    return conv


def messages(env: Env, conv_id: str) -> list[Message]:
    return rows(env, select(Message).where(Message.conversation_id == conv_id).order_by(Message.id))


def events(env: Env, conv_id: str) -> list[OutboxEvent]:
    return rows(env, select(OutboxEvent).where(OutboxEvent.conversation_id == conv_id).order_by(OutboxEvent.id))


def settled(env: Env, conv_id: str) -> list[OutboxEvent]:
    """The conversation's outbox events once none is pending."""

    def check() -> list[OutboxEvent]:
        evs = events(env, conv_id)
        assert evs and all(e.status != "pending" for e in evs), [(e.event, e.status) for e in evs]
        return evs

    return eventually(check)


def backdate(env: Env, conv_id: str, days: float) -> None:
    """Pretend the conversation closed ``days`` earlier than it did."""

    async def run(s: Any) -> None:
        await s.execute(
            update(Conversation).where(Conversation.id == conv_id).values(closed_at=Conversation.closed_at - days * DAY)
        )

    call(env, run)


def audit_of(client: httpx.Client, conv_id: str) -> list[tuple[str, str]]:
    r = client.get("/api/supervisor/audit", params={"conversation": conv_id})
    assert r.status_code == 200, r.text
    return [(e["username"], e["action"]) for e in reversed(r.json()["results"])]


def take(env: Env, counselor: Any) -> str:
    offer = counselor.wait_for("offer")["offer"]
    assert counselor.read_offer(offer["id"]).status_code == 200
    return str(offer["conversation"]["id"])


# --------------------------------------------------------------------------- audit


def test_staff_reads_and_acts_are_audited(make_env: Callable[..., Env], clients: list[httpx.Client]) -> None:
    env = make_env(offer_timeout_s=30.0)
    bot = env.chatbot()
    amina = env.counselor("amina", site="ke")
    baraka = env.counselor("baraka", site="ke", join=False)
    sam = staff(env, clients, "sam", "supervisor", site="ke")
    zawadi = staff(env, clients, "zawadi", "supervisor", site="tz")
    root = staff(env, clients, "root", "admin", site="ke")
    anonymous = httpx.Client(base_url=env.url, timeout=30)
    clients.append(anonymous)

    assert bot.send("aud-1", "nimechoka sana", contact_urn="telegram:1001").status_code == 201
    conv_id = take(env, amina)
    assert amina.messages(conv_id).status_code == 200
    assert sam.get(f"/api/conversations/{conv_id}/messages/").status_code == 200
    # Refused reads leave no trace.
    assert zawadi.get(f"/api/conversations/{conv_id}/messages/").status_code == 404
    assert baraka.messages(conv_id).status_code == 404
    r = amina.http.post(f"/api/conversations/{conv_id}/transfer/", json={"counselor": "baraka"})
    assert r.status_code == 200, r.text
    assert take(env, baraka) == conv_id
    assert baraka.close(conv_id).json()["already_closed"] is False
    assert baraka.close(conv_id).json()["already_closed"] is True  # nothing more happened: no entry

    expected = [
        ("amina", "read_offer"),
        ("amina", "read_messages"),
        ("sam", "read_messages"),
        ("amina", "transfer"),
        ("baraka", "read_offer"),
        ("baraka", "close"),
    ]
    assert audit_of(sam, conv_id) == expected
    assert audit_of(root, conv_id) == expected
    entries = sam.get("/api/supervisor/audit", params={"conversation": conv_id}).json()["results"]
    assert {(e["conversation_id"], e["site"], e["address"]) for e in entries} == {(conv_id, "ke", "127.0.0.1")}
    assert {e["username"]: e["role"] for e in entries} == {
        "amina": "counselor",
        "sam": "supervisor",
        "baraka": "counselor",
    }
    ats = [e["at"] for e in reversed(entries)]
    assert ats == sorted(ats) and all(a.endswith("Z") for a in ats)

    # Only supervisors of the site and admins read the trail.
    assert zawadi.get("/api/supervisor/audit", params={"conversation": conv_id}).status_code == 404
    assert sam.get("/api/supervisor/audit", params={"conversation": "no-such-id"}).status_code == 404
    assert root.get("/api/supervisor/audit", params={"conversation": conv_id, "site": "tz"}).status_code == 404
    for who in (amina.http, bot.http):
        r = who.get("/api/supervisor/audit", params={"conversation": conv_id})
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert anonymous.get("/api/supervisor/audit").status_code == 401

    # Without a conversation: the caller's sites, newest first, optionally one staff member's.
    site_wide = sam.get("/api/supervisor/audit").json()
    assert site_wide["count"] == len(expected)
    only = sam.get("/api/supervisor/audit", params={"user": "baraka"}).json()["results"]
    assert [e["action"] for e in only] == ["close", "read_offer"]
    assert zawadi.get("/api/supervisor/audit").json() == {"results": [], "count": 0}
    assert root.get("/api/supervisor/audit", params={"site": "tz"}).json()["count"] == 0
    assert sam.get("/api/supervisor/audit", params={"site": "tz"}).status_code == 403
    assert sam.get("/api/supervisor/audit", params={"limit": 2}).json()["count"] == 2
    assert sam.get("/api/supervisor/audit", params={"limit": 0}).status_code == 422


def test_export_is_a_case_file(make_env: Callable[..., Env], clients: list[httpx.Client]) -> None:
    env = make_env(offer_timeout_s=30.0)
    bot = env.chatbot()
    amina = env.counselor("amina", site="ke")
    baraka = env.counselor("baraka", site="ke", join=False)
    sam = staff(env, clients, "sam", "supervisor", site="ke")
    zawadi = staff(env, clients, "zawadi", "supervisor", site="tz")
    root = staff(env, clients, "root", "admin", site="tz")
    anonymous = httpx.Client(base_url=env.url, timeout=30)
    clients.append(anonymous)

    r = bot.send("case-1", "Naomba msaada", contact_urn="telegram:2002", client_name="Kiki", risk="high")
    assert r.status_code == 201
    conv_id = take(env, amina)
    assert amina.reply(conv_id, "Niko hapa, nakusikia").status_code == 201
    assert bot.send("case-1", "Asante").status_code == 201
    settled(env, conv_id)

    r = amina.http.get(f"/api/conversations/{conv_id}/export")
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"] == f"attachment; filename=conversation-{conv_id}.json"
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    case = r.json()
    assert case["format"] == "helpline.conversation/1"
    assert case["exported_by"] | {"id": None} == {"id": None, "username": "amina", "name": "Amina", "role": "counselor"}
    meta = case["conversation"]
    assert (meta["id"], meta["chat_session"], meta["site"], meta["status"], meta["risk"]) == (
        conv_id,
        "case-1",
        "ke",
        "assigned",
        "high",
    )
    assert meta["purged_at"] is None
    assert meta["client"] == {"name": "Kiki"}  # a counselor gets what the console shows
    assert meta["counselor"] | {"id": None} == {"id": None, "username": "amina", "name": "Amina"}
    assert [(m["sender"], m["direction"], m["text"]) for m in case["messages"]] == [
        ("contact", "in", "Naomba msaada"),
        ("counselor", "out", "Niko hapa, nakusikia"),
        ("contact", "in", "Asante"),
    ]
    assert [m["status"] for m in case["messages"]] == ["delivered", "sent", "delivered"]
    assert all(m["created_at"] and m["status_at"] for m in case["messages"])
    assert case["messages"][1]["counselor_name"] == "Amina"
    assert [(o["counselor"]["username"], o["status"]) for o in case["offers"]] == [("amina", "read")]
    assert all(o["created_at"] and o["deadline"] and o["resolved_at"] for o in case["offers"])
    assert [(e["username"], e["action"]) for e in case["audit"]] == [("amina", "read_offer"), ("amina", "export")]

    # A supervisor of the site (and an admin) also get the contact identifiers, for a referral.
    case = sam.get(f"/api/conversations/{conv_id}/export").json()
    assert case["conversation"]["client"] == {
        "name": "Kiki",
        "id": "23343411",
        "contact_urn": "telegram:2002",
        "contact_uuid": None,
    }
    assert root.get(f"/api/conversations/{conv_id}/export").status_code == 200

    # Nobody else; refusals are not audited.
    assert baraka.http.get(f"/api/conversations/{conv_id}/export").status_code == 404
    assert zawadi.get(f"/api/conversations/{conv_id}/export").status_code == 404
    assert sam.get("/api/conversations/nope/export").status_code == 404
    assert bot.http.get(f"/api/conversations/{conv_id}/export").status_code == 403
    assert anonymous.get(f"/api/conversations/{conv_id}/export").status_code == 401
    assert audit_of(sam, conv_id) == [
        ("amina", "read_offer"),
        ("amina", "export"),
        ("sam", "export"),
        ("root", "export"),
    ]
    assert "/api/conversations/{conversation_id}/export" in env.server.app.openapi()["paths"]


# --------------------------------------------------------------------------- retention


def test_purge_command_empties_old_conversations_and_keeps_statistics(
    make_env: Callable[..., Env], clients: list[httpx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(offer_timeout_s=30.0)
    bot = env.chatbot()
    amina = env.counselor("amina", site="ke")
    sam = staff(env, clients, "sam", "supervisor", site="ke")

    sessions: dict[str, str] = {}
    for name in ("old", "recent", "open"):
        r = bot.send(f"ret-{name}", f"siri ya {name}", contact_urn=f"telegram:30{len(sessions)}", client_name="Zuri")
        assert r.status_code == 201
        sessions[name] = take(env, amina)
        assert amina.reply(sessions[name], f"jibu la {name}").status_code == 201
    for name in ("old", "recent"):
        assert amina.close(sessions[name]).status_code == 200
    old = sessions["old"]
    for conv_id in sessions.values():
        settled(env, conv_id)

    async def attach(s: Any) -> None:
        await s.execute(
            update(Message)
            .where(Message.conversation_id == old, Message.direction == "in")
            .values(attachments=json.dumps([{"url": "https://files.example/photo.jpg", "content_type": "image/jpeg"}]))
        )

    call(env, attach)
    backdate(env, old, 10)
    before = conversation(env, old)

    monkeypatch.setenv("HELPLINE_DATABASE_URL", env.server.settings.database_url)
    monkeypatch.setenv("HELPLINE_SITES", env.server.settings.sites)
    monkeypatch.delenv("HELPLINE_RETENTION_DAYS", raising=False)
    runner = CliRunner()

    def purge(*args: str) -> str:
        result = runner.invoke(cli.app, ["purge", *args])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    # Retention off by default: the command says so and does nothing.
    assert "retention is off" in purge()

    out = purge("--days", "7", "--dry-run")
    assert out.startswith("would purge 1 conversation(s) closed before ")
    assert out.endswith(f"(2 message(s)) and {len(events(env, old))} outbox event(s)")
    assert [m.text for m in messages(env, old)] == ["siri ya old", "jibu la old"]

    monkeypatch.setenv("HELPLINE_RETENTION_DAYS", "7")
    assert purge().startswith("purged 1 conversation(s)")

    # The text and the client are gone ...
    assert [(m.text, m.attachments) for m in messages(env, old)] == [("", None), ("", None)]
    after = conversation(env, old)
    assert (after.client_id, after.client_name, after.contact_urn, after.contact_uuid) == (
        "purged",
        "(purged)",
        None,
        None,
    )
    assert after.purged_at is not None and after.purged_at > after.closed_at  # type: ignore[operator]
    assert {e.payload for e in events(env, old)} == {PURGED_PAYLOAD}
    # ... the statistics stay.
    keep = "site status risk source chat_session counselor_id created_at queued_at assigned_at closed_at"
    keep += " closed_by close_reason"
    assert {k: getattr(after, k) for k in keep.split()} == {k: getattr(before, k) for k in keep.split()}
    assert [(m.direction, m.status) for m in messages(env, old)] == [("in", "delivered"), ("out", "sent")]
    stats = sam.get("/api/supervisor/stats", params={"hours": 1}).json()["sites"][0]["hours"]
    assert sum(h["conversations"] for h in stats) == 3 and sum(h["assigned"] for h in stats) == 3

    # The others are untouched.
    for name in ("recent", "open"):
        conv_id = sessions[name]
        assert [m.text for m in messages(env, conv_id)] == [f"siri ya {name}", f"jibu la {name}"]
        assert conversation(env, conv_id).purged_at is None
        assert conversation(env, conv_id).contact_urn is not None
        assert all(f"jibu la {name}" in e.payload for e in events(env, conv_id) if e.event == "message")

    # What is left is still served: the export says it was purged, the chatbot sees empty texts.
    case = sam.get(f"/api/conversations/{old}/export").json()
    assert case["conversation"]["purged_at"] is not None
    assert case["conversation"]["client"] == {
        "name": "(purged)",
        "id": "purged",
        "contact_urn": None,
        "contact_uuid": None,
    }
    assert [m["text"] for m in case["messages"]] == ["", ""]
    assert [m["attachments"] for m in case["messages"]] == [[], []]
    assert [m["text"] for m in bot.messages("ret-old").json()["results"]] == ["", ""]

    # Nothing more to do.
    assert purge("--days", "7").startswith("purged 0 conversation(s)")
    assert runner.invoke(cli.app, ["purge", "--days", "-1"]).exit_code != 0


def test_outbox_events_are_purged_once_sent_or_dead(make_env: Callable[..., Env], clients: list[httpx.Client]) -> None:
    env = make_env(offer_timeout_s=30.0)
    bot = env.chatbot()
    amina = env.counselor("amina", site="ke")
    sam = staff(env, clients, "sam", "supervisor", site="ke")

    assert bot.send("dead-1", "nisaidie", contact_urn="telegram:4004").status_code == 201
    conv_id = take(env, amina)
    settled(env, conv_id)
    # RapidPro refuses the counselor's message, echoing what it was sent.
    echo = json.dumps({"params": ["invalid: Tuko pamoja, telegram:4004"]})
    env.rapidpro.fail_next(2, 400, body=echo)
    assert amina.reply(conv_id, "Tuko pamoja").status_code == 201
    dead = eventually(lambda: next(e for e in settled(env, conv_id) if e.status == "dead"))
    assert "Tuko pamoja" in (dead.last_error or "")
    # A replay is audited (and fails again here).
    assert sam.post(f"/api/supervisor/dead-letters/{dead.id}/replay").status_code == 200
    eventually(lambda: next(e for e in settled(env, conv_id) if e.id == dead.id and e.status == "dead"))
    assert audit_of(sam, conv_id)[-1] == ("sam", "replay")
    assert amina.close(conv_id).status_code == 200
    evs = settled(env, conv_id)
    closed_event = evs[-1]
    assert closed_event.event == "closed"

    # RapidPro has been down for days: the "closed" event still waits (not due for a long time).
    async def stuck(s: Any) -> None:
        await s.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == closed_event.id)
            .values(status="pending", next_attempt_at=now() + 30 * DAY, sent_at=None)
        )

    call(env, stuck)
    backdate(env, conv_id, 30)

    report = env.server.call(retention.purge(env.server.core, days=7))
    assert (report.conversations, report.messages) == (1, 2)
    assert report.outbox_events == len(evs) - 1  # all but the pending one
    by_id = {e.id: e for e in events(env, conv_id)}
    assert by_id[dead.id].payload == PURGED_PAYLOAD
    assert by_id[dead.id].last_error == "HTTP 400"
    assert "telegram:4004" in by_id[closed_event.id].payload  # still owed to the contact
    dl = sam.get("/api/supervisor/dead-letters").json()["results"]
    assert [(d["id"], d["last_error"]) for d in dl] == [(dead.id, "HTTP 400")]
    r = sam.post(f"/api/supervisor/dead-letters/{dead.id}/replay")
    assert r.status_code == 409 and "purged" in r.json()["error"]["message"]

    # Once it has gone out, the next run empties it too.
    async def sent(s: Any) -> None:
        await s.execute(update(OutboxEvent).where(OutboxEvent.id == closed_event.id).values(status="sent"))

    call(env, sent)
    report = env.server.call(retention.purge(env.server.core, days=7))
    assert (report.conversations, report.outbox_events) == (0, 1)
    assert {e.payload for e in events(env, conv_id)} == {PURGED_PAYLOAD}


def test_weni_ticket_is_purged(make_env: Callable[..., Env]) -> None:
    weni_iter = start_weni()
    weni: FakeWeni = next(weni_iter)
    try:
        env = weni_env(make_env, weni, offer_timeout_s=30.0)
        amina = env.counselor("amina", site="ke")
        ticket, r = weni.open_ticket(name="Neema", urn="whatsapp:254700000555", topic="ke", body="siri ya tiketi")
        assert ticket is not None and r.status == 201, r.body
        conv_id = str(ticket.external_id)
        take_offer(amina, conv_id)
        photo = {"url": "https://files.example/p.jpg", "content_type": "image/jpeg"}
        assert weni.forward(ticket, "picha yangu", attachments=[photo]).status == 200
        assert amina.close(conv_id).status_code == 200
        eventually(lambda: settled(env, conv_id))
        backdate(env, conv_id, 8)

        report = env.server.call(retention.purge(env.server.core, days=7))
        assert report.conversations == 1
        assert {(m.text, m.attachments) for m in messages(env, conv_id)} == {("", None)}
        (t,) = rows(env, select(Ticket).where(Ticket.conversation_id == conv_id))
        assert (t.contact_uuid, t.contact_urn, t.body, t.meta, t.open_contact) == (
            f"purged:{t.id}",
            "purged",
            None,
            None,
            None,
        )
        assert {e.payload for e in events(env, conv_id)} == {PURGED_PAYLOAD}
        conv = conversation(env, conv_id)
        assert (conv.client_name, conv.contact_urn, conv.contact_uuid) == ("(purged)", None, None)
    finally:
        next(weni_iter, None)


def test_background_purge(make_env: Callable[..., Env]) -> None:
    env = make_env(settings={"retention_days": 2, "retention_interval_s": 0.2}, offer_timeout_s=30.0)
    bot = env.chatbot()
    amina = env.counselor("amina", site="ke")
    assert bot.send("bg-1", "siri", contact_urn="telegram:5005").status_code == 201
    conv_id = take(env, amina)
    assert amina.close(conv_id).status_code == 200
    settled(env, conv_id)
    assert conversation(env, conv_id).purged_at is None
    backdate(env, conv_id, 3)

    def purged() -> None:
        assert conversation(env, conv_id).purged_at is not None

    eventually(purged)
    assert [m.text for m in messages(env, conv_id)] == [""]


@pytest.mark.skipif(not PG_URL, reason="helpline work runs beside the servers on PostgreSQL")
def test_helpline_work_purges_what_the_settings_say(make_env: Callable[..., Env]) -> None:
    """`helpline work` starts the retention purge as `helpline serve` does: here the server keeps
    everything (retention_days 0) and only the worker, with HELPLINE_RETENTION_DAYS=2, purges."""
    env = make_env(offer_timeout_s=30.0)
    bot = env.chatbot()
    amina = env.counselor("amina", site="ke")
    assert bot.send("wk-1", "siri", contact_urn="telegram:5006").status_code == 201
    conv_id = take(env, amina)
    assert amina.close(conv_id).status_code == 200
    settled(env, conv_id)
    backdate(env, conv_id, 3)
    settings = env.server.settings.model_copy(
        update={"retention_days": 2, "retention_interval_s": 0.2, "run_hunter": False, "run_outbox": False}
    )

    def purged() -> None:  # the conversation, then (in transactions of their own) its sent events
        assert conversation(env, conv_id).purged_at is not None
        assert {e.payload for e in events(env, conv_id)} == {PURGED_PAYLOAD}

    with LiveWorker(settings, env.server.sites):
        eventually(purged)
    assert [m.text for m in messages(env, conv_id)] == [""]


def test_concurrent_purges_share_the_work(make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two purges at once (two instances on PostgreSQL): every conversation purged exactly once."""
    env = make_env()
    bot = env.chatbot()
    assert bot.send("seed", "x", contact_urn="telegram:1").status_code == 201
    (chatbot_id,) = rows(env, select(Conversation.chatbot_id))
    t = now()
    n = 40

    async def seed(s: Any) -> None:
        for i in range(n):
            cid = f"00000000-0000-4000-8000-{i:012d}"
            s.add(
                Conversation(
                    id=cid,
                    site="ke",
                    chatbot_id=chatbot_id,
                    chat_session=f"bulk-{i}",
                    source="WENI",
                    client_id=f"2550{i}",
                    client_name="Bulk",
                    contact_urn=f"telegram:2550{i}",
                    risk="low",
                    risk_rank=0,
                    status="closed",
                    created_at=t - 20 * DAY,
                    queued_at=t - 20 * DAY,
                    closed_at=t - 19 * DAY,
                )
            )
            await s.flush()
            for j in range(3):
                s.add(
                    Message(
                        uuid=f"{cid[:-4]}{i:02d}{j:02d}",
                        conversation_id=cid,
                        direction="in",
                        external_id=f"m{j}",
                        text=f"bulk text {i}/{j}",
                        status="read",
                        created_at=t - 20 * DAY,
                        status_at=t - 20 * DAY,
                    )
                )

    call(env, seed)
    monkeypatch.setattr(retention, "BATCH", 7)

    async def both() -> list[retention.PurgeReport]:
        core = env.server.core
        return list(await asyncio.gather(retention.purge(core, days=7), retention.purge(core, days=7)))

    reports = env.server.call(both())
    assert sum(r.conversations for r in reports) == n
    assert sum(r.messages for r in reports) == 3 * n
    bulk = rows(env, select(Conversation).where(Conversation.chat_session.like("bulk-%")))
    assert len(bulk) == n and all(c.purged_at is not None and c.contact_urn is None for c in bulk)
    texts = rows(env, select(Message.text).where(Message.conversation_id.in_([c.id for c in bulk])))
    assert set(texts) == {""}
    assert rows(env, select(AuditEntry)) == []
