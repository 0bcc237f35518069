"""The counselor console and the supervisor view in Debian's Chromium, driven by Playwright.

A real helpline on loopback, the fake RapidPro and a chatbot client; the browser plays the
counselor (or the supervisor) and the test asserts what the page shows and what RapidPro received.
Screenshots of each page are taken on every run; with HELPLINE_UPDATE_SCREENSHOTS=1 they are
written to docs/ for the README (otherwise to a temporary folder, so a run leaves git clean).
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import select

from conftest import PASSWORD, Env
from helpline.runtime.core import now
from helpline.store.models import Conversation, Offer, User
from helpline.testing.fake_rapidpro import ReceivedStart

CHROMIUM = Path("/usr/bin/chromium")
DOCS = (
    Path(__file__).resolve().parent.parent / "docs"
    if os.environ.get("HELPLINE_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "helpline-screenshots"
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

expect.set_options(timeout=10_000)


@pytest.fixture
def browser(make_env: Callable[..., Env]) -> Iterator[Browser]:
    if not CHROMIUM.exists() and os.environ.get("CI") != "true":
        pytest.skip(
            "Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium); "
            "CI installs it and runs these tests"
        )
    # Depends on make_env so that the database is reset before Playwright starts its own loop.
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-GB", timezone_id="UTC")
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        yield pg
    finally:
        context.close()
    # 4xx answers the page handles itself show up as console errors ("Failed to load resource").
    unexpected = [e for e in errors if "Failed to load resource" not in e]
    assert not unexpected, unexpected


def shot(page: Page, name: str, *, full_page: bool = False) -> None:
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / name), full_page=full_page)


def params(starts: list[ReceivedStart], session: str) -> list[dict[str, Any]]:
    return [s.params for s in starts if s.params and s.params.get("conversation_id") == session]


def sign_in(page: Page, username: str) -> None:
    page.get_by_label("Username", exact=True).fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password", exact=True).press("Enter")  # the keyboard is enough


def test_counselor_console_end_to_end(make_env: Callable[..., Env], page: Page) -> None:
    env = make_env(offer_timeout_s=60.0)
    rapidpro = env.rapidpro
    bot = env.chatbot()
    env.user("amina", "counselor", site="ke", name="Amina")
    session = "weni-browser-1"

    # Sign in.
    page.goto(env.url + "/console/")
    expect(page.get_by_role("heading", name="Counselor console")).to_be_visible()
    shot(page, "console-login.png")
    sign_in(page, "amina")
    expect(page.locator("#me-name")).to_have_text("Amina")
    expect(page.locator("#site-name")).to_have_text("Childline Kenya")
    expect(page.locator("#conn")).to_have_text("Live")
    expect(page.locator("#presence-badge")).to_have_text("Offline")

    # Join the queue.
    page.get_by_role("button", name="Join queue").click()
    expect(page.locator("#presence-badge")).to_have_text("In the queue")
    expect(page.get_by_role("button", name="Join queue")).to_be_disabled()

    # The chatbot hands a conversation over: the offer shows, with a running countdown.
    r = bot.send(
        session,
        "Hi. I am scared to go home tonight.",
        message_id="in-1",
        risk="high",
        client_name="Kid 42",
        contact_urn="telegram:23343411",
        location="KE",
    )
    assert r.status_code == 201, r.text
    card = page.locator(".offer-card")
    expect(card).to_have_count(1)
    expect(card).to_contain_text("Kid 42")
    expect(card).to_contain_text("High risk")
    secs = card.locator(".secs")
    expect(secs).to_have_text(re.compile(r"^\d+ s left$"))
    first = int(secs.inner_text().split()[0])
    assert 55 <= first <= 60
    expect(secs).not_to_have_text(f"{first} s left", timeout=3000)  # it counts down
    expect(page.locator("#offers-count")).to_have_text("1")
    expect(page.locator("#announce-urgent")).to_contain_text("New chat offer: Kid 42, High risk")
    page.wait_for_function("document.title.startsWith('● New chat offer')")  # the title flashes
    shot(page, "console-offer.png")

    # Read it: the conversation is mine, the pane shows the client's message; RapidPro hears of it.
    card.get_by_role("button", name="Read and accept the offer from Kid 42").click()
    expect(page.locator(".offer-card")).to_have_count(0)
    expect(page.locator("#pane-title")).to_have_text("Kid 42")
    expect(page.locator("#pane-meta")).to_contain_text("Site KE")
    expect(page.locator("#pane-meta")).to_contain_text("High risk")
    log = page.get_by_role("log", name="Messages")
    expect(log.locator(".msg.in")).to_have_text(re.compile("Hi. I am scared to go home tonight."))
    expect(page.get_by_label("Reply to the client")).to_be_focused()
    rapidpro.wait_for(
        lambda rs: (
            {(p["event"], p.get("status")) for p in params(rs, session)}
            >= {("assigned", None), ("ack", "delivered"), ("ack", "read")}
        )
    )
    assigned = next(p for p in params(rapidpro.accepted, session) if p["event"] == "assigned")
    assert assigned["counselor_name"] == "Amina"

    # Reply with Enter: RapidPro receives it and the tick moves to sent, then delivered on the ack.
    box = page.get_by_label("Reply to the client")
    box.fill("I am here, Kid 42. You are safe to talk to me.")
    box.press("Enter")
    expect(box).to_have_value("")
    out = log.locator(".msg.out")
    expect(out).to_have_count(1)
    starts = rapidpro.wait_for(lambda rs: any(p["event"] == "message" for p in params(rs, session)))
    sent = next(p for p in params(starts, session) if p["event"] == "message")
    assert sent["text"] == "I am here, Kid 42. You are safe to talk to me."
    assert sent["counselor_name"] == "Amina"
    expect(out).to_have_attribute("data-message-id", sent["message_id"])
    expect(out).to_have_attribute("data-status", "sent")
    expect(out.locator(".tick")).to_have_attribute("title", "Sent")
    assert bot.ack(session, sent["message_id"], "delivered").status_code == 200
    expect(out).to_have_attribute("data-status", "delivered")
    expect(out.locator(".tick")).to_have_attribute("title", "Delivered")
    expect(out.locator(".tick .sr-only")).to_have_text("Delivered")

    # The connection drops; meanwhile the client writes and reads. Back online, the page catches
    # up over REST: each message once, the tick at "read".
    page.evaluate("window.helplineConsole.live.hold()")
    expect(page.locator("#conn")).to_have_text("Offline")
    assert bot.send(session, "Ok. My uncle shouts a lot.", message_id="in-2").status_code == 201
    assert bot.ack(session, sent["message_id"], "read").status_code == 200
    page.evaluate("window.helplineConsole.live.resume()")
    expect(page.locator("#conn")).to_have_text("Live")
    expect(log.locator(".msg.in").filter(has_text="My uncle shouts")).to_have_count(1)
    expect(out).to_have_attribute("data-status", "read")
    assert bot.send(session, "Can you help me?", message_id="in-3").status_code == 201
    expect(log.locator(".msg")).to_have_count(4)
    expect(log.locator(".msg.in").filter(has_text="Can you help me?")).to_have_count(1)
    page.evaluate("window.helplineConsole.resync()")  # a second catch-up changes nothing
    expect(log.locator(".msg")).to_have_count(4)

    box.fill("Yes. Let us find a safe place for tonight together.")
    box.press("Enter")
    second = log.locator(".msg.out").nth(1)
    expect(second).to_have_attribute("data-status", "sent")
    assert bot.ack(session, second.get_attribute("data-message-id") or "", "delivered").status_code == 200
    expect(second).to_have_attribute("data-status", "delivered")
    shot(page, "console-chat.png")

    # On a narrow screen the page still fits: no sideways scrolling.
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.locator("#pane-title")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "console-narrow.png")
    page.set_viewport_size({"width": 1280, "height": 800})

    # Close with a reason: the pane says so and RapidPro gets "closed".
    page.locator("#close-menu summary").click()
    page.get_by_label("Reason for closing").select_option("referred")
    page.get_by_role("button", name="Close conversation").click()
    expect(page.locator("#closed-text")).to_have_text("This conversation is closed by you (referred).")
    expect(page.locator("#composer")).to_be_hidden()
    expect(page.locator(".conv-item")).to_contain_text("Closed")
    closed = rapidpro.wait_for(lambda rs: any(p["event"] == "closed" for p in params(rs, session)))
    assert next(p for p in params(closed, session) if p["event"] == "closed")["status"] == "referred"
    events = [(p["event"], p.get("message_id"), p.get("status")) for p in params(rapidpro.accepted, session)]
    assert len(events) == len(set(events))  # nothing sent twice

    page.get_by_role("button", name="Remove from my list").click()
    expect(page.locator("#pane-empty")).to_be_visible()
    expect(page.locator("#hint-title")).to_have_text("You are in the queue")


def test_console_pages_are_served(env: Env) -> None:
    with httpx.Client(base_url=env.url, timeout=30) as http:
        for path, title in (("/console/", "Counselor console"), ("/console/supervisor/", "Supervisor view")):
            r = http.get(path)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/html")
            assert f"<h1>{title}</h1>" in r.text
            assert "script-src 'self'" in r.headers["content-security-policy"]
            assert r.headers["x-frame-options"] == "DENY"
            r = http.get(path.rstrip("/"))
            assert (r.status_code, r.headers["location"]) == (308, path)
        for asset, kind in (("lib.js", "javascript"), ("console.js", "javascript"), ("app.css", "text/css")):
            r = http.get(f"/console/static/{asset}")
            assert r.status_code == 200 and kind in r.headers["content-type"], asset
            assert r.headers["cache-control"] == "no-cache" and r.headers.get("etag")
        assert http.get("/console/static/missing.js").status_code == 404
        assert not [p for p in http.get("/openapi.json").json()["paths"] if p.startswith("/console")]


def test_console_presence_lapse_and_transfer(make_env: Callable[..., Env], page: Page) -> None:
    env = make_env(offer_timeout_s=3.0, autopause=True)
    bot = env.chatbot()
    env.user("amina", "counselor", site="ke", name="Amina")
    baraka = env.counselor("baraka", site="ke", name="Baraka", join=False)
    page.goto(env.url + "/console/")
    sign_in(page, "amina")
    badge = page.locator("#presence-badge")
    expect(badge).to_have_text("Offline")
    expect(page.locator("#hint-title")).to_have_text("No conversation open")

    # Join, pause with a reason, join again.
    page.get_by_role("button", name="Join queue").click()
    expect(badge).to_have_text("In the queue")
    page.get_by_label("Pause reason").select_option("Meeting")
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(badge).to_have_text("Paused · Meeting")
    expect(page.locator("#hint-title")).to_have_text("You are paused")
    page.get_by_role("button", name="Join queue").click()
    expect(badge).to_have_text("In the queue")

    # An offer left unread lapses: the card goes and the counselor is paused, and told so.
    assert bot.send("lapse-1", "is anyone there?", client_name="Kid 7", contact_urn="telegram:7").status_code == 201
    card = page.locator(".offer-card")
    expect(card).to_have_count(1)
    expect(card).to_have_count(0)
    expect(badge).to_have_text("Paused · no answer")
    expect(page.locator("#announce-urgent")).to_contain_text("You were paused")

    # Back in the queue it comes again; read it, then hand it to Baraka.
    page.get_by_role("button", name="Join queue").click()
    card.get_by_role("button", name="Read and accept the offer from Kid 7").click()
    expect(page.locator("#pane-title")).to_have_text("Kid 7")
    page.locator("#transfer-menu summary").click()
    page.get_by_label("Counselor username or site code").fill("baraka")
    page.locator("#transfer-form").get_by_role("button", name="Transfer").click()
    expect(page.locator(".conv-item")).to_have_count(0)
    expect(page.locator("#pane-empty")).to_be_visible()
    offered = baraka.wait_for("offer")["offer"]
    assert offered["conversation"]["chat_session"] == "lapse-1"

    # Leave the queue.
    page.get_by_role("button", name="Leave queue").click()
    expect(badge).to_have_text("Offline")


async def _seed_history(env: Env, chatbot: str, counselor: str) -> None:
    """A day of closed conversations (for the charts) and two offers lapsed in the last hour."""
    core = env.server.core
    rng = random.Random(7)
    t = now()
    async with core.tx() as tx:
        bot_id = await tx.session.scalar(select(User.id).where(User.username == chatbot))
        counselor_id = await tx.session.scalar(select(User.id).where(User.username == counselor))
        assert bot_id is not None and counselor_id is not None
        for hour in range(1, 24):
            busy = 3 + round(6 * max(0.0, 1 - abs(hour - 9) / 9))
            for _ in range(rng.randint(busy - 2, busy + 1)):
                created = t - hour * 3600 + rng.uniform(0, 3500)
                wait = rng.uniform(4, 35) + (rng.uniform(30, 160) if rng.random() < 0.2 else 0)
                tx.session.add(
                    Conversation(
                        id=str(uuid.uuid4()),
                        site="ke",
                        chatbot_id=bot_id,
                        chat_session=f"hist-{uuid.uuid4().hex[:12]}",
                        source="WENI",
                        client_id="1000",
                        client_name="Client",
                        risk="low",
                        risk_rank=0,
                        status="closed",
                        counselor_id=counselor_id,
                        created_at=created,
                        queued_at=created,
                        assigned_at=created + wait,
                        closed_at=created + wait + 600,
                        closed_by="counselor",
                        close_reason="resolved",
                    )
                )
        await tx.session.flush()
        conv_id = await tx.session.scalar(select(Conversation.id).where(Conversation.site == "ke").limit(1))
        assert conv_id is not None
        for ago in (1500, 600):
            tx.session.add(
                Offer(
                    conversation_id=conv_id,
                    counselor_id=counselor_id,
                    site="ke",
                    status="timed_out",
                    created_at=t - ago - 30,
                    deadline=t - ago,
                    resolved_at=t - ago,
                )
            )


def test_supervisor_page(make_env: Callable[..., Env], page: Page) -> None:
    env = make_env(offer_timeout_s=60.0, max_chats=3)
    rapidpro = env.rapidpro
    bot = env.chatbot()
    env.user("sam", "supervisor", site="ke", name="Sam")
    baraka = env.counselor("baraka", site="ke", name="Baraka")
    env.counselor("chloe", site="ke", name="Chloe", join=False)
    env.server.call(_seed_history(env, "weni", "chloe"))

    # Baraka takes a conversation; RapidPro refuses its "assigned" event for good: a dead letter.
    assert bot.send("weni-sup-1", "hello?", risk="medium", contact_urn="telegram:555").status_code == 201
    rapidpro.wait_for(lambda rs: any(p["event"] == "queued" for p in params(rs, "weni-sup-1")))
    rapidpro.fail_next(1, 400)
    offer = baraka.wait_for("offer")["offer"]
    assert baraka.read_offer(offer["id"]).status_code == 200
    rapidpro.wait_for(lambda rs: any(r.status == 400 for r in rs), accepted_only=False)
    baraka.presence("paused", "Meeting")
    for i, risk in enumerate(["high", "low"], start=2):
        assert bot.send(f"weni-sup-{i}", "please answer", risk=risk, contact_urn="telegram:555").status_code == 201

    page.goto(env.url + "/console/supervisor/")
    expect(page.get_by_role("heading", name="Supervisor view")).to_be_visible()
    sign_in(page, "sam")
    block = page.locator('[data-site="ke"]')
    expect(block.get_by_role("heading", name=re.compile("Childline Kenya"))).to_be_visible()
    expect(page.locator('[data-site="tz"]')).to_have_count(0)  # another site's: not shown
    expect(page.locator("#site-field")).to_be_hidden()

    def kpi(key: str) -> Any:
        return block.locator(f'[data-kpi="{key}"] .value')

    expect(kpi("waiting")).to_have_text("2")
    expect(kpi("high_risk")).to_have_text("1")
    expect(kpi("assigned")).to_have_text("1")
    expect(kpi("lapsed")).to_have_text("2")
    expect(kpi("counselors")).to_have_text("0")
    expect(kpi("dead")).to_have_text("1")
    expect(block.locator('[data-counselor="baraka"]')).to_contain_text("Paused")
    expect(block.locator('[data-counselor="baraka"]')).to_contain_text("Meeting")
    expect(block.locator('[data-counselor="chloe"]')).to_contain_text("Offline")
    row = block.locator("[data-dead-letter]")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("weni-sup-1")
    expect(row).to_contain_text("assigned")
    expect(row).to_contain_text("400")
    expect(block.get_by_role("img", name=re.compile("^Conversations per hour"))).to_be_visible()
    expect(block.get_by_role("img", name=re.compile("^Wait to a counselor"))).to_be_visible()
    expect(block.locator(".bar-volume").first).to_be_visible()
    shot(page, "supervisor.png", full_page=True)

    # Live: a counselor joining shows without a reload.
    baraka.join_queue()
    expect(kpi("counselors")).to_have_text("1")

    # Replay the dead letter with a click: RapidPro gets "assigned" for that conversation.
    row.get_by_role("button", name=re.compile("Replay dead letter")).click()
    rapidpro.wait_for(lambda rs: any(p["event"] == "assigned" for p in params(rs, "weni-sup-1")))
    expect(block.locator("[data-dead-letter]")).to_have_count(0)
    expect(kpi("dead")).to_have_text("0")
    expect(page.get_by_role("alert").filter(has_text="is being sent again")).to_be_visible()


def test_pages_turn_away_the_wrong_accounts(make_env: Callable[..., Env], page: Page) -> None:
    env = make_env()
    env.chatbot("weni")
    env.user("amina", "counselor", name="Amina")
    page.goto(env.url + "/console/")
    page.get_by_label("Username", exact=True).fill("weni")
    page.get_by_label("Password", exact=True).fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert").filter(has_text="Wrong username or password.")).to_be_visible()
    sign_in(page, "weni")
    expect(page.locator("#login-note")).to_have_text("This account cannot use the counselor console.")
    assert page.evaluate("sessionStorage.getItem('helpline.token')") is None

    page.goto(env.url + "/console/supervisor/")
    sign_in(page, "amina")
    expect(page.locator("#login-note")).to_contain_text("This page is for supervisors")
    assert page.evaluate("sessionStorage.getItem('helpline.token')") is None


def test_a_shared_location_shows_as_a_map_link(make_env: Callable[..., Env], page: Page) -> None:
    """A child on WhatsApp shares their location: Weni forwards geo:LAT,LON; the counselor gets a map link."""
    from weni_support import start_weni, weni_env

    for weni in start_weni():
        env = weni_env(make_env, weni, offer_timeout_s=60.0)
        env.user("amina", "counselor", site="ke", name="Amina")
        ticket, r = weni.open_ticket(name="Kid 9", topic="ke")
        assert ticket is not None and r.status == 201, r.body
        body = {
            "ticket_id": ticket.uuid,
            "external_id": ticket.external_id,
            "message_id": str(uuid.uuid4()),
            "direction": "incoming",
            "sender": {"type": "contact", "id": ticket.contact_uuid},
            "text": "I am here",
            "attachments": [{"url": "geo:-2.9,-79.0", "content_type": "geo"}],
            "sent_at": "2026-05-20T14:32:00Z",
        }
        sent = weni.call(f"/v1/tickets/{ticket.external_id}/messages", body, retry=False)
        assert sent.status == 200, sent.body

        page.goto(env.url + "/console/")
        sign_in(page, "amina")
        page.get_by_role("button", name="Join queue").click()
        page.locator(".offer-card").get_by_role("button", name=re.compile("Read")).click()
        link = page.get_by_role("link", name="Location -2.9, -79.0")
        expect(link).to_be_visible()
        assert link.get_attribute("href") == "https://www.openstreetmap.org/?mlat=-2.9&mlon=-79.0#map=15/-2.9/-79.0"
