"""Request signatures already accepted, shared by every instance on one PostgreSQL.

Each instance first checks its own memory (``helpline.api.signing.ReplayCache``): a copy sent to the
same instance is refused with no query. A signature new to this instance is then claimed for all of
them: one ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` into ``seen_signatures``, keyed by
``"<account id>:<digest>"``, in its own short transaction. Nothing inserted: another instance (or a
copy racing on this one) had it first, a replay. Two copies sent at once to two instances cannot
both pass: the second insert waits for the first one's commit, then finds the key.

A row is kept until its timestamp's window is over (``expires_at``), and a little longer
(:data:`CLOCK_MARGIN_S`), so an instance whose clock runs behind still finds it while it would
accept the timestamp. Each instance deletes the expired rows itself, at most once every
:data:`PURGE_EVERY_S`, right after a claim (a signing account is in use, so the table may grow): one
``DELETE`` over the ``expires_at`` index that skips rows another instance's purge holds, so
purges never wait for each other. The table holds about one tolerance window of signed requests.

On SQLite (one process) the memory is enough: :meth:`SeenSignatures.first_use` answers at once.
Accounts without a secret never get here.
"""

from __future__ import annotations

import structlog
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError

from helpline.runtime.core import Core
from helpline.store.db import is_sqlite
from helpline.store.models import SeenSignature

log = structlog.get_logger("helpline.signatures")

PURGE_EVERY_S = 60.0
CLOCK_MARGIN_S = 60.0


class SeenSignatures:
    """One instance's access to ``seen_signatures`` (one per application, like its replay cache)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.shared = not is_sqlite(core.settings.database_url)
        self.next_purge = 0.0  # the first claim purges: rows left by instances that have stopped

    async def first_use(self, key: str, until: float, t: float) -> bool:
        """Record ``key`` for every instance until ``until``; False if one had recorded it (a replay).

        Always True on SQLite. A database error propagates (the request fails: 503).
        """
        if not self.shared:
            return True
        async with self.core.tx() as tx:
            claim = (
                insert(SeenSignature)
                .values(key=key, expires_at=until)
                .on_conflict_do_nothing(index_elements=[SeenSignature.key])
                .returning(SeenSignature.key)
            )
            first = await tx.session.scalar(claim) is not None
        if t >= self.next_purge:
            self.next_purge = t + PURGE_EVERY_S
            try:
                await self.purge(t)
            except (SQLAlchemyError, OSError) as exc:  # the claim stands; the next purge retries
                log.warning("seen signatures purge failed", error=type(exc).__name__)
        return first

    async def purge(self, t: float) -> int:
        """Delete the rows expired before ``t - CLOCK_MARGIN_S`` that no other purge holds; how many."""
        cutoff = t - CLOCK_MARGIN_S
        expired = select(SeenSignature.key).where(SeenSignature.expires_at < cutoff).with_for_update(skip_locked=True)
        async with self.core.tx() as tx:
            result = await tx.session.execute(delete(SeenSignature).where(SeenSignature.key.in_(expired)))
        return int(result.rowcount)  # type: ignore[attr-defined]
