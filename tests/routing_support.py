"""Helpers of the routing tests (notices, overflow, transfers, business hours, wrap-up).

``make_env(extra=...)`` appends TOML after the ``tz`` site's ``[site.routing]`` table: routing keys
for ``tz`` first, then ``[site.hours]`` of ``tz``, then more ``[[site]]`` tables (``site_toml``).
The ``tz`` site talks to RapidPro with ``extra`` (not ``params``) and ``whatsapp:`` URNs, ``ke``
with ``params`` and ``telegram:``: which one an event used shows which site's RapidPro carried it.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from helpline.domain import auth
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro, ReceivedStart
from support import Event, Pred, wait_event

Params = dict[str, Any]


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here makes users and logs them in; argon2's real cost is for the auth tests."""
    monkeypatch.setattr(auth, "_hasher", PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1),)))


def site_toml(
    rapidpro: FakeRapidPro,
    slug: str,
    *,
    name: str | None = None,
    countries: tuple[str, ...] = (),
    timezone: str = "UTC",
    routing: str = "",
    hours: str = "",
) -> str:
    """One more ``[[site]]``, on the same fake RapidPro (``params``, ``telegram:`` URNs)."""
    text = f"""
        [[site]]
        slug = "{slug}"
        name = "{name or slug.upper() + " helpline"}"
        countries = {json.dumps(list(countries))}
        timezone = "{timezone}"
        [site.rapidpro]
        base_url = "{rapidpro.url}"
        token = "{rapidpro.token}"
        flow = "{rapidpro.flow}"
        urn_scheme = "telegram"
        [site.routing]
        strategy = "ringall"
        offer_timeout_s = 5
    """
    text = textwrap.dedent(text) + textwrap.dedent(routing)
    if hours:
        text += "[site.hours]\n" + textwrap.dedent(hours)
    return text


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- RapidPro


def notices(rapidpro: FakeRapidPro, session: str, event: str | None = None) -> list[Params]:
    """The params (``params`` or ``extra``) RapidPro accepted for ``session``, in arrival order."""
    return [
        p for s in starts(rapidpro, session) if (p := s.params) is not None and (event is None or p["event"] == event)
    ]


def starts(rapidpro: FakeRapidPro, session: str) -> list[ReceivedStart]:
    return [s for s in rapidpro.accepted if s.params is not None and s.params.get("conversation_id") == session]


def wait_notice(
    rapidpro: FakeRapidPro, session: str, event: str, pred: Callable[[Params], bool] | None = None, timeout: float = 5
) -> Params:
    """The first ``event`` of ``session`` (matching ``pred``) RapidPro accepted."""

    def found(_: list[ReceivedStart]) -> bool:
        return any(pred is None or pred(p) for p in notices(rapidpro, session, event))

    rapidpro.wait_for(found, timeout=timeout)
    return next(p for p in notices(rapidpro, session, event) if pred is None or pred(p))


def events_of(rapidpro: FakeRapidPro, session: str) -> list[str]:
    return [p["event"] for p in notices(rapidpro, session)]


def assert_params_valid(rapidpro: FakeRapidPro) -> None:
    """Every accepted flow start's params: string values RapidPro keeps whole (at most 640 characters)."""
    for s in rapidpro.accepted:
        params = s.params or {}
        assert all(isinstance(v, str) and len(v) <= 640 for v in params.values()), params
        assert "params" in s.body or "extra" in s.body


# --------------------------------------------------------------------------- counselors' WebSockets


def for_session(session: str) -> Pred:
    return lambda e: bool(e["offer"]["conversation"]["chat_session"] == session)


def offer_for(c: FakeCounselor, session: str, timeout: float = 5.0) -> Event:
    offer: Event = wait_event(c, "offer", for_session(session), timeout=timeout)["offer"]
    return offer
