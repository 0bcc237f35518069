"""Helpers of the Weni ticketer tests: a helpline wired to a FakeWeni, and store look-ups."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from sqlalchemy import Select, select

from conftest import Env
from helpline.domain.auth import issue_service_token
from helpline.store.models import Conversation, Message, Ticket
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_weni import FakeWeni

SECRET = "whsec-current"
OLD_SECRET = "whsec-previous"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def start_weni(**kwargs: Any) -> Iterator[FakeWeni]:
    fake = FakeWeni(secrets=[SECRET], max_retry_wait_s=0.5, **kwargs)
    fake.start()
    try:
        yield fake
    finally:
        fake.shutdown()


def weni_env(
    make_env: Callable[..., Env],
    weni: FakeWeni,
    *,
    settings: dict[str, Any] | None = None,
    project: str = "weni-acme",
    site: str = "*",
    prefix: str = "",
    **site_opts: Any,
) -> Env:
    """A helpline whose Weni project ``project`` is ``weni`` (token issued, secrets configured)."""
    env = make_env(settings={"weni_webhook_secrets": SECRET, **(settings or {})}, **site_opts)
    env.user(project, "chatbot", site=site)
    token, _ = env.server.call(issue_service_token(env.server.core, username=project, ttl_s=30 * 86400))
    weni.connect(env.url + prefix, token)
    return env


def rows(env: Env, stmt: Select[Any]) -> list[Any]:
    async def run() -> list[Any]:
        async with env.server.core.sessionmaker() as s:
            return list((await s.scalars(stmt)).all())

    return env.server.call(run())


def conversation(env: Env, external_id: str) -> Conversation:
    (conv,) = rows(env, select(Conversation).where(Conversation.id == external_id))
    return conv


def messages(env: Env, external_id: str) -> list[Message]:
    return rows(env, select(Message).where(Message.conversation_id == external_id).order_by(Message.id))


def tickets(env: Env) -> list[Ticket]:
    return rows(env, select(Ticket).order_by(Ticket.id))


def take_offer(counselor: FakeCounselor, external_id: str) -> dict[str, Any]:
    """Wait for the offer of ticket ``external_id``, read it, and return the read answer."""
    offer = counselor.wait_for("offer", lambda e: e["offer"]["conversation"]["id"] == external_id)["offer"]
    r = counselor.read_offer(offer["id"])
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def reply(counselor: FakeCounselor, conversation_id: str, text: str, attachments: Any = None) -> httpx.Response:
    body: dict[str, Any] = {"text": text}
    if attachments is not None:
        body["attachments"] = attachments
    return counselor.http.post(f"/api/conversations/{conversation_id}/messages/", json=body)
