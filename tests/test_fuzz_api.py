"""Schemathesis over ``/openapi.json`` against a real server: no 5xx, every response as documented.

One live server (SQLite, or PostgreSQL with ``HELPLINE_TEST_DATABASE_URL``). Before each operation
with path parameters is fuzzed, fresh fixture data is made so that its ids exist in every
interesting state: conversations assigned to a counselor (one a Weni ticket, with her reply), one
offered to her, one closed, dead letters. Valid (positive) cases mostly use those ids and, half of
the time, body fields naming existing things; invalid (negative) ones are left as generated. Each
case carries the token of the role its operation is for, or another role's, a bad token or none.
The budget is bounded (``MAX_EXAMPLES``) and the run derandomized: CI sees the same cases each time.

Outbound traffic stays on loopback: RapidPro is the fake one, and the Weni project's webhooks are
configured (a configured URL wins over the ``webhook_base_url`` a generated ticket carries).
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.result import Ok
from sqlalchemy import select

from conftest import PASSWORD, Env
from helpline.domain import auth
from helpline.domain.auth import issue_service_token
from helpline.store.models import OutboxEvent
from helpline.testing.fake_chatbot import FakeChatbot
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro

# Cases per operation: valid data reaches deeper, so it gets more. ~40 operations: ~40 s per database.
MAX_EXAMPLES = {GenerationMode.POSITIVE: 16, GenerationMode.NEGATIVE: 8}
CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
CHATBOT = "weni"  # the Weni project: its webhooks go to the fake RapidPro, whatever a ticket says
BAD_TOKEN = "0" * 40


@dataclass
class Pools:
    """Values that name existing things: by path parameter, and by body field."""

    path: dict[str, list[Any]] = field(default_factory=dict)
    body: dict[str, list[Any]] = field(default_factory=dict)
    ticket_ids: dict[str, str] = field(default_factory=dict)  # external_id -> Weni's ticket_id


def offered_conv(offer: dict[str, Any]) -> str:
    conversation_id: str = offer["conversation"]["id"]
    return conversation_id


class World:
    """The server, its users and tokens, and fresh fixture data on demand."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.bot: FakeChatbot = env.chatbot(CHATBOT)
        self.amina: FakeCounselor = env.counselor("amina", site="ke")
        env.user("baraka", "counselor", site="ke")  # someone to transfer to
        env.user("sup", "supervisor", site="ke")
        env.user("root", "admin")
        self.tokens = {role: self.token(user) for role, user in (("chatbot", CHATBOT), ("counselor", "amina"))}
        self.tokens |= {"supervisor": self.token("sup"), "admin": self.token("root")}
        self.serial = itertools.count(1)

    def token(self, username: str) -> str:
        return self.token_of(self.env, username)

    @staticmethod
    def token_of(env: Env, username: str) -> str:
        token, _ = env.server.call(issue_service_token(env.server.core, username=username, ttl_s=3600))
        return token

    def _offer_of(self, session: str) -> dict[str, Any]:
        event = self.amina.wait_for("offer", lambda e: e["offer"]["conversation"]["chat_session"] == session)
        offer: dict[str, Any] = event["offer"]
        return offer

    def replenish(self) -> Pools:
        """Conversations assigned to amina (one a Weni ticket), one offered to her, one closed."""
        n = next(self.serial)
        assigned, offered, closed = f"a{n}", f"o{n}", f"c{n}"
        assert self.amina.join_queue().status_code == 200
        for role in ("supervisor", "admin"):  # staff may join the queue too (a fuzzed presence call): not now
            r = requests.put(
                self.env.url + "/api/agents/me/presence",
                json={"status": "offline"},
                headers=self.auth(role, "/api"),
                timeout=30,
            )
            assert r.status_code == 200, r.text
        assert self.bot.send(assigned, "hello", location="KE").status_code == 201
        read_offer = self._offer_of(assigned)
        assert self.amina.read_offer(read_offer["id"]).status_code == 200
        conv = read_offer["conversation"]["id"]
        reply = self.amina.reply(conv, "hi, I am here")
        assert reply.status_code == 201, reply.text
        ticket_id = f"0b7c8f3e-4a1d-4e52-9c1e-{n:012d}"
        r = requests.post(
            self.env.url + "/v1/tickets",
            json={
                "ticket_id": ticket_id,
                "contact": {"uuid": f"contact-{n}", "urn": f"whatsapp:2547000{n:05d}", "name": "Kid"},
                "body": "I need help",
                "opened_at": "2026-05-20T14:30:00Z",
            },
            headers={"Authorization": f"Bearer {self.tokens['chatbot']}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        ticket = r.json()["external_id"]
        assert self.amina.read_offer(self._offer_of(ticket)["id"]).status_code == 200
        assert self.bot.send(offered, "anyone?", location="KE").status_code == 201
        pending_offer = self._offer_of(offered)
        assert self.bot.send(closed, "bye", location="KE").status_code == 201
        closed_conv = self._offer_of(closed)["conversation"]["id"]
        assert self.bot.close(closed).status_code == 200
        dead = self.rows(select(OutboxEvent.id).where(OutboxEvent.status == "dead").limit(2))
        latest = self.rows(select(OutboxEvent.id).order_by(OutboxEvent.id.desc()).limit(1))
        # The value that leads somewhere comes first, and twice: sampled more often.
        return Pools(
            path={
                "chat_session": [assigned, assigned, offered, closed],
                "conversation_id": [conv, ticket, offered_conv(pending_offer), closed_conv],
                "offer_id": [pending_offer["id"], pending_offer["id"], read_offer["id"]],
                "external_id": [ticket],
                "outbox_id": [*dead, *latest],
                "site": ["ke", "ke", "tz"],
            },
            body={
                "chat_session": [assigned, offered, closed],
                "message_id": [reply.json()["message_id"]],
                "counselor": ["baraka", "amina"],
                "site": ["ke", "tz"],
                "text": ["hello", "x" * 700],  # a long reply goes to RapidPro in parts
                "attachments": [[], [{"url": "https://files.example/a.png", "content_type": "image/png"}]],
                "username": [CHATBOT],
                "password": [PASSWORD],
            },
            ticket_ids={ticket: ticket_id},
        )

    def rows(self, stmt: Any) -> list[Any]:
        async def run() -> list[Any]:
            async with self.env.server.core.sessionmaker() as s:
                return list((await s.scalars(stmt)).all())

        return self.env.server.call(run())

    def auth(self, role: str | None, path: str) -> dict[str, str]:
        if role is None:
            return {}
        if role == "bad":
            token = BAD_TOKEN
        elif role == "fresh":  # DELETE /api/token/ revokes what it is given: never one of ours
            token = self.token(CHATBOT)
        else:
            token = self.tokens[role]
        return {"Authorization": f"{'Bearer' if path.startswith('/v1/') else 'Token'} {token}"}


def roles(path: str, method: str) -> list[str | None]:
    """The role an operation is for (half of the time), other roles (403), a bad token and none (401)."""
    if path.startswith("/v1/"):
        # Only the Weni project's own chatbot opens tickets: its webhooks are configured to stay on loopback.
        return ["chatbot"] * 3 + ["counselor", "bad", None]
    if path.endswith("/token/"):
        return ["fresh", "fresh", "bad", None] if method == "DELETE" else [None]
    if "/chat/" in path:
        return ["chatbot"] * 4 + ["admin", "counselor", "bad", None]
    if "/supervisor/" in path:
        return ["supervisor"] * 4 + ["admin", "counselor", "chatbot", None]
    return ["counselor"] * 5 + ["supervisor", "admin", "chatbot", "bad", None]


def body_properties(op: Any) -> set[str]:
    content = op.definition.raw.get("requestBody", {}).get("content", {}).get("application/json", {})
    return set(content.get("schema", {}).get("properties", {}))


def use_known_ids(data: st.DataObject, case: Any, pools: Pools, properties: set[str]) -> None:
    """Mostly path ids that exist; half of the time body fields that name existing things."""
    for name in list(case.path_parameters or {}):
        if pools.path.get(name) and data.draw(st.integers(0, 3)):
            case.path_parameters[name] = data.draw(st.sampled_from(pools.path[name]))
    body = case.body
    if not isinstance(body, dict):
        return
    external_id = (case.path_parameters or {}).get("external_id")
    if external_id in pools.ticket_ids and data.draw(st.booleans()):  # the Weni contract repeats the path's ids
        body |= {"external_id": external_id, "ticket_id": pools.ticket_ids[external_id]}
    for name in sorted(properties & set(pools.body)):
        if data.draw(st.booleans()):
            body[name] = data.draw(st.sampled_from(pools.body[name]))


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fuzzed logins check passwords by the hundred: argon2's real cost is for the auth tests."""
    cheap = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1),))
    monkeypatch.setattr(auth, "_hasher", cheap)
    monkeypatch.setattr(auth, "_DUMMY_HASH", cheap.hash("not-a-real-password"))


def fuzz_operation(
    op: Any, mode: GenerationMode, world: World, pools: Pools, checks: list[Any], seen: Counter[int]
) -> str | None:
    """Fuzz one operation with one kind of data; the failures found, as schemathesis reports them."""
    strategy = op.as_strategy(generation_mode=mode)
    who = roles(op.path, op.method.upper())
    properties = body_properties(op)
    session = requests.Session()

    @settings(
        max_examples=MAX_EXAMPLES[mode],
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the report has a curl to replay
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(strategy)
        if mode == GenerationMode.POSITIVE:  # negative data may be in the path: left as generated
            use_known_ids(data, case, pools, properties)
        role = data.draw(st.sampled_from(who))
        response = case.call_and_validate(
            base_url=world.env.url, session=session, headers=world.auth(role, op.path), checks=checks
        )
        seen[response.status_code] += 1

    try:
        fuzz()
    except Unsatisfiable:  # nothing in this operation can be made invalid
        assert mode == GenerationMode.NEGATIVE, op.label
    except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
        return f"{op.label} [{mode.value}]:\n{exc}"
    finally:
        session.close()
    return None


# schemathesis' own strategies draw from `random`: not ours to fix.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_openapi_fuzz(make_env: Callable[..., Env], rapidpro: FakeRapidPro) -> None:
    env = make_env(
        settings={
            "weni_projects": {CHATBOT: {"webhook_base_url": f"{rapidpro.url}/weni-webhooks"}},
            "login_max_failures": 10_000,  # the fuzzed logins would lock the good ones out (429: test_auth)
        },
        offer_timeout_s=600,  # offers stay pending while their operation is fuzzed
        max_chats=1000,
    )
    world = World(env)
    schema = schemathesis.openapi.from_url(env.url + "/openapi.json")
    load_all_checks()
    checks = [CHECKS.get_one(name) for name in CHECK_NAMES]
    failures: list[str] = []
    seen: dict[str, Counter[int]] = defaultdict(Counter)
    started = time.monotonic()
    pools = world.replenish()

    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the spec itself is invalid: {result.err()}"
        op = result.ok()
        assert not op.path.startswith("/open/"), "/open/api is an alias, kept out of the spec"
        if op.path_parameters:  # fresh things to act on: the last operation may have closed them
            pools = world.replenish()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failure = fuzz_operation(op, mode, world, pools, checks, seen[op.label])
            if failure is not None:
                failures.append(failure)

    print(f"\nfuzzed {sum(sum(c.values()) for c in seen.values())} requests in {time.monotonic() - started:.1f}s")
    for label, statuses in seen.items():
        print(f"  {label}: {dict(sorted(statuses.items()))}")
    assert not failures, "\n\n".join(failures)
    succeeded = [label for label, statuses in seen.items() if any(s < 300 for s in statuses)]
    assert len(succeeded) >= 0.75 * len(seen), f"too few operations ever succeeded: {succeeded}"


# --------------------------------------------------------------------------- what the fuzzing found


def test_nul_characters_and_out_of_range_ids_are_client_errors(env: Env) -> None:
    """Found by the fuzzing on PostgreSQL, which stores no U+0000 in text and 32-bit INTEGER ids:
    both came back as 503 "store unavailable" (retry!), and a 64-bit overflow as a 500 on SQLite."""
    bot = env.chatbot(CHATBOT)
    amina = env.counselor("amina", site="ke", join=False)
    env.user("sup", "supervisor", site="ke")
    sup = {"Authorization": f"Token {World.token_of(env, 'sup')}"}
    assert bot.send("s1", "hello").status_code == 201
    nul = "a\x00b"
    chat = {"chat_sender": "1", "chat_message": "hi", "chat_session": "s2", "chat_source": "WENI"}
    cursor = base64.urlsafe_b64encode(json.dumps([1.0, nul]).encode()).decode()
    calls: list[tuple[httpx.Client, str, str, Any, int]] = [
        (bot.http, "POST", "/api/token/", {"username": nul, "password": PASSWORD}, 422),
        (bot.http, "POST", "/api/chat/", chat | {"chat_message": nul}, 422),
        (bot.http, "POST", "/api/chat/", chat | {"client_name": nul}, 422),
        (bot.http, "POST", "/api/chat/s1/ack/", {"message_id": nul, "status": "read"}, 422),
        (bot.http, "GET", "/api/chat/a%00b/messages/", None, 404),
        (bot.http, "POST", "/api/chat/a%00b/close/", None, 404),
        (bot.http, "GET", f"/api/chat/?cursor={cursor}", None, 422),
        (amina.http, "PUT", "/api/agents/me/presence", {"status": "paused", "reason": nul}, 422),
        (amina.http, "GET", "/api/conversations/a%00b/messages/", None, 404),
        (amina.http, "POST", f"/api/offers/{2**31}/read", None, 422),
        (amina.http, "POST", f"/api/offers/{2**70}/decline", None, 422),
        (amina.http, "POST", "/api/offers/0/read", None, 422),
        (amina.http, "GET", "/api/supervisor/audit?user=a%00b", None, 422),
    ]
    for client, method, path, body, status in calls:
        r = client.request(method, path, json=body)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        assert set(r.json()["error"]) == {"code", "message", "fields"}, r.text
    r = httpx.post(f"{env.url}/api/supervisor/dead-letters/{2**40}/replay", headers=sup, timeout=30)
    assert r.status_code == 422, r.text
    # The Weni contract's own error body: 400 invalid_payload, 404 for a path no ticket can have.
    weni = {"Authorization": f"Bearer {bot.token}"}
    ticket = {
        "ticket_id": "0b7c8f3e-4a1d-4e52-9c1e-2f6d7a8b9c0d",
        "contact": {"uuid": "c-1", "urn": "whatsapp:254700000001", "name": nul},
        "opened_at": "2026-05-20T14:30:00Z",
        "metadata": {"webhook_base_url": "http://127.0.0.1:9/x"},
    }
    r = httpx.post(f"{env.url}/v1/tickets", json=ticket, headers=weni, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "invalid_payload", r.text
    assert "contact.name" in r.json()["details"]["fields"], r.text
    r = httpx.post(f"{env.url}/v1/tickets/a%00b/close", headers=weni, timeout=30)
    assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
