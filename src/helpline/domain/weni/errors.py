"""The Weni contract's own errors (``{"error": "<code>", ...}`` under ``/v1``; the API maps them)."""

from __future__ import annotations

from helpline.domain.errors import Conflict, Invalid, NotFound


class TicketNotFound(NotFound):
    code = "ticket_not_found"

    def __init__(self, external_id: str) -> None:
        super().__init__(f"Ticket {external_id} was not found", fields={"external_id": external_id})


class TicketAlreadyOpen(Conflict):
    code = "ticket_already_open"

    def __init__(self, external_id: str) -> None:
        super().__init__("An open ticket already exists for this contact", fields={"external_id": external_id})


class TicketAlreadyClosed(Conflict):
    code = "ticket_already_closed"

    def __init__(self, external_id: str) -> None:
        super().__init__("Ticket is already closed", fields={"external_id": external_id})


class TicketClosed(Conflict):
    code = "ticket_closed"

    def __init__(self, external_id: str) -> None:
        super().__init__(f"Ticket {external_id} is closed", fields={"external_id": external_id})


class MissingWebhookUrl(Invalid):
    code = "webhook_base_url_required"


class ReopenNotSupported(Invalid):
    code = "reopen_not_supported"
