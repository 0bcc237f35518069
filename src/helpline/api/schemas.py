"""The bodies of successful answers, for ``/openapi.json`` only.

Routes document them with ``response_model=None, responses=answer(Model, ...)``: they return the
domain's views (``helpline.domain.views``) as they are, nothing is filtered or re-validated on the
way out. Keys a view has beyond these are allowed (no ``additionalProperties: false``); the fuzz
tests check every answer against these schemas.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from helpline.domain.states import Risk

ConversationState = Literal["queued", "offered", "assigned", "closed"]
InDelivery = Literal["queued", "delivered", "read"]  # a client's message
OutDelivery = Literal["pending", "sent", "delivered", "read", "failed"]  # a counselor's


def answer(model: type[BaseModel], description: str, status: int = 200) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry documenting a successful answer's body."""
    return {status: {"model": model, "description": description}}


class ConversationView(BaseModel):
    id: str
    chat_session: str
    site: str
    status: ConversationState
    risk: Risk
    client_name: str
    source: str
    location: str | None
    counselor_id: int | None
    created_at: str
    queued_at: str
    assigned_at: str | None
    closed_at: str | None
    closed_by: str | None
    close_reason: str | None


class MessageView(BaseModel):
    id: int
    uuid: str
    message_id: str
    conversation_id: str
    direction: Literal["in", "out"]
    sender: str  # contact | counselor | bot | system
    text: str
    attachments: list[dict[str, Any]]
    status: InDelivery | OutDelivery
    counselor_name: str | None
    created_at: str
    status_at: str | None


class OfferView(BaseModel):
    id: int
    status: Literal["pending", "read", "timed_out", "declined", "withdrawn"]
    created_at: str
    deadline: str
    expires_in_s: float
    conversation: ConversationView


class PresenceView(BaseModel):
    status: Literal["available", "paused", "offline"]
    reason: str | None
    since: str | None
    wrapup_until: str | None


# -- the chatbot's API -----------------------------------------------------------------------------


class ChatList(BaseModel):
    results: list[ConversationView]
    next_cursor: str | None


class ChatMessages(BaseModel):
    chat_session: str
    conversation_status: ConversationState
    results: list[MessageView]


class ChatClosed(BaseModel):
    status: Literal["success"]
    chat_session: str
    conversation_status: Literal["closed"]
    already_closed: bool
    closed_at: str | None


class ChatAcked(BaseModel):
    status: Literal["success"]
    chat_session: str
    message_id: str
    delivery: OutDelivery


# -- the counselor's API ---------------------------------------------------------------------------


class MeView(BaseModel):
    id: int
    username: str
    name: str
    role: Literal["chatbot", "counselor", "supervisor", "admin"]
    site: str
    site_name: str | None
    presence: PresenceView
    active_conversations: int
    max_conversations: int | None


class OfferList(BaseModel):
    results: list[OfferView]


class OfferTaken(BaseModel):
    offer: OfferView
    conversation: ConversationView
    messages: list[MessageView]


class OfferDeclined(BaseModel):
    id: int
    status: Literal["declined"]


class ConversationList(BaseModel):
    results: list[ConversationView]


class ConversationMessages(BaseModel):
    conversation: ConversationView
    results: list[MessageView]


class MessagesRead(BaseModel):
    conversation_id: str
    read: list[str]  # the message_ids now read


class ConversationClosed(BaseModel):
    conversation: ConversationView
    already_closed: bool


class ConversationMoved(BaseModel):
    conversation: ConversationView
