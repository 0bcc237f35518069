"""Operations endpoints: liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import generate_latest
from sqlalchemy import func, select, text

from helpline.api import errors
from helpline.runtime import metrics
from helpline.runtime.core import Core, now
from helpline.store.models import Conversation, OutboxEvent

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=errors.responses(503))
async def readyz(request: Request) -> dict[str, str]:
    core: Core = request.app.state.core
    async with core.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request) -> Response:
    return Response(await render(request.app.state.core), media_type="text/plain; version=0.0.4")


async def render(core: Core) -> bytes:
    """Refresh the store-backed gauges and return the text exposition."""
    t = now()
    async with core.sessionmaker() as s:
        depth = (await s.execute(select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status))).all()
        oldest = await s.scalar(select(func.min(OutboxEvent.created_at)).where(OutboxEvent.status == "pending"))
        convs = (
            await s.execute(
                select(Conversation.site, Conversation.status, func.count())
                .where(Conversation.status != "closed")
                .group_by(Conversation.site, Conversation.status)
            )
        ).all()
    for status in ("pending", "sent", "dead"):
        metrics.OUTBOX_DEPTH.labels(status).set(0)
    for status, n in depth:
        metrics.OUTBOX_DEPTH.labels(status).set(n)
    metrics.OUTBOX_OLDEST.set(0 if oldest is None else max(0.0, t - oldest))
    metrics.CONVERSATIONS.clear()
    for site, status, n in convs:
        metrics.CONVERSATIONS.labels(site, status).set(n)
    return generate_latest(metrics.REGISTRY)
