"""Asterisk presence over AMI, against a fake Asterisk speaking AMI's text protocol on loopback.

The phone site is ``tz`` (``extra`` is appended to the sites file after the ``tz`` site). Counselors
are made with an extension; their queue interface is ``PJSIP/<extension>``.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import select
from typer.testing import CliRunner

from conftest import PASSWORD, PG_URL, Env
from helpline.config.sites import AsteriskConfig
from helpline.domain import auth
from helpline.routing.asterisk import AsteriskPresence, SiteLink, header
from helpline.store.db import make_engine, make_sessionmaker
from helpline.store.models import PhoneState, User
from helpline.testing.fake_ami import FakeAMI, ReceivedAction
from helpline.testing.fake_counselor import FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro
from helpline.testing.live import LiveWorker
from support import holds_for, wait_until_sync

QUEUE = "helpline-tz"
Event = dict[str, Any]


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_hasher", PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1),)))


@pytest.fixture
def ami() -> Iterator[FakeAMI]:
    with FakeAMI(queues=[QUEUE, "sales"]) as fake:
        yield fake


def asterisk_toml(ami: FakeAMI, *, secret: str | None = None, timeout_s: float = 2) -> str:
    return textwrap.dedent(f"""
        [site.asterisk]
        host = "{ami.host}"
        port = {ami.port}
        username = "{ami.username}"
        secret = "{ami.secret if secret is None else secret}"
        queue = "{QUEUE}"
        interface = "PJSIP/{{extension}}"
        timeout_s = {timeout_s}
        reconnect_min_s = 0.1
        reconnect_max_s = 0.4
        ping_s = 1
        """)


def phone_env(
    make_env: Callable[..., Env], ami: FakeAMI, *, secret: str | None = None, timeout_s: float = 2, **opts: Any
) -> Env:
    opts.setdefault("offer_timeout_s", 5)
    return make_env(extra=asterisk_toml(ami, secret=secret, timeout_s=timeout_s), **opts)


def link(env: Env) -> SiteLink:
    sink = env.server.core.presence_sink
    assert isinstance(sink, AsteriskPresence)
    return sink.links["tz"]


def wait_synced(env: Env, logins: int = 1) -> None:
    phones = link(env)
    wait_until_sync(lambda: phones.logins >= logins and phones.synced.is_set(), message=f"login #{logins} and resync")


def phone_counselor(env: Env, username: str, extension: str | None, *, join: bool = True) -> FakeCounselor:
    env.server.create_user(username, PASSWORD, "counselor", site="tz", name=username.title(), extension=extension)
    c = FakeCounselor(env.url, username, PASSWORD)
    c.login()
    c.connect()
    env._clients.append(c)  # closed with the env
    if join:
        assert c.join_queue().status_code == 200
    return c


def phone_state(env: Env, username: str) -> PhoneState | None:
    async def get() -> PhoneState | None:
        async with env.server.core.sessionmaker() as s:
            return await s.scalar(
                select(PhoneState).join(User, User.id == PhoneState.user_id).where(User.username == username)
            )

    return env.server.call(get())


def wait_phone(env: Env, username: str, pred: Callable[[PhoneState], bool], what: str) -> PhoneState:
    def check() -> PhoneState | None:
        state = phone_state(env, username)
        return state if state is not None and pred(state) else None

    return wait_until_sync(check, message=f"{username}: {what}")


def is_free(s: PhoneState) -> bool:
    return not s.busy and not s.paused


def offers_for(c: FakeCounselor, session: str) -> list[Event]:
    return [e for e in c.of_type("offer") if e["offer"]["conversation"]["chat_session"] == session]


def wait_offer(c: FakeCounselor, session: str, timeout: float = 5.0) -> Event:
    found = wait_until_sync(
        lambda: offers_for(c, session), timeout=timeout, message=f"an offer of {session} to {c.username}"
    )
    return found[0]["offer"]


def assert_no_offer(c: FakeCounselor, session: str, within: float = 0.8) -> None:
    holds_for(lambda: not offers_for(c, session), within, message=f"{c.username} was offered {session}")


def member_paused(ami: FakeAMI, interface: str) -> bool | None:
    """Whether the fake has ``interface`` paused in the queue (None: not a member)."""
    member = ami.member(QUEUE, interface)
    return None if member is None else member.paused


def for_interface(interface: str) -> Callable[[ReceivedAction], bool]:
    return lambda a: a.get("Interface") == interface


def action_failures(env: Env, action: str) -> float:
    """The ``tz`` site's count of ``action`` refused by Asterisk, as ``/metrics`` shows it (0: none yet)."""
    families = text_string_to_metric_families(httpx.get(env.url + "/metrics").text)
    return sum(
        s.value
        for f in families
        if f.name == "helpline_asterisk_action_failures"
        for s in f.samples
        if s.name.endswith("_total") and s.labels == {"site": "tz", "action": action}
    )


def wait_refusal(logs: list[Event]) -> Event:
    """The warning the adapter logs when Asterisk refuses an action (and its fallback)."""
    found: Event = wait_until_sync(
        lambda: next((e for e in logs if e["event"] == "asterisk refused an action"), None),
        message="the refusal to be logged",
    )
    return found


# --------------------------------------------------------------------------- presence -> the queue


def test_join_pause_and_leave_drive_the_asterisk_queue(make_env: Callable[..., Env], ami: FakeAMI) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    assert 'helpline_asterisk_connected{site="tz"} 1.0' in httpx.get(env.url + "/metrics").text
    amina = phone_counselor(env, "amina", "1001", join=False)

    start = len(ami.actions)
    assert amina.join_queue().status_code == 200
    add = ami.wait_for_action("QueueAdd", after=start)
    assert add["Queue"] == QUEUE
    assert add["Interface"] == "PJSIP/1001"
    assert add["MemberName"] == "Amina"
    assert add["Paused"] == "false"
    assert add.get("ActionID")  # every action carries one; the fake echoes it
    member = ami.member(QUEUE, "PJSIP/1001")
    assert member is not None and not member.paused and member.name == "Amina"
    state = wait_phone(env, "amina", lambda s: s.member, "a member, as QueueMemberAdded says")
    assert state.status == 1 and is_free(state)

    start = len(ami.actions)
    assert amina.presence("paused", "lunch").status_code == 200
    pause = ami.wait_for_action("QueuePause", after=start)
    assert (pause["Queue"], pause["Interface"], pause["Paused"], pause["Reason"]) == (
        QUEUE,
        "PJSIP/1001",
        "true",
        "lunch",
    )
    wait_phone(env, "amina", lambda s: s.paused and s.reason == "lunch", "paused in Asterisk (QueueMemberPause)")

    # Back from a pause: already a member, so QueueAdd is refused ("Already there") and she is unpaused.
    start = len(ami.actions)
    assert amina.join_queue().status_code == 200
    unpause = ami.wait_for_action("QueuePause", after=start)
    assert unpause["Paused"] == "false"
    assert [a.name for a in ami.actions[start:]][:2] == ["QueueAdd", "QueuePause"]
    wait_phone(env, "amina", is_free, "unpaused")
    wait_until_sync(lambda: member_paused(ami, "PJSIP/1001") is False, message="unpaused in the fake")

    start = len(ami.actions)
    assert amina.presence("offline").status_code == 200
    remove = ami.wait_for_action("QueueRemove", after=start)
    assert (remove["Queue"], remove["Interface"]) == (QUEUE, "PJSIP/1001")
    assert ami.member(QUEUE, "PJSIP/1001") is None
    wait_phone(env, "amina", lambda s: not s.member, "removed (QueueMemberRemoved)")

    # Paused while out of the queue: joins it paused.
    start = len(ami.actions)
    assert amina.presence("paused", "training").status_code == 200
    add = ami.wait_for_action("QueueAdd", after=start)
    assert add["Paused"] == "true" and add["Reason"] == "training"
    member = ami.member(QUEUE, "PJSIP/1001")
    assert member is not None and member.paused


def test_a_reason_cannot_inject_ami_headers_or_actions(make_env: Callable[..., Env], ami: FakeAMI) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    amina = phone_counselor(env, "amina", "1001")
    ami.wait_for_action("QueueAdd")
    start = len(ami.actions)
    evil = "brb\r\nAction: Originate\r\nChannel: PJSIP/999\r\n\r\nAction: Logoff"
    assert amina.presence("paused", evil).status_code == 200
    pause = ami.wait_for_action("QueuePause", after=start)
    assert pause["Reason"] == header(evil)
    assert "\r" not in pause["Reason"] and "\n" not in pause["Reason"]
    time.sleep(0.2)
    assert {a.name for a in ami.actions[start:]} <= {"QueuePause", "Ping"}
    assert ami.clients == 1  # no Logoff went through


def test_counselors_without_an_extension_are_left_out_of_asterisk(make_env: Callable[..., Env], ami: FakeAMI) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    bot = env.chatbot()
    start = len(ami.actions)
    chat_only = phone_counselor(env, "neema", None)
    assert chat_only.presence("paused", "tea").status_code == 200
    assert chat_only.join_queue().status_code == 200
    time.sleep(0.3)
    assert [a.name for a in ami.actions[start:] if a.name != "Ping"] == []
    assert bot.send("sess-chat-only", "hi", location="TZ").status_code == 201
    wait_offer(chat_only, "sess-chat-only")


# --------------------------------------------------------------------------- the phone -> offers


def test_a_counselor_on_a_call_gets_no_chat_offers_until_the_call_ends(
    make_env: Callable[..., Env], ami: FakeAMI
) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    bot = env.chatbot()
    amina = phone_counselor(env, "amina", "1001")
    bob = phone_counselor(env, "bob", "1002")
    for who in ("amina", "bob"):
        wait_phone(env, who, lambda s: s.member, "in the queue")

    ami.set_device_state("PJSIP/1001", 2)  # InUse: Amina is on a call
    busy = wait_phone(env, "amina", lambda s: s.busy, "busy")
    assert busy.status == 2

    assert bot.send("sess-phone-1", "hello", location="TZ").status_code == 201
    offer = wait_offer(bob, "sess-phone-1")
    assert_no_offer(amina, "sess-phone-1")
    assert bob.read_offer(offer["id"]).status_code == 200
    assert bob.presence("paused", "busy with a chat").status_code == 200

    # Nobody can take this one: Amina's phone is busy, Bob is paused.
    assert bot.send("sess-phone-2", "anyone?", location="TZ").status_code == 201
    assert_no_offer(amina, "sess-phone-2")

    ami.set_device_state("PJSIP/1001", 1)  # NotInUse: the call is over, offers resume at once
    wait_offer(amina, "sess-phone-2", timeout=3)
    state = phone_state(env, "amina")
    assert state is not None and state.status == 1 and is_free(state)


def test_every_busy_device_state_counts(make_env: Callable[..., Env], ami: FakeAMI) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    phone_counselor(env, "amina", "1001")
    wait_phone(env, "amina", lambda s: s.member, "in the queue")
    for status in (3, 6, 7, 8):  # Busy, Ringing, RingInUse, OnHold (InUse: above)
        ami.set_device_state("PJSIP/1001", status)
        wait_phone(env, "amina", lambda s, st=status: s.busy and s.status == st, f"busy with state {status}")
        ami.set_device_state("PJSIP/1001", 5)  # Unavailable: no call, so not busy
        wait_phone(env, "amina", lambda s: not s.busy and s.status == 5, "not busy")
    ami.set_device_state("PJSIP/1001", 1, in_call=True)  # InCall alone is enough
    wait_phone(env, "amina", lambda s: s.busy and s.in_call, "in a call")


def test_a_phone_call_withdraws_a_pending_offer_and_agent_events_count(
    make_env: Callable[..., Env], ami: FakeAMI
) -> None:
    env = phone_env(make_env, ami, offer_timeout_s=10)
    wait_synced(env)
    bot = env.chatbot()
    amina = phone_counselor(env, "amina", "1001")
    wait_phone(env, "amina", lambda s: s.member, "in the queue")
    assert bot.send("sess-ring", "hello", location="TZ").status_code == 201
    first = wait_offer(amina, "sess-ring")

    # A queue call rings her phone (AgentCalled): the chat offer goes back to the queue at once.
    ami.emit("AgentCalled", Queue=QUEUE, Interface="PJSIP/1001", MemberName="Amina", Channel="PJSIP/caller-01")
    withdrawn = amina.wait_for("offer_withdrawn", lambda e: e["offer_id"] == first["id"], timeout=5)
    assert withdrawn["reason"] == "phone_busy"
    ami.emit("AgentConnect", Queue=QUEUE, Interface="PJSIP/1001", MemberName="Amina", HoldTime=3, RingTime=2)
    time.sleep(0.3)
    assert len(offers_for(amina, "sess-ring")) == 1

    ami.emit("AgentComplete", Queue=QUEUE, Interface="PJSIP/1001", MemberName="Amina", Reason="caller")
    wait_until_sync(lambda: len(offers_for(amina, "sess-ring")) == 2, message="offered again once the call completed")
    # Another queue's events are not this site's business.
    ami.emit("AgentCalled", Queue="sales", Interface="PJSIP/1001", MemberName="Amina")
    time.sleep(0.3)
    state = phone_state(env, "amina")
    assert state is not None and not state.busy


def test_paused_in_asterisk_gets_no_offers_until_they_rejoin(make_env: Callable[..., Env], ami: FakeAMI) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    bot = env.chatbot()
    amina = phone_counselor(env, "amina", "1001")
    bob = phone_counselor(env, "bob", "1002")
    wait_phone(env, "amina", lambda s: s.member, "in the queue")

    ami.pause_member(QUEUE, "PJSIP/1001", True, "phone break")  # from the phone, not from helpline
    state = wait_phone(env, "amina", lambda s: s.paused, "paused in Asterisk")
    assert state.reason == "phone break"
    me = amina.http.get("/api/agents/me").json()
    assert me["presence"]["status"] == "available"  # helpline presence is left alone

    assert bot.send("sess-paused", "hi", location="TZ").status_code == 201
    wait_offer(bob, "sess-paused")
    assert_no_offer(amina, "sess-paused")

    start = len(ami.actions)
    assert amina.join_queue().status_code == 200  # "Join queue" again: unpaused everywhere
    assert ami.wait_for_action("QueuePause", after=start)["Paused"] == "false"
    wait_phone(env, "amina", is_free, "free again")
    assert bot.send("sess-after-pause", "hi", location="TZ").status_code == 201
    wait_until_sync(
        lambda: offers_for(amina, "sess-after-pause") or offers_for(bob, "sess-after-pause"), message="an offer"
    )
    assert bob.presence("paused", "tea").status_code == 200
    assert bot.send("sess-amina", "hi", location="TZ").status_code == 201
    wait_offer(amina, "sess-amina")


# --------------------------------------------------------------------------- failures


def test_with_asterisk_down_presence_works_and_a_reconnect_resyncs(make_env: Callable[..., Env], ami: FakeAMI) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    bot = env.chatbot()
    amina = phone_counselor(env, "amina", "1001")
    bob = phone_counselor(env, "bob", "1002")
    wait_phone(env, "bob", lambda s: s.member, "in the queue")
    ami.set_device_state("PJSIP/1002", 2)  # Bob is on a call...
    wait_phone(env, "bob", lambda s: s.busy, "busy")

    ami.go_down()  # ... when Asterisk goes away (and forgets its dynamic members)
    wait_until_sync(lambda: not link(env).synced.is_set(), message="the adapter noticed")
    # Nothing is known about the phones now: nobody is kept from chats by a stale "on a call".
    wait_phone(env, "bob", lambda s: not s.busy and not s.member, "forgotten")

    with structlog.testing.capture_logs() as logs:
        r = amina.presence("paused", "meeting")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "paused"
        wait_until_sync(lambda: any(e["event"].startswith("asterisk unavailable") for e in logs), message="a warning")
    assert bot.send("sess-down", "hello", location="TZ").status_code == 201
    offer = wait_offer(bob, "sess-down")
    assert bob.read_offer(offer["id"]).status_code == 200
    assert amina.http.get("/api/agents/me").json()["presence"]["status"] == "paused"

    start = len(ami.actions)
    ami.come_back()
    wait_synced(env, logins=2)
    # Re-synced from helpline's presence: Bob (available) added again, Amina (paused) added paused.
    bob_add = ami.wait_for_action("QueueAdd", for_interface("PJSIP/1002"), after=start)
    assert bob_add["Paused"] == "false" and bob_add["Queue"] == QUEUE
    amina_add = ami.wait_for_action("QueueAdd", for_interface("PJSIP/1001"), after=start)
    assert amina_add["Paused"] == "true" and amina_add["Reason"] == "meeting"
    assert ami.wait_for_action("QueueStatus", after=start)["Queue"] == QUEUE
    assert ami.logins == 2
    # Bob's phone is still in use: Asterisk says so when he is added back.
    wait_phone(env, "bob", lambda s: s.member and s.busy, "busy again")


def test_a_dropped_connection_reconnects_and_repairs_membership(make_env: Callable[..., Env], ami: FakeAMI) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    amina = phone_counselor(env, "amina", "1001")
    phone_counselor(env, "bob", "1002")
    ami.wait_for_action("QueueAdd", for_interface("PJSIP/1002"))
    ami.add_static_member(QUEUE, "PJSIP/2000", "Reception")  # not ours: left alone

    ami.drop_connections()  # a network blip: Asterisk keeps its members
    wait_synced(env, logins=2)
    assert amina.presence("offline").status_code == 200
    ami.wait_for_action("QueueRemove", for_interface("PJSIP/1001"))
    assert {m.interface for m in ami.members(QUEUE)} == {"PJSIP/1002", "PJSIP/2000"}

    # Someone removed Bob by hand while we were cut off: the resync after the next login adds him back.
    ami.go_down(forget_members=False)
    with ami._lock:
        del ami._queues[QUEUE]["pjsip/1002"]
    start = len(ami.actions)
    ami.come_back()
    wait_synced(env, logins=3)
    ami.wait_for_action("QueueAdd", for_interface("PJSIP/1002"), after=start)
    assert not [a for a in ami.actions[start:] if a.name == "QueueRemove"]  # Amina's already out; 2000 is not ours
    assert {m.interface for m in ami.members(QUEUE)} == {"PJSIP/1002", "PJSIP/2000"}


def test_a_wrong_secret_is_logged_and_the_chat_side_is_unaffected(
    make_env: Callable[..., Env], ami: FakeAMI, rapidpro: FakeRapidPro
) -> None:
    with structlog.testing.capture_logs() as logs:
        env = phone_env(make_env, ami, secret="not-the-secret")
        wait_until_sync(lambda: ami.login_failures >= 2, message="login retried with backoff")
        refused = [e for e in logs if e["event"] == "asterisk login refused"]
        assert refused and refused[0]["log_level"] == "warning"
        assert refused[0]["site"] == "tz" and refused[0]["message"] == "Authentication failed"
        assert "not-the-secret" not in repr(logs)  # the secret is never logged
    assert link(env).logins == 0 and ami.logins == 0
    bot = env.chatbot()
    amina = phone_counselor(env, "amina", "1001")
    assert amina.presence("paused", "x").status_code == 200
    assert amina.join_queue().status_code == 200
    assert bot.send("sess-secret", "hello", location="TZ").status_code == 201
    offer = wait_offer(amina, "sess-secret")
    assert amina.read_offer(offer["id"]).status_code == 200
    assert not [a for a in ami.actions if a.name not in ("Login",)]


def test_an_asterisk_that_stops_answering_is_left_and_retried(make_env: Callable[..., Env], ami: FakeAMI) -> None:
    env = phone_env(make_env, ami, timeout_s=0.5)
    wait_synced(env)
    amina = phone_counselor(env, "amina", "1001")
    ami.wait_for_action("QueueAdd")
    ami.never_answer("Ping")
    ami.never_answer("QueuePause")
    t = time.monotonic()
    r = amina.presence("paused", "lunch")  # the HTTP call never waits on Asterisk
    assert r.status_code == 200 and time.monotonic() - t < 1.0
    ami.wait_for_action("QueuePause")
    wait_until_sync(lambda: not link(env).synced.is_set(), timeout=8, message="the silent connection was given up")
    ami.never_answer("Ping", False)
    ami.never_answer("QueuePause", False)
    wait_synced(env, logins=2)
    wait_until_sync(lambda: member_paused(ami, "PJSIP/1001"), message="paused in the fake")


def test_a_join_asterisk_refuses_is_logged_and_repaired_at_the_next_login(
    make_env: Callable[..., Env], ami: FakeAMI
) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    bot = env.chatbot()
    amina = phone_counselor(env, "amina", "1001", join=False)
    failures = action_failures(env, "QueuePause")

    ami.refuse_next("QueueAdd", "Unable to add interface to queue: Out of memory")
    with structlog.testing.capture_logs() as logs:
        r = amina.join_queue()  # the HTTP call never waits on Asterisk, nor fails with it
        assert r.status_code == 200 and r.json()["status"] == "available", r.text
        refused = wait_refusal(logs)
    # QueueAdd refused, the adapter tried to unpause her instead (a member already?): refused too.
    assert [a["Paused"] for a in ami.actions_named("QueueAdd")] == ["false"]
    assert [a["Paused"] for a in ami.actions_named("QueuePause")] == ["false"]
    assert (refused["log_level"], refused["site"], refused["action"], refused["interface"]) == (
        "warning",
        "tz",
        "QueuePause",
        "PJSIP/1001",
    )
    assert refused["message"] == "Interface not found"
    assert refused["earlier"] == "Unable to add interface to queue: Out of memory"
    assert action_failures(env, "QueuePause") == failures + 1
    assert ami.member(QUEUE, "PJSIP/1001") is None  # no phone calls for her yet...

    # ... but chats: helpline presence is what she chose.
    assert amina.http.get("/api/agents/me").json()["presence"]["status"] == "available"
    assert bot.send("sess-refused", "hello", location="TZ").status_code == 201
    wait_offer(amina, "sess-refused")
    assert len(ami.actions_named("QueueAdd")) == 1  # not retried at once

    # The next resync (at the next login, or every resync_s) adds her.
    start = len(ami.actions)
    ami.drop_connections()
    wait_synced(env, logins=2)
    add = ami.wait_for_action("QueueAdd", for_interface("PJSIP/1001"), after=start)
    assert add["Paused"] == "false"
    member = ami.member(QUEUE, "PJSIP/1001")
    assert member is not None and not member.paused
    wait_phone(env, "amina", lambda s: s.member and is_free(s), "in the queue, free")


def test_a_pause_asterisk_refuses_is_logged_and_repaired_at_the_next_login(
    make_env: Callable[..., Env], ami: FakeAMI
) -> None:
    env = phone_env(make_env, ami)
    wait_synced(env)
    bot = env.chatbot()
    amina = phone_counselor(env, "amina", "1001")
    wait_phone(env, "amina", lambda s: s.member, "in the queue")
    failures = action_failures(env, "QueueAdd")

    ami.refuse_next("QueuePause", "Interface not found")
    with structlog.testing.capture_logs() as logs:
        r = amina.presence("paused", "lunch")
        assert r.status_code == 200 and r.json()["status"] == "paused", r.text
        refused = wait_refusal(logs)
    # QueuePause refused, the adapter tried to join her paused instead (not a member?): "Already there".
    assert [(a["Paused"], a["Reason"]) for a in ami.actions_named("QueuePause")] == [("true", "lunch")]
    assert [a["Paused"] for a in ami.actions_named("QueueAdd")] == ["false", "true"]  # her join, then the fallback
    assert (refused["log_level"], refused["site"], refused["action"], refused["interface"]) == (
        "warning",
        "tz",
        "QueueAdd",
        "PJSIP/1001",
    )
    assert refused["message"] == "Unable to add interface: Already there"
    assert refused["earlier"] == "Interface not found"
    assert action_failures(env, "QueueAdd") == failures + 1
    assert member_paused(ami, "PJSIP/1001") is False  # her phone may still ring...
    state = phone_state(env, "amina")
    assert state is not None and state.member and not state.paused

    # ... but no chats: helpline presence is what she chose.
    assert amina.http.get("/api/agents/me").json()["presence"]["status"] == "paused"
    assert bot.send("sess-paused-refused", "hello", location="TZ").status_code == 201
    assert_no_offer(amina, "sess-paused-refused")
    assert len(ami.actions_named("QueuePause")) == 1  # not retried at once

    # The next resync (at the next login, or every resync_s) pauses her, with her reason.
    start = len(ami.actions)
    ami.drop_connections()
    wait_synced(env, logins=2)
    pause = ami.wait_for_action("QueuePause", for_interface("PJSIP/1001"), after=start)
    assert (pause["Paused"], pause["Reason"]) == ("true", "lunch")
    wait_phone(env, "amina", lambda s: s.paused and s.reason == "lunch", "paused in Asterisk")
    member = ami.member(QUEUE, "PJSIP/1001")
    assert member is not None and member.paused and member.reason == "lunch"


# --------------------------------------------------------------------------- helpline work


def stored_phone_state(database_url: str, username: str) -> PhoneState | None:
    """The phone state in the store, read without a server."""

    async def get() -> PhoneState | None:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as s:
                return await s.scalar(
                    select(PhoneState).join(User, User.id == PhoneState.user_id).where(User.username == username)
                )
        finally:
            await engine.dispose()

    return asyncio.run(get())


@pytest.mark.skipif(not PG_URL, reason="helpline work runs beside the servers on PostgreSQL")
def test_helpline_work_follows_asterisk_and_leaves_presence_changes_to_the_servers(
    make_env: Callable[..., Env], ami: FakeAMI
) -> None:
    """`helpline work` runs the Asterisk adapter as `helpline serve` does (the sites have
    [site.asterisk]), with a connection of its own. A presence change is made by a server, whose
    adapter tells Asterisk at once: the worker does not tell it again. Asterisk's events reach the
    store through the worker too, also while no server is up."""
    env = phone_env(make_env, ami)
    wait_synced(env)
    amina = phone_counselor(env, "amina", "1001")
    wait_phone(env, "amina", lambda s: s.member, "in the queue")
    (server,) = {a.connection for a in ami.actions_named("QueueAdd")}
    settings = env.server.settings.model_copy(update={"run_hunter": False, "run_outbox": False})

    with structlog.testing.capture_logs() as logs, LiveWorker(settings, env.server.sites):
        wait_until_sync(
            lambda: any(e["event"] == "asterisk resynced" for e in logs), message="the worker's login and resync"
        )
        assert ami.logins == 2
        worker = {a.connection for a in ami.actions} - {server}
        # Amina is in the queue already: the worker's resync read it and had nothing to repair.
        assert {a.name for a in ami.actions if a.connection in worker} <= {"Login", "QueueStatus", "Ping"}

        start = len(ami.actions)
        assert amina.presence("paused", "lunch").status_code == 200
        ami.wait_for_action("QueuePause", after=start)
        wait_phone(env, "amina", lambda s: s.paused and s.reason == "lunch", "paused in Asterisk")

        def sent() -> list[tuple[str, int]]:
            return [(a.name, a.connection) for a in ami.actions[start:] if a.name != "Ping"]

        # The worker hears the change on the bus: it sends nothing of it.
        holds_for(lambda: sent() == [("QueuePause", server)], 0.5, message=lambda: f"sent {sent()}")

        env.server.stop()  # every server down (a restart): the worker still follows the phones
        ami.set_device_state("PJSIP/1001", 2)
        state = wait_until_sync(
            lambda: (st := stored_phone_state(settings.database_url, "amina")) is not None and st.busy and st,
            message="busy, stored by the worker",
        )
        assert state.status == 2 and state.paused


# --------------------------------------------------------------------------- configuration and CLI


def test_asterisk_config_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELPLINE_TZ_AMI_SECRET", "from-env")
    cfg = AsteriskConfig(username="u", secret_env="HELPLINE_TZ_AMI_SECRET", queue="q")
    assert cfg.secret == "from-env" and "from-env" not in repr(cfg)
    assert cfg.interface_for("1001") == "PJSIP/1001"
    local = AsteriskConfig(username="u", queue="q", interface="Local/{extension}@from-queue/n")
    assert local.interface_for("7") == "Local/7@from-queue/n"
    for bad in ("PJSIP/1001", "SIP/{ext}", "SIP/{extension}{0}"):
        with pytest.raises(ValueError):
            AsteriskConfig(username="u", queue="q", interface=bad)
    with pytest.raises(ValueError):
        AsteriskConfig(username="u", queue="q\r\nAction: Logoff")


def test_createuser_takes_an_extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpline.cli import app

    sites = tmp_path / "sites.toml"
    sites.write_text(
        '[[site]]\nslug = "ke"\nname = "Childline Kenya"\n'
        '[site.rapidpro]\nbase_url = "http://127.0.0.1:9"\nflow = "f"\n'
        '[site.asterisk]\nusername = "helpline"\nsecret = "s"\nqueue = "helpline-ke"\n'
    )
    db = tmp_path / "cli.db"
    monkeypatch.setenv("HELPLINE_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
    monkeypatch.setenv("HELPLINE_SITES", str(sites))
    runner = CliRunner()
    args = ["createuser", "--role", "counselor", "--password", "x" * 12]
    r = runner.invoke(app, [*args, "--username", "amina", "--extension", "1001"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--username", "bad", "--extension", "10 01\r\nAction: Logoff"])
    assert r.exit_code == 2 and "extension" in r.output

    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT username, extension FROM users ORDER BY id").fetchall()
    assert rows == [("amina", "1001")]
