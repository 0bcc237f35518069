"""Asterisk presence over AMI (panoramisk): a site's phone queue follows the chat queue, and a
counselor on a call, or paused in Asterisk, gets no chat offers.

- "Join queue" (available) -> ``QueueAdd`` (``Paused: false``), or ``QueuePause`` ``Paused: false``
  when already a member; pause -> ``QueuePause`` ``Paused: true`` with the reason; leave (offline)
  -> ``QueueRemove``. The interface is the site's template filled with the counselor's extension.
- Events (``QueueMemberStatus``/``Pause``/``Added``/``Removed``, ``AgentCalled``/``Connect``/
  ``Complete``/``RingNoAnswer``/``Dump``) update ``phone_states`` in the store, so every instance's
  hunter sees them (routing.presence). A phone turning busy withdraws the counselor's pending offers.
- On every login (first connect and reconnects) and every ``resync_s``: ``QueueStatus``, then the
  phone states are rewritten and membership is repaired from helpline's presence.
- The connection is re-made with exponential backoff. While it is down the phone state is unknown:
  it is forgotten (nobody is kept from chats by a stale "on a call") and presence changes wait for
  the resync at the next login. Nothing here fails a chat call: a failed action is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from panoramisk import Manager
from panoramisk.ami_protocol import AMIProtocol
from prometheus_client import Counter, Gauge
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from helpline.config.sites import AsteriskConfig, Site
from helpline.domain.counselors import withdraw_offers_of
from helpline.runtime import metrics
from helpline.runtime.core import Core, now
from helpline.runtime.presence import PresenceChange
from helpline.store.models import Agent, PhoneState, User

log = structlog.get_logger("helpline.asterisk")
_ami_log = logging.getLogger("helpline.asterisk.ami")

# Asterisk device states (AST_DEVICE_*) in which the phone counts as busy.
NOT_INUSE, INUSE, BUSY, RINGING, RINGINUSE, ONHOLD = 1, 2, 3, 6, 7, 8
BUSY_STATES = frozenset({INUSE, BUSY, RINGING, RINGINUSE, ONHOLD})

MEMBER_EVENTS = frozenset({"queuememberstatus", "queuememberpause", "queuememberadded", "queuemember"})
CALL_STARTS = frozenset({"agentcalled", "agentconnect"})
CALL_ENDS = frozenset({"agentcomplete", "agentringnoanswer", "agentdump"})
QUEUE_EVENTS = MEMBER_EVENTS | CALL_STARTS | CALL_ENDS | {"queuememberremoved"}

_NEVER = 10**7  # panoramisk's blind pinger is switched off: SiteLink pings and waits for the answer
_LINE_BREAKS = re.compile(r"[\r\n]+")

CONNECTED = Gauge(
    "helpline_asterisk_connected", "1 while logged in to the site's Asterisk (AMI)", ["site"], registry=metrics.REGISTRY
)
ACTION_FAILURES = Counter(
    "helpline_asterisk_action_failures",
    "AMI actions that Asterisk refused",
    ["site", "action"],
    registry=metrics.REGISTRY,
)


class AmiUnavailable(Exception):
    """Not logged in to AMI, the connection dropped, or no answer in time."""


def header(value: str, limit: int = 80) -> str:
    """A value safe for one AMI header line: no line breaks (they would inject headers), cut."""
    return _LINE_BREAKS.sub(" ", value).strip()[:limit]


def _true(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on", "y", "t")


def _int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        return 0


def member_fields(msg: Any) -> dict[str, Any]:
    """Phone-state fields from a ``QueueMember*`` event (or a ``QueueStatus`` ``QueueMember`` row)."""
    fields: dict[str, Any] = {"member": True}
    if "Status" in msg:
        fields["status"] = _int(msg["Status"])
    if "InCall" in msg:
        fields["in_call"] = _true(msg["InCall"])
    if "Paused" in msg:
        paused = _true(msg["Paused"])
        fields["paused"] = paused
        reason = msg.get("PausedReason") or msg.get("Reason") or ""
        fields["reason"] = (header(str(reason), 128) or None) if paused else None
    return fields


def event_fields(msg: Any) -> dict[str, Any]:
    name = str(msg.get("Event", "")).lower()
    if name == "queuememberremoved":
        return {"member": False, "status": 0, "in_call": False, "paused": False, "reason": None}  # no news
    if name in CALL_STARTS:
        return {"in_call": True}
    if name in CALL_ENDS:
        return {"in_call": False}
    return member_fields(msg)


def interface_of(msg: Any) -> str:
    return str(msg.get("Interface") or msg.get("Location") or "")


@dataclass(frozen=True)
class Person:
    """A counselor of the site with an extension, and their helpline presence (None: never set)."""

    user_id: int
    interface: str
    name: str
    status: str | None
    reason: str | None


class _Manager(Manager):  # type: ignore[misc]  # panoramisk is untyped
    """One AMI connection: panoramisk's Manager, minus its fixed-delay reconnects (SiteLink backs off)."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.lost = asyncio.Event()

    def connection_lost(self, exc: Any) -> None:
        self._connected = False
        pinger: asyncio.TimerHandle | None = getattr(self, "pinger", None)
        if pinger is not None:
            pinger.cancel()
        self.pinger = None
        self.lost.set()


_RESYNC = object()


@dataclass(frozen=True)
class _Write:
    """Phone-state fields to store, in turn with the events (the events task applies both, in order)."""

    user_id: int
    fields: dict[str, Any]


_SYNCED = object()  # in the events queue after a resync's writes: they are all applied
_FORGET = object()  # in the events queue when the connection is down: the phones' state is unknown


class SiteLink:
    """One site's AMI connection, the worker that sends its actions, and the one that applies its events."""

    def __init__(self, core: Core, site: Site, config: AsteriskConfig) -> None:
        self.core = core
        self.site = site
        self.cfg = config
        self.manager: _Manager | None = None  # logged in: actions may be sent
        self._conn: _Manager | None = None  # connected (maybe not yet logged in): its events count
        self._todo: asyncio.Queue[object] = asyncio.Queue()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._resync_queued = False
        self._forgotten = False
        self._interfaces: dict[str, int] = {}
        self._interfaces_at = 0.0
        self._seq = 0  # queue events received so far on any connection, in wire order
        self._seen: dict[str, int] = {}  # interface (lower case) -> _seq of its latest event
        self.logins = 0  # successful logins so far (tests and logs)
        self.synced = asyncio.Event()  # set after each resync, cleared when the connection drops
        self._log = log.bind(site=site.slug, host=config.host, port=config.port, queue=config.queue)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._connection_loop(), name=f"asterisk-{self.site.slug}"),
            asyncio.create_task(self._work(), name=f"asterisk-{self.site.slug}-actions"),
            asyncio.create_task(self._apply_events(), name=f"asterisk-{self.site.slug}-events"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self._close()

    def submit(self, change: PresenceChange) -> None:
        self._todo.put_nowait(change)

    def _request_resync(self) -> None:
        if not self._resync_queued:
            self._resync_queued = True
            self._todo.put_nowait(_RESYNC)

    async def _connection_loop(self) -> None:
        delay = self.cfg.reconnect_min_s
        while True:
            logged_in = False
            try:
                logged_in = await self._session()
            except Exception:
                self._log.exception("asterisk session failed")
            finally:
                self._close()
            self._events.put_nowait(_FORGET)
            if logged_in:
                delay = self.cfg.reconnect_min_s
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def _session(self) -> bool:
        """Connect, log in and stay until the connection drops; True if the login succeeded."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        manager = _Manager(
            host=cfg.host,
            port=cfg.port,
            username=cfg.username,
            secret=cfg.secret,
            events="on",
            encoding="utf8",
            loop=loop,
            log=_ami_log,
            ping_delay=_NEVER,
            ping_interval=_NEVER,
        )
        manager.register_event("*", self._on_event)
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(AMIProtocol, cfg.host, cfg.port), timeout=cfg.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            self._log.warning("asterisk unreachable", error=str(exc) or type(exc).__name__)
            return False
        self._conn = manager
        connected: asyncio.Future[tuple[Any, Any]] = loop.create_future()
        connected.set_result((transport, protocol))
        manager.connection_made(connected)  # wires the protocol to the manager and sends Login
        try:
            answer = await self._wait(manager, manager.authenticated_future)
        except AmiUnavailable as exc:
            self._log.warning("asterisk login got no answer", error=str(exc))
            return False
        if not answer.success:
            self._log.warning("asterisk login refused", username=cfg.username, message=str(answer.message))
            return False
        self.manager = manager
        self.logins += 1
        CONNECTED.labels(self.site.slug).set(1)
        self._log.info("asterisk connected", logins=self.logins)
        self._request_resync()
        last_resync = loop.time()
        while not manager.lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(manager.lost.wait(), timeout=min(cfg.ping_s, cfg.resync_s))
                break
            try:
                await self._action({"Action": "Ping"})
            except AmiUnavailable as exc:
                self._log.warning("asterisk stopped answering", error=str(exc))
                break
            if loop.time() - last_resync >= cfg.resync_s:
                last_resync = loop.time()
                self._request_resync()
        self._log.warning("asterisk connection lost")
        return True

    def _close(self) -> None:
        manager, self.manager, self._conn = self._conn, None, None
        self.synced.clear()
        CONNECTED.labels(self.site.slug).set(0)
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()

    async def _wait(self, manager: _Manager, future: Any) -> Any:
        """An action's answer, unless the connection drops or ``timeout_s`` passes first."""
        if future is None:
            raise AmiUnavailable("nothing sent")
        lost = asyncio.ensure_future(manager.lost.wait())
        try:
            done, _ = await asyncio.wait(
                {future, lost}, timeout=self.cfg.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
        if future in done:
            return future.result()
        raise AmiUnavailable("connection lost" if manager.lost.is_set() else f"no answer within {self.cfg.timeout_s}s")

    async def _action(self, action: dict[str, str], *, as_list: bool | None = False) -> Any:
        manager = self.manager
        if manager is None or manager.lost.is_set():
            raise AmiUnavailable("not connected")
        return await self._wait(manager, manager.send_action(action, as_list=as_list))

    # ------------------------------------------------------------------ presence -> Asterisk

    async def _work(self) -> None:
        while True:
            item = await self._todo.get()
            try:
                if item is _RESYNC:
                    self._resync_queued = False
                    await self._resync()
                elif isinstance(item, PresenceChange):
                    await self._follow(item)
            except AmiUnavailable as exc:
                what = "resync" if item is _RESYNC else getattr(item, "status", "?")
                self._log.warning("asterisk unavailable: will resync at the next login", action=what, error=str(exc))
            except Exception:
                self._log.exception("asterisk presence action failed")

    async def _follow(self, change: PresenceChange) -> None:
        if self.manager is None:
            raise AmiUnavailable("not connected")
        person = await self._person(change.counselor_id)
        if person is None:
            return  # no extension: not a phone counselor
        if change.status == "available":
            self._events.put_nowait(_Write(person.user_id, {"paused": False, "reason": None}))  # unpaused below
            await self._join(person)
        elif change.status == "paused":
            await self._pause(person, change.reason)
        elif change.status == "offline":
            await self._leave(person)

    def _queue_add(self, person: Person, *, paused: bool, reason: str | None = None) -> dict[str, str]:
        action = {
            "Action": "QueueAdd",
            "Queue": self.cfg.queue,
            "Interface": person.interface,
            "MemberName": header(person.name) or person.interface,
            "Paused": "true" if paused else "false",
        }
        if paused and reason:
            action["Reason"] = header(reason)
        return action

    def _queue_pause(self, person: Person, *, paused: bool, reason: str | None = None) -> dict[str, str]:
        action = {
            "Action": "QueuePause",
            "Queue": self.cfg.queue,
            "Interface": person.interface,
            "Paused": "true" if paused else "false",
        }
        if paused:
            action["Reason"] = header(reason or "")
        return action

    async def _join(self, person: Person) -> None:
        first = await self._action(self._queue_add(person, paused=False))
        if first.success:
            return
        # Already a member (perhaps paused): unpause instead.
        self._check("QueuePause", person, await self._action(self._queue_pause(person, paused=False)), first)

    async def _pause(self, person: Person, reason: str | None) -> None:
        first = await self._action(self._queue_pause(person, paused=True, reason=reason))
        if first.success:
            return
        # Not a member yet: join paused.
        self._check("QueueAdd", person, await self._action(self._queue_add(person, paused=True, reason=reason)), first)

    async def _leave(self, person: Person) -> None:
        answer = await self._action({"Action": "QueueRemove", "Queue": self.cfg.queue, "Interface": person.interface})
        if not answer.success and "not there" not in str(answer.message).lower():
            self._check("QueueRemove", person, answer)

    def _check(self, action: str, person: Person, answer: Any, earlier: Any = None) -> None:
        if answer.success:
            return
        ACTION_FAILURES.labels(self.site.slug, action).inc()
        self._log.warning(
            "asterisk refused an action",
            action=action,
            counselor_id=person.user_id,
            interface=person.interface,
            message=str(answer.message),
            earlier=None if earlier is None else str(earlier.message),
        )

    async def _person(self, user_id: int) -> Person | None:
        people = await self._people(user_id)
        return people[0] if people else None

    async def _people(self, user_id: int | None = None) -> list[Person]:
        q = (
            select(User.id, User.extension, User.name, Agent.status, Agent.reason)
            .outerjoin(Agent, Agent.user_id == User.id)
            .where(User.site == self.site.slug, User.extension.is_not(None), User.active.is_(True))
        )
        if user_id is not None:
            q = q.where(User.id == user_id)
        async with self.core.sessionmaker() as s:
            rows = (await s.execute(q.order_by(User.id))).all()
        people = [
            Person(uid, self.cfg.interface_for(ext or ""), name, st, reason) for uid, ext, name, st, reason in rows
        ]
        for p in people:
            self._interfaces[p.interface.lower()] = p.user_id
        return people

    async def _resync(self) -> None:
        """Read the queue, rewrite the phone states, and make membership follow helpline's presence."""
        mark = self._seq
        answer = await self._action({"Action": "QueueStatus", "Queue": self.cfg.queue}, as_list=None)
        messages: Iterable[Any] = answer if isinstance(answer, list) else [answer]
        queue = self.cfg.queue.lower()
        members = {
            interface_of(m).lower(): m
            for m in messages
            if str(m.get("Event", "")).lower() == "queuemember" and str(m.get("Queue", "")).lower() == queue
        }
        people = await self._people()
        self._interfaces = {p.interface.lower(): p.user_id for p in people}
        self._interfaces_at = now()
        for person in people:
            m = members.get(person.interface.lower())
            fields = (
                member_fields(m)
                if m is not None
                else {"member": False, "status": 0, "in_call": False, "paused": False, "reason": None}
            )
            is_paused = bool(fields.get("paused"))
            if person.status == "available" and is_paused:
                fields.update(paused=False, reason=None)  # unpaused below
            if self._seen.get(person.interface.lower(), 0) <= mark:  # else an event since says more
                self._events.put_nowait(_Write(person.user_id, fields))
            try:
                dynamic = m is None or str(m.get("Membership", "dynamic")).lower() == "dynamic"
                await self._repair(person, member=m is not None, paused=is_paused, dynamic=dynamic)
            except AmiUnavailable:
                raise
            except Exception:
                self._log.exception("asterisk resync failed for a counselor", counselor_id=person.user_id)
        self._events.put_nowait(_SYNCED)
        self._log.info("asterisk resynced", members=len(members), counselors=len(people))

    async def _repair(self, person: Person, *, member: bool, paused: bool, dynamic: bool) -> None:
        if person.status == "available":
            if not member:
                self._check("QueueAdd", person, await self._action(self._queue_add(person, paused=False)))
            elif paused:
                self._check("QueuePause", person, await self._action(self._queue_pause(person, paused=False)))
        elif person.status == "paused":
            if not member:
                action = self._queue_add(person, paused=True, reason=person.reason)
                self._check("QueueAdd", person, await self._action(action))
            elif not paused:
                action = self._queue_pause(person, paused=True, reason=person.reason)
                self._check("QueuePause", person, await self._action(action))
        elif person.status == "offline" and member and dynamic:  # queues.conf members are not ours to remove
            await self._leave(person)

    # ------------------------------------------------------------------ Asterisk -> phone states

    def _on_event(self, manager: Any, message: Any) -> None:
        """panoramisk's callback, for every event of the connection."""
        if manager is not self._conn:
            return
        name = str(message.get("Event", "")).lower()
        if name not in QUEUE_EVENTS or str(message.get("Queue", "")).lower() != self.cfg.queue.lower():
            return
        self._seq += 1
        self._seen[interface_of(message).lower()] = self._seq
        self._events.put_nowait(message)

    async def _apply_events(self) -> None:
        """Store events and resync writes one at a time, in the order they came."""
        while True:
            item = await self._events.get()
            try:
                if item is _SYNCED:
                    if self.manager is not None:
                        self._forgotten = False
                        self.synced.set()
                elif item is _FORGET:
                    await self._forget()
                elif isinstance(item, _Write):
                    await self._set_state(item.user_id, **item.fields)
                else:
                    user_id = await self._user_for(interface_of(item))
                    if user_id is not None:
                        await self._set_state(user_id, **event_fields(item))
            except Exception:
                self._log.warning("asterisk phone state not stored", item=repr(item)[:200], exc_info=True)

    async def _user_for(self, interface: str) -> int | None:
        key = interface.lower()
        if key not in self._interfaces and now() - self._interfaces_at > 1.0:
            self._interfaces_at = now()
            await self._people()  # a counselor created since the last look
        return self._interfaces.get(key)

    async def _set_state(self, user_id: int, **fields: Any) -> None:
        for attempt in (1, 2):
            try:
                await self._write_state(user_id, fields)
                return
            except IntegrityError:  # another instance inserted the row first: update it
                if attempt == 2:
                    raise

    async def _write_state(self, user_id: int, fields: dict[str, Any]) -> None:
        t = now()
        async with self.core.tx() as tx:
            row = await tx.session.get(PhoneState, user_id, with_for_update=True)
            if row is None:
                row = PhoneState(
                    user_id=user_id,
                    site=self.site.slug,
                    member=False,
                    status=0,
                    in_call=False,
                    busy=False,
                    paused=False,
                    reason=None,
                    updated_at=t,
                )
                tx.session.add(row)
            was_busy, was_blocked = row.busy, row.busy or row.paused
            for key, value in fields.items():
                setattr(row, key, value)
            row.busy = row.in_call or row.status in BUSY_STATES
            row.updated_at = t
            if row.busy and not was_busy:
                # On a call: offers still pending go to someone else now, not after they lapse.
                # (The row's lock comes before the conversations': nothing locks them the other way.)
                await withdraw_offers_of(tx, user_id, reason="phone_busy")
            if was_blocked and not (row.busy or row.paused):
                tx.wake_hunter = True

    async def _forget(self) -> None:
        """The connection is down: the phones' state is unknown, and nobody is kept from chats by it."""
        if self._forgotten or self.manager is not None:  # once per outage; not if already back
            return
        async with self.core.tx() as tx:
            await tx.session.execute(
                update(PhoneState)
                .where(PhoneState.site == self.site.slug)
                .values(member=False, status=0, in_call=False, busy=False, paused=False, reason=None, updated_at=now())
            )
            tx.wake_hunter = True
        self._forgotten = True


class AsteriskPresence:
    """The presence sink of the sites that have ``[site.asterisk]``: one :class:`SiteLink` each."""

    def __init__(self, core: Core) -> None:
        self.links = {s.slug: SiteLink(core, s, s.asterisk) for s in core.sites if s.asterisk is not None}

    @classmethod
    def for_core(cls, core: Core) -> AsteriskPresence | None:
        found = cls(core)
        return found if found.links else None

    async def presence_changed(self, change: PresenceChange) -> None:
        link = self.links.get(change.site)
        if link is not None:
            link.submit(change)

    async def run(self) -> None:
        await asyncio.gather(*(link.run() for link in self.links.values()))
