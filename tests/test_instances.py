"""Several instances on one PostgreSQL: live events cross instances through LISTEN/NOTIFY."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import PASSWORD, PG_URL, Env
from helpline.domain.sites import SiteRegistry
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.live import LiveServer

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
