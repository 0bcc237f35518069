"""The counselor's REST API (the console uses it, and so can any client)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from helpline.api.cases import client_address
from helpline.api.deps import RowId, body_doc, core_of, principal, read_json
from helpline.api.errors import responses
from helpline.api.schemas import (
    AttachmentIn,
    ConversationClosed,
    ConversationList,
    ConversationMessages,
    ConversationMoved,
    ConversationReopened,
    MessagesRead,
    MessageView,
    MeView,
    OfferDeclined,
    OfferList,
    OfferTaken,
    PresenceView,
    answer,
)
from helpline.domain import counselors as cs
from helpline.domain.auth import Principal
from helpline.domain.weni import agent as weni_agent

Caller = Annotated[Principal, Depends(principal)]
router = APIRouter(tags=["counselor"])


class PresenceIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: Literal["available", "paused", "offline"]
    reason: StrictStr | None = Field(None, max_length=128)


class ReplyIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: StrictStr = Field("", max_length=20000)
    # URL references (Weni tickets only): {"url", "content_type", "filename"?, "size"?}
    attachments: list[AttachmentIn] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> ReplyIn:
        if not self.text and not self.attachments:
            raise ValueError("text or attachments are required")
        return self


class CloseIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reason: StrictStr | None = Field(None, max_length=64)


class TransferIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    counselor: StrictStr | None = Field(None, max_length=150)
    site: StrictStr | None = Field(None, max_length=32)


ERR = responses(401, 403, 404, 409, 503)
BODY_ERR = responses(400, 401, 403, 404, 409, 413, 415, 422, 503)


async def _optional_body(request: Request, model: type[CloseIn]) -> CloseIn:
    if int(request.headers.get("content-length") or 0) > 0:
        return await read_json(request, model)
    return model()


@router.get(
    "/agents/me",
    response_model=None,
    responses={**answer(MeView, "who I am"), **ERR},
    summary="Who I am, my presence and load",
)
async def me(request: Request, who: Caller) -> dict[str, Any]:
    return await cs.me(core_of(request), who)


@router.put(
    "/agents/me/presence",
    openapi_extra=body_doc(PresenceIn),
    response_model=None,
    responses={**answer(PresenceView, "my presence now"), **BODY_ERR},
    summary="Join the queue (available), pause with a reason, or leave (offline)",
)
async def presence(request: Request, who: Caller) -> dict[str, Any]:
    body = await read_json(request, PresenceIn)
    return await cs.set_presence(core_of(request), who, body.status, body.reason)


@router.get(
    "/offers/", response_model=None, responses={**answer(OfferList, "oldest first"), **ERR}, summary="My pending offers"
)
async def offers(request: Request, who: Caller) -> dict[str, Any]:
    return await cs.list_offers(core_of(request), who)


@router.post(
    "/offers/{offer_id}/read",
    response_model=None,
    responses={**answer(OfferTaken, "the conversation is mine, with its messages"), **ERR},
    summary="Read an offer: the conversation is mine",
)
async def read_offer(request: Request, who: Caller, offer_id: RowId) -> dict[str, Any]:
    return await cs.read_offer(core_of(request), who, offer_id, address=client_address(request))


@router.post(
    "/offers/{offer_id}/decline",
    response_model=None,
    responses={**answer(OfferDeclined, "declined"), **ERR},
    summary="Decline an offer (409 when it has lapsed)",
)
async def decline_offer(request: Request, who: Caller, offer_id: RowId) -> dict[str, Any]:
    return await cs.decline_offer(core_of(request), who, offer_id)


@router.get(
    "/conversations/",
    response_model=None,
    responses={**answer(ConversationList, "newest first"), **ERR},
    summary="My open conversations (a supervisor: the site's)",
)
async def conversations(
    request: Request,
    who: Caller,
    status: Annotated[Literal["queued", "offered", "assigned", "closed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    return await cs.list_conversations(core_of(request), who, status=status, limit=limit)


@router.get(
    "/conversations/{conversation_id}/messages/",
    response_model=None,
    responses={**answer(ConversationMessages, "the conversation and its messages"), **ERR},
    summary="A conversation's messages (audited)",
)
async def messages(request: Request, who: Caller, conversation_id: str) -> dict[str, Any]:
    return await cs.conversation_messages(core_of(request), who, conversation_id, address=client_address(request))


@router.post(
    "/conversations/{conversation_id}/messages/",
    status_code=201,
    openapi_extra=body_doc(ReplyIn),
    response_model=None,
    responses={**answer(MessageView, "the message, pending delivery", 201), **BODY_ERR},
    summary="Reply to the client",
)
async def reply(request: Request, who: Caller, conversation_id: str) -> dict[str, Any]:
    body = await read_json(request, ReplyIn)
    files = [a.model_dump(exclude_none=True) for a in body.attachments]
    return await cs.reply(core_of(request), who, conversation_id, body.text, files)


@router.post(
    "/conversations/{conversation_id}/read/",
    response_model=None,
    responses={**answer(MessagesRead, "the client's messages now read"), **ERR},
    summary="I have read the client's messages (RapidPro is told)",
)
async def mark_read(request: Request, who: Caller, conversation_id: str) -> dict[str, Any]:
    return await cs.mark_read(core_of(request), who, conversation_id)


@router.post(
    "/conversations/{conversation_id}/close/",
    openapi_extra=body_doc(CloseIn),
    response_model=None,
    responses={**answer(ConversationClosed, "closed (or closed already)"), **BODY_ERR},
    summary="End the conversation (the chatbot is told)",
)
async def close(request: Request, who: Caller, conversation_id: str) -> dict[str, Any]:
    body = await _optional_body(request, CloseIn)
    return await cs.close(core_of(request), who, conversation_id, body.reason, address=client_address(request))


@router.post(
    "/conversations/{conversation_id}/transfer/",
    openapi_extra=body_doc(TransferIn),
    response_model=None,
    responses={**answer(ConversationMoved, "queued for the other site, or offered to the counselor"), **BODY_ERR},
    summary="Hand the conversation to another counselor or site",
)
async def transfer(request: Request, who: Caller, conversation_id: str) -> dict[str, Any]:
    body = await read_json(request, TransferIn)
    return await cs.transfer(
        core_of(request),
        who,
        conversation_id,
        counselor=body.counselor,
        site=body.site,
        address=client_address(request),
    )


@router.post(
    "/conversations/{conversation_id}/reopen/",
    response_model=None,
    responses={
        **answer(ConversationReopened, "queued again, or mine again (a counselor); or open already"),
        **responses(401, 403, 404, 409, 422, 503),
    },
    summary="Reopen a closed Weni ticket (Weni is told); 422 for other conversations",
)
async def reopen_conversation(request: Request, who: Caller, conversation_id: str) -> dict[str, Any]:
    return await weni_agent.reopen_by_counselor(core_of(request), who, conversation_id)
