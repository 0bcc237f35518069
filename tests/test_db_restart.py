"""The database restarted under load: the chatbot gets 503 with Retry-After, then all recovers.

Restarts this machine's PostgreSQL cluster (pg_ctlcluster, as the machine's services are run),
so it only runs in the PostgreSQL pass of the suite.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import PG_URL, Env
from support import wait_until_sync

pytestmark = pytest.mark.skipif(not PG_URL, reason="restarts the PostgreSQL server")


def _cluster() -> list[str]:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


@pytest.fixture
def postgres_restartable() -> Iterator[None]:
    if not Path("/etc/postgresql").is_dir():
        pytest.skip("no local PostgreSQL cluster to restart")
    try:
        yield
    finally:  # whatever happened, leave the server running for the rest of the suite
        subprocess.run([*_cluster(), "start"], check=False, capture_output=True)


def test_database_restart_gives_503_then_recovers(make_env: Callable[..., Env], postgres_restartable: None) -> None:
    env = make_env(offer_timeout_s=60.0)  # the offer outlives the outage
    bot = env.chatbot()
    amina = env.counselor("amina")
    assert bot.send("db-1", "before the restart", message_id="m-1").status_code == 201
    offer = amina.wait_for("offer")["offer"]

    subprocess.run([*_cluster(), "stop", "-m", "fast"], check=True, capture_output=True)
    try:
        r = bot.send("db-1", "while the database is down", message_id="m-2")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable"
        assert int(r.headers["Retry-After"]) >= 1
        r = amina.read_offer(offer["id"])
        assert r.status_code == 503, r.text
        assert httpx.get(f"{env.url}/readyz").status_code == 503
        assert httpx.get(f"{env.url}/healthz").status_code == 200  # the process itself is alive
    finally:
        subprocess.run([*_cluster(), "start"], check=True, capture_output=True)

    # The chatbot retries as told (same message_id): within a few seconds it is taken, once.
    started = time.monotonic()

    def taken() -> httpx.Response | None:
        r = bot.send("db-1", "while the database is down", message_id="m-2")
        if r.status_code in (200, 201):
            return r
        assert r.status_code == 503, r.text
        return None

    r = wait_until_sync(taken, timeout=30, interval=0.5, message="the chatbot's retry to be taken")
    assert r.status_code == 201, r.text
    assert bot.send("db-1", "while the database is down", message_id="m-2").status_code == 200

    # The offer (its deadline is stored) can still be read, and replies reach RapidPro.
    def readable() -> httpx.Response | None:
        r = amina.read_offer(offer["id"])
        return r if r.status_code != 503 else None

    r = wait_until_sync(
        readable,
        timeout=max(0.0, 30 - (time.monotonic() - started)),  # what is left of the same 30 s
        interval=0.5,
        message="the offer to be readable again",
    )
    assert r.status_code == 200, r.text
    conv = r.json()["conversation"]["id"]
    texts = [m["text"] for m in r.json()["messages"]]
    assert texts == ["before the restart", "while the database is down"]
    mid = amina.reply(conv, "I am still here").json()["message_id"]
    env.rapidpro.wait_for(lambda rs: any(x.body["params"].get("message_id") == mid for x in rs), timeout=15)
    assert httpx.get(f"{env.url}/readyz").status_code == 200
