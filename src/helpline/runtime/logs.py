"""Log hygiene: what the server's own log lines must not carry.

helpline's structured logs (structlog) never name a client: no message text, no ``chat_sender``,
contact URN or UUID, no client name; outbox failures are logged as ``HTTP 400`` or ``ConnectError``
without the peer's answer, which may echo the params (see :func:`short_reason`).

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


_GAVE_UP = re.compile(r"^gave up after \d+ attempts: ")
_HTTP_STATUS = re.compile(r"^HTTP \d{3}")


def short_reason(reason: str) -> str:
    """A failure reason without the peer's answer, which may echo the params (message text, contact):
    ``"HTTP 400: {...}"`` -> ``"HTTP 400"``, ``"ConnectError: ..."`` -> ``"ConnectError"``. For logs."""
    prefix = ""
    gave_up = _GAVE_UP.match(reason)
    if gave_up:
        prefix, reason = gave_up.group(0), reason[gave_up.end() :]
    status = _HTTP_STATUS.match(reason)
    head = status.group(0) if status else reason.split(": ", 1)[0]
    return (prefix + head)[:200]
