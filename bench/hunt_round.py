"""One hunting round at scale, timed in-process: the whole round and the candidate query in it.

Runs on a copy of the SQLite database that ``python -m bench.scale`` leaves in ``bench/.work``
(990 counselors of ``ke``, 10,000 assigned conversations), or with ``--pg`` on the ``bench``
PostgreSQL database that ``python -m bench.scale --db pg`` leaves (in place; the next bench run
resets it anyway): every counselor is made available and
every pending offer read, then ``--rounds`` times a new conversation is queued and one round of
``Hunter.step`` offers it. Prints p50/p90/max in ms (the first ``--warmup`` rounds left out).
Nothing is written to RESULTS.md: quote its output there with the command.

    python -m bench.scale --no-write && python -m bench.hunt_round
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

import helpline.routing.hunt as hunt_mod
from bench.common import PG_URL, WORK
from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.domain.states import ConversationStatus, OfferStatus
from helpline.routing import presence
from helpline.routing.hunt import Hunter
from helpline.runtime.core import Core, now
from helpline.store.migrate import upgrade
from helpline.store.models import Agent, Conversation, Offer


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"{name}: p50 {statistics.median(ms):.2f} ms, p90 {p90:.2f} ms, max {ms[-1]:.2f} ms ({len(ms)} rounds)"


async def run(url: str, sites: Path, rounds: int, warmup: int) -> None:
    settings = Settings(database_url=url, sites=str(sites))
    core = Core(settings, SiteRegistry.from_toml(settings.sites))
    try:
        await upgrade(core.engine)
        async with core.tx() as tx:
            await tx.session.execute(update(Agent).values(status="available"))
            await tx.session.execute(
                update(Offer).where(Offer.status == OfferStatus.PENDING).values(status=OfferStatus.READ)
            )
            model = (await tx.session.scalars(select(Conversation).where(Conversation.site == "ke").limit(1))).one()
        spent: list[float] = []
        original = presence.candidates

        async def candidates(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t)

        setattr(hunt_mod, "candidates", candidates)  # noqa: B010 (the hunter's own reference)
        hunter = Hunter(core)
        round_s: list[float] = []
        candidates_s: list[float] = []
        for i in range(warmup + rounds):
            async with core.tx() as tx:
                t = now()
                tx.session.add(
                    Conversation(
                        id=str(uuid.uuid4()),
                        site="ke",
                        chatbot_id=model.chatbot_id,
                        chat_session=f"hunt-round-{uuid.uuid4().hex}",
                        source=model.source,
                        client_id=uuid.uuid4().hex[:12],
                        status=ConversationStatus.QUEUED,
                        created_at=t,
                        queued_at=t,
                    )
                )
            del spent[:]
            t0 = time.perf_counter()
            await hunter.step()
            if i >= warmup:
                round_s.append(time.perf_counter() - t0)
                candidates_s.append(sum(spent))
        print(summary("hunting round", round_s))
        print(summary("candidate queries in it", candidates_s))
    finally:
        await core.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=WORK / "scale.db", help="left by bench.scale (copied, not changed)")
    ap.add_argument("--pg", action="store_true", help=f"on {PG_URL} instead (left by bench.scale --db pg)")
    ap.add_argument("--sites", type=Path, default=WORK / "sites-scale.toml")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    if args.pg:
        asyncio.run(run(PG_URL, args.sites, args.rounds, args.warmup))
        return
    if not args.db.exists():
        raise SystemExit(f"{args.db} not found: run `python -m bench.scale --no-write` first")
    copy = WORK / "hunt-round.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{copy}{suffix}").unlink(missing_ok=True)
    shutil.copy(args.db, copy)
    asyncio.run(run(f"sqlite+aiosqlite:///{copy}", args.sites, args.rounds, args.warmup))


if __name__ == "__main__":
    main()
