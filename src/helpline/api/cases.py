"""Child-data protection over HTTP: a conversation's export for a case file, and the audit log.

``GET /api/conversations/<id>/export``: the whole conversation as a JSON attachment (an admin, a
supervisor of its site, or its counselor; audited). ``GET /api/supervisor/audit``: who read or acted
on which conversation (supervisors of the site and admins).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response

from helpline.api.deps import core_of, principal
from helpline.api.errors import responses
from helpline.api.schemas import AuditLog, CaseFile, answer
from helpline.domain import cases
from helpline.domain.auth import Principal

Caller = Annotated[Principal, Depends(principal)]
router = APIRouter()


def client_address(request: Request) -> str | None:
    """The caller's IP address for the audit log (behind a trusted proxy: what uvicorn's
    ``--forwarded-allow-ips`` lets ``X-Forwarded-For`` say)."""
    return request.client.host if request.client else None


EXPORT_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "model": CaseFile,
        "description": "The case file, as an attachment `conversation-<id>.json`",
        "headers": {
            "Content-Disposition": {
                "description": "`attachment; filename=conversation-<id>.json`",
                "schema": {"type": "string"},
            }
        },
    },
    **responses(401, 403, 404, 503),
}


@router.get(
    "/conversations/{conversation_id}/export",
    tags=["counselor"],
    response_class=Response,
    responses=EXPORT_DOC,
    summary="A conversation as a JSON case file: metadata, messages, offers, audit trail (audited)",
)
async def export(request: Request, who: Caller, conversation_id: str) -> Response:
    data = await cases.export_conversation(core_of(request), who, conversation_id, address=client_address(request))
    name = f"conversation-{data['conversation']['id']}.json"
    return Response(
        orjson.dumps(data, option=orjson.OPT_INDENT_2),
        media_type="application/json",
        headers={"Content-Disposition": f"attachment; filename={name}", "Cache-Control": "no-store"},
    )


@router.get(
    "/supervisor/audit",
    tags=["supervisor"],
    response_model=None,
    responses={**answer(AuditLog, "newest first"), **responses(401, 403, 404, 422, 503)},
    summary="Who read or acted on which conversation, newest first (supervisors of the site, admins)",
)
async def audit_log(
    request: Request,
    who: Caller,
    conversation: Annotated[str | None, Query(max_length=36, description="only this conversation (its id)")] = None,
    site: Annotated[str | None, Query(max_length=32, description="only this site (admins, site '*')")] = None,
    user: Annotated[str | None, Query(max_length=150, description="only this staff member (username)")] = None,
    limit: Annotated[int, Query(ge=1, le=cases.MAX_AUDIT_LIMIT)] = 100,
) -> dict[str, Any]:
    return await cases.audit_log(
        core_of(request), who, conversation_id=conversation, site=site, username=user, limit=limit
    )
