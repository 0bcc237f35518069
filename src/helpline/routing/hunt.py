"""The hunting engine: offers queued conversations to counselors and re-hunts lapsed offers.

Every deadline lives in the store, so a restarted process (or another instance) picks up where
this one stopped.

The loop is driven by wake-ups and timers: it sleeps until ``core.hunter_wakeup`` is set (a
conversation queued, a counselor free, an offer declined...) or until the earliest offer deadline
or retry time, exactly (an asyncio timer at that instant; ``poll_interval_s`` only bounds the
sleep, as a safety net for what no wake-up announces). A round is **one** short write
transaction:

1. one statement surveys the store: which sites have offers past their deadline, which have
   queued conversations, and the next deadline still ahead;
2. the due offers are lapsed (all sites at once), their counselors auto-paused where the site
   says so, their conversations put back in the queue;
3. each site with queued conversations is hunted; a site with nothing to do costs nothing more.

So a lapsed offer's ``offer_withdrawn`` and the next counselor's ``offer`` commit together and are
published together, right after that commit.

Sites with more to do than offers (an ``overflow_site``, business hours, position notices) keep
their passes in the order they always had: lapse (in the round's transaction), overflow
(routing/overflow.py), client notices (domain/notices.py: a closed site is not hunted), then
offers in a transaction of their own.

``roundrobin`` remembers the last counselor offered per site in this process's memory: across
hunts, not across restarts, and each instance of a cluster keeps its own turn (the order stays
fair per instance; good enough for the one-instance default).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import structlog
from sqlalchemy import CompoundSelect, Float, String, bindparam, cast, exists, func, literal, null, select, union_all

from helpline.config.sites import Site
from helpline.domain import notices
from helpline.domain.offers import add_offer, offers_made, requeue_unoffered
from helpline.domain.states import ConversationStatus, OfferStatus, move_offer
from helpline.routing.overflow import overflow_pass
from helpline.routing.presence import candidates
from helpline.routing.strategies import STORE_ORDERED_STRATEGIES, Candidate, offers_per_round, order
from helpline.runtime import metrics
from helpline.runtime.core import Core, Tx, now
from helpline.store.models import Agent, Conversation, Offer

log = structlog.get_logger("helpline.hunt")

BATCH = 200
# For a strategy the store orders: how many free counselors a round reads first (more when the
# queue or the conversations' missed offers need more).
FIRST_CANDIDATES = 16
# Due offers another transaction held (SKIP LOCKED passed them by, on PostgreSQL): look again this soon.
BUSY_RETRY_S = 0.05

# The hunter's statements, built once and run with parameters (``:t`` the round's time, ``:slug``
# a site): building them costs more CPU than SQLite takes to run them.
_T = bindparam("t", type_=Float)
_SLUG = bindparam("slug", type_=String)

# The survey: (what, site, how many, when) rows, each part read from an index (no part reads
# every pending offer or every queued conversation):
# ("due", site, n, -) pending offers past their deadline, per site;
# ("next", -, -, at) the earliest pending deadline still ahead;
# ("queued", site, -, -) for each site with at least one queued conversation.
_DUE_BY_SITE = (
    select(literal("due"), Offer.site, func.count(), cast(null(), Float))
    .where(Offer.status == OfferStatus.PENDING, Offer.deadline <= _T)
    .group_by(Offer.site)
)
_NEXT_DEADLINE = select(literal("next"), cast(null(), String), literal(0), func.min(Offer.deadline)).where(
    Offer.status == OfferStatus.PENDING, Offer.deadline > _T
)
_SURVEYS: dict[tuple[str, ...], CompoundSelect[str, str | None, int, float | None]] = {}


def _survey_statement(slugs: tuple[str, ...]) -> CompoundSelect[str, str | None, int, float | None]:
    """Built once per set of sites (they can change while running)."""
    found = _SURVEYS.get(slugs)
    if found is None:
        queued = [
            select(literal("queued"), literal(slug), literal(0), cast(null(), Float)).where(
                exists().where(Conversation.site == slug, Conversation.status == ConversationStatus.QUEUED)
            )
            for slug in slugs
        ]
        found = _SURVEYS[slugs] = union_all(_DUE_BY_SITE, _NEXT_DEADLINE, *queued)
    return found


# Locks the conversation with its offer (skipping both when either is busy), so the lapse never
# waits on a row while holding one: see domain.offers.lock_conversation_of.
_DUE = (
    select(Offer, Conversation)
    .join(Conversation, Conversation.id == Offer.conversation_id)
    .where(Offer.status == OfferStatus.PENDING, Offer.deadline <= _T)
    .order_by(Offer.deadline, Offer.id)
    .limit(BATCH)
    .with_for_update(skip_locked=True)
)
_DUE_AT_SITES = _DUE.where(Offer.site.in_(bindparam("sites", expanding=True)))

# Missed: a counselor let it lapse or declined it. Read with the queue, so that only conversations
# offered before cost a look at their offers (_MISSED): a new one costs no round trip more.
_MISSED_STATUSES = (OfferStatus.TIMED_OUT, OfferStatus.DECLINED)
_MISSED_ONCE = (
    exists().where(Offer.conversation_id == Conversation.id, Offer.status.in_(_MISSED_STATUSES)).label("missed")
)
_QUEUE = (
    select(Conversation, _MISSED_ONCE)
    .where(Conversation.site == _SLUG, Conversation.status == ConversationStatus.QUEUED)
    .order_by(*notices.QUEUE_ORDER)
    .limit(BATCH)
    .with_for_update(skip_locked=True, of=Conversation)
)

_ANY_QUEUED = (
    select(Conversation.id).where(Conversation.site == _SLUG, Conversation.status == ConversationStatus.QUEUED).limit(1)
)

# Per conversation and counselor: when they last let it lapse or declined it.
_MISSED = (
    select(Offer.conversation_id, Offer.counselor_id, func.max(func.coalesce(Offer.resolved_at, Offer.created_at)))
    .where(
        Offer.conversation_id.in_(bindparam("ids", expanding=True)),
        Offer.status.in_(_MISSED_STATUSES),
    )
    .group_by(Offer.conversation_id, Offer.counselor_id)
)

# Agents after conversations and offers, in id order: see domain.offers.lock_conversation_of.
_AGENTS = (
    select(Agent).where(Agent.user_id.in_(bindparam("ids", expanding=True))).order_by(Agent.user_id).with_for_update()
)

_WRAPUP_ENDS = select(func.min(Agent.wrapup_until)).where(
    Agent.site == _SLUG, Agent.status == "available", Agent.wrapup_until > _T
)


@dataclass
class Survey:
    """What needs doing, from one statement."""

    due: dict[str, int] = field(default_factory=dict)  # site -> pending offers past their deadline
    queued: set[str] = field(default_factory=set)  # sites with queued conversations
    next_deadline: float | None = None  # the earliest pending deadline still ahead


@dataclass
class Lapsed:
    count: int = 0
    requeued: set[str] = field(default_factory=set)  # sites of the conversations back in the queue


def has_passes(site: Site) -> bool:
    """Whether hunting ``site`` involves more than offers: overflow, opening hours, position notices."""
    r = site.routing
    return (
        (r.overflow_site is not None and r.max_overflow_depth > 0)
        or not site.hours.is_always
        or bool(site.hours.holidays)
        or r.position_notice_s > 0
    )


class Hunter:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._rng = random.Random()
        self._rr_last: dict[str, int] = {}  # roundrobin: the last counselor offered, per site
        self._next_wake: float | None = None

    async def run(self) -> None:
        while True:
            self.core.hunter_wakeup.clear()  # a wake-up during the round below starts another one
            try:
                at = await self.step()
            except Exception:
                log.exception("hunt step failed")
                at = now() + self.core.settings.poll_interval_s
            wait = at - now()
            if wait <= 0:
                continue
            # A timer at ``at`` exactly; ``asyncio.timeout`` spares wait_for's task (and its hop).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.core.hunter_wakeup.wait()

    def _wake(self, at: float) -> None:
        """Come back at ``at`` (a deadline, a retry gap, a wrap-up's end, an opening, a notice...)."""
        self._next_wake = at if self._next_wake is None else min(self._next_wake, at)

    async def step(self) -> float:
        """One round: lapse what is due, offer what is queued. Returns when the next round is due
        (wall clock), unless something wakes the hunter before."""
        self._next_wake = now() + self.core.settings.poll_interval_s
        with_passes = [site for site in self.core.sites if has_passes(site)]
        async with self.core.tx() as tx:
            t = now()  # once the write lock is ours: offers get their whole timeout
            survey = await self.survey(tx, t)
            if survey.next_deadline is not None:
                self._wake(survey.next_deadline)
            lapsed = Lapsed()
            if survey.due:
                lapsed = await self._lapse(tx, t)
                if lapsed.count < sum(survey.due.values()) and lapsed.count < BATCH:
                    # Held by another transaction: it may be reading them, or letting go of them.
                    self._wake(t + BUSY_RETRY_S)
            hunt = (survey.queued | lapsed.requeued) - {site.slug for site in with_passes}
            for site in self.core.sites:
                if site.slug in hunt:
                    await self._hunt(tx, site, t, queued=True)
        for site in with_passes:
            await self._site_with_passes(site)
        return self._next_wake

    async def survey(self, tx: Tx, t: float) -> Survey:
        """The sites with due offers or queued conversations, and the next deadline: one statement."""
        statement = _survey_statement(tuple(site.slug for site in self.core.sites))
        out = Survey()
        for what, site, n, at in (await tx.session.execute(statement, {"t": t})).all():
            if what == "next":
                out.next_deadline = None if at is None else float(at)
            elif site is not None:
                if what == "due":
                    out.due[site] = int(n)
                else:
                    out.queued.add(site)
        return out

    async def _site_with_passes(self, site: Site) -> None:
        t = now()
        await overflow_pass(self.core, site, t, self._wake)
        if not await notices.site_notices(self.core, site, t, self._wake):
            return  # closed: conversations wait (told out_of_hours) until the site opens
        await self.hunt_site(site)

    async def hunt_site(self, site: Site) -> int:
        """Lapse the site's due offers, then offer its queued conversations: one transaction.
        Returns how many offers lapsed."""
        async with self.core.tx() as tx:
            t = now()
            lapsed = await self._lapse(tx, t, sites=[site.slug])
            await self._hunt(tx, site, t, queued=bool(lapsed.requeued) or None)
            return lapsed.count

    async def lapse_due(self) -> int:
        """Only time out the offers whose deadline has passed, waking the hunter for their
        conversations, back in the queue (a round does both at once). Returns how many lapsed."""
        total = 0
        while True:
            async with self.core.tx() as tx:
                lapsed = await self._lapse(tx, now(), wake=True)
            total += lapsed.count
            if lapsed.count < BATCH:
                return total

    async def _lapse(self, tx: Tx, t: float, *, sites: Collection[str] | None = None, wake: bool = False) -> Lapsed:
        """Lapse up to ``BATCH`` offers due at ``t``, in ``tx``."""
        if sites is None:
            due = (await tx.session.execute(_DUE, {"t": t})).all()
        else:
            due = (await tx.session.execute(_DUE_AT_SITES, {"t": t, "sites": list(sites)})).all()
        if not due:
            return Lapsed()
        convs: dict[str, Conversation] = {}
        for offer, conv in due:
            offer.status = move_offer(offer.status, OfferStatus.TIMED_OUT)
            offer.resolved_at = t
            metrics.OFFERS_LAPSED.labels(offer.site).inc()
            tx.notify(
                offer.counselor_id,
                "offer_withdrawn",
                offer_id=offer.id,
                conversation_id=offer.conversation_id,
                reason="timed_out",
            )
            convs[conv.id] = conv
        await self._autopause(tx, [offer for offer, _ in due], t)
        back = await requeue_unoffered(tx, list(convs.values()), wake=wake)
        log.info("offers lapsed", count=len(due))
        if len(due) == BATCH:
            self._wake(t)  # more may be due: another round at once
        return Lapsed(len(due), {conv.site for conv in back})

    async def _autopause(self, tx: Tx, lapsed: Sequence[Offer], t: float) -> None:
        """Counselors who let an offer lapse are paused (``no answer``) where their site says so."""
        ids = set()
        for offer in lapsed:
            site = self.core.sites.get(offer.site)
            if site is not None and site.routing.autopause_on_no_answer:
                ids.add(offer.counselor_id)
        if not ids:
            return
        agents = (await tx.session.scalars(_AGENTS, {"ids": sorted(ids)})).all()
        for agent in agents:
            if agent.status != "available":
                continue
            agent.status = "paused"
            agent.reason = "no answer"
            agent.since = t
            view = {"status": "paused", "reason": "no answer", "since": None, "wrapup_until": None}
            tx.notify(agent.user_id, "presence", presence=view)
            tx.notify_site(agent.site, "presence", counselor_id=agent.user_id, presence=view)

    async def _hunt(self, tx: Tx, site: Site, t: float, *, queued: bool | None) -> None:
        """Offer the site's queued conversations to its free counselors, in ``tx``.

        ``queued``: whether conversations are known to be waiting (``None``: unknown).
        """
        # Counselors first: with nobody free, the queue is not even loaded. For a strategy the
        # store orders (STORE_ORDERED_STRATEGIES), only the first few free counselors in its order.
        first = FIRST_CANDIDATES if site.routing.strategy in STORE_ORDERED_STRATEGIES else None
        after = self._rr_last.get(site.slug)  # roundrobin's turn
        found = await candidates(tx.session, site, t, first=first, after=after)
        if not found:
            if queued if queued is not None else await self._any_queued(tx, site):
                await self._wake_after_wrapup(tx, site, t)
            return
        rows = (await tx.session.execute(_QUEUE, {"slug": site.slug})).all()
        if not rows:
            return
        waiting = [conv for conv, _ in rows]
        missed = await self._missed(tx, [conv.id for conv, missed_once in rows if missed_once])
        more = first is not None and len(found) == first  # free counselors past the first few
        if more:
            # Enough of the order's head that each waiting conversation finds there the counselor
            # the strategy would pick from everyone: one offer each takes at most one counselor
            # out, and those who missed it are passed over.
            need = len(waiting) + len({uid for who in missed.values() for uid in who})
            if need > len(found):
                found = await candidates(tx.session, site, t, first=need, after=after)
                more = len(found) == need
        cands = {c.counselor_id: c for c in found}
        made: list[tuple[Offer, Conversation]] = []
        left = 0  # conversations that stay in the queue
        for i, conv in enumerate(waiting):
            if not cands:
                left += len(waiting) - i
                break
            eligible = self._eligible(missed.get(conv.id, {}), list(cands.values()), site, t)
            if not eligible:
                left += 1
                continue
            ordered = order(site.routing.strategy, eligible, last=self._rr_last.get(site.slug), rng=self._rng)
            for cand in ordered[: offers_per_round(site.routing.strategy, ordered)]:
                offer = add_offer(tx, site, conv, cand.counselor_id, t)
                made.append((offer, conv))
                self._wake(offer.deadline)
                self._rr_last[site.slug] = cand.counselor_id
                updated = Candidate(cand.counselor_id, cand.active + 1, cand.last_assigned_at, t)
                if updated.active >= site.routing.max_chats_per_counselor:
                    del cands[cand.counselor_id]
                else:
                    cands[cand.counselor_id] = updated
        if made:
            await tx.session.flush()  # the round's offers in one go: their ids, for the events
            offers_made(tx, made)
        if left:
            await self._wake_after_wrapup(tx, site, t)  # conversations wait: a wrap-up's end frees someone
        elif len(waiting) == BATCH and (cands or more):
            self._wake(t)  # the queue goes on past this batch and counselors are free: at once

    async def _any_queued(self, tx: Tx, site: Site) -> bool:
        return await tx.session.scalar(_ANY_QUEUED, {"slug": site.slug}) is not None

    async def _wake_after_wrapup(self, tx: Tx, site: Site, t: float) -> None:
        """Conversations are waiting: hunt again the moment a counselor's wrap-up ends."""
        ends = await tx.session.scalar(_WRAPUP_ENDS, {"slug": site.slug, "t": t})
        if ends is not None:
            self._wake(ends)

    async def _missed(self, tx: Tx, conversation_ids: Sequence[str]) -> dict[str, dict[int, float]]:
        """Per conversation: the counselors who let it lapse or declined it, and when they last did."""
        if not conversation_ids:
            return {}
        rows = (await tx.session.execute(_MISSED, {"ids": list(conversation_ids)})).all()
        out: dict[str, dict[int, float]] = {}
        for cid, uid, at in rows:
            out.setdefault(cid, {})[uid] = at
        return out

    def _eligible(self, missed: dict[int, float], cands: Sequence[Candidate], site: Site, t: float) -> list[Candidate]:
        """Counselors who have not yet let this conversation lapse (or declined it) come first.

        When every candidate has, the one whose miss is oldest gets it again, once ``retry_gap_s``
        has passed since the last miss: the hunt never stops, and never ping-pongs between two
        absent counselors while a third is free.
        """
        if not missed:
            return list(cands)
        others = [c for c in cands if c.counselor_id not in missed]
        if others:
            return others
        last_miss = max(missed.values())
        if t - last_miss < site.routing.retry_gap_s:
            self._wake(last_miss + site.routing.retry_gap_s)
            return []
        oldest = min(missed[c.counselor_id] for c in cands)
        return [c for c in cands if missed[c.counselor_id] == oldest]
