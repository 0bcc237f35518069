"""Weni webhooks (generic ticketer contract v1): build, sign, send, classify.

No database code lives here. The outbox stores one :class:`Webhook` per event (the URL, the exact
body text and a request id) and hands it back here on every attempt:

* the body bytes are sent exactly as stored, and signed with
  ``X-Webhook-Signature: sha256=<hex HMAC-SHA256(secret, body)>``;
* ``X-Webhook-Timestamp`` (RFC 3339, UTC) is taken at each attempt, so a webhook retried after a
  long outage is still inside Weni's five-minute window;
* ``X-Request-Id`` is the same on every attempt of one event, so Weni may recognise a repeat;
* the first configured secret signs; when Weni answers ``401 invalid_signature`` the next one is
  tried at once (a secret rotation where helpline changed first);
* the answer becomes an :class:`~helpline.delivery.rapidpro.Outcome`: 2xx ``sent``; network
  errors, timeouts, 408, 429 and 5xx ``retry`` (``Retry-After`` honoured); other 4xx ``dead``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx

from helpline.config.settings import Settings
from helpline.delivery.rapidpro import Outcome, http_client, parse_retry_after

__all__ = [
    "SIGNATURE_HEADER",
    "SOURCE",
    "TIMESTAMP_HEADER",
    "Webhook",
    "WeniClient",
    "classify",
    "dumps",
    "rfc3339",
    "secrets_for",
    "sign",
    "webhook_base_url",
]

SOURCE = "weni-ticketer"
"""``conversations.source`` of a conversation opened through ``POST /v1/tickets``."""

SIGNATURE_HEADER = "X-Webhook-Signature"
TIMESTAMP_HEADER = "X-Webhook-Timestamp"
_BODY_SNIPPET = 500


def dumps(body: dict[str, Any]) -> str:
    """The JSON text of a webhook body: compact, UTF-8 characters kept as they are."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def rfc3339(t: float | None = None) -> str:
    """``2026-05-20T14:35:00Z``: RFC 3339 in UTC, whole seconds."""
    when = datetime.now(UTC) if t is None else datetime.fromtimestamp(t, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, body)>`` over the exact bytes sent."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def _split(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def secrets_for(settings: Settings, project: str) -> list[str]:
    """The webhook secrets of a Weni project, newest first (the project's own, else the global ones)."""
    own = settings.weni_projects.get(project)
    if own is not None and _split(own.webhook_secrets):
        return _split(own.webhook_secrets)
    return _split(settings.weni_webhook_secrets)


def webhook_base_url(settings: Settings, project: str, from_weni: str | None) -> str | None:
    """Where a ticket's webhooks go: a configured URL wins over the one Weni sent when opening."""
    own = settings.weni_projects.get(project)
    if own is not None and own.webhook_base_url:
        return own.webhook_base_url.rstrip("/")
    if from_weni:
        return from_weni.rstrip("/")
    if settings.weni_webhook_base_url:
        return settings.weni_webhook_base_url.rstrip("/")
    return None


@dataclass(frozen=True)
class Webhook:
    """One webhook owed to Weni, as the outbox stores it (``to_payload``/``from_payload``)."""

    url: str
    body: str  # the exact JSON text sent and signed
    project: str  # whose secrets sign it (looked up at each attempt: rotations apply to what is pending)
    request_id: str

    @classmethod
    def new(cls, url: str, body: dict[str, Any], project: str) -> Webhook:
        return cls(url=url, body=dumps(body), project=project, request_id=str(uuid.uuid4()))

    def to_payload(self) -> str:
        return json.dumps(
            {"url": self.url, "body": self.body, "project": self.project, "request_id": self.request_id},
            ensure_ascii=False,
        )

    @classmethod
    def from_payload(cls, payload: str) -> Webhook:
        data = json.loads(payload)
        return cls(
            url=str(data["url"]),
            body=str(data["body"]),
            project=str(data["project"]),
            request_id=str(data["request_id"]),
        )


def _snippet(response: httpx.Response) -> str:
    try:
        text = response.text
    except (LookupError, ValueError):
        text = repr(response.content[:_BODY_SNIPPET])
    return text[:_BODY_SNIPPET]


def _error_code(response: httpx.Response) -> str | None:
    try:
        data = response.json()
    except ValueError:
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) else None


def classify(response: httpx.Response) -> Outcome:
    """Turn Weni's answer into an :class:`Outcome` (contract: retry 5xx and 429, not other 4xx)."""
    code = response.status_code
    if 200 <= code < 300:
        return Outcome("sent", f"HTTP {code}", status=code)
    reason = f"HTTP {code}: {_snippet(response)}"
    if code in (408, 429) or code >= 500:
        return Outcome("retry", reason, retry_after=parse_retry_after(response.headers.get("retry-after")), status=code)
    return Outcome("dead", reason, status=code)


class WeniClient:
    """Posts signed webhooks. Never raises for HTTP or network problems: see :class:`Outcome`."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._owns_client = client is None
        self._client = (
            client if client is not None else http_client()
        )  # keep-alive, on aiohttp (see rapidpro.http_client)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def deliver(self, settings: Settings, payload: str) -> Outcome:
        """Send an outbox payload (see :meth:`Webhook.to_payload`) with the project's current secrets."""
        try:
            hook = Webhook.from_payload(payload)
        except (ValueError, KeyError, TypeError) as exc:
            return Outcome("dead", f"unreadable webhook payload: {type(exc).__name__}")
        return await self.send(hook, secrets_for(settings, hook.project), timeout_s=settings.weni_timeout_s)

    async def send(self, hook: Webhook, secrets: Sequence[str], *, timeout_s: float = 30.0) -> Outcome:
        """POST ``hook``, signed with ``secrets[0]``; on ``401 invalid_signature`` try the next secret.

        With no secret at all the webhook goes unsigned (a Weni ticketer with ``skip_webhook_hmac``).
        """
        content = hook.body.encode("utf-8")
        keys: list[str | None] = list(secrets) or [None]
        for i, secret in enumerate(keys):
            outcome, bad_signature = await self._post(hook, content, secret, timeout_s)
            if not (bad_signature and i + 1 < len(keys)):
                return outcome
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, hook: Webhook, content: bytes, secret: str | None, timeout_s: float) -> tuple[Outcome, bool]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            TIMESTAMP_HEADER: rfc3339(),
            "X-Request-Id": hook.request_id,
        }
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(secret, content)
        try:
            response = await self._client.post(
                hook.url, content=content, headers=headers, timeout=httpx.Timeout(timeout_s)
            )
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            return Outcome("dead", f"bad Weni webhook URL {hook.url!r}: {type(exc).__name__}: {exc}"), False
        except (httpx.HTTPError, OSError) as exc:
            detail = str(exc).strip()
            return Outcome("retry", f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__), False
        return classify(response), response.status_code == 401 and _error_code(response) == "invalid_signature"
