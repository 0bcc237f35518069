"""``helpline demo``: everything embedded on loopback, and a scripted conversation printed hop by hop.

One command starts, in a temporary directory, a SQLite database, a generated sites file, a fake
RapidPro and the real helpline server; creates demo users; then a scripted chatbot and two simulated
counselors hold a conversation through the real HTTP and WebSocket APIs:

1. the chatbot opens a high-risk conversation;
2. Amina gets the offer and lets it lapse; Baraka gets it and reads it (RapidPro hears ``assigned``);
3. Baraka replies; the chatbot acknowledges the reply as delivered, then read;
4. the chatbot writes again; Baraka answers with a long text that RapidPro receives in ordered parts;
5. the chatbot closes the conversation and Baraka's console is told.

Every hop is printed with the milliseconds since the start. RapidPro hops come from watching the
fake RapidPro's requests, WebSocket hops from the counselors' event streams. Afterwards the server
keeps running (so a person can try the API and the console) until Ctrl-C or ``seconds`` have passed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
from rich.console import Console
from rich.text import Text

from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.testing.fake_chatbot import FakeChatbot
from helpline.testing.fake_counselor import Event, FakeCounselor
from helpline.testing.fake_rapidpro import FakeRapidPro, ReceivedStart
from helpline.testing.live import LiveServer

__all__ = ["DEMO_PASSWORD", "OFFER_TIMEOUT_S", "DemoError", "run_demo"]

DEMO_PASSWORD = "helpline-demo"
OFFER_TIMEOUT_S = 3.0
CHATBOT = "weni-demo"
SUPERVISOR = "supervisor"
COUNSELORS = {"amina": "Amina", "baraka": "Baraka"}
CLIENT_URN = "telegram:23343411"
WAIT_S = 10.0  # how long a step waits for something that normally takes milliseconds

FIRST_MESSAGE = "Hello, I am scared. Someone at home keeps hurting me."
FIRST_REPLY = "Hello, I am Baraka, a counselor. I am here with you and you are safe talking to me."
SECOND_MESSAGE = "Thank you. What can I do tonight?"
LONG_REPLY = " ".join(
    [
        "Thank you for telling me; that took a lot of courage, and none of this is your fault.",
        "Tonight, if you feel in danger, go to a room with a door that locks or to a trusted neighbour,",
        "and call 116, the free child helpline, at any time of the day or night: it costs nothing.",
        "Can you tell me the name of an adult you trust, like a teacher, an aunt or a religious leader?",
        "We can plan together how to tell them, and I can stay with you in this chat while you do.",
        "If you are hurt, a health centre will treat you for free and will not send you away.",
        "Whatever happens tonight, you can write here again, and a counselor will answer you.",
        "You may also save this number in your phone under another name, so nobody at home sees it.",
        "Tomorrow we can talk about school: a teacher or the head teacher can help keep you safe too.",
        "Take a slow breath with me: in for four, hold for four, out for four. I am not going anywhere.",
    ]
)


class DemoError(Exception):
    """A scripted step did not go as expected."""


# --------------------------------------------------------------------------- printing


class Timeline:
    """Prints hops, one a line, with the milliseconds since the demo started (thread-safe)."""

    STYLES = {"chatbot": "cyan", "helpline": "green", "RapidPro": "yellow"}

    def __init__(self, console: Console) -> None:
        self.console = console
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def ms(self) -> int:
        return round((time.monotonic() - self.t0) * 1000)

    def hop(self, src: str, dst: str, what: str, *, ok: bool = True) -> None:
        with self._lock:
            line = Text(f"+{self.ms():5d} ms  ", style="dim")
            line.append(f"{src:<8}", style=self.STYLES.get(src, "magenta"))
            line.append(" -> ")
            line.append(f"{dst:<10}", style=self.STYLES.get(dst, "magenta"))
            line.append(f" {what}", style="" if ok else "bold red")
            self.console.print(line, soft_wrap=True)

    def note(self, text: str, style: str = "bold") -> None:
        with self._lock:
            self.console.print(Text(text, style=style), soft_wrap=True)


def short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def describe_ws(event: Event) -> str | None:
    """One line for a counselor's WebSocket event; ``None`` for what is not worth a line."""
    kind = event.get("type")
    if kind == "offer":
        offer = event["offer"]
        return f"offer #{offer['id']} (ws) risk={offer['conversation']['risk']}, {offer['expires_in_s']:g} s to read it"
    if kind == "offer_withdrawn":
        reason = str(event.get("reason", "")).replace("_", " ")
        return f"offer #{event['offer_id']} withdrawn ({reason}) (ws)"
    if kind == "message":
        message = event["message"]
        if message.get("direction") != "in":
            return None  # the echo of the counselor's own reply
        return f"message {short(message['text'])} (ws)"
    if kind == "message_status":
        return f"message_status {event['status']} (ws)"
    if kind == "conversation_closed":
        return f"conversation_closed by {event.get('closed_by')} (ws)"
    if kind == "presence":
        presence = event["presence"]
        if not presence.get("reason"):
            return None  # the counselor's own change, printed with its request
        return f"presence {presence['status']} ({presence['reason']}) (ws)"
    if kind in ("hello", "queue_changed", "pong"):
        return None
    return f"{kind} (ws)"


def describe_start(start: ReceivedStart) -> str:
    """One line for a flow start the fake RapidPro answered."""
    params = start.params or {}
    what = f"flow_start event={params.get('event', '?')}"
    if params.get("counselor_name") and params.get("event") != "message":
        what += f" counselor={params['counselor_name']}"
    if params.get("status"):
        what += f" status={params['status']}"
    if params.get("event") == "ack" and params.get("message_id"):
        what += f" message={str(params['message_id'])[:8]}"
    if params.get("parts"):
        what += f" part {params.get('part')}/{params['parts']} ({len(params.get('text', ''))} chars)"
    elif params.get("text"):
        what += f" text={short(params['text'])}"
    return f"{what} -> {start.status}"


class HopWatcher:
    """Polls the fake RapidPro's requests and the counselors' WebSocket events, and prints new ones."""

    def __init__(
        self, timeline: Timeline, rapidpro: FakeRapidPro, counselors: dict[str, FakeCounselor], interval: float = 0.005
    ) -> None:
        self.timeline = timeline
        self.rapidpro = rapidpro
        self.counselors = counselors
        self.interval = interval
        self._starts_seen = 0
        self._events_seen = dict.fromkeys(counselors, 0)
        self._poll_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-hops", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        with self._poll_lock:
            for name, counselor in self.counselors.items():
                new = counselor.events[self._events_seen[name] :]
                self._events_seen[name] += len(new)
                for event in new:
                    line = describe_ws(event)
                    if line is not None:
                        self.timeline.hop("helpline", name, line)
            starts = self.rapidpro.received[self._starts_seen :]
            self._starts_seen += len(starts)
            for start in starts:
                self.timeline.hop("helpline", "RapidPro", describe_start(start), ok=start.accepted)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold printing while a request is in flight: its answer is printed before what it caused."""
        with self._poll_lock:
            yield

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.poll()


# --------------------------------------------------------------------------- setup


def sites_toml(rapidpro: FakeRapidPro) -> str:
    return textwrap.dedent(f"""\
        [[site]]
        slug = "ke"
        name = "Childline Kenya (demo)"
        countries = ["KE"]
        timezone = "Africa/Nairobi"
        default = true
        [site.rapidpro]
        base_url = "{rapidpro.url}"
        token = "{rapidpro.token}"
        flow = "{rapidpro.flow}"
        urn_scheme = "telegram"
        [site.routing]
        strategy = "leastrecent"
        offer_timeout_s = {OFFER_TIMEOUT_S}
        max_chats_per_counselor = 3
        """)


def start_services(stack: contextlib.ExitStack, port: int) -> tuple[LiveServer, FakeRapidPro, Path]:
    """A temporary directory, the fake RapidPro and the helpline server; all stopped by ``stack``."""
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="helpline-demo-")))
    rapidpro = FakeRapidPro()
    stack.callback(rapidpro.stop)
    rapidpro.start()
    sites = workdir / "sites.toml"
    sites.write_text(sites_toml(rapidpro), encoding="utf-8")
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{workdir / 'helpline.db'}",
        sites=str(sites),
        poll_interval_s=0.5,
        outbox_backoff_base_s=0.1,
        outbox_backoff_cap_s=2.0,
        log_level="WARNING",
    )
    server = LiveServer(settings, SiteRegistry.from_toml(sites), port=port)
    stack.callback(server.stop)
    server.start()
    return server, rapidpro, workdir


def quiet_logs() -> None:
    """The hops are the output: library logs only when something is wrong."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# --------------------------------------------------------------------------- the script


@dataclass
class Demo:
    console: Console
    timeline: Timeline
    server: LiveServer
    rapidpro: FakeRapidPro
    workdir: Path
    stack: contextlib.ExitStack
    session: str = field(default_factory=lambda: f"demo-{uuid.uuid4().hex[:8]}")
    chatbot: FakeChatbot | None = None
    counselors: dict[str, FakeCounselor] = field(default_factory=dict)
    watcher: HopWatcher | None = None
    conversation_id: str = ""
    step: str = "starting"

    # -- helpers --------------------------------------------------------------------------------

    @property
    def bot(self) -> FakeChatbot:
        assert self.chatbot is not None
        return self.chatbot

    @property
    def amina(self) -> FakeCounselor:
        return self.counselors["Amina"]

    @property
    def baraka(self) -> FakeCounselor:
        return self.counselors["Baraka"]

    def begin(self, title: str) -> None:
        self.flush()
        self.step = title
        self.timeline.note(f"-- {title}", style="bold blue")

    def flush(self) -> None:
        """Print what the watcher has not printed yet."""
        if self.watcher is not None:
            self.watcher.poll()

    def call(
        self,
        src: str,
        request: str,
        send: Callable[[], httpx.Response],
        expect: int,
        detail: Callable[[Any], str] | None = None,
    ) -> Any:
        """Make one HTTP request and print its hop before anything it caused; return its JSON body.

        :class:`DemoError` when the status is not ``expect``.
        """
        self.flush()
        with self.watcher.paused() if self.watcher is not None else contextlib.nullcontext():
            response = send()
            ok = response.status_code == expect
            body: Any = response.json() if response.content else None
            extra = f" {detail(body)}" if ok and detail is not None else ""
            self.timeline.hop(src, "helpline", f"{request} {response.status_code}{extra}", ok=ok)
        if not ok:
            raise DemoError(f"{request}: expected {expect}, got {response.status_code}: {response.text[:300]}")
        return body

    def rapidpro_event(self, event: str, predicate: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Wait until the fake RapidPro accepted a flow start with ``event`` (and ``predicate``); its params."""

        def match(params: dict[str, Any]) -> bool:
            return params.get("event") == event and (predicate is None or predicate(params))

        starts = self.rapidpro.wait_for(lambda rs: any(match(r.params or {}) for r in rs), timeout=WAIT_S)
        return next(r.params or {} for r in starts if match(r.params or {}))

    # -- steps ----------------------------------------------------------------------------------

    def print_banner(self) -> None:
        url = self.server.url
        lines = [
            f"[bold]helpline demo[/bold]: everything embedded, in {self.workdir}",
            f"  API docs       {url}/docs",
            f"  console        {url}/console/   (supervisor: {url}/console/supervisor/)",
            f"  chatbot API    {url}/api/chat/   (token: POST {url}/api/token/)",
            f"  fake RapidPro  {self.rapidpro.flow_starts_url}",
            f"  logins         {CHATBOT} (chatbot), {', '.join(COUNSELORS)} (counselors), {SUPERVISOR} (supervisor)",
            f"  password       [bold]{DEMO_PASSWORD}[/bold] (all demo logins)",
            f"  site           ke: strategy leastrecent, offers lapse after {OFFER_TIMEOUT_S:g} s",
        ]
        for line in lines:
            self.console.print(line, soft_wrap=True)

    def create_users(self) -> None:
        self.begin("demo users are created")
        self.server.create_user(CHATBOT, DEMO_PASSWORD, "chatbot", site="ke")
        for username, name in COUNSELORS.items():
            self.server.create_user(username, DEMO_PASSWORD, "counselor", site="ke", name=name)
        self.server.create_user(SUPERVISOR, DEMO_PASSWORD, "supervisor", site="ke", name="Supervisor")
        counselors = ", ".join(f"{username} ({name!r})" for username, name in COUNSELORS.items())
        self.timeline.note(f"   chatbot {CHATBOT}; counselors {counselors}; supervisor {SUPERVISOR}", style="")

    def counselors_join(self) -> None:
        self.begin("Amina and Baraka log in, open their live channel and join the queue")
        for username, name in COUNSELORS.items():
            counselor = FakeCounselor(self.server.url, username, DEMO_PASSWORD)
            self.stack.callback(counselor.close_all)
            counselor.login()
            self.timeline.hop(name, "helpline", "POST /api/token/ 200")
            counselor.connect()
            self.timeline.hop(name, "helpline", "GET /ws 101 (live events)")
            self.counselors[name] = counselor
        self.watcher = HopWatcher(self.timeline, self.rapidpro, self.counselors)
        self.stack.callback(self.watcher.stop)
        self.watcher.start()
        for name, counselor in self.counselors.items():
            self.call(name, "PUT /api/agents/me/presence", counselor.join_queue, 200, lambda b: b["status"])

    def chatbot_opens(self) -> int:
        """The conversation starts and is offered to Amina (first by ``leastrecent``); the offer id."""
        self.begin("the chatbot opens a high-risk conversation; the hunt offers it to Amina")
        self.chatbot = FakeChatbot(self.server.url, CHATBOT, DEMO_PASSWORD)
        self.stack.callback(self.bot.aclose)
        self.bot.login()
        self.timeline.hop("chatbot", "helpline", "POST /api/token/ 200")
        self.call(
            "chatbot",
            "POST /api/chat/",
            lambda: self.bot.send(
                self.session, FIRST_MESSAGE, risk="high", location="KE", client_name="Kid", contact_urn=CLIENT_URN
            ),
            201,
            lambda b: f"{'created' if b['created'] else 'added'} ({b['delivery']}) chat_session={b['chat_session']}",
        )
        return int(self.amina.wait_for("offer", timeout=WAIT_S)["offer"]["id"])

    def first_counselor_lets_offer_lapse(self, offer_id: int) -> int:
        """Amina does not answer; the conversation is offered to Baraka: his offer id."""
        self.begin(f"Amina does not answer: after {OFFER_TIMEOUT_S:g} s the offer lapses and goes to Baraka")
        self.amina.wait_for(
            "offer_withdrawn",
            lambda e: e["offer_id"] == offer_id and e.get("reason") == "timed_out",
            timeout=OFFER_TIMEOUT_S + WAIT_S,
        )
        return int(self.baraka.wait_for("offer", timeout=WAIT_S)["offer"]["id"])

    def second_counselor_reads(self, offer_id: int) -> None:
        self.begin("Baraka reads the offer: the conversation is his, and RapidPro is told")
        body = self.call(
            "Baraka",
            f"POST /api/offers/{offer_id}/read",
            lambda: self.baraka.read_offer(offer_id),
            200,
            lambda b: f"{b['conversation']['status']} ({len(b['messages'])} message from the client)",
        )
        self.conversation_id = body["conversation"]["id"]
        self.rapidpro_event("assigned")
        self.rapidpro_event("ack", lambda p: p.get("status") == "delivered")

    def counselor_replies(self) -> str:
        """Baraka's reply reaches RapidPro: its message id, as the chatbot learns it from RapidPro."""
        self.begin("Baraka replies; RapidPro carries the reply to the client")
        self.call(
            "Baraka",
            f"POST /api/conversations/{self.conversation_id}/messages/",
            lambda: self.baraka.reply(self.conversation_id, FIRST_REPLY),
            201,
            lambda b: f"({b['status']})",
        )
        params = self.rapidpro_event("message", lambda p: p.get("text") == FIRST_REPLY)
        self.baraka.wait_for("message_status", lambda e: e["status"] == "sent", timeout=WAIT_S)
        return str(params["message_id"])

    def chatbot_acks(self, message_id: str) -> None:
        self.begin("the chatbot acknowledges the reply: delivered, then read")
        for status in ("delivered", "read"):
            self.chatbot_acks_once(message_id, status)

    def chatbot_acks_once(self, message_id: str, status: str) -> None:
        self.call(
            "chatbot",
            f"POST /api/chat/{self.session}/ack/ {status}",
            lambda: self.bot.ack(self.session, message_id, status),
            200,
            lambda b: f"delivery={b['delivery']}",
        )
        self.baraka.wait_for("message_status", lambda e: e["status"] == status, timeout=WAIT_S)

    def chatbot_writes_again(self) -> None:
        self.begin("the client writes again: it goes straight to Baraka")
        self.call(
            "chatbot",
            "POST /api/chat/",
            lambda: self.bot.send(self.session, SECOND_MESSAGE, contact_urn=CLIENT_URN),
            201,
            lambda b: f"({b['delivery']})",
        )
        self.baraka.wait_for("message", lambda e: e["message"]["direction"] == "in", timeout=WAIT_S)

    def counselor_answers_at_length(self) -> None:
        self.begin(f"Baraka answers at length ({len(LONG_REPLY)} characters): RapidPro gets it in ordered parts")
        self.call(
            "Baraka",
            f"POST /api/conversations/{self.conversation_id}/read/",
            lambda: self.baraka.mark_read(self.conversation_id),
            200,
        )
        self.call(
            "Baraka",
            f"POST /api/conversations/{self.conversation_id}/messages/",
            lambda: self.baraka.reply(self.conversation_id, LONG_REPLY),
            201,
            lambda b: f"({len(b['text'])} chars)",
        )
        last = self.rapidpro_event("message", lambda p: p.get("parts") is not None and p.get("part") == p.get("parts"))
        parts = [
            (r.params or {}).get("text", "")
            for r in self.rapidpro.accepted
            if (r.params or {}).get("message_id") == last["message_id"]
        ]
        if "".join(parts) != LONG_REPLY:
            raise DemoError(f"the {len(parts)} parts RapidPro received do not add up to the reply")

    def chatbot_closes(self) -> None:
        self.begin("the chatbot closes the conversation; Baraka's console is told")
        self.call(
            "chatbot",
            f"POST /api/chat/{self.session}/close/",
            lambda: self.bot.close(self.session),
            200,
            lambda b: b["conversation_status"],
        )
        self.baraka.wait_for("conversation_closed", timeout=WAIT_S)

    def counselors_leave(self) -> None:
        """The simulated counselors go offline, so a person can take new conversations in the console."""
        self.begin("the simulated counselors go offline")
        for name, counselor in self.counselors.items():
            self.call(name, "PUT /api/agents/me/presence", functools.partial(counselor.presence, "offline"), 200)
            counselor.disconnect()

    def run_script(self) -> None:
        self.create_users()
        self.counselors_join()
        first_offer = self.chatbot_opens()
        second_offer = self.first_counselor_lets_offer_lapse(first_offer)
        self.second_counselor_reads(second_offer)
        message_id = self.counselor_replies()
        self.chatbot_acks(message_id)
        self.chatbot_writes_again()
        self.counselor_answers_at_length()
        self.chatbot_closes()
        self.counselors_leave()
        self.flush()
        self.step = "serving"
        self.timeline.note(
            f"scripted conversation finished in {self.timeline.ms()} ms "
            f"({len(self.rapidpro.accepted)} flow starts accepted by RapidPro)",
            style="bold green",
        )

    def serve(self, seconds: float) -> None:
        url = self.server.url
        until = f"for {seconds:g} s" if seconds > 0 else "until Ctrl-C"
        self.timeline.note(
            f"serving {url} {until}: try {url}/docs, or log in at {url}/console/ as amina or baraka "
            f"(password {DEMO_PASSWORD}) and post to /api/chat/ as {CHATBOT}",
            style="",
        )
        deadline = time.monotonic() + seconds if seconds > 0 else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))


def run_demo(*, port: int = 8000, seconds: float = 0, console: Console | None = None) -> int:
    """Run the demo; the process exit code: 0 when it ran (and was stopped), 1 when a step failed."""
    console = console or Console()
    quiet_logs()
    timeline = Timeline(console)
    code = 0
    demo: Demo | None = None
    with contextlib.ExitStack() as stack:
        try:
            server, rapidpro, workdir = start_services(stack, port)
            demo = Demo(console, timeline, server, rapidpro, workdir, stack)
            demo.print_banner()
            demo.run_script()
            demo.serve(seconds)
        except KeyboardInterrupt:
            console.print("interrupted")
        except Exception as exc:
            where = demo.step if demo is not None else "starting"
            starting = demo is None and isinstance(exc, OSError)
            hint = f" (is port {port} free? --port 0 picks any free port)" if starting else ""
            message = f"demo failed ({where}): {type(exc).__name__}: {exc}{hint}"
            console.print(Text(message, style="bold red"), soft_wrap=True)
            code = 1
    console.print("demo stopped" if code == 0 else "demo stopped (failed)")
    return code
