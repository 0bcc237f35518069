"""Who hunting offers to, read from the store: every free counselor, or the first few in order; and
what going offline does to the offers a counselor still has.

For ``leastrecent`` and ``roundrobin`` (strategies the store orders) a round reads only the first
few free counselors in the strategy's order, not every free counselor of the site with their load.
These tests pin that it changes nothing a counselor or a child sees: the same candidates, the same
loads, the same counselor offered each conversation, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conftest import sites_toml
from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.domain.counselors import withdraw_offers_of
from helpline.domain.states import ConversationStatus, OfferStatus
from helpline.routing import hunt
from helpline.routing.hunt import Hunter
from helpline.routing.presence import candidates
from helpline.routing.strategies import Candidate, leastrecent, roundrobin
from helpline.runtime.core import Core
from helpline.store.migrate import upgrade
from helpline.store.models import Agent, Conversation, Offer, User
from helpline.testing.fake_rapidpro import FakeRapidPro

T0 = 1_700_000_000.0
MAX_CHATS = 3


def run_with_core(
    database_url: str,
    tmp_path: Path,
    rapidpro: FakeRapidPro,
    body: Callable[[Core], Awaitable[Any]],
    strategy: str = "leastrecent",
) -> Any:
    path = tmp_path / "sites.toml"
    path.write_text(sites_toml(rapidpro, strategy=strategy, max_chats=MAX_CHATS, retry_gap_s=60.0))
    settings = Settings(database_url=database_url, sites=str(path))

    async def main() -> Any:
        core = Core(settings, SiteRegistry.from_toml(settings.sites))
        try:
            await upgrade(core.engine)
            return await body(core)
        finally:
            await core.close()

    return asyncio.run(main())


async def add_counselors(core: Core, specs: list[dict[str, Any]]) -> list[int]:
    """Counselors of ``ke`` with a status, a last assignment, a wrap-up and a load."""
    async with core.tx() as tx:
        bot = User(username="bot", password_hash="-", role="chatbot", site="*", name="Bot", created_at=T0)
        tx.session.add(bot)
        users = [
            User(username=f"c{i}", password_hash="-", role="counselor", site="ke", name=f"C{i}", created_at=T0)
            for i in range(len(specs))
        ]
        tx.session.add_all(users)
        await tx.session.flush()
        for user, spec in zip(users, specs, strict=True):
            tx.session.add(
                Agent(
                    user_id=user.id,
                    site="ke",
                    status=spec.get("status", "available"),
                    since=T0,
                    last_assigned_at=spec.get("last_assigned_at", 0.0),
                    wrapup_until=spec.get("wrapup_until", 0.0),
                )
            )
            for _ in range(spec.get("assigned", 0)):
                tx.session.add(conversation(bot.id, ConversationStatus.ASSIGNED, counselor_id=user.id))
            for _ in range(spec.get("pending", 0)):
                conv = conversation(bot.id, ConversationStatus.OFFERED)
                tx.session.add(conv)
                tx.session.add(offer(conv.id, user.id, OfferStatus.PENDING, deadline=T0 + 10**6))
        return [user.id for user in users]


def conversation(bot_id: int, status: str, *, counselor_id: int | None = None, at: float = T0) -> Conversation:
    return Conversation(
        id=str(uuid.uuid4()),
        site="ke",
        chatbot_id=bot_id,
        chat_session=uuid.uuid4().hex,
        source="telegram",
        client_id=uuid.uuid4().hex[:12],
        status=status,
        counselor_id=counselor_id,
        created_at=at,
        queued_at=at,
    )


def offer(conversation_id: str, counselor_id: int, status: str, *, deadline: float) -> Offer:
    return Offer(
        conversation_id=conversation_id,
        counselor_id=counselor_id,
        site="ke",
        status=status,
        created_at=deadline - 30,
        deadline=deadline,
        resolved_at=None if status == OfferStatus.PENDING else deadline,
    )


async def read_candidates(core: Core, first: int | None = None, after: int | None = None) -> list[Candidate]:
    async with core.sessionmaker() as session:
        return await candidates(session, core.site("ke"), T0 + 1, first=first, after=after)


def random_counselors(seed: int) -> list[dict[str, Any]]:
    """80 counselors of every kind: free or not, loaded or not, ties in last_assigned_at."""
    rng = random.Random(seed)
    return [
        {
            "status": rng.choice(["available"] * 4 + ["paused", "offline"]),
            "last_assigned_at": float(rng.choice([0, 0, 5, 9, 9, 20, 33])),  # ties, broken by id
            "wrapup_until": rng.choice([0.0] * 5 + [T0 + 60]),  # still wrapping up: not free
            "assigned": rng.choice([0, 0, 1, 2, 3]),
            "pending": rng.choice([0, 0, 0, 1]),
        }
        for _ in range(80)
    ]


def free_of(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        s
        for s in specs
        if s["status"] == "available" and s["wrapup_until"] == 0.0 and s["assigned"] + s["pending"] < MAX_CHATS
    ]


def test_the_first_few_are_the_head_of_leastrecents_order_with_the_same_loads(
    database_url: str, tmp_path: Path, rapidpro: FakeRapidPro
) -> None:
    specs = random_counselors(7)

    async def body(core: Core) -> tuple[list[Candidate], dict[int, list[Candidate]]]:
        await add_counselors(core, specs)
        every = await read_candidates(core)
        return every, {n: await read_candidates(core, first=n) for n in (1, 2, 5, 16, len(every), 100)}

    every, heads = run_with_core(database_url, tmp_path, rapidpro, body)
    free = free_of(specs)
    assert len(every) == len(free) > 16
    assert sorted(c.active for c in every) == sorted(s["assigned"] + s["pending"] for s in free)
    for n, head in heads.items():
        assert head == leastrecent(every)[:n], n


def test_the_first_few_are_the_head_of_roundrobins_turn_from_the_last_counselor_offered(
    database_url: str, tmp_path: Path, rapidpro: FakeRapidPro
) -> None:
    """From no turn yet, from a free counselor, from one who is not free, from the highest id: the
    head wraps around to the lowest ids as the full order does, with the same loads."""
    specs = random_counselors(11)

    async def body(core: Core) -> tuple[list[Candidate], dict[tuple[int | None, int], list[Candidate]]]:
        ids = await add_counselors(core, specs)
        every = await read_candidates(core)
        busy = next(uid for uid, s in zip(ids, specs, strict=True) if s not in free_of(specs))
        afters = [None, every[len(every) // 2].counselor_id, busy, max(ids), every[-3].counselor_id]
        heads = {
            (after, n): await read_candidates(core, first=n, after=after) for after in afters for n in (1, 5, 16, 100)
        }
        return every, heads

    every, heads = run_with_core(database_url, tmp_path, rapidpro, body, strategy="roundrobin")
    assert len(every) == len(free_of(specs)) > 16
    for (after, n), head in heads.items():
        assert head == roundrobin(every, after)[:n], (after, n)


def test_a_conversation_everyone_at_the_head_missed_goes_to_the_next_counselor_in_order(
    database_url: str, tmp_path: Path, rapidpro: FakeRapidPro, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three counselors let it lapse; reading two at first, the round reads on to the fourth."""
    monkeypatch.setattr(hunt, "FIRST_CANDIDATES", 2)

    async def body(core: Core) -> list[tuple[str, int, str]]:
        ids = await add_counselors(core, [{"last_assigned_at": float(i)} for i in range(6)])
        async with core.tx() as tx:
            bot_id = await tx.session.scalar(select(User.id).where(User.username == "bot"))
            assert bot_id is not None
            conv = conversation(bot_id, ConversationStatus.QUEUED)
            tx.session.add(conv)
            for uid in ids[:3]:  # the three least recent let it lapse (retry gap: 60 s)
                tx.session.add(offer(conv.id, uid, OfferStatus.TIMED_OUT, deadline=T0 + 1))
        await Hunter(core).step()
        async with core.sessionmaker() as session:
            rows = (await session.execute(select(Offer.conversation_id, Offer.counselor_id, Offer.status))).all()
        return [(c, ids.index(u), s) for c, u, s in rows if s == OfferStatus.PENDING]

    pending = run_with_core(database_url, tmp_path, rapidpro, body)
    assert [(who, status) for _, who, status in pending] == [(3, OfferStatus.PENDING)]


async def hunt_a_burst(
    core: Core, specs: list[dict[str, Any]], count: int, turn: int | None = None
) -> list[tuple[int, int]]:
    """``count`` conversations queued at once, one round of hunting (roundrobin's turn after the
    counselor of index ``turn``): which counselor (by index) was offered which (by queue order)."""
    ids = await add_counselors(core, specs)
    queued = []
    async with core.tx() as tx:
        bot_id = await tx.session.scalar(select(User.id).where(User.username == "bot"))
        assert bot_id is not None
        for i in range(count):
            conv = conversation(bot_id, ConversationStatus.QUEUED, at=T0 + i)
            tx.session.add(conv)
            queued.append(conv.id)
    hunter = Hunter(core)
    if turn is not None:
        hunter._rr_last["ke"] = ids[turn]
    await hunter.step()
    async with core.sessionmaker() as session:
        rows = (
            await session.execute(
                select(Offer.conversation_id, Offer.counselor_id).where(Offer.status == OfferStatus.PENDING)
            )
        ).all()
    return sorted((queued.index(c), ids.index(u)) for c, u in rows if c in queued)


def test_a_burst_longer_than_the_head_reaches_as_many_counselors_as_it_needs(
    database_url: str, tmp_path: Path, rapidpro: FakeRapidPro, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven queued at once, room for one more each: the seven least recent get one offer each,
    in queue order, though a round reads two counselors at first."""
    monkeypatch.setattr(hunt, "FIRST_CANDIDATES", 2)
    order = [5, 0, 8, 2, 7, 1, 9, 3, 6, 4]  # last_assigned_at per counselor: least recent first is 1, 5, 3...
    specs = [{"last_assigned_at": float(a), "assigned": MAX_CHATS - 1} for a in order]

    made = run_with_core(database_url, tmp_path, rapidpro, lambda core: hunt_a_burst(core, specs, 7))
    by_recency = sorted(range(len(order)), key=lambda i: order[i])
    assert made == list(enumerate(by_recency[:7]))


def test_roundrobin_offers_a_burst_in_turn_and_wraps_around_reading_two_at_first(
    database_url: str, tmp_path: Path, rapidpro: FakeRapidPro, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven queued at once, room for one more each, the turn after the seventh of ten counselors:
    the eighth, ninth and tenth get one each, then the first four, in queue order."""
    monkeypatch.setattr(hunt, "FIRST_CANDIDATES", 2)
    specs: list[dict[str, Any]] = [{"assigned": MAX_CHATS - 1} for _ in range(10)]

    made = run_with_core(
        database_url, tmp_path, rapidpro, lambda core: hunt_a_burst(core, specs, 7, turn=6), strategy="roundrobin"
    )
    assert made == list(enumerate([7, 8, 9, 0, 1, 2, 3]))


def test_going_offline_withdraws_every_pending_offer_and_requeues_only_what_nobody_else_is_offered(
    database_url: str, tmp_path: Path, rapidpro: FakeRapidPro
) -> None:
    """Three offers pending for one counselor: two conversations offered to nobody else go back to
    the queue at their old place; the one also offered to a colleague stays offered."""

    async def body(core: Core) -> tuple[dict[str, tuple[str, float]], dict[int, str]]:
        leaving, colleague = await add_counselors(core, [{}, {}])
        async with core.tx() as tx:
            bot_id = await tx.session.scalar(select(User.id).where(User.username == "bot"))
            assert bot_id is not None
            convs = [conversation(bot_id, ConversationStatus.OFFERED, at=T0 - 100 + i) for i in range(3)]
            tx.session.add_all(convs)
            for conv in convs:
                tx.session.add(offer(conv.id, leaving, OfferStatus.PENDING, deadline=T0 + 30))
            tx.session.add(offer(convs[1].id, colleague, OfferStatus.PENDING, deadline=T0 + 30))
        async with core.tx() as tx:
            await withdraw_offers_of(tx, leaving, reason="offline")
        async with core.sessionmaker() as session:
            rows = (await session.execute(select(Conversation.id, Conversation.status, Conversation.queued_at))).all()
            offers = (await session.execute(select(Offer.counselor_id, Offer.status))).all()
        by_id = {cid: (status, queued_at) for cid, status, queued_at in rows}
        names = {leaving: "leaving", colleague: "colleague"}
        return {f"conv{i}": by_id[c.id] for i, c in enumerate(convs)}, {
            n: ",".join(sorted(s for u, s in offers if u == uid)) for uid, n in names.items()
        }

    convs, offers = run_with_core(database_url, tmp_path, rapidpro, body)
    assert convs == {
        "conv0": (ConversationStatus.QUEUED, T0 - 100),
        "conv1": (ConversationStatus.OFFERED, T0 - 99),
        "conv2": (ConversationStatus.QUEUED, T0 - 98),
    }
    assert offers == {"leaving": "withdrawn,withdrawn,withdrawn", "colleague": "pending"}
