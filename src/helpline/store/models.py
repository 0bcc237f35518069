"""The schema. Times are UTC epoch seconds (float): portable across SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(150), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # chatbot | counselor | supervisor | admin
    site: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(150))  # pseudonym shown to clients and in logs
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float)
    # The counselor's phone extension: their Asterisk queue interface, when the site has one.
    extension: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # A chatbot's HMAC signing secret(s), "new" or "new,old" while rotating: when set, every request
    # it authenticates must be signed (helpline.api.signing). Kept as is: HMAC needs the secret itself.
    signing_secret: Mapped[str | None] = mapped_column(String(255), nullable=True)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the token
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class LoginFailure(Base):
    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_key_at", "key", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200))  # "user:<name>" or "addr:<ip>"
    at: Mapped[float] = mapped_column(Float)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("chatbot_id", "chat_session", name="uq_conversations_chatbot_session"),
        Index("ix_conversations_queue", "site", "status", "risk_rank", "queued_at"),
        Index("ix_conversations_site_assigned", "site", "assigned_at"),  # recent waits: notices
        # Hunting counts each counselor's assigned conversations of a site on every round
        # (routing.presence): from this index alone, not 10,000 table rows at scale.
        Index("ix_conversations_site_status_counselor", "site", "status", "counselor_id"),
        Index("ix_conversations_purge", "purged_at", "closed_at"),
        Index("ix_conversations_wait_due", "wait_due"),
        Index("ix_conversations_reply_due", "reply_due"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid
    site: Mapped[str] = mapped_column(String(32))
    chatbot_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    chat_session: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str] = mapped_column(String(128))
    client_name: Mapped[str] = mapped_column(String(150), default="")
    contact_urn: Mapped[str | None] = mapped_column(String(255), nullable=True)
    contact_uuid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    location: Mapped[str | None] = mapped_column(String(8), nullable=True)
    risk: Mapped[str] = mapped_column(String(8), default="low")
    risk_rank: Mapped[int] = mapped_column(Integer, default=0)  # high=2 medium=1 low=0
    status: Mapped[str] = mapped_column(String(16))  # queued | offered | assigned | closed
    counselor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    created_at: Mapped[float] = mapped_column(Float)
    queued_at: Mapped[float] = mapped_column(Float)
    assigned_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closed_by: Mapped[str | None] = mapped_column(String(16), nullable=True)  # chatbot | counselor
    close_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Routing (domain/notices.py, routing/overflow.py). The site the contact came in through: its
    # RapidPro keeps carrying the events after a transfer or an overflow (NULL: ``site``).
    origin_site: Mapped[str | None] = mapped_column(String(32), nullable=True)
    site_since: Mapped[float | None] = mapped_column(Float, nullable=True)  # in its queue since (NULL: queued_at)
    overflow_depth: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    overflow_from: Mapped[str | None] = mapped_column(String(255), nullable=True)  # sites left, comma-separated
    notice_position: Mapped[int | None] = mapped_column(Integer, nullable=True)  # last position told the client
    notice_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # when it was told
    closed_notice_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # told out_of_hours, not reopened
    # Set by the retention purge (domain/retention.py): texts emptied, client identifiers pseudonymised.
    purged_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The safety net (domain/safety.py). The conversation's language (POST /api/chat/ ``language``;
    # NULL: the site's), the deadlines its timers fire at (NULL: no timer runs) and what they did.
    language: Mapped[str | None] = mapped_column(String(16), nullable=True)
    wait_due: Mapped[float | None] = mapped_column(Float, nullable=True)  # max wait runs out: fallback + alert
    fallback_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # when the fallback was sent
    awaiting_since: Mapped[float | None] = mapped_column(Float, nullable=True)  # child waits for a reply since
    reply_due: Mapped[float | None] = mapped_column(Float, nullable=True)  # reply timer: nudge, then alert
    reply_stage: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 0 none, 1 nudged, 2 alerted


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "external_id", name="uq_messages_conv_external"),
        Index("ix_messages_conv_id", "conversation_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    direction: Mapped[str] = mapped_column(String(3))  # in (client -> counselor) | out
    external_id: Mapped[str] = mapped_column(String(128))  # message_id
    text: Mapped[str] = mapped_column(Text)
    # in:  queued -> delivered (a counselor has it) -> read
    # out: pending -> sent (RapidPro took it) -> delivered -> read | failed
    status: Mapped[str] = mapped_column(String(16))
    counselor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    status_at: Mapped[float] = mapped_column(Float)
    # JSON list of {"url", "content_type", "filename", "size", ...} (URL references), or NULL: none.
    attachments: Mapped[str | None] = mapped_column(Text, nullable=True)
    # contact | counselor | bot | system; NULL: contact when "in", counselor when "out".
    sender: Mapped[str | None] = mapped_column(String(16), nullable=True)


class IdempotencyKey(Base):
    """The first answer to a chatbot's ``message_id``: the same id again gets the same answer."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("chatbot_id", "message_id", name="uq_idem_chatbot_msg"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chatbot_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(String(128))
    conversation_id: Mapped[str] = mapped_column(String(36))
    response: Mapped[str] = mapped_column(Text)  # JSON
    created_at: Mapped[float] = mapped_column(Float)


class Agent(Base):
    """A counselor's presence in the queue."""

    __tablename__ = "agents"
    __table_args__ = (
        # Hunting for ``leastrecent`` and ``roundrobin`` reads the site's available counselors in
        # that strategy's order and stops at the first few with room (routing.presence), however
        # many are free.
        Index("ix_agents_site_status_assigned", "site", "status", "last_assigned_at", "user_id"),
        Index("ix_agents_site_status_user", "site", "status", "user_id"),
    )

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    site: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), default="offline")  # available | paused | offline
    reason: Mapped[str | None] = mapped_column(String(128), nullable=True)
    since: Mapped[float] = mapped_column(Float)
    last_offer_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_assigned_at: Mapped[float] = mapped_column(Float, default=0.0)
    wrapup_until: Mapped[float] = mapped_column(Float, default=0.0)


class PhoneState(Base):
    """A counselor's phone as their site's Asterisk queue reports it (AMI events and QueueStatus).

    Kept apart from ``agents``: the AMI listener writes here without touching the rows that
    counselors' own requests lock. Busy or paused here: no chat offers (see routing.presence).
    """

    __tablename__ = "phone_states"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    site: Mapped[str] = mapped_column(String(32), index=True)
    member: Mapped[bool] = mapped_column(Boolean, default=False)  # in the Asterisk queue
    status: Mapped[int] = mapped_column(Integer, default=0)  # Asterisk device state (2 InUse, 6 Ringing...)
    in_call: Mapped[bool] = mapped_column(Boolean, default=False)  # InCall, AgentCalled..AgentComplete
    busy: Mapped[bool] = mapped_column(Boolean, default=False)  # in_call or a busy device state
    paused: Mapped[bool] = mapped_column(Boolean, default=False)  # paused in Asterisk
    reason: Mapped[str | None] = mapped_column(String(128), nullable=True)  # Asterisk's pause reason
    updated_at: Mapped[float] = mapped_column(Float)


class Offer(Base):
    __tablename__ = "offers"
    __table_args__ = (
        Index("ix_offers_status_deadline", "status", "deadline"),
        Index("ix_offers_conversation", "conversation_id"),
        Index("ix_offers_counselor_status", "counselor_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    counselor_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    site: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # pending | read | timed_out | declined | withdrawn
    created_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class OutboxEvent(Base):
    """An event owed to a peer, written in the same transaction as what caused it."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_conv", "conversation_id", "status", "id"),
        Index("ix_outbox_heads", "status", "conversation_id", "id"),
        Index("ix_outbox_message", "message_ref", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(String(36))
    site: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(16), default="rapidpro")
    event: Mapped[str] = mapped_column(String(16))  # message | ack | queued | assigned | closed
    message_ref: Mapped[int | None] = mapped_column(Integer, nullable=True)  # messages.id, if any
    payload: Mapped[str] = mapped_column(Text)  # JSON body to send
    status: Mapped[str] = mapped_column(String(8), default="pending")  # pending | sent | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    claimed_until: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Ticket(Base):
    """A Weni ticket (generic ticketer contract v1): the Weni side of one conversation."""

    __tablename__ = "tickets"
    __table_args__ = (
        UniqueConstraint("chatbot_id", "ticket_id", name="uq_tickets_chatbot_ticket"),
        # One open ticket per contact and Weni project: set while open, NULL once closed.
        UniqueConstraint("chatbot_id", "open_contact", name="uq_tickets_chatbot_open_contact"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), unique=True)
    chatbot_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    ticket_id: Mapped[str] = mapped_column(String(64))  # Weni's ticket uuid
    external_id: Mapped[str] = mapped_column(String(64), unique=True)  # ours, given to Weni
    project: Mapped[str] = mapped_column(String(150))  # the chatbot username: per-project settings key
    project_uuid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    org_uuid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    contact_uuid: Mapped[str] = mapped_column(String(64))
    contact_urn: Mapped[str] = mapped_column(String(255))
    topic_uuid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    topic_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    priority: Mapped[str | None] = mapped_column(String(16), nullable=True)
    webhook_base_url: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    meta: Mapped[str | None] = mapped_column(Text, nullable=True)  # Weni's metadata, JSON
    open_contact: Mapped[str | None] = mapped_column(String(64), nullable=True)
    opened_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class TicketRequest(Base):
    """The first answer to a Weni request, by ``Idempotency-Key`` or ``X-Request-Id``: a repeat gets it again."""

    __tablename__ = "ticket_requests"
    __table_args__ = (UniqueConstraint("chatbot_id", "scope", "key", name="uq_ticket_requests_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    chatbot_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(String(80))  # "open", "messages:<external_id>", ...
    key: Mapped[str] = mapped_column(String(300))  # "idem:<Idempotency-Key>" or "req:<X-Request-Id>"
    status: Mapped[int] = mapped_column(Integer)
    response: Mapped[str] = mapped_column(Text)  # JSON
    created_at: Mapped[float] = mapped_column(Float, index=True)


class BusSpill(Base):
    """A live event too large for a PostgreSQL NOTIFY payload, fetched by id by the listeners."""

    __tablename__ = "bus_spill"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)


class AuditEntry(Base):
    """Who read or acted on a conversation (domain/audit.py): written in the transaction of the access."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_conversation_at", "conversation_id", "at"),
        Index("ix_audit_log_site_at", "site", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    # No foreign keys: the trail outlives anything it points at.
    user_id: Mapped[int] = mapped_column(Integer)
    username: Mapped[str] = mapped_column(String(150))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))  # read_messages | read_offer | export | close | transfer | replay
    conversation_id: Mapped[str] = mapped_column(String(36))
    site: Mapped[str] = mapped_column(String(32))
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the caller's IP address


class SeenSignature(Base):
    """A request signature some instance accepted (helpline.domain.signatures): on PostgreSQL every
    instance refuses it as a replay until ``expires_at``, the end of its timestamp's window."""

    __tablename__ = "seen_signatures"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # "<account id>:<64 hex digest>"
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Alert(Base):
    """Something a supervisor must know (domain/safety.py): raised once per cause, resolved by itself
    when the cause ends, acknowledged by a supervisor."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_site_raised", "site", "raised_at"),
        Index("ix_alerts_site_status", "site", "status"),
        Index("ix_alerts_conversation", "conversation_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(24))  # waiting_too_long | unanswered | no_counselors | delivery_failed
    cause: Mapped[str] = mapped_column(String(120))  # "waiting_too_long:<conversation id>", "no_counselors:<site>"...
    # The cause while the alert is unresolved (NULL once resolved): unique, so that every instance
    # raising the same cause at once makes one alert.
    open_cause: Mapped[str | None] = mapped_column(String(120), nullable=True, unique=True)
    status: Mapped[str] = mapped_column(String(16))  # open | acknowledged | resolved
    conversation_id: Mapped[str | None] = mapped_column(String(36), nullable=True)  # no FK: outlives a purge
    counselor_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    risk: Mapped[str | None] = mapped_column(String(8), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON: waited_s, reason, case...
    raised_at: Mapped[float] = mapped_column(Float)
    acked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acked_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    acked_by_name: Mapped[str | None] = mapped_column(String(150), nullable=True)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Whisper(Base):
    """A supervisor's note to a conversation's counselor: shown to counselors and supervisors only,
    never sent to RapidPro or Weni, never in the chatbot's view of the conversation."""

    __tablename__ = "whispers"
    __table_args__ = (Index("ix_whispers_conversation", "conversation_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    site: Mapped[str] = mapped_column(String(32))
    author_id: Mapped[int] = mapped_column(Integer)
    author_name: Mapped[str] = mapped_column(String(150))
    counselor_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # who it was for
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
