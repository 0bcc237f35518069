"""A fake Asterisk Manager Interface: a real TCP server on ``127.0.0.1`` speaking AMI's text protocol.

Like Asterisk 16-20's ``manager.c`` and ``app_queue.c``: the ``Asterisk Call Manager/5.0.x`` banner,
``\\r\\n`` line endings, packets ended by a blank line, ``ActionID`` echoed. ``Login`` (wrong secret:
``Authentication failed`` and the connection is closed), ``Logoff``, ``Ping``, ``QueueAdd``,
``QueuePause``, ``QueueRemove`` and ``QueueStatus`` (``QueueParams``/``QueueMember`` events then
``QueueStatusComplete``), with Asterisk's own messages. It keeps each queue's members, records
every action, and sends the events Asterisk would (``QueueMemberAdded``/``Removed``/``Pause``/
``Status``) to logged-in clients that asked for events. Tests drive the phones::

    with FakeAMI(queues=["helpline-ke"]) as ami:
        ...  # [site.asterisk] host/port = ami.host/ami.port, username/secret = ami.username/ami.secret
        add = ami.wait_for_action("QueueAdd")
        ami.set_device_state("PJSIP/1001", 2)  # InUse: QueueMemberStatus Status: 2 to every client
        ami.go_down()  # connections dropped, nothing listens; a restart forgets dynamic members
        ami.come_back()

The server runs its own event loop in a background thread; every method here is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = ["DEVICE_STATES", "FakeAMI", "Member", "ReceivedAction"]

EOL = "\r\n"
DEVICE_STATES = {
    0: "Unknown",
    1: "NotInUse",
    2: "InUse",
    3: "Busy",
    4: "Invalid",
    5: "Unavailable",
    6: "Ringing",
    7: "RingInUse",
    8: "OnHold",
}


def _true(value: str | None) -> bool:  # Asterisk's ast_true()
    return (value or "").strip().lower() in ("yes", "true", "y", "t", "1", "on")


@dataclass(frozen=True)
class ReceivedAction:
    """One action packet as the server read it."""

    name: str  # as sent, e.g. "QueueAdd"
    headers: tuple[tuple[str, str], ...]  # every line, in order
    at: float  # time.time()
    connection: int  # which client connection sent it (1, 2, ...)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last value of header ``key`` (case-insensitive, like Asterisk's astman_get_header)."""
        found = default
        for k, v in self.headers:
            if k.lower() == key.lower():
                found = v
        return found

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value


@dataclass
class Member:
    queue: str
    interface: str
    name: str
    state_interface: str
    membership: str = "dynamic"
    penalty: int = 0
    paused: bool = False
    reason: str = ""
    calls_taken: int = 0
    last_call: int = 0
    last_pause: int = 0
    login_time: int = field(default_factory=lambda: int(time.time()))
    in_call: bool = False

    def copy(self) -> Member:
        return Member(**self.__dict__)


class _Client:
    def __init__(self, number: int, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.writer = writer
        self.authenticated = False
        self.events = False

    def send(self, *lines: tuple[str, object]) -> None:
        if self.writer.is_closing():
            return
        packet = "".join(f"{k}: {v}{EOL}" for k, v in lines) + EOL
        self.writer.write(packet.encode("utf-8"))


class FakeAMI:
    """Asterisk's AMI on ``127.0.0.1`` (port 0: any free port, kept across :meth:`come_back`)."""

    def __init__(
        self,
        *,
        username: str = "helpline",
        secret: str = "fake-ami-secret",
        queues: Iterable[str] = ("helpline",),
        host: str = "127.0.0.1",
        port: int = 0,
        version: str = "5.0.4",
    ) -> None:
        self.username = username
        self.secret = secret
        self.host = host
        self.port = port
        self.version = version
        self._lock = threading.Lock()
        self._queues: dict[str, dict[str, Member]] = {q: {} for q in queues}  # queue -> interface.lower() -> member
        self._device: dict[str, int] = {}  # interface.lower() -> device state
        self._actions: list[ReceivedAction] = []
        self._clients: list[_Client] = []
        self._connections = 0
        self.logins = 0
        self.login_failures = 0
        self._refuse: dict[str, list[str]] = {}  # action name (lower) -> messages to answer with, in turn
        self._silent: set[str] = set()  # action names (lower) never answered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Listen (on the same port after the first start) and return once serving."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
                )
            except OSError as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-ami", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join(5)
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Drop every connection and stop listening. Queue state and recordings are kept."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for c in list(self._clients):
                c.writer.close()
            self._clients.clear()
            handlers = list(self._handlers)
            if handlers:  # they end on the closed connections (cancelling them upsets asyncio's streams)
                _, pending = await asyncio.wait(handlers, timeout=2)
                for t in pending:
                    t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._server = self._thread = None

    def go_down(self, *, forget_members: bool = True) -> None:
        """Asterisk stops: connections drop and nothing listens. ``forget_members``: a restart
        without persistent members (dynamic members are gone when it comes back)."""
        self.stop()
        if forget_members:
            with self._lock:
                for members in self._queues.values():
                    for key in [k for k, m in members.items() if m.membership == "dynamic"]:
                        del members[key]

    def come_back(self) -> None:
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    # ------------------------------------------------------------------ what happened

    @property
    def actions(self) -> list[ReceivedAction]:
        with self._lock:
            return list(self._actions)

    def actions_named(self, name: str) -> list[ReceivedAction]:
        return [a for a in self.actions if a.name.lower() == name.lower()]

    def wait_for_action(
        self, name: str, pred: Callable[[ReceivedAction], bool] | None = None, *, after: int = 0, timeout: float = 5.0
    ) -> ReceivedAction:
        """The first action ``name`` (matching ``pred``) among those received from index ``after`` on."""
        deadline = time.monotonic() + timeout
        while True:
            for a in self.actions[after:]:
                if a.name.lower() == name.lower() and (pred is None or pred(a)):
                    return a
            if time.monotonic() > deadline:
                seen = [(a.name, a.get("Interface")) for a in self.actions[after:]]
                raise TimeoutError(f"FakeAMI: no {name} within {timeout}s; got {seen}")
            time.sleep(0.01)

    def clear(self) -> None:
        with self._lock:
            self._actions.clear()

    @property
    def clients(self) -> int:
        """Connections logged in right now."""
        with self._lock:
            return sum(1 for c in self._clients if c.authenticated)

    def members(self, queue: str) -> list[Member]:
        with self._lock:
            return [m.copy() for m in self._queues[queue].values()]

    def member(self, queue: str, interface: str) -> Member | None:
        with self._lock:
            m = self._queues[queue].get(interface.lower())
            return m.copy() if m else None

    # ------------------------------------------------------------------ controls

    def add_static_member(self, queue: str, interface: str, name: str = "") -> None:
        """A member from queues.conf: QueueRemove answers "Not dynamic"; survives a restart."""
        with self._lock:
            self._queues[queue][interface.lower()] = Member(
                queue, interface, name or interface, interface, membership="static"
            )

    def refuse_next(self, action: str, message: str) -> None:
        """Answer the next ``action`` with ``Response: Error`` and ``message`` (without acting)."""
        with self._lock:
            self._refuse.setdefault(action.lower(), []).append(message)

    def never_answer(self, action: str, silent: bool = True) -> None:
        """Record ``action`` but never answer it (an Asterisk that hangs)."""
        with self._lock:
            (self._silent.add if silent else self._silent.discard)(action.lower())

    def set_device_state(self, interface: str, status: int, *, in_call: bool | None = None) -> None:
        """The phone behind ``interface`` changes state: ``QueueMemberStatus`` for each queue it is in."""
        if status not in DEVICE_STATES:
            raise ValueError(f"unknown device state {status}")

        def act() -> None:
            with self._lock:
                self._device[interface.lower()] = status
                changed = []
                for members in self._queues.values():
                    m = members.get(interface.lower())
                    if m is not None:
                        if in_call is not None:
                            m.in_call = in_call
                        changed.append(m.copy())
            for m in changed:
                self._broadcast("QueueMemberStatus", m)

        self._on_loop(act)

    def pause_member(self, queue: str, interface: str, paused: bool, reason: str = "") -> None:
        """Paused from the phone (a feature code) or by Asterisk itself: ``QueueMemberPause``."""

        def act() -> None:
            with self._lock:
                m = self._queues[queue].get(interface.lower())
                if m is None:
                    raise KeyError(interface)
                m.paused, m.reason = paused, reason if paused else ""
                m.last_pause = int(time.time()) if paused else m.last_pause
                copy = m.copy()
            self._broadcast("QueueMemberPause", copy)

        self._on_loop(act)

    def emit(self, event: str, **headers: object) -> None:
        """Send any event to every client that asked for events."""

        def act() -> None:
            lines: list[tuple[str, object]] = [("Event", event), ("Privilege", "agent,all"), *headers.items()]
            for c in self._event_clients():
                c.send(*lines)

        self._on_loop(act)

    def drop_connections(self) -> None:
        """Close every client connection (the server keeps listening)."""

        def act() -> None:
            for c in list(self._clients):
                c.writer.close()

        self._on_loop(act)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("FakeAMI is not running")

        async def run() -> None:
            fn()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(run(), loop).result(5)

    # ------------------------------------------------------------------ protocol

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        with self._lock:
            self._connections += 1
            client = _Client(self._connections, writer)
            self._clients.append(client)
        try:
            writer.write(f"Asterisk Call Manager/{self.version}{EOL}".encode())
            headers: list[tuple[str, str]] = []
            while not writer.is_closing():
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line:
                    key, sep, value = line.partition(":")
                    if sep:
                        headers.append((key.strip(), value.strip()))
                    continue
                if headers:
                    packet, headers = headers, []
                    if not await self._handle(client, packet):
                        break
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, client: _Client, packet: list[tuple[str, str]]) -> bool:
        """Answer one packet; False: close the connection."""
        name = next((v for k, v in packet if k.lower() == "action"), "")
        action = ReceivedAction(name, tuple(packet), time.time(), client.number)
        with self._lock:
            self._actions.append(action)
            refusal = self._refuse.get(name.lower())
            refused = refusal.pop(0) if refusal else None
            silent = name.lower() in self._silent
        aid = action.get("ActionID")
        ids: list[tuple[str, object]] = [("ActionID", aid)] if aid is not None else []

        def ok(message: str, *extra: tuple[str, object]) -> None:
            client.send(("Response", "Success"), *ids, ("Message", message), *extra)

        def error(message: str) -> None:
            client.send(("Response", "Error"), *ids, ("Message", message))

        lowered = name.lower()
        if not name:
            error("Missing action in request")
            return True
        if silent:
            return True
        if lowered == "login":
            if action.get("Username") == self.username and action.get("Secret") == self.secret:
                with self._lock:
                    client.authenticated = True
                    client.events = (action.get("Events") or "on").lower() != "off"
                    self.logins += 1
                ok("Authentication accepted")
                if client.events:
                    t = int(time.time())
                    client.send(
                        ("Event", "FullyBooted"),
                        ("Privilege", "system,all"),
                        ("Uptime", t % 100000),
                        ("LastReload", t % 100000),
                        ("Status", "Fully Booted"),
                    )
                return True
            with self._lock:
                self.login_failures += 1
            await asyncio.sleep(0.05)  # Asterisk sleeps a second here
            error("Authentication failed")
            return False
        if lowered == "logoff":
            client.send(("Response", "Goodbye"), *ids, ("Message", "Thanks for all the fish."))
            return False
        if not client.authenticated:
            error("Permission denied")
            return True
        if refused is not None:
            error(refused)
            return True
        if lowered == "ping":
            client.send(("Response", "Success"), *ids, ("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}"))
        elif lowered == "queueadd":
            self._queue_add(action, ok, error)
        elif lowered == "queueremove":
            self._queue_remove(action, ok, error)
        elif lowered == "queuepause":
            self._queue_pause(action, ok, error)
        elif lowered == "queuestatus":
            self._queue_status(client, action, ids)
        else:
            error("Invalid/unknown command")
        return True

    def _queue_add(self, a: ReceivedAction, ok: Callable[..., None], error: Callable[[str], None]) -> None:
        queue, interface = a.get("Queue"), a.get("Interface")
        if not queue or not interface:
            error("'Queue' or 'Interface' not set.")
            return
        with self._lock:
            members = self._queue(queue)
            if members is None:
                error("Unable to add interface to queue: No such queue")
                return
            if interface.lower() in members:
                error("Unable to add interface: Already there")
                return
            paused = _true(a.get("Paused"))
            m = Member(
                self._queue_name(queue),
                interface,
                a.get("MemberName") or interface,
                a.get("StateInterface") or interface,
                penalty=int(a.get("Penalty") or 0),
                paused=paused,
                reason=(a.get("Reason") or "") if paused else "",
            )
            members[interface.lower()] = m
            copy = m.copy()
        ok("Added interface to queue")
        self._broadcast("QueueMemberAdded", copy)

    def _queue_remove(self, a: ReceivedAction, ok: Callable[..., None], error: Callable[[str], None]) -> None:
        queue, interface = a.get("Queue"), a.get("Interface")
        if not queue or not interface:
            error("Need 'Queue' and 'Interface' parameters.")
            return
        with self._lock:
            members = self._queue(queue)
            if members is None:
                error("Unable to remove interface from queue: No such queue")
                return
            m = members.get(interface.lower())
            if m is None:
                error("Unable to remove interface: Not there")
                return
            if m.membership != "dynamic":
                error("Unable to remove interface: Not dynamic")
                return
            del members[interface.lower()]
        ok("Removed interface from queue")
        self._broadcast("QueueMemberRemoved", m)

    def _queue_pause(self, a: ReceivedAction, ok: Callable[..., None], error: Callable[[str], None]) -> None:
        interface, paused_s = a.get("Interface"), a.get("Paused")
        if not interface or not paused_s:
            error("Need 'Interface' and 'Paused' parameters.")
            return
        paused = _true(paused_s)
        queue = a.get("Queue")
        with self._lock:
            if queue:
                members = self._queue(queue)
                targets = [members[interface.lower()]] if members and interface.lower() in members else []
            else:
                targets = [ms[interface.lower()] for ms in self._queues.values() if interface.lower() in ms]
            for m in targets:
                m.paused = paused
                m.reason = (a.get("Reason") or "") if paused else ""
                if paused:
                    m.last_pause = int(time.time())
            copies = [m.copy() for m in targets]
        if not copies:
            error("Interface not found")
            return
        ok(f"Interface {'paused' if paused else 'unpaused'} successfully")
        for m in copies:
            self._broadcast("QueueMemberPause", m)

    def _queue_status(self, client: _Client, a: ReceivedAction, ids: list[tuple[str, object]]) -> None:
        wanted, member_filter = a.get("Queue"), a.get("Member")
        client.send(("Response", "Success"), *ids, ("EventList", "start"), ("Message", "Queue status will follow"))
        items = 0
        with self._lock:
            queues = [
                (q, list(ms.values())) for q, ms in self._queues.items() if not wanted or q.lower() == wanted.lower()
            ]
            rows = [(q, [m.copy() for m in ms]) for q, ms in queues]
        for queue, members in rows:
            client.send(
                ("Event", "QueueParams"),
                *ids,
                ("Queue", queue),
                ("Max", 0),
                ("Strategy", "ringall"),
                ("Calls", 0),
                ("Holdtime", 0),
                ("TalkTime", 0),
                ("Completed", 0),
                ("Abandoned", 0),
                ("ServiceLevel", 0),
                ("ServicelevelPerf", "0.0"),
                ("ServicelevelPerf2", "0.0"),
                ("Weight", 0),
            )
            items += 1
            for m in members:
                if member_filter and member_filter.lower() not in (m.interface.lower(), m.name.lower()):
                    continue
                client.send(
                    ("Event", "QueueMember"),
                    *ids,
                    ("Queue", queue),
                    ("Name", m.name),
                    ("Location", m.interface),
                    ("StateInterface", m.state_interface),
                    ("Membership", m.membership),
                    ("Penalty", m.penalty),
                    ("CallsTaken", m.calls_taken),
                    ("LastCall", m.last_call),
                    ("LastPause", m.last_pause),
                    ("LoginTime", m.login_time),
                    ("InCall", int(m.in_call)),
                    ("Status", self._state_of(m)),
                    ("Paused", int(m.paused)),
                    ("PausedReason", m.reason),
                    ("Wrapuptime", 0),
                )
                items += 1
        client.send(("Event", "QueueStatusComplete"), *ids, ("EventList", "Complete"), ("ListItems", items))

    def _queue(self, name: str) -> dict[str, Member] | None:
        for q, members in self._queues.items():
            if q.lower() == name.lower():  # Asterisk finds queues case-insensitively
                return members
        return None

    def _queue_name(self, name: str) -> str:
        return next(q for q in self._queues if q.lower() == name.lower())

    def _state_of(self, m: Member) -> int:
        return self._device.get(m.state_interface.lower(), self._device.get(m.interface.lower(), 1))

    def _event_clients(self) -> list[_Client]:
        with self._lock:
            return [c for c in self._clients if c.authenticated and c.events]

    def _broadcast(self, event: str, m: Member) -> None:
        """A queue-member event (every one carries the member's full state), to every listening client."""
        with self._lock:
            status = self._state_of(m)
        lines: list[tuple[str, object]] = [
            ("Event", event),
            ("Privilege", "agent,all"),
            ("Queue", m.queue),
            ("MemberName", m.name),
            ("Interface", m.interface),
            ("StateInterface", m.state_interface),
            ("Membership", m.membership),
            ("Penalty", m.penalty),
            ("CallsTaken", m.calls_taken),
            ("LastCall", m.last_call),
            ("LastPause", m.last_pause),
            ("LoginTime", m.login_time),
            ("InCall", int(m.in_call)),
            ("Status", status),
            ("Paused", int(m.paused)),
            ("PausedReason", m.reason),
            ("Ringinuse", 0),
            ("Wrapuptime", 0),
        ]
        if event == "QueueMemberPause":
            lines.append(("Reason", m.reason))
        for c in self._event_clients():
            c.send(*lines)

    def __repr__(self) -> str:
        return f"<FakeAMI {self.host}:{self.port} running={self.running} actions={len(self._actions)}>"
