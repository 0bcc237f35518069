"""Log hygiene: a whole conversation logged at INFO names no client and shows no message text.

Captured: helpline's structured logs as ``helpline serve`` configures them (``configure_logging("INFO")``:
structlog's JSON lines on stdout), every stdlib record at INFO (httpx, ...) and uvicorn's access and
WebSocket lines. ``chat_session`` and conversation ids may appear (in request paths): they are
pseudonymous ids. A WebSocket's ``?token=`` is a credential and is redacted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
import structlog
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import DBAPIError

from conftest import PASSWORD, Env
from helpline.cli import configure_logging
from helpline.runtime.logs import UVICORN_LOGGERS, redact
from helpline.store.db import make_engine
from helpline.store.migrate import upgrade
from helpline.store.models import Conversation, Message, OutboxEvent
from support import eventually

pytestmark = pytest.mark.timeout(90)

SENDER = "99112233445"
CONTACT_URN = f"telegram:{SENDER}"
CONTACT_UUID = str(uuid.uuid4())
CLIENT_NAME = "Wanjiku Kamau-Secret"
CLIENT_TEXT = "MY-SECRET-WORRY my stepfather hurts me"
CLIENT_TEXT_2 = "SECOND-SECRET where can I go tonight"
REPLY = "COUNSELOR-SECRET-REPLY you are safe to talk here"
LONG_REPLY = "LONG-SECRET-PART " * 60  # over RapidPro's 640 characters: goes as parts


class Records(logging.Handler):
    """Keeps every formatted record (uvicorn's loggers do not propagate to the root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.structured = ""  # structlog's JSON lines, read from stdout

    def attach(self) -> None:
        """Listen to uvicorn's loggers at INFO: once the server runs (starting uvicorn resets them)."""
        for name in UVICORN_LOGGERS:
            logging.getLogger(name).addHandler(self)
            logging.getLogger(name).setLevel(logging.INFO)

    def read_stdout(self, capsys: pytest.CaptureFixture[str]) -> str:
        self.structured += capsys.readouterr().out
        return self.structured

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> Iterator[Records]:
    """Everything at INFO, configured like ``helpline serve``; restored afterwards."""
    saved_structlog = structlog.get_config()
    configure_logging("INFO")
    caplog.set_level(logging.INFO)
    records = Records()
    saved_levels = {name: logging.getLogger(name).level for name in UVICORN_LOGGERS}
    try:
        yield records
    finally:
        for name in UVICORN_LOGGERS:
            logging.getLogger(name).removeHandler(records)
            logging.getLogger(name).setLevel(saved_levels[name])
        structlog.reset_defaults()
        structlog.configure(**saved_structlog)


def test_a_whole_conversation_logs_no_client_data(
    make_env: Callable[..., Env],
    info_logs: Records,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = make_env(settings={"retention_days": 1, "retention_interval_s": 0.2}, offer_timeout_s=1.0)
    info_logs.attach()  # LiveServer runs uvicorn at WARNING: open up its access and WebSocket lines
    bot = env.chatbot()
    amina = env.counselor("amina", site="ke", name="Amina")
    env.user("sam", "supervisor", site="ke")
    sam = httpx.Client(base_url=env.url, timeout=30)
    token = sam.post("/api/token/", json={"username": "sam", "password": PASSWORD}).json()["token"]
    sam.headers["Authorization"] = f"Token {token}"
    extra = {"client_name": CLIENT_NAME, "contact_urn": CONTACT_URN, "contact_uuid": CONTACT_UUID, "risk": "high"}

    try:
        # An offer lapses first (logged at INFO; Amina is paused for it), then is read.
        assert bot.send("logs-1", CLIENT_TEXT, sender=SENDER, **extra).status_code == 201
        offer = amina.wait_for("offer")["offer"]
        assert amina.wait_for("offer_withdrawn")["offer_id"] == offer["id"]
        assert amina.join_queue().status_code == 200
        offer = amina.wait_for("offer")["offer"]
        conv_id = offer["conversation"]["id"]
        assert amina.read_offer(offer["id"]).status_code == 200
        assert bot.send("logs-1", CLIENT_TEXT_2, sender=SENDER, **extra).status_code == 201
        assert bot.send("logs-1", CLIENT_TEXT + "x" * 5000, sender=SENDER).status_code == 422
        assert amina.messages(conv_id).status_code == 200
        assert amina.mark_read(conv_id).status_code == 200

        # RapidPro answers with bodies that echo what it was sent: a retry, then a dead letter.
        echo = json.dumps({"detail": f"rejected {CONTACT_URN} {REPLY}"})
        env.rapidpro.fail_next(1, 503, body=echo)
        env.rapidpro.fail_next(1, 400, body=echo)
        assert amina.reply(conv_id, REPLY).status_code == 201
        assert amina.reply(conv_id, LONG_REPLY).status_code == 201
        dead = eventually(lambda: _one_dead_letter(sam))
        assert sam.post(f"/api/supervisor/dead-letters/{dead}/replay").status_code == 200
        assert sam.get(f"/api/conversations/{conv_id}/export").status_code == 200
        assert bot.messages("logs-1").status_code == 200
        assert bot.close("logs-1").status_code == 200
        eventually(lambda: _settled(env, conv_id))

        # The retention loop purges it (logged at INFO).
        async def backdate() -> None:
            async with env.server.core.tx() as tx:
                await tx.session.execute(
                    update(Conversation).where(Conversation.id == conv_id).values(closed_at=time.time() - 3 * 86400)
                )

        env.server.call(backdate())
        eventually(lambda: _purged(capsys, info_logs))
        info_logs.read_stdout(capsys)
    finally:
        sam.close()

    structured = info_logs.structured
    everything = "\n".join([structured, caplog.text, *info_logs.lines])
    # What happened was logged ...
    events = [json.loads(line)["event"] for line in structured.splitlines() if line.startswith("{")]
    for expected in ("offers lapsed", "outbox retry", "outbox dead letter", "retention purge"):
        assert expected in events, events
    assert any('"POST /api/chat/ HTTP/1.1" 201' in line for line in info_logs.lines)
    assert any('"WebSocket /ws?token=[redacted]" [accepted]' in line for line in info_logs.lines)
    # ... and none of it names the client, repeats a text or shows a token.
    for secret in (SENDER, CONTACT_UUID, CLIENT_NAME, "Wanjiku", CLIENT_TEXT, "MY-SECRET", "SECOND-SECRET"):
        assert secret not in everything, secret
    for maybe in ("COUNSELOR-SECRET", "LONG-SECRET", amina.token, token, bot.token):
        assert maybe and maybe not in everything, maybe


def _one_dead_letter(sam: httpx.Client) -> int:
    results = sam.get("/api/supervisor/dead-letters").json()["results"]
    assert len(results) == 1
    return int(results[0]["id"])


def _settled(env: Env, conv_id: str) -> None:
    async def pending() -> int:
        async with env.server.core.sessionmaker() as s:
            q = select(func.count()).where(OutboxEvent.conversation_id == conv_id, OutboxEvent.status == "pending")
            return int(await s.scalar(q) or 0)

    assert env.server.call(pending()) == 0


def _purged(capsys: pytest.CaptureFixture[str], records: Records) -> None:
    assert '"retention purge"' in records.read_stdout(capsys)


def test_store_errors_do_not_show_statement_parameters(database_url: str) -> None:
    """A failed statement's error (what a logged traceback prints) does not repeat its parameters."""

    async def run() -> str:
        engine = make_engine(database_url)
        try:
            await upgrade(engine)
            async with engine.begin() as conn:
                await conn.execute(insert(Message).values(conversation_id="nowhere", text=CLIENT_TEXT))
        except DBAPIError as exc:
            return str(exc)
        finally:
            await engine.dispose()
        raise AssertionError("the insert should have failed")

    error = asyncio.run(run())
    assert "INSERT INTO messages" in error and "hidden due to hide_parameters" in error
    assert CLIENT_TEXT not in error


def test_redact() -> None:
    assert redact("/ws?token=0123abcd") == "/ws?token=[redacted]"
    assert redact("/ws?a=1&token=0123abcd&b=2") == "/ws?a=1&token=[redacted]&b=2"
    assert redact("/ws?access_token=x") == "/ws?access_token=[redacted]"
    assert redact("/api/chat/abc/messages/") == "/api/chat/abc/messages/"
