"""Schemas shared by the routes: the bodies of successful answers, and request bodies two interfaces take.

Answers are for ``/openapi.json`` only. Routes document them with ``response_model=None,
responses=answer(Model, ...)``: they return the domain's views (``helpline.domain.views``) as they
are, nothing is filtered or re-validated on the way out. Keys a view has beyond these are allowed
(no ``additionalProperties: false``); the fuzz tests check every answer against these schemas.

Request bodies (validated): :class:`AttachmentIn`, the URL reference Weni sends on a contact's
message (``api/weni.py``) and a counselor sends on a reply to a Weni ticket (``api/counselors.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from helpline.domain.audit import Action
from helpline.domain.states import Risk

ConversationState = Literal["queued", "offered", "assigned", "closed"]
InDelivery = Literal["queued", "delivered", "read"]  # a client's message
OutDelivery = Literal["pending", "sent", "delivered", "read", "failed"]  # a counselor's
OfferState = Literal["pending", "read", "timed_out", "declined", "withdrawn"]


class AttachmentIn(BaseModel):
    # An attachment as a URL reference (helpline never stores the file). No docstring: it would
    # become the schema's description in /openapi.json.
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = Field(None, max_length=128)
    url: StrictStr = Field(
        pattern=r"^(https?://\S+|geo:-?\d{1,2}(\.\d+)?,-?\d{1,3}(\.\d+)?([,;]\S*)?)$",
        max_length=2048,
        description="an http(s) URL, or a shared location as geo:LAT,LON (RFC 5870)",
    )
    content_type: StrictStr | None = Field(None, max_length=255)
    filename: StrictStr | None = Field(None, max_length=255)
    size: StrictInt | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None


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
    status: OfferState
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


class ConversationReopened(BaseModel):
    conversation: ConversationView
    already_open: bool  # it was open: nothing changed


# -- the supervisor's API --------------------------------------------------------------------------


class QueueCounts(BaseModel):
    waiting: int  # queued + offered
    queued: int
    offered: int
    assigned: int
    high_risk_waiting: int
    longest_wait_s: float | None


class CounselorState(BaseModel):
    id: int
    username: str
    name: str
    status: Literal["available", "paused", "offline"]
    reason: str | None
    since: str | None
    in_wrapup: bool
    active_conversations: int
    pending_offers: int


class CounselorsSummary(BaseModel):
    available: int
    paused: int
    offline: int


class OutboxState(BaseModel):
    pending: int
    oldest_pending_age_s: float | None


class SiteOverview(BaseModel):
    slug: str
    name: str
    max_chats_per_counselor: int | None
    offer_timeout_s: float | None
    queue: QueueCounts
    counselors: list[CounselorState]
    counselors_summary: CounselorsSummary
    offers_lapsed_last_hour: int
    outbox: OutboxState
    dead_letters: int


class Overview(BaseModel):
    generated_at: str
    sites: list[SiteOverview]


class DeadLetter(BaseModel):
    """An event a peer refused for good: the reason and the conversation, never the text."""

    id: int
    site: str
    conversation_id: str
    chat_session: str | None
    event: str  # message | ack | queued | assigned | closed | position | out_of_hours | overflow | reopened
    last_error: str | None
    attempts: int
    created_at: str


class DeadLetters(BaseModel):
    results: list[DeadLetter]
    count: int  # all of them, beyond ``limit``


class Replayed(BaseModel):
    id: int
    site: str
    status: Literal["pending"]


class HourStats(BaseModel):
    start: str  # the hour, UTC
    conversations: int  # started in that hour
    assigned: int  # of those, assigned since
    median_wait_s: float | None
    max_wait_s: float | None


class SiteStats(BaseModel):
    slug: str
    name: str
    hours: list[HourStats]  # oldest first


class Stats(BaseModel):
    generated_at: str
    hours: int
    sites: list[SiteStats]


StaffRole = Literal["counselor", "supervisor", "admin"]


class AuditEntryView(BaseModel):
    id: int
    at: str
    user_id: int
    username: str
    role: StaffRole
    action: Action
    conversation_id: str
    site: str
    address: str | None


class AuditLog(BaseModel):
    results: list[AuditEntryView]  # newest first
    count: int


# -- a case file (GET /api/conversations/<id>/export) ----------------------------------------------


class Person(BaseModel):
    id: int
    username: str
    name: str


class Exporter(Person):
    role: StaffRole


class CaseClient(BaseModel):
    """The pseudonym for a counselor; supervisors and admins also get the contact identifiers."""

    name: str
    id: str | None = None
    contact_urn: str | None = None
    contact_uuid: str | None = None


class CaseConversation(ConversationView):
    purged_at: str | None
    counselor: Person | None
    client: CaseClient


class CaseOffer(BaseModel):
    id: int
    site: str
    counselor: Person | None
    status: OfferState
    created_at: str
    deadline: str
    resolved_at: str | None


class CaseFile(BaseModel):
    format: Literal["helpline.conversation/1"]
    exported_at: str
    exported_by: Exporter
    conversation: CaseConversation
    messages: list[MessageView]  # oldest first
    offers: list[CaseOffer]  # oldest first
    audit: list[AuditEntryView]  # oldest first, this export included
