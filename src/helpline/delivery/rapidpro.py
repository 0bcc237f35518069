"""RapidPro ``flow_starts`` adapter: build the request, send it, classify the answer.

No database code lives here. The outbox decides *when* to send and what to do with an
:class:`Outcome`; this module only knows RapidPro's API v2 ``POST /api/v2/flow_starts.json``:

* :func:`split_text` cuts a long counselor message into ordered parts that RapidPro will not
  truncate (it cuts every string value of ``params``/``extra`` to 640 characters);
* :func:`contact_target` and :func:`build_flow_start` build the JSON body;
* :class:`RapidProClient` posts it and turns the answer into ``sent`` / ``retry`` / ``dead``;
* :func:`backoff_delay` says how long to wait before the next attempt;
* :func:`http_client` is the default clients' (RapidPro's and Weni's) ``httpx.AsyncClient``, on
  aiohttp's transport: httpcore's pool costs ~1 ms of CPU per request and grows with its
  connections, which capped a drain of the outbox far below 1,000 events/s on one core.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import random
import re
import time
import unicodedata
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from helpline.config.sites import RapidProConfig

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_PARAMS",
    "MAX_URNS",
    "PART_LIMIT",
    "Outcome",
    "RapidProClient",
    "Transport",
    "backoff_delay",
    "build_flow_start",
    "contact_target",
    "http_client",
    "parse_retry_after",
    "split_text",
]

PART_LIMIT = 640
"""RapidPro cuts every string value of ``params``/``extra`` to this many characters."""

MAX_PARAMS = 256
"""RapidPro keeps at most this many values of ``params``/``extra``."""

MAX_URNS = 100
"""RapidPro accepts at most this many items in ``urns`` / ``contacts`` / ``groups``."""

_LOOKBACK = 80
_KEY_RE = re.compile(r"^[a-zA-Z0-9_]{1,255}$")
_TARGET_KEYS = ("urns", "contacts", "groups")
_BODY_SNIPPET = 500


# --------------------------------------------------------------------------- splitting


def _is_joiner(ch: str) -> bool:
    """Characters that must stay glued to the one before them (accents, ZWJ, selectors)."""
    return bool(
        unicodedata.combining(ch)
        or ch in "\u200d\u200c"
        or "\ufe00" <= ch <= "\ufe0f"
        or "\U0001f3fb" <= ch <= "\U0001f3ff"  # skin-tone modifiers
    )


def _cut_point(text: str, start: int, limit: int) -> int:
    """Index where the part beginning at ``start`` ends (exclusive); always > start."""
    end = start + limit
    lookback = min(_LOOKBACK, limit // 2)
    # Prefer to cut just after a whitespace character near the end of the window.
    for i in range(end - 1, end - 1 - lookback, -1):
        if i <= start:
            break
        ch = text[i]
        if ch.isspace() and not (ch == "\r" and text[i + 1 : i + 2] == "\n"):
            return i + 1
    # Hard split, but do not separate a base character from what is joined to it, nor cut
    # a ZWJ sequence in the middle, when there is room to back off a little.
    cut = end
    floor = max(start + 1, end - 16)
    while cut > floor and (_is_joiner(text[cut]) or text[cut - 1] == "\u200d"):
        cut -= 1
    if _is_joiner(text[cut]) or text[cut - 1] == "\u200d":
        return end  # a very long cluster: hard split at the limit
    return cut


def split_text(text: str, limit: int = PART_LIMIT) -> list[str]:
    """Split ``text`` into ordered parts of at most ``limit`` characters.

    ``"".join(split_text(t)) == t`` always holds: no character is dropped or added. A part
    ends just after a whitespace character when one lies in the last ~80 characters of the
    window; otherwise the text is split at the limit. Empty text gives ``[""]``.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if len(text) <= limit:
        return [text]
    parts: list[str] = []
    start = 0
    while len(text) - start > limit:
        cut = _cut_point(text, start, limit)
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


# --------------------------------------------------------------------------- body


def contact_target(
    cfg: RapidProConfig,
    *,
    contact_urn: str | None,
    contact_uuid: str | None,
    client_id: str,
) -> dict[str, list[str]]:
    """Who the flow is started for: the contact URN, else the contact UUID, else a URN
    made from the site's URN scheme and the chatbot's client id (``telegram:23343411``)."""
    if contact_urn:
        return {"urns": [contact_urn]}
    if contact_uuid:
        return {"contacts": [contact_uuid]}
    return {"urns": [f"{cfg.urn_scheme}:{client_id}"]}


def build_flow_start(
    cfg: RapidProConfig,
    target: dict[str, list[str]],
    params: dict[str, str],
) -> dict[str, object]:
    """The JSON body of a flow start: ``{"flow", "urns"|"contacts", "params"|"extra"}``.

    Raises :class:`ValueError` for anything RapidPro would silently alter or reject: a value
    longer than :data:`PART_LIMIT` (split it first with :func:`split_text`), a key outside
    ``[a-zA-Z0-9_]``, more than :data:`MAX_PARAMS` values, or an empty / oversized / unknown
    target; :class:`TypeError` for a value that is not a string.
    """
    if not target or any(k not in _TARGET_KEYS for k in target):
        raise ValueError(f"target must use the keys {_TARGET_KEYS}, got {sorted(target)}")
    if not any(target.values()):
        raise ValueError("target must name at least one URN, contact or group")
    for key, items in target.items():
        if len(items) > MAX_URNS:
            raise ValueError(f"at most {MAX_URNS} {key} per flow start, got {len(items)}")
    if len(params) > MAX_PARAMS:
        raise ValueError(f"at most {MAX_PARAMS} params per flow start, got {len(params)}")
    for key, value in params.items():
        if not _KEY_RE.match(key):
            raise ValueError(f"param key {key!r} must match [a-zA-Z0-9_]{{1,255}}")
        if not isinstance(value, str):
            raise TypeError(f"param {key!r} must be a string, got {type(value).__name__}")
        if len(value) > PART_LIMIT:
            raise ValueError(f"param {key!r} has {len(value)} characters; RapidPro keeps {PART_LIMIT}: split it first")
    body: dict[str, object] = {"flow": cfg.flow}
    body.update({k: list(v) for k, v in target.items()})
    body[cfg.params_field] = dict(params)
    return body


# --------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class Outcome:
    """What became of one attempt.

    ``sent``: RapidPro created the flow start. ``retry``: try again later (network error,
    timeout, 408, 429, 5xx); ``retry_after`` is the server's wish in seconds, if it said.
    ``dead``: retrying cannot help (other 4xx, 3xx, bad URL or body); ``reason`` says why.
    """

    kind: Literal["sent", "retry", "dead"]
    reason: str
    retry_after: float | None = None
    status: int | None = None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date).

    ``None`` when absent or invalid; a date in the past gives ``0.0``.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _snippet(response: httpx.Response) -> str:
    try:
        text = response.text
    except (LookupError, ValueError):  # undecodable body: show the bytes instead
        text = repr(response.content[:_BODY_SNIPPET])
    return text[:_BODY_SNIPPET]


def _error_reason(exc: BaseException) -> str:
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def classify(response: httpx.Response) -> Outcome:
    """Turn RapidPro's answer into an :class:`Outcome`."""
    code = response.status_code
    if 200 <= code < 300:
        reason = f"HTTP {code}"
        try:
            data = response.json()
        except ValueError:  # a 2xx is a success whatever its body
            data = None
        start_uuid = data.get("uuid") if isinstance(data, dict) else None
        if isinstance(start_uuid, str):
            reason += f" (flow start {start_uuid})"
        return Outcome("sent", reason, status=code)
    reason = f"HTTP {code}: {_snippet(response)}"
    if code == 429 or code == 408 or code >= 500:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return Outcome("retry", reason, retry_after=retry_after, status=code)
    if 300 <= code < 400 and "location" in response.headers:
        reason = f"HTTP {code} redirect to {response.headers['location']}: {_snippet(response)}"
    return Outcome("dead", reason, status=code)


# --------------------------------------------------------------------------- transport

DEFAULT_MAX_CONNECTIONS = 256
"""Connections kept per origin (scheme, host, port) by the default clients."""

_KEEPALIVE_EXPIRY_S = 4.0  # under the usual servers' idle timeouts (uvicorn 5 s, nginx 75 s)


class Transport(AiohttpTransport):
    """httpx-aiohttp's transport, with every aiohttp failure raised as the httpx error it is.

    It leaves a malformed answer as aiohttp's own exception and reports a refused certificate or
    a peer that hung up as a connect *timeout*; callers here catch ``httpx.HTTPError`` only.
    """

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.TransportError as exc:
            cause = exc.__cause__
            if isinstance(cause, aiohttp.ServerDisconnectedError):
                raise httpx.RemoteProtocolError(str(cause) or "the server hung up", request=request) from cause
            if isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ClientSSLError):
                raise httpx.ConnectError(str(cause), request=request) from cause
            raise
        except aiohttp.ClientError as exc:  # e.g. a status line that is not HTTP
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc


def http_client(max_connections: int = DEFAULT_MAX_CONNECTIONS) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` sending through aiohttp (``httpx-aiohttp``), with up to
    ``max_connections`` keep-alive connections per origin.

    httpx's own transport (httpcore on anyio) spent 1 to 4.5 ms of CPU per request as connections
    grew, which capped an outbox drain under 1,000 events/s; aiohttp's connection pool and C
    parser cost a fraction of that. The httpx API, its error types and timeouts stay the same.
    """
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=_KEEPALIVE_EXPIRY_S
    )
    return httpx.AsyncClient(transport=Transport(limits=limits), limits=limits)


# --------------------------------------------------------------------------- client


class RapidProClient:
    """Posts flow starts. Never raises for HTTP or network problems: see :class:`Outcome`.

    Pass an ``httpx.AsyncClient`` to share a connection pool; otherwise one is created and
    owned here (:func:`http_client`: keep-alive, up to ``max_connections`` per RapidPro; close it
    with :meth:`aclose` or ``async with``). An ``httpx.AsyncClient`` belongs to the event loop it
    is first used on.
    """

    def __init__(
        self, client: httpx.AsyncClient | None = None, *, max_connections: int = DEFAULT_MAX_CONNECTIONS
    ) -> None:
        self._owns_client = client is None
        self._client = client if client is not None else http_client(max_connections)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def send(self, cfg: RapidProConfig, body: dict[str, object] | str | bytes) -> Outcome:
        """POST ``body`` to the site's ``flow_starts.json`` and classify the answer.

        ``body`` is the flow start as a dict, or its JSON text as stored by the outbox (sent as it
        is, not parsed and serialized again)."""
        if isinstance(body, bytes):
            content = body
        elif isinstance(body, str):
            content = body.encode("utf-8")
        else:
            try:
                content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                return Outcome("dead", f"body is not JSON: {_error_reason(exc)}")
        headers = {
            "Authorization": f"Token {cfg.token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        try:
            response = await self._client.post(
                cfg.flow_starts_url,
                content=content,
                headers=headers,
                timeout=httpx.Timeout(cfg.timeout_s),
            )
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            # Configuration error (bad base_url): retrying cannot help; fix it and replay.
            return Outcome("dead", f"bad RapidPro URL {cfg.flow_starts_url!r}: {_error_reason(exc)}")
        except httpx.HTTPError as exc:
            # ConnectError, ConnectTimeout, ReadTimeout, ReadError, RemoteProtocolError, ...
            return Outcome("retry", _error_reason(exc))
        except OSError as exc:  # defensive: transports should wrap these
            return Outcome("retry", _error_reason(exc))
        return classify(response)


# --------------------------------------------------------------------------- backoff


def backoff_delay(
    attempt: int,
    *,
    base: float = 0.5,
    cap: float = 60.0,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential backoff, full jitter.

    Attempt 1 waits up to ``base``, attempt 2 up to ``2 * base``, ... never more than ``cap``
    (drawn uniformly from ``[0, ceiling]``). A server's ``retry_after`` is a floor: the delay
    is never shorter than it.
    """
    n = max(1, attempt)
    ceiling = min(cap, base * 2.0 ** min(n - 1, 1023))
    ceiling = max(0.0, ceiling)
    delay = (rng if rng is not None else random).uniform(0.0, ceiling)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay
