"""Offers: a conversation put in front of one counselor until they read it or the deadline passes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Integer, bindparam, select

from helpline.config.sites import Site
from helpline.domain.states import ConversationStatus, OfferStatus, move_conversation
from helpline.domain.views import offer_view
from helpline.runtime import metrics
from helpline.runtime.core import Tx
from helpline.store.models import Conversation, Offer


def add_offer(tx: Tx, site: Site, conv: Conversation, counselor_id: int, t: float) -> Offer:
    """Offer ``conv`` (locked) to a counselor, with a stored deadline; no flush, no event yet.

    The hunter adds a round's offers this way, flushes them together (one round trip, however
    many offers) and then calls :func:`offers_made`.
    """
    if conv.status != ConversationStatus.OFFERED:
        conv.status = move_conversation(conv.status, ConversationStatus.OFFERED)
    offer = Offer(
        conversation_id=conv.id,
        counselor_id=counselor_id,
        site=site.slug,
        status=OfferStatus.PENDING.value,
        created_at=t,
        deadline=t + site.routing.offer_timeout_s,
    )
    tx.session.add(offer)
    return offer


def offers_made(tx: Tx, made: Iterable[tuple[Offer, Conversation]]) -> None:
    """Push flushed offers to their counselors' consoles (once the transaction commits)."""
    for offer, conv in made:
        metrics.OFFERS_MADE.labels(offer.site).inc()
        tx.notify(offer.counselor_id, "offer", offer=offer_view(offer, conv))
        tx.notify_site(offer.site, "queue_changed", conversation_id=conv.id)


async def make_offer(tx: Tx, site: Site, conv: Conversation, counselor_id: int, t: float) -> Offer:
    """Offer ``conv`` to a counselor, with a stored deadline, and push it to their console."""
    offer = add_offer(tx, site, conv, counselor_id, t)
    await tx.session.flush()
    offers_made(tx, [(offer, conv)])
    return offer


def _requeue(tx: Tx, conv: Conversation, *, wake: bool = True) -> None:
    conv.status = move_conversation(conv.status, ConversationStatus.QUEUED)
    tx.wake_hunter = tx.wake_hunter or wake
    tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)


# Those of conversations ``:ids`` that still have a pending offer (built once: see routing.hunt).
_STILL_OFFERED = (
    select(Offer.conversation_id)
    .where(Offer.conversation_id.in_(bindparam("ids", expanding=True)), Offer.status == OfferStatus.PENDING)
    .distinct()
)


async def requeue_unoffered(tx: Tx, convs: Sequence[Conversation], *, wake: bool = True) -> list[Conversation]:
    """The offered conversations of ``convs`` (locked, loaded) with no pending offer left go back
    to the queue, keeping their place: one query for all of them.

    Returns those that went back to the queue. ``wake=False``: the caller (the hunter, after a
    lapse) hunts them again in the same transaction, so nobody needs waking for them.
    """
    offered = {c.id: c for c in convs if c.status == ConversationStatus.OFFERED}
    if not offered:
        return []
    still = set((await tx.session.scalars(_STILL_OFFERED, {"ids": list(offered)})).all())
    back = [c for cid, c in offered.items() if cid not in still]
    for conv in back:
        _requeue(tx, conv, wake=wake)
    return back


# Only the conversation's row is locked (FOR UPDATE applies to the outer FROM, not the subquery).
_CONVERSATION_OF = (
    select(Conversation)
    .where(
        Conversation.id
        == select(Offer.conversation_id).where(Offer.id == bindparam("offer_id", type_=Integer)).scalar_subquery()
    )
    .with_for_update()
)


async def lock_conversation_of(tx: Tx, offer_id: int) -> Conversation | None:
    """Lock (and load) the conversation of offer ``offer_id`` before the offer itself: one statement.
    None when there is no such offer.

    Rows are locked in one order everywhere: a conversation, then its offers, then agents (closing,
    hunting and transfers lock the conversation first). A path that locked an offer first, then its
    conversation, would deadlock on PostgreSQL with one going the other way: two counselors reading
    ringall offers of one conversation at once, or a read racing the chatbot's close.
    """
    return await tx.session.scalar(_CONVERSATION_OF, {"offer_id": offer_id})
