"""State machines of conversations and offers: the only legal moves."""

from __future__ import annotations

from enum import StrEnum

from helpline.domain.errors import Conflict


class ConversationStatus(StrEnum):
    QUEUED = "queued"
    OFFERED = "offered"
    ASSIGNED = "assigned"
    CLOSED = "closed"


class OfferStatus(StrEnum):
    PENDING = "pending"
    READ = "read"
    TIMED_OUT = "timed_out"
    DECLINED = "declined"
    WITHDRAWN = "withdrawn"


class Risk(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return {"low": 0, "medium": 1, "high": 2}[self.value]


_CONVERSATION_MOVES: dict[ConversationStatus, frozenset[ConversationStatus]] = {
    ConversationStatus.QUEUED: frozenset({ConversationStatus.OFFERED, ConversationStatus.CLOSED}),
    ConversationStatus.OFFERED: frozenset(
        {ConversationStatus.QUEUED, ConversationStatus.ASSIGNED, ConversationStatus.CLOSED}
    ),
    # assigned -> queued: a transfer puts it back in a queue
    ConversationStatus.ASSIGNED: frozenset({ConversationStatus.CLOSED, ConversationStatus.QUEUED}),
    ConversationStatus.CLOSED: frozenset(),
}

_OFFER_MOVES: dict[OfferStatus, frozenset[OfferStatus]] = {
    OfferStatus.PENDING: frozenset(
        {OfferStatus.READ, OfferStatus.TIMED_OUT, OfferStatus.DECLINED, OfferStatus.WITHDRAWN}
    ),
    OfferStatus.READ: frozenset(),
    OfferStatus.TIMED_OUT: frozenset(),
    OfferStatus.DECLINED: frozenset(),
    OfferStatus.WITHDRAWN: frozenset(),
}


def can_move_conversation(src: str, dst: str) -> bool:
    return ConversationStatus(dst) in _CONVERSATION_MOVES[ConversationStatus(src)]


def move_conversation(src: str, dst: str) -> str:
    if not can_move_conversation(src, dst):
        raise Conflict(f"conversation cannot go from {src} to {dst}")
    return dst


def can_move_offer(src: str, dst: str) -> bool:
    return OfferStatus(dst) in _OFFER_MOVES[OfferStatus(src)]


def move_offer(src: str, dst: str) -> str:
    if not can_move_offer(src, dst):
        raise Conflict(f"offer is already {src}")
    return dst
