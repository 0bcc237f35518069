"""Log hygiene: what the server's own log lines must not carry.

helpline's structured logs (structlog) never name a client: no message text, no ``chat_sender``,
contact URN or UUID, no client name; outbox failures are logged as ``HTTP 400`` or ``ConnectError``
without the peer's answer, which may echo the params (see ``delivery.outbox.short_reason``).

Uvicorn's access log and its WebSocket lines show request paths. ``chat_session`` and conversation ids
in paths are pseudonymous ids (they name no one), so those lines stay. A WebSocket's ``?token=`` (the
console opens ``/ws?token=…``) is a credential: :class:`RedactTokens` blanks it in uvicorn's records.
"""

from __future__ import annotations

import logging
import re

_TOKEN_QUERY = re.compile(r"([?&](?:token|access_token)=)[^&\s\"']*", re.IGNORECASE)
UVICORN_LOGGERS = ("uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    """``/ws?token=abc&x=1`` -> ``/ws?token=[redacted]&x=1``."""
    return _TOKEN_QUERY.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Blanks ``token=`` query values in a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


_FILTER = RedactTokens()


def install_redaction() -> None:
    """Put :class:`RedactTokens` on uvicorn's loggers (idempotent)."""
    for name in UVICORN_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
