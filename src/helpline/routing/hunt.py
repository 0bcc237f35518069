"""The hunting engine: offers queued conversations to counselors and re-hunts lapsed offers.

Every deadline lives in the store, so a restarted process (or another instance) picks up where
this one stopped. The loop sleeps until the next deadline or until something wakes it.

Per site and step: overflow (routing/overflow.py), client notices (domain/notices.py: a closed
site is not hunted), then offers. ``roundrobin`` remembers the last counselor offered per site in
this process's memory: across hunts, not across restarts, and each instance of a cluster keeps its
own turn (the order stays fair per instance; good enough for the one-instance default).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import structlog
from sqlalchemy import func, select

from helpline import metrics
from helpline.domain import notices
from helpline.domain.core import Core, Tx, now
from helpline.domain.offers import make_offer, requeue_if_unoffered
from helpline.domain.sites import Site
from helpline.domain.states import ConversationStatus, OfferStatus, move_offer
from helpline.routing.overflow import overflow_pass
from helpline.routing.presence import candidates
from helpline.routing.strategies import Candidate, offers_per_round, order
from helpline.store.models import Agent, Conversation, Offer

log = structlog.get_logger("helpline.hunt")

BATCH = 200


class Hunter:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._rng = random.Random()
        self._rr_last: dict[str, int] = {}  # roundrobin: the last counselor offered, per site
        self._next_retry: float | None = None

    async def run(self) -> None:
        while True:
            self.core.hunter_wakeup.clear()
            try:
                await self.step()
                wait = await self._until_next_deadline()
            except Exception:
                log.exception("hunt step failed")
                wait = self.core.settings.poll_interval_s
            try:
                await asyncio.wait_for(self.core.hunter_wakeup.wait(), timeout=max(0.0, wait))
            except TimeoutError:
                pass

    async def step(self) -> None:
        self._next_retry = None
        while await self.lapse_due():
            pass
        for site in self.core.sites:
            await self.hunt_site(site)

    def _wake(self, at: float) -> None:
        """Come back at ``at`` (a retry gap, a wrap-up's end, an opening, a notice or overflow due)."""
        self._next_retry = at if self._next_retry is None else min(self._next_retry, at)

    async def _until_next_deadline(self) -> float:
        async with self.core.sessionmaker() as s:
            nxt = await s.scalar(select(func.min(Offer.deadline)).where(Offer.status == OfferStatus.PENDING))
        wait = self.core.settings.poll_interval_s
        t = now()
        if nxt is not None:
            wait = min(wait, nxt - t)
        if self._next_retry is not None:
            wait = min(wait, self._next_retry - t)
        return wait

    async def lapse_due(self) -> int:
        """Time out the offers whose deadline has passed; their conversations go back to the queue."""
        t = now()
        async with self.core.tx() as tx:
            due = (
                await tx.session.scalars(
                    select(Offer)
                    # Locks the conversation with its offer (skipping both when either is busy), so
                    # the lapse never waits on a row while holding one: see lock_conversation_of.
                    .join(Conversation, Conversation.id == Offer.conversation_id)
                    .where(Offer.status == OfferStatus.PENDING, Offer.deadline <= t)
                    .order_by(Offer.deadline)
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for offer in due:
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
                await self._autopause(tx, offer)
                await requeue_if_unoffered(tx, offer.conversation_id)
            if due:
                log.info("offers lapsed", count=len(due))
            return len(due)

    async def _autopause(self, tx: Tx, offer: Offer) -> None:
        site = self.core.sites.get(offer.site)
        if site is None or not site.routing.autopause_on_no_answer:
            return
        agent = await tx.session.get(Agent, offer.counselor_id, with_for_update=True)
        if agent is None or agent.status != "available":
            return
        agent.status = "paused"
        agent.reason = "no answer"
        agent.since = now()
        view = {"status": "paused", "reason": "no answer", "since": None, "wrapup_until": None}
        tx.notify(agent.user_id, "presence", presence=view)
        tx.notify_site(agent.site, "presence", counselor_id=agent.user_id, presence=view)

    async def hunt_site(self, site: Site) -> None:
        t = now()
        await overflow_pass(self.core, site, t, self._wake)
        if not await notices.site_notices(self.core, site, t, self._wake):
            return  # closed: conversations wait (told out_of_hours) until the site opens
        async with self.core.tx() as tx:
            queued = (
                await tx.session.scalars(
                    select(Conversation)
                    .where(Conversation.site == site.slug, Conversation.status == ConversationStatus.QUEUED)
                    .order_by(Conversation.risk_rank.desc(), Conversation.queued_at, Conversation.id)
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not queued:
                return
            await self._wake_after_wrapup(tx, site, t)
            cands = {c.counselor_id: c for c in await candidates(tx.session, site, t)}
            if not cands:
                return
            for conv in queued:
                eligible = await self._eligible(tx, conv, list(cands.values()), site, t)
                if not eligible:
                    continue
                ordered = order(site.routing.strategy, eligible, last=self._rr_last.get(site.slug), rng=self._rng)
                for cand in ordered[: offers_per_round(site.routing.strategy, ordered)]:
                    await make_offer(tx, site, conv, cand.counselor_id, t)
                    self._rr_last[site.slug] = cand.counselor_id
                    updated = Candidate(cand.counselor_id, cand.active + 1, cand.last_assigned_at, t)
                    if updated.active >= site.routing.max_chats_per_counselor:
                        del cands[cand.counselor_id]
                    else:
                        cands[cand.counselor_id] = updated
                if not cands:
                    break

    async def _wake_after_wrapup(self, tx: Tx, site: Site, t: float) -> None:
        """Conversations are waiting: hunt again the moment a counselor's wrap-up ends."""
        ends = await tx.session.scalar(
            select(func.min(Agent.wrapup_until)).where(
                Agent.site == site.slug, Agent.status == "available", Agent.wrapup_until > t
            )
        )
        if ends is not None:
            self._wake(ends)

    async def _eligible(
        self, tx: Tx, conv: Conversation, cands: Sequence[Candidate], site: Site, t: float
    ) -> list[Candidate]:
        """Counselors who have not yet let this conversation lapse (or declined it) come first.

        When every candidate has, the one whose miss is oldest gets it again, once ``retry_gap_s``
        has passed since the last miss: the hunt never stops, and never ping-pongs between two
        absent counselors while a third is free.
        """
        rows = (
            await tx.session.execute(
                select(Offer.counselor_id, func.max(func.coalesce(Offer.resolved_at, Offer.created_at)))
                .where(
                    Offer.conversation_id == conv.id,
                    Offer.status.in_([OfferStatus.TIMED_OUT, OfferStatus.DECLINED]),
                )
                .group_by(Offer.counselor_id)
            )
        ).all()
        missed: dict[int, float] = {uid: at for uid, at in rows}
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
