from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from conftest import Env
from helpline.cli import app


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + labels + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    m = re.search(pattern, text)
    assert m, f"{name}{{{labels}}} not in metrics"
    return float(m.group(1))


def test_health_ready_and_metrics(env: Env) -> None:
    assert httpx.get(f"{env.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{env.url}/readyz").json() == {"status": "ready"}
    bot = env.chatbot()
    amina = env.counselor("amina")
    before = httpx.get(f"{env.url}/metrics").text
    base_in = (
        metric(before, "helpline_messages_in_total", 'site="ke"') if "helpline_messages_in_total{" in before else 0.0
    )
    assert bot.send("m-1", "hello", risk="high").status_code == 201
    offer = amina.wait_for("offer")["offer"]
    conv = amina.read_offer(offer["id"]).json()["conversation"]["id"]
    assert amina.reply(conv, "hi").status_code == 201
    env.rapidpro.wait_for(lambda rs: any(r.body["params"]["event"] == "message" for r in rs))
    text = httpx.get(f"{env.url}/metrics").text
    assert metric(text, "helpline_messages_in_total", 'site="ke"') == base_in + 1
    assert metric(text, "helpline_messages_out_total", 'site="ke"') >= 1
    assert metric(text, "helpline_offers_made_total", 'site="ke"') >= 1
    assert metric(text, "helpline_queue_wait_seconds_count", 'site="ke"') >= 1
    assert metric(text, "helpline_conversations", 'site="ke",status="assigned"') == 1
    assert "helpline_outbox_depth" in text


def test_helpline_work_refuses_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker process needs PostgreSQL's bus; with SQLite, `helpline serve` runs every loop."""
    monkeypatch.setenv("HELPLINE_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    r = CliRunner().invoke(app, ["work"])
    assert r.exit_code == 2, r.output
    assert "needs PostgreSQL" in r.output
