"""The supervisor's REST API: live overview, dead letters (with replay) and hourly stats.

Supervisors and admins only (403 otherwise), scoped to the caller's site; an admin or a supervisor
of site ``*`` sees every site and may narrow with ``?site=``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from helpline.api.cases import client_address
from helpline.api.deps import RowId, core_of, principal
from helpline.api.errors import responses
from helpline.api.schemas import DeadLetters, Overview, Replayed, Stats, answer
from helpline.domain import supervision as sv
from helpline.domain.auth import Principal

Caller = Annotated[Principal, Depends(principal)]
SiteFilter = Annotated[str | None, Query(max_length=32, description="only this site (admins, site '*')")]
router = APIRouter(prefix="/supervisor", tags=["supervisor"])

ERR = responses(401, 403, 404, 503)


@router.get(
    "/overview",
    response_model=None,
    responses={**answer(Overview, "per visible site, in the order of the sites file"), **ERR},
    summary="Per site: queue, counselors, lapsed offers, outbox, dead letters",
)
async def overview(request: Request, who: Caller, site: SiteFilter = None) -> dict[str, Any]:
    return await sv.overview(core_of(request), who, site=site)


@router.get(
    "/dead-letters",
    response_model=None,
    responses={**answer(DeadLetters, "newest first, and how many there are"), **ERR},
    summary="Events RapidPro refused for good (no message text)",
)
async def dead_letters(
    request: Request,
    who: Caller,
    site: SiteFilter = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    return await sv.dead_letters(core_of(request), who, site=site, limit=limit)


@router.post(
    "/dead-letters/{outbox_id}/replay",
    response_model=None,
    responses={**answer(Replayed, "queued to be sent again"), **responses(401, 403, 404, 409, 503)},
    summary="Send a dead letter again (audited; 404 unknown or of another site, 409 not dead or purged)",
)
async def replay(request: Request, who: Caller, outbox_id: RowId) -> dict[str, Any]:
    return await sv.replay(core_of(request), who, outbox_id, address=client_address(request))


@router.get(
    "/stats",
    response_model=None,
    responses={
        **answer(Stats, "per visible site, one bucket per hour (UTC), oldest first"),
        **responses(401, 403, 404, 422, 503),
    },
    summary="Hourly volume and waits, for charts",
)
async def stats(
    request: Request,
    who: Caller,
    site: SiteFilter = None,
    hours: Annotated[int, Query(ge=1, le=sv.MAX_STATS_HOURS)] = 24,
) -> dict[str, Any]:
    return await sv.stats(core_of(request), who, hours=hours, site=site)
