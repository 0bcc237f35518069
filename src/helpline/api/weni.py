"""Weni's generic ticketer contract v1: ``/v1/tickets…`` (and ``/sites/<slug>/v1/tickets…``).

HTTP only: the bodies of the contract, its headers (``Authorization: Bearer``, ``X-API-Version``,
``Idempotency-Key``, ``X-Request-Id``) and its error body, ``{"error": "<snake_case>", "message",
"details"}``, which every error under ``/v1`` gets (the OpenCHS-style API keeps its own). The rules
live in :mod:`helpline.domain.weni`. (A counselor reopening a ticket is a counselor route:
``api/counselors.py``.)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from helpline.api.deps import body_doc, core_of, nul_field, principal
from helpline.api.errors import STATUS, ApiError
from helpline.api.openchs import URN_RE, UUID_RE, path_site
from helpline.api.schemas import AttachmentIn
from helpline.domain import errors as d
from helpline.domain.auth import Principal
from helpline.domain.weni import requests, tickets

log = structlog.get_logger("helpline.api.weni")

API_VERSION = "1"
KEY_MAX = 255
TEXT_MAX = 20000

# --------------------------------------------------------------------------- error body

# The contract's code for each status, when nothing more precise is known.
CODES: dict[int, str] = {
    400: "invalid_payload",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}
# Codes of the OpenCHS-style API that have a contract name.
_RENAMED = {
    "malformed_json": "invalid_payload",
    "not_authenticated": "unauthorized",
    "permission_denied": "forbidden",
    "validation_error": "unprocessable_entity",
    "body_too_large": "payload_too_large",
    "unavailable": "service_unavailable",
}
_V1_PATH = re.compile(r"^(/sites/[^/]+)?/v1(/|$)")


class WeniError(Exception):
    """An error answered with the contract's body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if details:
        body["details"] = details
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(body, status_code=status, headers=headers)


def is_v1(request: Request) -> bool:
    return bool(_V1_PATH.match(request.url.path))


def _as_weni(exc: Exception) -> WeniError:
    if isinstance(exc, WeniError):
        return exc
    if isinstance(exc, ApiError):
        code = _RENAMED.get(exc.code, exc.code)
        return WeniError(exc.status, code, exc.message, {"fields": exc.fields} if exc.fields else None, exc.headers)
    if isinstance(exc, d.DomainError):
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, d.RateLimited) else None
        return WeniError(status, _RENAMED.get(exc.code, exc.code), exc.message, exc.fields, headers)
    if isinstance(exc, RequestValidationError):
        fields = _fields(list(exc.errors()))
        return WeniError(400, "invalid_payload", _first_problem(fields), {"fields": fields})
    if isinstance(exc, StarletteHTTPException):
        code = CODES.get(exc.status_code, "error")
        message = "no such resource" if exc.status_code == 404 else str(exc.detail)
        return WeniError(exc.status_code, code, message, headers=getattr(exc, "headers", None))
    if isinstance(exc, OperationalError | DBAPIError | OSError):
        return WeniError(
            503, "service_unavailable", "the store is unavailable; retry shortly", headers={"Retry-After": "2"}
        )
    return WeniError(500, "internal_error", "internal error")


Handler = Callable[[Request, Exception], Awaitable[Response]]


def install(app: FastAPI) -> None:
    """Give every error under ``/v1`` the contract's body; call after ``errors.install(app)``.

    Each handler already installed is wrapped: on a ``/v1`` path it answers with the contract's
    body, elsewhere it hands over to the handler it replaces (the OpenCHS-style body stays).
    """

    async def weni_error(request: Request, exc: Exception) -> Response:
        e = _as_weni(exc)
        if e.status == 500:
            log.error("unexpected error", path=request.url.path, error=type(exc).__name__, exc_info=exc)
        elif e.status == 503:
            log.warning("store unavailable", path=request.url.path, error=type(exc).__name__)
        return error_response(e.status, e.code, e.message, e.details, e.headers)

    app.add_exception_handler(WeniError, weni_error)
    for cls in (
        ApiError,
        d.DomainError,
        RequestValidationError,
        StarletteHTTPException,
        OperationalError,
        DBAPIError,
        OSError,
        Exception,
    ):
        app.add_exception_handler(cls, _wrap(app.exception_handlers.get(cls), weni_error))


def _wrap(fallback: Any, weni_error: Handler) -> Handler:
    async def handler(request: Request, exc: Exception) -> Response:
        if is_v1(request):
            return await weni_error(request, exc)
        if fallback is None:
            raise exc
        answer = fallback(request, exc)
        if inspect.isawaitable(answer):
            answer = await answer
        assert isinstance(answer, Response)
        return answer

    return handler


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}},
    }


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the contract's error statuses a route can answer."""
    return {
        s: {"description": CODES[s], "content": {"application/json": {"schema": _error_schema()}}} for s in statuses
    }


# --------------------------------------------------------------------------- bodies


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContactIn(Strict):
    uuid: StrictStr = Field(min_length=1, max_length=64)
    urn: StrictStr = Field(pattern=URN_RE, max_length=255)
    urns: list[StrictStr] = Field(default_factory=list, max_length=100)
    name: StrictStr | None = Field(None, max_length=255)
    language: StrictStr | None = Field(None, max_length=16)


class TopicIn(Strict):
    uuid: StrictStr = Field(min_length=1, max_length=64)
    name: StrictStr | None = Field(None, max_length=255)
    queue_uuid: StrictStr | None = Field(None, max_length=64)


class AssigneeIn(Strict):
    email: StrictStr = Field(min_length=1, max_length=255)
    name: StrictStr | None = Field(None, max_length=255)
    uuid: StrictStr | None = Field(None, max_length=64)


class OpenMetadataIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    project_uuid: StrictStr | None = Field(None, max_length=64)
    org_uuid: StrictStr | None = Field(None, max_length=64)
    priority: Literal["low", "normal", "high", "urgent"] | None = None
    webhook_base_url: StrictStr | None = Field(None, pattern=r"^https?://\S+$", max_length=1024)


class OpenTicketIn(Strict):
    ticket_id: StrictStr = Field(pattern=UUID_RE)
    contact: ContactIn
    topic: TopicIn | None = None
    body: StrictStr | None = Field(None, max_length=TEXT_MAX)
    assignee: AssigneeIn | None = None
    metadata: OpenMetadataIn | None = None
    opened_at: datetime


class SenderIn(Strict):
    type: Literal["contact", "agent", "bot", "system"]
    id: StrictStr | None = Field(None, max_length=255)
    name: StrictStr | None = Field(None, max_length=255)
    email: StrictStr | None = Field(None, max_length=255)


class MessageIn(Strict):
    ticket_id: StrictStr = Field(min_length=1, max_length=64)
    external_id: StrictStr = Field(min_length=1, max_length=64)
    message_id: StrictStr | None = Field(None, min_length=1, max_length=128)
    # "outgoing": the bot's earlier messages, one by one (mailroom's history_mode one_by_one).
    direction: Literal["incoming", "outgoing"]
    sender: SenderIn
    text: StrictStr | None = Field(None, max_length=TEXT_MAX)
    attachments: list[AttachmentIn] = Field(default_factory=list)
    metadata: dict[str, Any] | None = None
    sent_at: datetime


class ActorIn(Strict):
    type: Literal["platform", "agent", "contact", "flow", "system"]
    id: StrictStr | None = Field(None, max_length=255)
    name: StrictStr | None = Field(None, max_length=255)


class CloseIn(Strict):
    ticket_id: StrictStr | None = Field(None, max_length=64)
    external_id: StrictStr | None = Field(None, max_length=64)
    closed_by: ActorIn | None = None
    reason: Literal["resolved", "abandoned", "transferred", "expired", "cancelled", "other"] | None = None
    metadata: dict[str, Any] | None = None
    closed_at: datetime | None = None


class ReopenIn(Strict):
    ticket_id: StrictStr | None = Field(None, max_length=64)
    external_id: StrictStr | None = Field(None, max_length=64)
    reopened_by: ActorIn | None = None
    metadata: dict[str, Any] | None = None
    reopened_at: datetime | None = None


class HistoryMessageIn(Strict):
    message_id: StrictStr | None = Field(None, min_length=1, max_length=128)
    direction: Literal["incoming", "outgoing"]
    sender: SenderIn | None = None
    text: StrictStr | None = Field(None, max_length=TEXT_MAX)
    attachments: list[AttachmentIn] = Field(default_factory=list)
    metadata: dict[str, Any] | None = None
    sent_at: datetime | None = None

    @model_validator(mode="after")
    def _something(self) -> HistoryMessageIn:
        if not (self.text or "").strip() and not self.attachments:
            raise ValueError("text or attachments are required")
        return self


class HistoryIn(Strict):
    ticket_id: StrictStr | None = Field(None, max_length=64)
    external_id: StrictStr | None = Field(None, max_length=64)
    contact: dict[str, Any] | None = None
    messages: list[HistoryMessageIn] = Field(default_factory=list, max_length=50)
    metadata: dict[str, Any] | None = None


class OpenedOut(BaseModel):
    external_id: str
    status: Literal["open"]
    created_at: str


class ReceivedOut(BaseModel):
    message_external_id: str
    status: Literal["received"]


class ClosedOut(BaseModel):
    status: Literal["closed"]


class ReopenedOut(BaseModel):
    status: Literal["open"]


class HistoryOut(BaseModel):
    status: Literal["history_received"]
    messages_received: int


def _fields(errors: list[Any]) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")]
        name = ".".join(loc) or "body"
        msg = "is required" if e.get("type") == "missing" else str(e.get("msg", "invalid"))
        fields.setdefault(name, []).append(msg)
    return fields


def _first_problem(fields: dict[str, list[str]]) -> str:
    name, msgs = next(iter(fields.items()))
    return f"{name} {msgs[0]}" if msgs[0] == "is required" else f"{name}: {msgs[0]}"


async def _read(request: Request, model: type[Any], *, optional: bool = False) -> Any:
    """The JSON body: 415 not JSON, 413 too large, 400 ``invalid_payload`` malformed or invalid."""
    limit = core_of(request).settings.max_body_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise WeniError(413, "payload_too_large", f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WeniError(413, "payload_too_large", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if optional and not raw.strip():
        return model()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise WeniError(415, "unsupported_media_type", f"the body must be application/json, not {ctype}")
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WeniError(400, "invalid_payload", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise WeniError(400, "invalid_payload", "the body must be a JSON object")
    bad = nul_field(data)
    if bad is not None:
        raise WeniError(
            400, "invalid_payload", f"{bad}: must not contain NUL characters", {"fields": {bad: ["NUL character"]}}
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = _fields(list(exc.errors()))
        raise WeniError(400, "invalid_payload", _first_problem(fields), {"fields": fields}) from exc


def _epoch(t: datetime | None) -> float | None:
    if t is None:
        return None
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()


def _same_ticket(external_id: str, in_body: str | None) -> None:
    if in_body is not None and in_body != external_id:
        raise WeniError(
            400,
            "invalid_payload",
            f"external_id {in_body!r} in the body is not the ticket of the path ({external_id!r})",
            {"fields": {"external_id": ["does not match the path"]}},
        )


def _attachments(items: list[AttachmentIn]) -> list[dict[str, Any]]:
    return [a.model_dump(exclude_none=True) for a in items]


async def api_version(request: Request) -> None:
    given = request.headers.get("x-api-version")
    if given is not None and given.strip() != API_VERSION:
        raise WeniError(
            400, "unsupported_api_version", f"this server speaks version {API_VERSION} of the contract, not {given!r}"
        )


async def request_keys(request: Request) -> requests.RequestKeys:
    idem = request.headers.get("idempotency-key")
    req = request.headers.get("x-request-id")
    for name, value in (("Idempotency-Key", idem), ("X-Request-Id", req)):
        if value is not None and (not value.strip() or len(value) > KEY_MAX):
            raise WeniError(400, "invalid_header", f"{name} must be 1..{KEY_MAX} characters")
    return requests.RequestKeys(idempotency_key=idem or None, request_id=req or None)


Caller = Annotated[Principal, Depends(principal)]
SiteSlug = Annotated[str | None, Depends(path_site)]
Keys = Annotated[requests.RequestKeys, Depends(request_keys)]

router = APIRouter(tags=["weni ticketer"], dependencies=[Depends(api_version)])


def _answer(a: requests.Answer) -> JSONResponse:
    return JSONResponse(a.body, status_code=a.status)


@router.post(
    "/tickets",
    status_code=201,
    response_model=OpenedOut,
    openapi_extra=body_doc(OpenTicketIn),
    responses=responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    summary="Weni opens a ticket: a conversation queued for a counselor",
)
async def open_ticket(request: Request, who: Caller, site: SiteSlug, keys: Keys) -> JSONResponse:
    body: OpenTicketIn = await _read(request, OpenTicketIn)
    meta = body.metadata or OpenMetadataIn()
    data = tickets.OpenIn(
        ticket_id=body.ticket_id,
        contact=tickets.ContactIn(uuid=body.contact.uuid, urn=body.contact.urn, name=body.contact.name),
        opened_at=_epoch(body.opened_at) or 0.0,
        topic_uuid=body.topic.uuid if body.topic else None,
        topic_name=body.topic.name if body.topic else None,
        body=body.body,
        priority=meta.priority,
        project_uuid=meta.project_uuid,
        org_uuid=meta.org_uuid,
        webhook_base_url=meta.webhook_base_url,
        metadata=meta.model_dump(exclude_none=True),
    )
    return _answer(await tickets.open_ticket(core_of(request), who, data, keys, path_site=site))


@router.post(
    "/tickets/{external_id}/messages",
    response_model=ReceivedOut,
    openapi_extra=body_doc(MessageIn),
    responses=responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    summary="A message from the contact (or, outgoing, the bot's history one by one)",
)
async def message(request: Request, who: Caller, site: SiteSlug, keys: Keys, external_id: str) -> JSONResponse:
    body: MessageIn = await _read(request, MessageIn)
    _same_ticket(external_id, body.external_id)
    if not (body.text or "").strip() and not body.attachments:
        raise WeniError(400, "empty_message", "text or attachments are required")
    if body.direction == "outgoing":
        return await _bot_message(request, who, site, keys, external_id, body)
    data = tickets.MessageIn(
        ticket_id=body.ticket_id,
        message_id=body.message_id,
        text=body.text or "",
        attachments=_attachments(body.attachments),
        sent_at=_epoch(body.sent_at),
    )
    return _answer(await tickets.add_message(core_of(request), who, external_id, data, keys, path_site=site))


async def _bot_message(
    request: Request, who: Principal, site: str | None, keys: requests.RequestKeys, external_id: str, body: MessageIn
) -> JSONResponse:
    """An outgoing message here is the conversation before the ticket, sent one by one (mailroom's
    ``history_mode = one_by_one``): stored as ``/history`` stores it. A counselor's replies come from
    helpline, so an outgoing message from an agent or the contact is refused."""
    if body.sender.type not in ("bot", "system"):
        raise WeniError(
            422,
            "unsupported_sender",
            f"an outgoing message here is the bot's history: sender.type bot or system, not {body.sender.type!r}",
        )
    message = tickets.HistoryMessageIn(
        message_id=body.message_id,
        direction="outgoing",
        sender_type=body.sender.type,
        text=body.text or "",
        attachments=_attachments(body.attachments),
        sent_at=_epoch(body.sent_at),
    )
    await tickets.add_history(core_of(request), who, external_id, [message], keys, path_site=site)
    return JSONResponse({"message_external_id": tickets.history_id(message), "status": "received"})


@router.post(
    "/tickets/{external_id}/close",
    response_model=ClosedOut,
    openapi_extra=body_doc(CloseIn),
    responses=responses(400, 401, 403, 404, 409, 413, 415, 503),
    summary="Weni closed the ticket (409 ticket_already_closed)",
)
async def close(request: Request, who: Caller, site: SiteSlug, keys: Keys, external_id: str) -> JSONResponse:
    body: CloseIn = await _read(request, CloseIn, optional=True)
    _same_ticket(external_id, body.external_id)
    answer = await tickets.close_ticket(core_of(request), who, external_id, body.reason, keys, path_site=site)
    return _answer(answer)


@router.post(
    "/tickets/{external_id}/reopen",
    response_model=ReopenedOut,
    openapi_extra=body_doc(ReopenIn),
    responses=responses(400, 401, 403, 404, 409, 413, 415, 503),
    summary="Weni reopened the ticket: it is queued for a counselor again",
)
async def reopen(request: Request, who: Caller, site: SiteSlug, keys: Keys, external_id: str) -> JSONResponse:
    body: ReopenIn = await _read(request, ReopenIn, optional=True)
    _same_ticket(external_id, body.external_id)
    return _answer(await tickets.reopen_ticket(core_of(request), who, external_id, keys, path_site=site))


@router.post(
    "/tickets/{external_id}/history",
    response_model=HistoryOut,
    openapi_extra=body_doc(HistoryIn),
    responses=responses(400, 401, 403, 404, 413, 415, 422, 503),
    summary="The conversation before the ticket (batches of at most 50 messages)",
)
async def history(request: Request, who: Caller, site: SiteSlug, keys: Keys, external_id: str) -> JSONResponse:
    body: HistoryIn = await _read(request, HistoryIn, optional=True)
    _same_ticket(external_id, body.external_id)
    messages = [
        tickets.HistoryMessageIn(
            message_id=m.message_id,
            direction=m.direction,
            sender_type=m.sender.type if m.sender else ("contact" if m.direction == "incoming" else "bot"),
            text=m.text or "",
            attachments=_attachments(m.attachments),
            sent_at=_epoch(m.sent_at),
        )
        for m in body.messages
    ]
    return _answer(await tickets.add_history(core_of(request), who, external_id, messages, keys, path_site=site))
