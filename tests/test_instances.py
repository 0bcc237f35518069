"""Several instances on one PostgreSQL: live events cross instances through LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import PASSWORD, PG_URL, Env
from helpline.config.sites import SiteRegistry
from helpline.store.bus import CHANNEL, Listener
from helpline.store.db import make_engine, make_sessionmaker
from helpline.store.migrate import upgrade
from helpline.store.models import BusSpill
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro
from helpline.testing.live import LiveServer
from support import wait_until

pytestmark = pytest.mark.skipif(not PG_URL, reason="instances share work only on PostgreSQL")


def test_counselor_on_instance_b_gets_what_is_posted_to_instance_a(
    make_env: Callable[..., Env], tmp_path: Path
) -> None:
    env = make_env(offer_timeout_s=5.0)
    a = env.server
    sites = sorted(tmp_path.glob("sites*.toml"))[0]
    b = LiveServer(a.settings, SiteRegistry.from_toml(sites)).start()
    try:
        bot = env.chatbot()  # talks to instance A
        env.user("amina", "counselor", name="Amina")
        amina = FakeCounselor(b.url, "amina", PASSWORD)  # connected to instance B
        amina.login()
        amina.connect()
        assert amina.join_queue().status_code == 200

        assert bot.send("x-1", "help me", risk="high").status_code == 201
        offer = amina.wait_for("offer", timeout=5)["offer"]
        assert offer["conversation"]["chat_session"] == "x-1"
        conv = amina.read_offer(offer["id"]).json()["conversation"]["id"]

        # A long multi-byte text is over NOTIFY's 8000-byte limit: it crosses through the spill table.
        long_text = "é" * 4096
        for text in ("short one", long_text):
            assert bot.send("x-1", text).status_code == 201
            got = amina.wait_for("message", lambda e: e["message"]["direction"] == "in", timeout=5)
            assert got["message"]["text"] == text
        # Exactly once: each message event reached the counselor one time, though two instances listen.
        texts = [e["message"]["text"] for e in amina.of_type("message")]
        assert texts == ["short one", long_text]

        # The counselor's reply, posted to B, is delivered to RapidPro once (either instance's worker).
        mid = amina.reply(conv, "I am here").json()["message_id"]
        env.rapidpro.wait_for(lambda rs: any(r.body["params"].get("message_id") == mid for r in rs), timeout=5)
        assert bot.close("x-1").status_code == 200
        assert amina.wait_for("conversation_closed", timeout=5)["closed_by"] == "chatbot"
        sent = [r for r in env.rapidpro.accepted if r.body["params"].get("message_id") == mid]
        assert len(sent) == 1
        amina.close_all()
    finally:
        b.stop()


def _events(rapidpro: FakeRapidPro, session: str) -> list[str]:
    return [r.body["params"]["event"] for r in rapidpro.accepted if r.body["params"]["conversation_id"] == session]


def test_a_hunter_in_a_worker_process_of_its_own(make_env: Callable[..., Env], tmp_path: Path) -> None:
    """`helpline serve` with HELPLINE_RUN_HUNTER=false, `helpline work` with HELPLINE_RUN_OUTBOX=false:
    the worker process hunts what the server queues, the server delivers what the worker decides."""
    env = make_env(settings={"run_hunter": False}, offer_timeout_s=5.0)
    sites = sorted(tmp_path.glob("sites*.toml"))[0]
    bot = env.chatbot()
    env.user("amina", "counselor", name="Amina")
    amina = FakeCounselor(env.url, "amina", PASSWORD)
    amina.login()
    amina.connect()
    assert amina.join_queue().status_code == 200

    assert bot.send("w-1", "help me").status_code == 201
    env.rapidpro.wait_for(lambda rs: "queued" in _events(env.rapidpro, "w-1"), timeout=5)  # its outbox runs
    time.sleep(1.5)  # three of the server's polls: it does not hunt
    assert amina.of_type("offer") == []

    worker_env = {
        **os.environ,
        "HELPLINE_DATABASE_URL": env.server.settings.database_url,
        "HELPLINE_RUN_OUTBOX": "false",
        "HELPLINE_LOG_LEVEL": "INFO",
    }
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "helpline.cli", "work", "--sites", str(sites)],
        env=worker_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # The waiting conversation (found by the worker's first round), then a new one (woken through the bus).
        offer = amina.wait_for("offer", timeout=15)["offer"]
        assert offer["conversation"]["chat_session"] == "w-1"
        assert amina.read_offer(offer["id"]).status_code == 200
        assert bot.send("w-2", "are you there", risk="high").status_code == 201
        second = amina.wait_for("offer", lambda e: e["offer"]["conversation"]["chat_session"] == "w-2", timeout=5)
        assert amina.read_offer(second["offer"]["id"]).status_code == 200
        # What the worker decided reaches RapidPro once, through the server's outbox (the worker's is off).
        for session in ("w-1", "w-2"):
            env.rapidpro.wait_for(lambda rs, s=session: "ack" in _events(env.rapidpro, s), timeout=5)
            assert _events(env.rapidpro, session) == ["queued", "assigned", "ack"]
        assert [e["offer"]["conversation"]["chat_session"] for e in amina.of_type("offer")] == ["w-1", "w-2"]
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(15)
        log.close()
        amina.close_all()
    assert code == 0, (tmp_path / "worker.log").read_text()
    lines = (tmp_path / "worker.log").read_text()
    assert '"hunter": true, "outbox": false, "event": "worker started"' in lines
    assert "worker stopped" in lines


def test_a_notification_after_a_spilled_one_waits_for_it(database_url: str) -> None:
    """Notifications are delivered at once, in the listener's callback, except behind a spilled one
    (its payload is read from the store first): the order they were sent in is kept."""

    async def run() -> list[str]:
        engine = make_engine(database_url)
        sessionmaker = make_sessionmaker(engine)
        try:
            await upgrade(engine)
            async with sessionmaker() as s, s.begin():
                spill = BusSpill(payload='{"u": 1, "e": {"type": "big"}}', created_at=time.time())
                s.add(spill)
            got: list[str] = []
            listener = Listener(database_url, sessionmaker, lambda msg: got.append(msg["e"]["type"]))
            pump = asyncio.create_task(listener._pump())
            try:
                notify = listener._on_notify
                notify(None, 0, CHANNEL, '{"u": 1, "e": {"type": "first"}}')
                assert got == ["first"]  # at once, in the callback
                notify(None, 0, CHANNEL, f'{{"spill": {spill.id}}}')
                notify(None, 0, CHANNEL, '{"u": 1, "e": {"type": "after"}}')
                assert got == ["first"]  # both wait for the spill's payload
                await wait_until(
                    lambda: len(got) == 3, interval=0.01, message=lambda: f"the spill and the one after it; got {got}"
                )
                notify(None, 0, CHANNEL, '{"u": 1, "e": {"type": "last"}}')
                return got
            finally:
                pump.cancel()
        finally:
            await engine.dispose()

    assert asyncio.run(run()) == ["first", "big", "after", "last"]
