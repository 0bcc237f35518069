"""Fixtures: a real server on loopback over SQLite (default) or PostgreSQL, and real fake peers.

Set ``HELPLINE_TEST_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test`` to run the
whole suite on PostgreSQL (CI does both).
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.testing.fake_chatbot import FakeChatbot
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro
from helpline.testing.live import LiveServer

PG_URL = os.environ.get("HELPLINE_TEST_DATABASE_URL")

# Many servers start in this one process: gc.freeze() at each start would keep every earlier
# server's cyclic garbage for ever, and the process's collector stays Python's own.
os.environ.setdefault("HELPLINE_GC_FREEZE", "false")
os.environ.setdefault("HELPLINE_GC_FULL_COLLECTION_S", "0")

# structlog's default console output renders a logged exception with rich (syntax-highlighted
# source of every frame): seconds of CPU on the server's event loop per traceback, which stalls
# the live server under test. Plain tracebacks instead; `helpline serve` logs JSON anyway.
structlog.configure(
    processors=[
        *structlog.get_config()["processors"][:-1],
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
    ]
)
PASSWORD = "correct-horse-battery"


def reset_postgres(url: str) -> None:
    async def run() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
        await engine.dispose()

    asyncio.run(run())


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    if PG_URL:
        reset_postgres(PG_URL)
        return PG_URL
    return f"sqlite+aiosqlite:///{tmp_path / 'helpline.db'}"


@pytest.fixture
def rapidpro() -> Iterator[FakeRapidPro]:
    fake = FakeRapidPro()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def sites_toml(
    rapidpro: FakeRapidPro,
    *,
    offer_timeout_s: float = 1.0,
    strategy: str = "leastrecent",
    extra: str = "",
    autopause: bool = True,
    retry_gap_s: float = 0.0,
    max_chats: int = 3,
    ke_keys: str = "",
) -> str:
    """Two sites, ke (the default) and tz; ``ke_keys``: more top-level keys of ke (``a = 1\\nb = 2``)."""
    return (
        textwrap.dedent(f"""
        [[site]]
        slug = "ke"
        name = "Childline Kenya"
        countries = ["KE"]
        timezone = "Africa/Nairobi"
        default = true
        {ke_keys}
        [site.rapidpro]
        base_url = "{rapidpro.url}"
        token = "{rapidpro.token}"
        flow = "{rapidpro.flow}"
        urn_scheme = "telegram"
        [site.routing]
        strategy = "{strategy}"
        offer_timeout_s = {offer_timeout_s}
        retry_gap_s = {retry_gap_s}
        max_chats_per_counselor = {max_chats}
        autopause_on_no_answer = {"true" if autopause else "false"}

        [[site]]
        slug = "tz"
        name = "C-Sema Tanzania"
        countries = ["TZ"]
        timezone = "Africa/Dar_es_Salaam"
        [site.rapidpro]
        base_url = "{rapidpro.url}"
        token = "{rapidpro.token}"
        flow = "{rapidpro.flow}"
        urn_scheme = "whatsapp"
        params_field = "extra"
        [site.routing]
        strategy = "{strategy}"
        offer_timeout_s = {offer_timeout_s}
        """)
        + extra
    )


class Env:
    """A running helpline with its fake RapidPro, and helpers to make chatbots and counselors."""

    def __init__(self, server: LiveServer, rapidpro: FakeRapidPro) -> None:
        self.server = server
        self.rapidpro = rapidpro
        self.url = server.url
        self._clients: list[Any] = []

    def user(self, username: str, role: str, site: str | None = None, name: str | None = None) -> None:
        self.server.create_user(username, PASSWORD, role, site=site, name=name)

    def chatbot(self, username: str = "weni", site: str | None = "*", prefix: str = "/api") -> FakeChatbot:
        self.user(username, "chatbot", site=site)
        bot = FakeChatbot(self.url, username, PASSWORD, prefix=prefix)
        bot.login()
        self._clients.append(bot)
        return bot

    def counselor(
        self, username: str, site: str | None = None, name: str | None = None, *, join: bool = True
    ) -> FakeCounselor:
        self.user(username, "counselor", site=site, name=name or username.title())
        c = FakeCounselor(self.url, username, PASSWORD)
        c.login()
        c.connect()
        if join:
            assert c.join_queue().status_code == 200
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            if isinstance(c, FakeCounselor):
                c.close_all()
            else:
                c.aclose()


@pytest.fixture
def make_env(database_url: str, rapidpro: FakeRapidPro, tmp_path: Path) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []

    def make(settings: dict[str, Any] | None = None, **site_opts: Any) -> Env:
        path = tmp_path / f"sites{len(envs)}.toml"
        path.write_text(sites_toml(rapidpro, **site_opts))
        defaults: dict[str, Any] = {
            "poll_interval_s": 0.5,
            "outbox_backoff_base_s": 0.05,
            "outbox_backoff_cap_s": 0.5,
        }
        s = Settings(database_url=database_url, sites=str(path), **{**defaults, **(settings or {})})
        server = LiveServer(s, SiteRegistry.from_toml(path)).start()
        env = Env(server, rapidpro)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()
        env.server.stop()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


@pytest.fixture
def clients() -> Iterator[list[httpx.Client]]:
    """HTTP clients made by :func:`staff` in a test, closed at its end."""
    made: list[httpx.Client] = []
    yield made
    for c in made:
        c.close()


def staff(env: Env, clients: list[httpx.Client], username: str, role: str, site: str | None = None) -> httpx.Client:
    """A signed-in HTTP client for a new user."""
    env.user(username, role, site=site, name=username.title())
    c = httpx.Client(base_url=env.url, timeout=30)
    r = c.post("/api/token/", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    c.headers["Authorization"] = f"Token {r.json()['token']}"
    clients.append(c)
    return c
