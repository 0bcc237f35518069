"""Client notices through RapidPro while a conversation waits for a counselor.

Events (``params`` values are strings, see delivery/outbox.py):

- ``queued`` when a conversation is created at an open site (and again when a closed site opens):
  ``position`` in the site's queue, ``estimated_wait_s``, ``site`` (the site's name);
- ``position`` every ``position_notice_s`` while waiting, only when the position changed;
- ``out_of_hours`` instead of hunting while the site is closed: ``next_open`` (ISO 8601 in the
  site's time zone, empty if it never opens again), ``position``, ``site``;
- ``overflow`` when the conversation moves to another site (routing/overflow.py): ``position`` and
  ``estimated_wait_s`` there, ``site`` (the new site's name);
- ``assigned`` (domain/counselors.py) when a counselor reads the offer: ``counselor_name``.

``queued``, ``position`` and ``overflow`` carry the same params, built by :func:`tell_position`.
Every notice is written under the conversation's row lock, like every other event of the
conversation, so the outbox keeps their order (a ``position`` never overtakes ``assigned``).
What was last told is stored on the conversation: a restart (or another instance) neither repeats
nor forgets a notice.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from sqlalchemy import Float, Integer, String, and_, bindparam, cast, func, literal, or_, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from helpline.config import hours
from helpline.config.sites import Site
from helpline.domain.outbox import contact_site, enqueue_event
from helpline.domain.states import ConversationStatus
from helpline.runtime.core import Core, Tx
from helpline.store.models import Conversation

WAITING = (ConversationStatus.QUEUED.value, ConversationStatus.OFFERED.value)
RECENT_WAITS = 20  # how many recent assignments the estimate looks at
DEFAULT_WAIT_S = 60.0  # the estimate when the site has assigned nothing yet
BATCH = 200

# The hunting order: risk high > medium > low, then longest waiting.
QUEUE_ORDER = (Conversation.risk_rank.desc(), Conversation.queued_at, Conversation.id)

Wake = Callable[[float], None]


def estimate_wait(waits: Sequence[float], default: float = DEFAULT_WAIT_S) -> int:
    """Seconds a newcomer can expect to wait: the median of recent queue waits, else ``default``."""
    return round(statistics.median(waits)) if waits else round(default)


# Statements run for every new conversation (in the chatbot's POST), built once and run with
# parameters: building them costs more CPU than SQLite takes to run them.
_SITE = bindparam("site", type_=String)
_RECENT_WAITS = (
    select(Conversation.assigned_at - Conversation.queued_at)
    .where(Conversation.site == _SITE, Conversation.assigned_at.is_not(None))
    .order_by(Conversation.assigned_at.desc())
    .limit(bindparam("limit", type_=Integer))
)
_ID = bindparam("id", type_=String)
_RANK = bindparam("rank", type_=Integer)
_QUEUED_AT = bindparam("queued_at", type_=Float)
_AHEAD = select(func.count()).where(
    Conversation.site == _SITE,
    Conversation.status.in_(WAITING),
    Conversation.id != _ID,
    or_(
        Conversation.risk_rank > _RANK,
        and_(
            Conversation.risk_rank == _RANK,
            or_(Conversation.queued_at < _QUEUED_AT, and_(Conversation.queued_at == _QUEUED_AT, Conversation.id < _ID)),
        ),
    ),
)


# Both at once for a conversation joining a queue: (0, how many come before it) and (1, a recent
# wait) rows, one round trip.
_RECENT = _RECENT_WAITS.subquery()
_AHEAD_AND_WAITS = union_all(
    _AHEAD.with_only_columns(literal(0), cast(func.count(), Float)),
    select(literal(1), cast(_RECENT.c[0], Float)),
)


async def recent_waits(session: AsyncSession, site: str, limit: int = RECENT_WAITS) -> list[float]:
    """How long the site's last ``limit`` assigned conversations waited (queued -> read)."""
    rows = await session.scalars(_RECENT_WAITS, {"site": site, "limit": limit})
    return [max(0.0, float(w)) for w in rows if w is not None]


def _place(conv: Conversation) -> dict[str, object]:
    """``_AHEAD``'s parameters: where ``conv`` stands in its site's hunting order."""
    return {"site": conv.site, "id": conv.id, "rank": conv.risk_rank, "queued_at": conv.queued_at}


async def position_of(session: AsyncSession, conv: Conversation) -> int:
    """1 + the waiting conversations of its site that come before it in the hunting order."""
    ahead = await session.scalar(_AHEAD, _place(conv))
    return 1 + int(ahead or 0)


async def position_and_waits(session: AsyncSession, conv: Conversation) -> tuple[int, list[float]]:
    """``position_of(conv)`` and ``recent_waits`` of its site, in one statement."""
    ahead, waits = 0, []
    for kind, value in (await session.execute(_AHEAD_AND_WAITS, {**_place(conv), "limit": RECENT_WAITS})).all():
        if kind == 0:
            ahead = int(value or 0)
        elif value is not None:
            waits.append(max(0.0, float(value)))
    return 1 + ahead, waits


def enter_queue(conv: Conversation, site: Site, t: float) -> None:
    """``conv`` joins ``site``'s queue at ``t`` (a transfer or an overflow).

    Its events keep going through the site it came in through (``origin_site``), and notices
    start afresh: a transferred conversation gets no position updates (it is not "in line" the
    way a new one is); an overflowed one is told ``overflow`` with its new position.
    """
    if conv.origin_site is None:
        conv.origin_site = conv.site
    conv.site = site.slug
    conv.site_since = t
    conv.notice_position = None
    conv.notice_at = None
    conv.closed_notice_at = None


def next_open_iso(site: Site, t: float) -> str:
    at = hours.next_open(site.hours, site.zone, t)
    return "" if at is None else hours.local_iso(at, site.zone)


def tell_position(
    core: Core, tx: Tx, conv: Conversation, event: str, t: float, position: int, waits: Sequence[float]
) -> None:
    """``event`` (``queued``, ``position`` or ``overflow``) with where ``conv`` stands in its site's
    queue: ``position``, ``estimated_wait_s`` (from ``waits``) and ``site`` (the site's name).
    Position updates count from here."""
    enqueue_event(
        tx,
        contact_site(core, conv),
        conv,
        event,
        position=str(position),
        estimated_wait_s=str(estimate_wait(waits)),
        site=core.site(conv.site).name,
    )
    conv.notice_position = position
    conv.notice_at = t


async def tell_queued(
    core: Core, tx: Tx, conv: Conversation, t: float, *, waits: Sequence[float] | None = None
) -> None:
    """``queued`` with the position and the estimated wait; position updates start from here."""
    if waits is None:
        position, waits = await position_and_waits(tx.session, conv)
    else:
        position = await position_of(tx.session, conv)
    tell_position(core, tx, conv, "queued", t, position, waits)
    conv.closed_notice_at = None


async def tell_out_of_hours(core: Core, tx: Tx, conv: Conversation, t: float) -> None:
    site = core.site(conv.site)
    position = await position_of(tx.session, conv)
    enqueue_event(
        tx,
        contact_site(core, conv),
        conv,
        "out_of_hours",
        next_open=next_open_iso(site, t),
        position=str(position),
        site=site.name,
    )
    conv.closed_notice_at = t


async def conversation_created(core: Core, tx: Tx, conv: Conversation, t: float) -> None:
    """The first notice of a new conversation: ``queued``, or ``out_of_hours`` when the site is closed."""
    site = core.site(conv.site)
    if hours.is_open(site.hours, site.zone, t):
        await tell_queued(core, tx, conv, t)
    else:
        await tell_out_of_hours(core, tx, conv, t)


async def _lock(tx: Tx, ids: Sequence[str], site: str) -> Sequence[Conversation]:
    """The conversations ``ids`` still waiting at ``site``, locked (those busy elsewhere skipped)."""
    if not ids:
        return []
    return (
        await tx.session.scalars(
            select(Conversation)
            .where(Conversation.id.in_(ids), Conversation.site == site, Conversation.status.in_(WAITING))
            .order_by(Conversation.id)
            .with_for_update(skip_locked=True)
        )
    ).all()


async def site_notices(core: Core, site: Site, t: float, wake: Wake) -> bool:
    """The hunter's notice pass for one site. Returns whether the site is open (hunt it or not).

    Closed: each queued conversation not told yet gets ``out_of_hours``; the hunter wakes when the
    site opens. Open: conversations told ``out_of_hours`` get ``queued``; then, with
    ``position_notice_s``, those whose position changed get ``position`` (at most once per period).
    """
    is_open = hours.is_open(site.hours, site.zone, t)
    if not is_open:
        await _closed_pass(core, site, t, wake)
        return False
    if not site.hours.is_always or site.hours.holidays:
        await _reopened_pass(core, site, t)
    if site.routing.position_notice_s > 0:
        await _position_pass(core, site, t, wake)
    return True


async def _closed_pass(core: Core, site: Site, t: float, wake: Wake) -> None:
    async with core.tx() as tx:
        ids = (
            await tx.session.scalars(
                select(Conversation.id).where(Conversation.site == site.slug, Conversation.status.in_(WAITING)).limit(1)
            )
        ).all()
        if not ids:
            return
        opens = hours.next_open(site.hours, site.zone, t)
        if opens is not None:
            wake(opens)
        untold = (
            await tx.session.scalars(
                select(Conversation.id)
                .where(
                    Conversation.site == site.slug,
                    Conversation.status == ConversationStatus.QUEUED,
                    Conversation.closed_notice_at.is_(None),
                )
                .order_by(*QUEUE_ORDER)
                .limit(BATCH)
            )
        ).all()
        for conv in await _lock(tx, untold, site.slug):
            if conv.status == ConversationStatus.QUEUED and conv.closed_notice_at is None:
                await tell_out_of_hours(core, tx, conv, t)


async def _reopened_pass(core: Core, site: Site, t: float) -> None:
    async with core.tx() as tx:
        told = (
            await tx.session.scalars(
                select(Conversation.id)
                .where(
                    Conversation.site == site.slug,
                    Conversation.status.in_(WAITING),
                    Conversation.closed_notice_at.is_not(None),
                )
                .order_by(*QUEUE_ORDER)
                .limit(BATCH)
            )
        ).all()
        if not told:
            return
        waits = await recent_waits(tx.session, site.slug)
        for conv in await _lock(tx, told, site.slug):
            if conv.closed_notice_at is not None:
                await tell_queued(core, tx, conv, t, waits=waits)


async def _position_pass(core: Core, site: Site, t: float, wake: Wake) -> None:
    every = site.routing.position_notice_s
    async with core.tx() as tx:
        rows = (
            await tx.session.execute(
                select(Conversation.id, Conversation.notice_position, Conversation.notice_at)
                .where(Conversation.site == site.slug, Conversation.status.in_(WAITING))
                .order_by(*QUEUE_ORDER)
            )
        ).all()
        due: dict[str, int] = {}
        for position, (cid, told, told_at) in enumerate(rows, start=1):
            if told is None or told == position:
                continue  # never told (a transfer, a closed site), or nothing new to tell
            at = (told_at or 0.0) + every
            if at <= t:
                due[cid] = position
            else:
                wake(at)
        if not due:
            return
        waits = await recent_waits(tx.session, site.slug)
        for conv in await _lock(tx, list(due)[:BATCH], site.slug):
            position = due[conv.id]
            if conv.notice_position is None or conv.notice_position == position:
                continue
            tell_position(core, tx, conv, "position", t, position, waits)
