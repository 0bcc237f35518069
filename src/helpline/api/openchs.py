"""The chatbot-facing API, OpenCHS-compatible, under ``/api/``, ``/open/api/`` and per site."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from helpline.api.deps import body_doc, core_of, inline_defs, principal, read_body, read_json, token_from_header
from helpline.api.errors import ApiError, responses
from helpline.api.schemas import ChatAcked, ChatClosed, ChatList, ChatMessages, answer
from helpline.delivery.weni import SOURCE as WENI_SOURCE
from helpline.domain import conversations as convs
from helpline.domain import inbound
from helpline.domain.auth import Principal, issue_token, revoke_token
from helpline.domain.states import Risk
from helpline.domain.views import iso

SESSION_RE = r"^[A-Za-z0-9_.~-]{1,128}$"
URN_RE = r"^[a-z][a-z0-9_-]*:.+$"
UUID_RE = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"


def _client_id(value: object) -> int | str:
    """An id given as an integer or a string of 1..128 characters (the column holds 128).

    One validator, so a bad value is reported under the field's own name (a plain ``int | str``
    union reports it as ``chat_sender.int`` and ``chat_sender.str``).
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be an integer or a string")
    if not 1 <= len(str(value)) <= 128:
        raise ValueError("must be 1..128 characters long")
    return value


ClientId = Annotated[
    int | str,
    PlainValidator(_client_id),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1, "maxLength": 128}]}),
]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    username: StrictStr = Field(min_length=1, max_length=150)
    password: StrictStr = Field(min_length=1, max_length=1024)


class TokenOut(BaseModel):
    token: str
    expires_at: str


class ChatPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    chat_sender: ClientId
    chat_receiver: ClientId | None = None
    chat_message: StrictStr = Field(min_length=1, max_length=4096)
    chat_session: StrictStr = Field(pattern=SESSION_RE)
    chat_source: StrictStr = Field(
        min_length=1, max_length=64, description=f"e.g. WENI; not {WENI_SOURCE!r} (Weni tickets' own, /v1/tickets)"
    )
    message_id: StrictStr | None = Field(None, min_length=1, max_length=128)
    client_name: StrictStr | None = Field(None, max_length=150)
    location: StrictStr | None = Field(None, pattern=r"^[A-Za-z]{2}$")
    risk: Risk | None = None
    contact_urn: StrictStr | None = Field(None, pattern=URN_RE, max_length=255)
    contact_uuid: StrictStr | None = Field(None, pattern=UUID_RE)

    @field_validator("chat_source")
    @classmethod
    def _not_a_ticket(cls, value: str) -> str:
        # A conversation of that source is reached through a Weni ticket's webhooks, and one made here
        # has no ticket: the counselor's replies would go nowhere.
        if value == WENI_SOURCE:
            raise ValueError(f"{WENI_SOURCE!r} is reserved for Weni tickets (POST /v1/tickets)")
        return value


class ChatAnswer(BaseModel):
    status: Literal["success"]
    uuid: str
    chat_session: str
    message_id: str
    delivery: Literal["queued", "delivered", "read"]
    created: bool
    duplicate: bool | None = Field(
        None, description="true: the session's previous message again (no message_id), nothing stored"
    )


class ClosePost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    chat_source: StrictStr | None = Field(None, max_length=64)


class AckPost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    message_id: StrictStr = Field(min_length=1, max_length=128)
    status: Literal["delivered", "read", "failed"]


async def path_site(request: Request) -> str | None:
    """The ``<slug>`` of ``/sites/<slug>/api/...``; 404 when no such site is configured.

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency in its thread pool.
    """
    slug = request.path_params.get("site")
    if slug is None:
        return None
    if core_of(request).sites.get(slug) is None:
        raise ApiError(404, f"unknown site {slug!r}", code="unknown_site")
    return str(slug)


Caller = Annotated[Principal, Depends(principal)]
SiteSlug = Annotated[str | None, Depends(path_site)]

router = APIRouter(tags=["chatbot"])


@router.post(
    "/token/",
    response_model=TokenOut,
    openapi_extra=body_doc(TokenIn),
    responses=responses(400, 401, 404, 413, 415, 422, 429, 503),
    summary="Exchange a username and password for a time-bound token",
)
async def token(request: Request, _site: SiteSlug) -> dict[str, Any]:
    body = await read_json(request, TokenIn)
    address = request.client.host if request.client else "unknown"
    key, expires_at = await issue_token(
        core_of(request), username=body.username, password=body.password, address=address
    )
    return {"token": key, "expires_at": iso(expires_at)}


@router.delete("/token/", status_code=204, responses=responses(401, 503), summary="Revoke the presented token")
async def revoke(request: Request, _who: Caller) -> Response:
    await revoke_token(core_of(request), token_from_header(request.headers.get("authorization")))
    return Response(status_code=204)


@router.post(
    "/chat/",
    status_code=201,
    response_model=ChatAnswer,
    openapi_extra=body_doc(ChatPost),
    responses={
        **answer(
            ChatAnswer,
            "a repeat: of a message_id (or Idempotency-Key), the first answer; of the session's previous "
            "text within the site's dedupe_window_s, its answer with duplicate: true",
        ),
        **responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    },
    summary="One message from the chatbot: starts or continues a conversation",
)
async def post_chat(
    request: Request,
    who: Caller,
    site: SiteSlug,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=128,
            pattern=r"^[\x21-\x7e]+$",
            description="The message's idempotency key when the body has no `message_id` (RapidPro's "
            "webhooks carry none): a repeat is answered 200 with the first answer.",
        ),
    ] = None,
) -> JSONResponse:
    body = await read_json(request, ChatPost)
    answer = await inbound.post_chat(
        core_of(request),
        who,
        inbound.ChatIn(
            chat_sender=str(body.chat_sender),
            chat_receiver=None if body.chat_receiver is None else str(body.chat_receiver),
            chat_message=body.chat_message,
            chat_session=body.chat_session,
            chat_source=body.chat_source,
            message_id=body.message_id or idempotency_key,
            client_name=body.client_name,
            location=body.location,
            risk=body.risk,
            contact_urn=body.contact_urn,
            contact_uuid=body.contact_uuid,
        ),
        path_site=site,
    )
    return JSONResponse(answer.body, status_code=201 if answer.created else 200)


@router.get(
    "/chat/",
    response_model=None,
    responses={**answer(ChatList, "the chats, and the cursor of the next page"), **responses(401, 403, 404, 422, 503)},
    summary="The caller's chats, newest first",
)
async def list_chats(
    request: Request,
    who: Caller,
    site: SiteSlug,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    chat_session: Annotated[str | None, Query(pattern=SESSION_RE)] = None,
    status: Annotated[Literal["queued", "offered", "assigned", "closed"] | None, Query()] = None,
) -> dict[str, Any]:
    return await convs.list_chats(
        core_of(request), who, path_site=site, limit=limit, cursor=cursor, chat_session=chat_session, status=status
    )


@router.get(
    "/chat/{chat_session}/messages/",
    response_model=None,
    responses={**answer(ChatMessages, "the messages, oldest first"), **responses(401, 403, 404, 503)},
    summary="A conversation's messages with their delivery status",
)
async def chat_messages(request: Request, who: Caller, site: SiteSlug, chat_session: str) -> dict[str, Any]:
    return await convs.list_chat_messages(core_of(request), who, chat_session, path_site=site)


@router.post(
    "/chat/{chat_session}/close/",
    openapi_extra={
        "requestBody": {
            "required": False,
            "description": "Optional, and never a reason to refuse a close: JSON (as `application/json`, "
            "`text/plain` or without a content type, as the seed's Postman collection sends it) is read "
            "if it parses; any other body is ignored.",
            "content": {
                ctype: {"schema": inline_defs(ClosePost.model_json_schema())}
                for ctype in ("application/json", "text/plain")
            },
        }
    },
    response_model=None,
    responses={**answer(ChatClosed, "closed (or closed already)"), **responses(401, 403, 404, 503)},
    summary="The chatbot ends the conversation",
)
async def close_chat(request: Request, who: Caller, site: SiteSlug, chat_session: str) -> dict[str, Any]:
    await close_body(request)
    return await convs.close_chat(core_of(request), who, chat_session, path_site=site)


async def close_body(request: Request) -> ClosePost | None:
    """The close's body if it is a JSON object of the documented shape, else None: whatever its content
    type, size or syntax, a body never stops a child's conversation from being closed."""
    try:
        raw = await read_body(request)
        return ClosePost.model_validate_json(raw) if raw.strip() else None
    except (ApiError, ValidationError):
        return None


@router.post(
    "/chat/{chat_session}/ack/",
    openapi_extra=body_doc(AckPost),
    response_model=None,
    responses={**answer(ChatAcked, "the message's delivery now"), **responses(400, 401, 403, 404, 413, 415, 422, 503)},
    summary="The chatbot acknowledges a counselor message",
)
async def ack(request: Request, who: Caller, site: SiteSlug, chat_session: str) -> dict[str, Any]:
    body = await read_json(request, AckPost)
    return await convs.ack_message(core_of(request), who, chat_session, body.message_id, body.status, path_site=site)
