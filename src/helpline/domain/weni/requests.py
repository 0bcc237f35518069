"""A Weni request answered once: a repeat gets the first answer again, nothing is done twice.

Weni retries (5xx, 429, timeouts) and may send a request twice; its keys are ``Idempotency-Key``
and ``X-Request-Id``. Each call of :mod:`helpline.domain.weni.tickets` looks for a first answer
(:func:`replay`) under its scope (``open``, ``messages:<external_id>``, ...) before doing anything,
and stores its own (:func:`remember`) in the same transaction as what it did.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from helpline.domain.auth import Principal
from helpline.runtime.core import Tx, now
from helpline.store.models import TicketRequest

T = TypeVar("T")


@dataclass(frozen=True)
class RequestKeys:
    """What makes a Weni request a repeat: ``Idempotency-Key`` and ``X-Request-Id``."""

    idempotency_key: str | None = None
    request_id: str | None = None

    def keys(self) -> list[str]:
        out = []
        if self.idempotency_key:
            out.append(f"idem:{self.idempotency_key}")
        if self.request_id:
            out.append(f"req:{self.request_id}")
        return out


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


async def once_more_on_conflict(run: Callable[[], Awaitable[T]]) -> T:
    """A concurrent twin (same key, ticket or message) committed first: the second try sees it."""
    try:
        return await run()
    except IntegrityError:
        return await run()


async def replay(tx: Tx, who: Principal, scope: str, keys: RequestKeys) -> Answer | None:
    """The first answer to this request (by any of its keys), or ``None`` when it is new."""
    wanted = keys.keys()
    if not wanted:
        return None
    row = await tx.session.scalar(
        select(TicketRequest)
        .where(TicketRequest.chatbot_id == who.id, TicketRequest.scope == scope, TicketRequest.key.in_(wanted))
        .order_by(TicketRequest.id)
        .limit(1)
    )
    return None if row is None else Answer(row.status, json.loads(row.response))


def remember(tx: Tx, who: Principal, scope: str, keys: RequestKeys, answer: Answer) -> Answer:
    """Store ``answer`` under each of the request's keys (a repeat gets it) and return it."""
    t = now()
    for key in keys.keys():
        tx.session.add(
            TicketRequest(
                chatbot_id=who.id,
                scope=scope,
                key=key,
                status=answer.status,
                response=json.dumps(answer.body),
                created_at=t,
            )
        )
    return answer
