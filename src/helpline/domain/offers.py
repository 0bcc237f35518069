"""Offers: a conversation put in front of one counselor until they read it or the deadline passes."""

from __future__ import annotations

from sqlalchemy import func, select

from helpline import metrics
from helpline.domain.core import Tx
from helpline.domain.sites import Site
from helpline.domain.states import ConversationStatus, OfferStatus, move_conversation
from helpline.domain.views import offer_view
from helpline.store.models import Conversation, Offer


async def make_offer(tx: Tx, site: Site, conv: Conversation, counselor_id: int, t: float) -> Offer:
    """Offer ``conv`` to a counselor, with a stored deadline, and push it to their console."""
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
    await tx.session.flush()
    metrics.OFFERS_MADE.labels(site.slug).inc()
    tx.notify(counselor_id, "offer", offer=offer_view(offer, conv))
    tx.notify_site(site.slug, "queue_changed", conversation_id=conv.id)
    return offer


async def requeue_if_unoffered(tx: Tx, conversation_id: str) -> None:
    """An offered conversation with no pending offer left goes back to the queue, keeping its place."""
    conv = await tx.session.get(Conversation, conversation_id, with_for_update=True)
    if conv is None or conv.status != ConversationStatus.OFFERED:
        return
    pending = await tx.session.scalar(
        select(func.count()).where(Offer.conversation_id == conversation_id, Offer.status == OfferStatus.PENDING)
    )
    if not pending:
        conv.status = move_conversation(conv.status, ConversationStatus.QUEUED)
        tx.wake_hunter = True
        tx.notify_site(conv.site, "queue_changed", conversation_id=conv.id)


async def lock_conversation_of(tx: Tx, offer_id: int) -> None:
    """Lock the conversation of offer ``offer_id`` before the offer itself.

    Rows are locked in one order everywhere: a conversation, then its offers, then agents (closing,
    hunting and transfers lock the conversation first). A path that locked an offer first, then its
    conversation, would deadlock on PostgreSQL with one going the other way: two counselors reading
    ringall offers of one conversation at once, or a read racing the chatbot's close.
    """
    conversation_id = await tx.session.scalar(select(Offer.conversation_id).where(Offer.id == offer_id))
    if conversation_id is not None:
        await tx.session.execute(select(Conversation.id).where(Conversation.id == conversation_id).with_for_update())
