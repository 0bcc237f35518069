"""The durable outbox: events owed to RapidPro (or Weni), written in the caller's transaction, sent in order.

A conversation's events go out one at a time, oldest first: the next is only tried after the
previous one got its 201 (or was dead-lettered). Different conversations go out concurrently, up to
``outbox_concurrency`` events in flight (see :class:`OutboxWorker`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from sqlalchemy import BindParameter, Float, Table, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.delivery.rapidpro import (
    Outcome,
    RapidProClient,
    backoff_delay,
)
from helpline.delivery.weni import WeniClient
from helpline.runtime import message_status, metrics
from helpline.runtime.core import Core, Tx, now
from helpline.runtime.logs import short_reason
from helpline.store.models import Message, OutboxEvent

log = structlog.get_logger("helpline.outbox")

_OUTBOX: Table = OutboxEvent.__table__  # type: ignore[assignment]
_MESSAGES: Table = Message.__table__  # type: ignore[assignment]


# The worker's statements, built once and run with parameters: building one (aliases, subqueries,
# its cache key) costs more CPU than the database takes to run it, several times per event.
_O = _OUTBOX.c
_T = bindparam("t", type_=Float)
_IDS: BindParameter[Any] = bindparam("ids", expanding=True)
# The oldest pending event of each conversation: the only one of its queue that may go.
# One pass over the (status, conversation_id, id) index.
_HEADS = select(func.min(_O.id).label("id")).where(_O.status == "pending").group_by(_O.conversation_id).subquery()
_SCAN = (
    select(_O.conversation_id, _O.id, _O.next_attempt_at, _O.claimed_until)
    .select_from(_OUTBOX.join(_HEADS, _HEADS.c.id == _O.id))
    .order_by(_O.id)
)
# From the given events to their conversations' heads: per conversation one ``min(id)`` seek in
# ix_outbox_heads, whatever its backlog (a ``GROUP BY conversation_id`` would read every pending
# event of every candidate: 16 ms for 128 conversations of 100 on PostgreSQL).
_GIVEN, _OTHER = _OUTBOX.alias("given"), _OUTBOX.alias("other")
_HEAD_OF_GIVEN = (
    select(func.min(_OTHER.c.id))
    .where(_OTHER.c.status == "pending", _OTHER.c.conversation_id == _GIVEN.c.conversation_id)
    .scalar_subquery()
)
# The due, unclaimed heads of the given events' conversations, leased in the statement that finds
# them. ``status`` again: on PostgreSQL a head another instance has just sent is re-checked here
# once its lock is released (the subquery saw it still pending). ``|| ''`` keeps SQLite on the
# primary key (see _RECORD_SENT).
_CLAIMABLE = _OUTBOX.alias("claimable")
_CLAIM = (
    update(_OUTBOX)
    .where(
        _O.id.in_(
            select(_CLAIMABLE.c.id)
            .where(
                _CLAIMABLE.c.id.in_(select(_HEAD_OF_GIVEN).where(_GIVEN.c.id.in_(_IDS))),
                _CLAIMABLE.c.status.concat("") == "pending",
                _CLAIMABLE.c.next_attempt_at <= _T,
                _CLAIMABLE.c.claimed_until < _T,
            )
            .with_for_update(skip_locked=True, of=_CLAIMABLE)
        )
    )
    .values(claimed_until=bindparam("lease", type_=Float))
    .returning(_O.id, _O.conversation_id, _O.site, _O.target, _O.event, _O.message_ref, _O.payload, _O.attempts)
)
_RECORD_SENT = (
    update(_OUTBOX)
    # ``status || ''``: by the primary key. On ``status = ?`` with an id list SQLite's planner
    # picks ix_outbox_due (status, ...) and walks every pending row instead (90 µs per event at
    # 100,000 pending, against 24 µs).
    .where(_O.id.in_(_IDS), _O.status.concat("") == "pending")
    .values(status="sent", sent_at=_T, attempts=_O.attempts + 1, claimed_until=0.0, last_error=None)
    .returning(_O.site, _O.event, _O.message_ref)
)
_RECORD_RETRY = (
    update(_OUTBOX)
    .where(_O.id == bindparam("b_id"), _O.status == "pending")
    .values(
        attempts=bindparam("b_attempts"),
        next_attempt_at=bindparam("b_next"),
        claimed_until=0.0,
        last_error=bindparam("b_error"),
    )
)
_RECORD_DEAD = (
    update(_OUTBOX)
    .where(_O.id == bindparam("b_id"), _O.status == "pending")
    .values(status="dead", attempts=bindparam("b_attempts"), claimed_until=0.0, last_error=bindparam("b_error"))
)
_M = _MESSAGES.c
_MESSAGE_CHANGED = (_M.id, _M.conversation_id, _M.external_id, _M.counselor_id, _M.status)
# A counselor message is ``sent`` once all its parts are, ``failed`` if one is dead.
_MESSAGES_SENT = (
    update(_MESSAGES)
    .where(
        _M.id.in_(_IDS),
        _M.status == "pending",
        ~select(_O.id).where(_O.message_ref == _M.id, _O.status == "pending").exists(),
    )
    .values(status="sent", status_at=_T)
    .returning(*_MESSAGE_CHANGED)
)
_MESSAGES_FAILED = (
    update(_MESSAGES)
    .where(_M.id.in_(_IDS), _M.status.in_(("pending", "sent")))
    .values(status="failed", status_at=_T)
    .returning(*_MESSAGE_CHANGED)
)

_RETRY_STEP_S = 0.1  # after a failed turn (the store failed), before the next

Peer = tuple[str, str]
"""Who an event goes to: ``("rapidpro", origin of the site's base_url)`` or ``("weni", site)``."""


@dataclass(slots=True)
class _Claimed:
    """One claimed head, as sent: its row's columns at claim time (the claim's lease keeps them)."""

    id: int
    conversation_id: str
    site: str
    target: str
    event: str
    message_ref: int | None
    payload: str
    attempts: int


@dataclass(slots=True)
class _Done:
    """What to write for one attempt: the outcome (after ``outbox_max_attempts``), the new attempt
    count and, for a retry, when the next attempt may be made."""

    ev: _Claimed
    outcome: Outcome
    attempts: int
    next_attempt_at: float | None = None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class OutboxWorker:
    """Sends the heads of the conversations' queues, many at once; retries with backoff.

    A pipeline: up to ``outbox_concurrency`` events are in flight (claimed, sent, not yet recorded),
    at most one per conversation, which keeps each conversation's order. Whenever sends have finished,
    one transaction records their outcomes *and* claims the next heads: the conversations whose event
    just went join the back of the line of those known to be waiting (round robin: no conversation
    waits for another's whole queue), and each claimed conversation's head is found with one index
    seek, not a scan of the backlog.
    A scan of all heads (one ``min(id) ... GROUP BY conversation_id``) runs only when woken (new
    events), on ``poll_interval_s``, and takes no more than ~10 % of the time, but a slow one (the
    store or the event loop busy: its duration is wall time) never holds off the next for more
    than ``poll_interval_s``: new events would wait as long. Heads that got a
    retry are remembered with their due time and come back on their own.

    When a peer that failed answers 2xx again, the backed-off heads of that peer are made due at
    once (but not those a 429 asked to wait): the drain starts as soon as one event gets through
    instead of waiting for each head's backoff (up to ``outbox_backoff_cap_s``).

    Claims are leases (``claimed_until``), taken with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: any
    number of instances share the work; an instance that dies leaves its claims to run out.
    """

    def __init__(self, core: Core, client: RapidProClient | None = None, weni: WeniClient | None = None) -> None:
        self.core = core
        self.client = client or RapidProClient()
        self.weni = weni or WeniClient()
        self._rng = random.Random()
        self._kick = asyncio.Event()  # a send finished, or the outbox was woken
        self._results: list[tuple[_Claimed, Outcome]] = []
        self._unrecorded: list[_Done] = []  # outcomes whose transaction failed: written at the next turn
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # claimed here and not yet recorded
        self._busy: set[str] = set()  # their conversations
        # Conversations whose head may be due, in turn order, each with the id of one of its events
        # (the claim finds the head from it through the index, see _claim).
        self._runnable: dict[str, int] = {}
        self._due: dict[str, tuple[float, int]] = {}  # conversation -> when its head's backoff (or lease) ends
        self._timers: list[tuple[float, str]] = []  # heap over _due (stale entries skipped)
        self._want_scan = True
        self._next_scan_at = 0.0  # monotonic: the scan's throttle
        self._next_poll = 0.0  # monotonic
        self._failing: set[Peer] = set()  # peers whose last answer here asked for a retry
        self._reached: set[Peer] = set()  # peers that answered 2xx since this worker started
        self._failed_steps = 0  # in a row: the store is failing

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        forward = asyncio.create_task(self._forward_wakeups(), name="outbox-wakeups")
        try:
            while True:
                try:
                    busy = await self._step()
                except Exception:
                    log.exception("outbox step failed")
                    self._want_scan = True
                    self._failed_steps += 1
                    # The store is failing: try again soon, then less and less often (outcomes are kept).
                    pause = _RETRY_STEP_S * 2 ** min(self._failed_steps - 1, 10)
                    await asyncio.sleep(min(self.core.settings.poll_interval_s, pause))
                    continue
                self._failed_steps = 0
                if not busy:
                    await self._idle()
        finally:
            forward.cancel()
            tasks = [forward, *self._tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _forward_wakeups(self) -> None:
        """``core.outbox_wakeup`` (new events, a replay, another instance): look at the store again."""
        wakeup = self.core.outbox_wakeup
        while True:
            await wakeup.wait()
            wakeup.clear()
            self._want_scan = True
            self._kick.set()

    async def _idle(self) -> None:
        """Wait for a send to finish, a wake-up, the next head's due time or the poll."""
        s = self.core.settings
        if self._in_flight >= s.outbox_concurrency:
            timeout = s.poll_interval_s  # nothing can be claimed before a send finishes
        else:
            t = time.monotonic()
            until = self._next_poll
            if self._timers:
                until = min(until, self._timers[0][0] - now() + t)
            if self._want_scan:
                until = min(until, self._next_scan_at)
            timeout = min(s.poll_interval_s, max(0.0, until - t))
        if not self._kick.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)

    async def _step(self) -> bool:
        """Record what finished, claim what may go now, start sending it. False: nothing to do."""
        self._kick.clear()
        s = self.core.settings
        t = now()
        mono = time.monotonic()
        results, self._results = self._results, []
        free = s.outbox_concurrency - self._in_flight + len(results)
        if mono >= self._next_poll:
            self._want_scan = True
        if self._want_scan and free > 0 and mono >= self._next_scan_at:
            await self._scan()  # before the results leave _busy: their rows are still claimed
        # Finished: out of flight now. Their rows stay claimed until recorded below (or, should that
        # fail, until their lease runs out and they are tried again: at least once).
        self._in_flight -= len(results)
        self._busy.difference_update(ev.conversation_id for ev, _ in results)
        done = self._unrecorded + [self._plan(ev, outcome, t) for ev, outcome in results]
        self._unrecorded = []
        self._fire_timers(t)
        candidates: dict[str, int] = {}
        while self._runnable and len(candidates) < free:
            conv = next(iter(self._runnable))
            ref = self._runnable.pop(conv)
            if conv not in self._busy:
                candidates[conv] = ref
        if not done and not candidates:
            return False
        recovered = {self._peer(d.ev) for d in done if d.outcome.kind == "sent"}
        recovered = {p for p in recovered if p in self._failing or p not in self._reached}
        try:
            claimed, resumed = await self._cycle(done, candidates, recovered)
        except Exception:
            # The store failed (SQLite busy, PostgreSQL restarting): the outcomes are kept and written
            # at the next turn (their rows stay claimed meanwhile); the candidates wait their turn.
            self._unrecorded = done
            for conv, ref in candidates.items():
                self._runnable.setdefault(conv, ref)
            raise
        self._failing -= recovered
        self._reached |= recovered
        for conv, ref in resumed:
            self._runnable.setdefault(conv, ref)
        for ev in claimed:
            self._start(ev)
        return True

    def _plan(self, ev: _Claimed, outcome: Outcome, t: float) -> _Done:
        """What to write for one attempt; a conversation whose event went is next in line again."""
        s = self.core.settings
        attempts = ev.attempts + 1
        if outcome.kind == "retry" and s.outbox_max_attempts and attempts >= s.outbox_max_attempts:
            outcome = Outcome("dead", f"gave up after {attempts} attempts: {outcome.reason}")
        if outcome.kind != "retry":
            self._runnable.setdefault(ev.conversation_id, ev.id)
            return _Done(ev, outcome, attempts)
        delay = backoff_delay(
            attempts,
            base=s.outbox_backoff_base_s,
            cap=s.outbox_backoff_cap_s,
            retry_after=outcome.retry_after,
            rng=self._rng,
        )
        if outcome.status != 429:  # a 429 is a peer that works and asks us to slow down
            self._failing.add(self._peer(ev))
        self._set_timer(ev.conversation_id, t + delay, ev.id)
        return _Done(ev, outcome, attempts, t + delay)

    def _start(self, ev: _Claimed) -> None:
        self._in_flight += 1
        self._busy.add(ev.conversation_id)
        task = asyncio.create_task(self._deliver(ev))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, ev: _Claimed) -> None:
        try:
            outcome = await self._send(ev)
        except Exception as exc:  # a bug here, not the peer's answer: try again later
            log.exception("outbox send failed", outbox_id=ev.id)
            outcome = Outcome("retry", f"internal error: {type(exc).__name__}")
        self._results.append((ev, outcome))
        self._kick.set()

    async def _send(self, ev: _Claimed) -> Outcome:
        if ev.target == "weni":
            return await self.weni.deliver(self.core.settings, ev.payload)
        site = self.core.sites.get(ev.site)
        if site is None:
            return Outcome("dead", f"site {ev.site!r} is no longer configured")
        return await self.client.send(site.rapidpro, ev.payload)  # the stored JSON text, as it is

    # ------------------------------------------------------------------ timers and peers

    def _set_timer(self, conv: str, when: float, ref: int) -> None:
        due = self._due.get(conv)
        if due is None or due[0] != when:
            heapq.heappush(self._timers, (when, conv))
        self._due[conv] = (when, ref)

    def _fire_timers(self, t: float) -> None:
        while self._timers and self._timers[0][0] <= t:
            when, conv = heapq.heappop(self._timers)
            due = self._due.get(conv)
            if due is not None and due[0] == when:
                del self._due[conv]
                self._runnable.setdefault(conv, due[1])

    def _peer(self, ev: _Claimed) -> Peer:
        if ev.target == "rapidpro":
            site = self.core.sites.get(ev.site)
            if site is not None:
                return ("rapidpro", _origin(site.rapidpro.base_url))
        return (ev.target, ev.site)

    def _peer_sites(self, peer: Peer) -> list[str]:
        target, key = peer
        if target == "rapidpro":
            return [site.slug for site in self.core.sites if _origin(site.rapidpro.base_url) == key]
        return [key]

    # ------------------------------------------------------------------ store

    async def _scan(self) -> None:
        """All heads: the due ones join the line, the others get a timer. Read-only, no lock."""
        started = time.monotonic()
        t = now()
        try:
            async with self.core.sessionmaker() as session:
                rows = (await session.execute(_SCAN)).all()
        except Exception:
            log.exception("outbox scan failed")
            rows = []
        for conv, head, next_attempt_at, claimed_until in rows:
            if conv in self._busy:
                continue
            if claimed_until >= t:  # another instance has it: look again when its lease runs out
                self._set_timer(conv, claimed_until, head)
            elif next_attempt_at > t:
                self._set_timer(conv, next_attempt_at, head)
            else:
                self._runnable.setdefault(conv, head)
        finished = time.monotonic()
        self._want_scan = False
        self._next_scan_at = finished + min(9 * (finished - started), self.core.settings.poll_interval_s)
        self._next_poll = finished + self.core.settings.poll_interval_s

    async def _cycle(
        self, done: list[_Done], candidates: dict[str, int], recovered: set[Peer]
    ) -> tuple[list[_Claimed], list[tuple[str, int]]]:
        """One transaction: the outcomes, the backoffs cut short, the next claims."""
        t = now()
        async with self.core.tx() as tx:
            if done:
                await self._record(tx, done, t)
            resumed: list[tuple[str, int]] = []
            for peer in recovered:
                resumed += await self._cut_short(tx.session, peer, t)
            claimed = await self._claim(tx.session, candidates, t)
        return claimed, resumed

    async def _claim(self, session: AsyncSession, candidates: dict[str, int], t: float) -> list[_Claimed]:
        """Lease the due, unclaimed heads of these conversations (each given by one of its events)."""
        if not candidates:
            return []
        lease = t + self.core.settings.outbox_lease_s
        rows = (await session.execute(_CLAIM, {"ids": list(candidates.values()), "t": t, "lease": lease})).all()
        order = {conv: i for i, conv in enumerate(candidates)}
        claimed = [_Claimed(*r) for r in rows]
        claimed.sort(key=lambda c: order.get(c.conversation_id, len(order)))
        return claimed

    async def _cut_short(self, session: AsyncSession, peer: Peer, t: float) -> list[tuple[str, int]]:
        """The peer answers again: its backed-off heads are due now (except those a 429 delayed)."""
        o = _OUTBOX.c
        rows = (
            await session.execute(
                update(_OUTBOX)
                .where(
                    o.status == "pending",
                    o.next_attempt_at > t,
                    o.claimed_until < t,
                    o.target == peer[0],
                    o.site.in_(self._peer_sites(peer)),
                    or_(o.last_error.is_(None), o.last_error.not_like("HTTP 429%")),
                )
                .values(next_attempt_at=t)
                .returning(o.conversation_id, o.id)
            )
        ).all()
        if rows:
            log.info("outbox peer reachable again", peer=peer[1], resumed=len(rows))
        return [(r.conversation_id, r.id) for r in rows]

    async def _record(self, tx: Tx, done: list[_Done], t: float) -> None:
        """The outcomes of a batch: a few statements, whatever its size."""
        session = tx.session
        sent_ids = [d.ev.id for d in done if d.outcome.kind == "sent"]
        sent_refs: list[int] = []
        if sent_ids:
            rows = (await session.execute(_RECORD_SENT, {"ids": sent_ids, "t": t})).all()
            counts = collections.Counter((r.site, r.event) for r in rows)
            for (site, event), n in counts.items():
                metrics.OUTBOX_SENT.labels(site, event).inc(n)
            sent_refs = [r.message_ref for r in rows if r.message_ref is not None]
        retries = [d for d in done if d.outcome.kind == "retry"]
        if retries:
            await session.execute(
                _RECORD_RETRY,
                [
                    {
                        "b_id": d.ev.id,
                        "b_attempts": d.attempts,
                        "b_next": d.next_attempt_at,
                        "b_error": d.outcome.reason,
                    }
                    for d in retries
                ],
            )
            for d in retries:
                metrics.OUTBOX_RETRIES.labels(d.ev.site).inc()
                log.info(
                    "outbox retry",
                    outbox_id=d.ev.id,
                    attempts=d.attempts,
                    delay=round((d.next_attempt_at or t) - t, 3),
                    reason=short_reason(d.outcome.reason),
                )
        dead = [d for d in done if d.outcome.kind == "dead"]
        if dead:
            await session.execute(
                _RECORD_DEAD,
                [{"b_id": d.ev.id, "b_attempts": d.attempts, "b_error": d.outcome.reason} for d in dead],
            )
            for d in dead:
                metrics.OUTBOX_DEAD.labels(d.ev.site).inc()
                log.warning(
                    "outbox dead letter",
                    outbox_id=d.ev.id,
                    outbox_event=d.ev.event,
                    reason=short_reason(d.outcome.reason),
                )
        await _update_message_status(
            tx, sent=sent_refs, failed=[d.ev.message_ref for d in dead if d.ev.message_ref is not None], t=t
        )


async def _update_message_status(tx: Tx, *, sent: list[int], failed: list[int], t: float) -> None:
    """A counselor message is ``sent`` once all its parts are, ``failed`` if one is dead."""
    changed: list[Any] = []
    if sent:
        changed += (await tx.session.execute(_MESSAGES_SENT, {"ids": sorted(set(sent)), "t": t})).all()
    if failed:
        changed += (await tx.session.execute(_MESSAGES_FAILED, {"ids": sorted(set(failed)), "t": t})).all()
    for row in sorted(changed, key=lambda r: r.id):
        message_status.announce(
            tx,
            counselor_id=row.counselor_id,
            conversation_id=row.conversation_id,
            message_id=row.external_id,
            status=row.status,
        )
