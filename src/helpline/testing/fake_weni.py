"""A real loopback server playing Weni's side of the generic ticketer contract v1.

As the *platform* it calls helpline like Weni's mailroom (``services/tickets/generic``) does:
``POST /v1/tickets`` (``Idempotency-Key: open-<ticket uuid>``; a 409 with ``details.external_id``
taken as success), ``/messages`` (``forward-<message uuid>``), ``/close`` (``closed_by`` platform/
system; a 409 taken as already closed), ``/reopen`` and ``/history`` (batches of 50), each with
``Authorization: Bearer``, ``X-API-Version: 1`` and one ``X-Request-Id`` kept across its retries;
5xx and 429 are retried up to 3 times, honouring ``Retry-After``.

As the *webhook receiver* it serves ``/mr/tickets/types/generic/event_callback/<ticketer>/…`` and
the canonical ``/webhooks/ticketer/<ticketer>/…`` (``messages``, ``tickets/close``,
``tickets/reopen``) and checks them as mailroom's ``readWebhook`` does: unknown ticketer 404
``ticketer_not_found``; body over 1 MB 413; ``X-Webhook-Signature`` (``sha256=<hex>`` or bare hex,
HMAC-SHA256 of the exact body, constant-time) 401 ``invalid_signature``; ``X-Webhook-Timestamp``
(RFC 3339 or unix seconds) more than 5 minutes off 401 ``expired_request``; then the payload
(400 ``invalid_payload`` / ``empty_message``, 404 ``ticket_not_found``); attachments are fetched
(502 ``attachment_fetch_failed``, 10 MB limit). It also serves files (``add_file``) to attach.

Controls: ``fail_next`` (status, Retry-After), ``set_delay``, ``go_down``/``come_back`` (same port),
``set_secrets`` (several accepted during a rotation), ``clock_offset_s``. Every request is recorded
with what was verified::

    with FakeWeni(secrets=["s3cret"]) as weni:
        weni.connect(helpline_url, api_token)
        ticket, answer = weni.open_ticket(priority="high")
        weni.forward(ticket, "hello")
        hook = weni.wait_for(lambda hs: any(h.kind == "messages" for h in hs))
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["CallResult", "FakeTicket", "FakeWeni", "ReceivedWebhook", "verify_signature", "verify_timestamp"]

REPLAY_WINDOW_S = 300.0
MAX_WEBHOOK_BODY = 1 << 20
MAX_ATTACHMENT = 10 * 1024 * 1024
HISTORY_BATCH = 50
LEGACY_BASE = "/mr/tickets/types/generic/event_callback"
CANONICAL_BASE = "/webhooks/ticketer"


def _rfc3339(t: float | None = None) -> str:
    when = datetime.now(UTC) if t is None else datetime.fromtimestamp(t, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """mailroom's ``verifySignature``: ``sha256=<hex>`` or ``<hex>``, constant-time, over the exact bytes."""
    if not secret or not header:
        return False
    provided = header.removeprefix("sha256=").strip()
    if not provided:
        return False
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), provided.lower().encode())


def verify_timestamp(header: str, now: float) -> bool:
    """mailroom's ``verifyTimestamp``: RFC 3339 (or unix seconds) within 5 minutes of ``now``."""
    try:
        when = datetime.fromisoformat(header.replace("Z", "+00:00"))
        if when.tzinfo is None:
            return False
        t = when.timestamp()
    except ValueError:
        try:
            t = float(int(header))
        except ValueError:
            return False
        if t == 0:
            return False
    return abs(now - t) <= REPLAY_WINDOW_S


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ReceivedWebhook:
    """One webhook request the fake answered (``headers`` lower-case)."""

    path: str
    kind: str  # messages | close | reopen | other
    headers: dict[str, str]
    raw: bytes
    body: dict[str, Any] | None
    status: int
    response: Any
    signature_ok: bool | None  # None: not checked (HMAC skipped or failed earlier)
    secret_index: int | None  # which accepted secret matched
    timestamp_ok: bool | None  # None: no X-Webhook-Timestamp
    at: float

    @property
    def accepted(self) -> bool:
        return self.status == 200


@dataclass
class FakeTicket:
    """A ticket as Weni knows it."""

    uuid: str
    contact_uuid: str
    contact_urn: str
    contact_name: str
    external_id: str | None = None
    status: str = "open"
    replies: list[dict[str, Any]] = field(default_factory=list)
    closed_by: dict[str, Any] | None = None
    reopened: int = 0


@dataclass(frozen=True)
class CallResult:
    """What helpline answered to one call (after Weni's own retries)."""

    status: int
    body: Any
    headers: dict[str, str]
    attempts: int
    request_id: str

    def json(self) -> Any:
        return self.body


@dataclass
class _Failure:
    remaining: int
    status: int
    retry_after: float | None
    body: Any


# --------------------------------------------------------------------------- server


class FakeWeni:
    """Weni's platform and webhook endpoint on ``127.0.0.1``. Thread-safe."""

    def __init__(
        self,
        *,
        secrets: Iterable[str] = ("weni-webhook-secret",),
        ticketer_uuid: str | None = None,
        project_uuid: str | None = None,
        skip_hmac: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        retries: int = 3,
        max_retry_wait_s: float = 2.0,
    ) -> None:
        self.secrets = list(secrets)
        self.ticketer_uuid = ticketer_uuid or str(uuid.uuid4())
        self.project_uuid = project_uuid or str(uuid.uuid4())
        self.org_uuid = str(uuid.uuid4())
        self.skip_hmac = skip_hmac
        self.host = host
        self.port = port
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self.clock_offset_s = 0.0
        self.fetch_attachments = True
        self.helpline_url: str | None = None
        self.api_token: str | None = None
        self.tickets: dict[str, FakeTicket] = {}  # by external_id
        self.calls: list[tuple[str, str, CallResult]] = []  # (method, path, result) of the platform side
        self._files: dict[str, tuple[bytes, str]] = {}
        self._lock = threading.Lock()
        self._received: list[ReceivedWebhook] = []
        self._failures: list[_Failure] = []
        self._delay = 0.0
        self._contacts = itertools.count(1)
        self._http: httpx.Client | None = None
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        routes = []
        for base in (LEGACY_BASE, CANONICAL_BASE):
            routes += [
                Route(base + "/{ticketer}/messages", self._webhook, methods=["POST"]),
                Route(base + "/{ticketer}/tickets/close", self._webhook, methods=["POST"]),
                Route(base + "/{ticketer}/tickets/reopen", self._webhook, methods=["POST"]),
            ]
        routes.append(Route("/files/{name}", self._file, methods=["GET"]))
        self._app = Starlette(routes=routes)

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeWeni has not been started yet")
        return f"http://{self.host}:{self.port}"

    @property
    def webhook_base_url(self) -> str:
        """What mailroom sends as ``metadata.webhook_base_url``."""
        return f"{self.url}{LEGACY_BASE}/{self.ticketer_uuid}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def received(self) -> list[ReceivedWebhook]:
        with self._lock:
            return list(self._received)

    def accepted(self, kind: str | None = None) -> list[ReceivedWebhook]:
        """Webhooks answered 200 (of ``kind`` when given), oldest first."""
        with self._lock:
            return [r for r in self._received if r.accepted and (kind is None or r.kind == kind)]

    # ------------------------------------------------------------------ controls

    def set_secrets(self, *secrets: str) -> None:
        """The webhook secrets accepted from now on (the current one and, during a rotation, the old)."""
        with self._lock:
            self.secrets = list(secrets)

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None, body: Any = None) -> None:
        """Answer the next ``n`` webhooks with ``status`` (and ``Retry-After``) before anything else."""
        if n > 0:
            with self._lock:
                self._failures.append(_Failure(n, status, retry_after, body))

    def set_delay(self, seconds: float) -> None:
        with self._lock:
            self._delay = max(0.0, seconds)

    def add_file(self, name: str, content: bytes, content_type: str) -> dict[str, Any]:
        """Serve ``content`` at ``/files/<name>``; returns it as a contract attachment."""
        with self._lock:
            self._files[name] = (content, content_type)
        return {
            "id": f"att-{name}",
            "url": f"{self.url}/files/{name}",
            "content_type": content_type,
            "filename": name,
            "size": len(content),
        }

    def wait_for(
        self, predicate: Callable[[list[ReceivedWebhook]], bool], timeout: float = 10.0
    ) -> list[ReceivedWebhook]:
        """Poll until ``predicate(received)`` holds; returns every webhook received so far."""
        deadline = time.monotonic() + timeout
        while True:
            items = self.received
            if predicate(items):
                return items
            if time.monotonic() >= deadline:
                summary = ", ".join(f"{r.kind}:{r.status}" for r in items[-20:]) or "nothing"
                raise TimeoutError(f"FakeWeni: condition not met within {timeout}s; received {summary}")
            time.sleep(0.01)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self.running:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, log_level="warning", log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=2,
        )  # fmt: skip
        server = uvicorn.Server(config)
        self._server = server

        def run() -> None:
            async def main() -> None:
                try:
                    await server.serve(sockets=[sock])
                finally:
                    sock.close()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name=f"fake-weni:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"FakeWeni could not start on {self.host}:{self.port}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._thread = self._server = None

    def go_down(self) -> None:
        """Stop listening: helpline's webhooks get "connection refused" until :meth:`come_back`."""
        self.stop()

    def come_back(self) -> None:
        self.start()

    def shutdown(self) -> None:
        """Stop serving and close the platform-side HTTP client."""
        self.stop()
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ webhooks (helpline -> Weni)

    async def _file(self, request: Request) -> Response:
        with self._lock:
            found = self._files.get(request.path_params["name"])
        if found is None:
            return JSONResponse({"error": "not_found", "message": "no such file"}, 404)
        return Response(found[0], 200, media_type=found[1])

    async def _webhook(self, request: Request) -> Response:
        arrived = time.monotonic()
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        path = request.url.path
        kind = "messages" if path.endswith("/messages") else path.rsplit("/", 1)[-1]
        record: dict[str, Any] = {"signature_ok": None, "secret_index": None, "timestamp_ok": None, "body": None}
        status, payload, extra = await self._handle(request, raw, headers, kind, record)
        with self._lock:
            delay = self._delay
        if delay:
            await asyncio.sleep(delay)
        with self._lock:
            self._received.append(
                ReceivedWebhook(
                    path=path,
                    kind=kind,
                    headers=headers,
                    raw=raw,
                    body=record["body"],
                    status=status,
                    response=payload,
                    signature_ok=record["signature_ok"],
                    secret_index=record["secret_index"],
                    timestamp_ok=record["timestamp_ok"],
                    at=arrived,
                )
            )
        return JSONResponse(payload, status, extra)

    def _take_failure(self) -> _Failure | None:
        with self._lock:
            if not self._failures:
                return None
            failure = self._failures[0]
            failure.remaining -= 1
            if failure.remaining <= 0:
                self._failures.pop(0)
            return failure

    async def _handle(
        self, request: Request, raw: bytes, headers: dict[str, str], kind: str, record: dict[str, Any]
    ) -> tuple[int, Any, dict[str, str]]:
        def err(status: int, code: str, message: str) -> tuple[int, Any, dict[str, str]]:
            return status, {"error": code, "message": message}, {}

        try:
            body = json.loads(raw)
            record["body"] = body if isinstance(body, dict) else None
        except ValueError:
            pass
        failure = self._take_failure()
        if failure is not None:
            extra = {"Retry-After": f"{failure.retry_after:g}"} if failure.retry_after is not None else {}
            payload = failure.body or {"error": "unavailable", "message": f"fake failure {failure.status}"}
            return failure.status, payload, extra
        if request.path_params["ticketer"] != self.ticketer_uuid:
            return err(404, "ticketer_not_found", "no such ticketer")
        if len(raw) > MAX_WEBHOOK_BODY:
            return err(413, "payload_too_large", "request body exceeds limit")
        if not self.skip_hmac:
            with self._lock:
                secrets = list(self.secrets)
            if not secrets:
                return err(500, "misconfigured", "ticketer has no webhook secret")
            signature = headers.get("x-webhook-signature")
            index = next((i for i, s in enumerate(secrets) if verify_signature(s, raw, signature)), None)
            record["signature_ok"], record["secret_index"] = index is not None, index
            if index is None:
                return err(401, "invalid_signature", "HMAC verification failed")
            stamp = headers.get("x-webhook-timestamp")
            if stamp:
                record["timestamp_ok"] = verify_timestamp(stamp, time.time() + self.clock_offset_s)
                if not record["timestamp_ok"]:
                    return err(401, "expired_request", "X-Webhook-Timestamp outside the accepted window")
        body = record["body"]
        if body is None:
            return err(400, "invalid_payload", "the body is not a JSON object")
        for stamp_field in ("sent_at", "closed_at", "reopened_at"):
            value = body.get(stamp_field)
            if value is not None and (not isinstance(value, str) or not verify_timestamp_format(value)):
                return err(400, "invalid_payload", f"{stamp_field}: not an RFC 3339 time")
        external_id = str(body.get("external_id") or "").strip()
        if kind == "messages":
            return await self._agent_message(body, external_id, err)
        if not external_id:
            return err(400, "invalid_payload", "external_id is required")
        with self._lock:
            ticket = self.tickets.get(external_id)
            if ticket is None:
                return err(404, "ticket_not_found", "no such ticket for the given external_id")
            if kind == "close":
                if ticket.status != "closed":
                    ticket.status = "closed"
                    ticket.closed_by = body.get("closed_by")
                return 200, {"status": "closed", "ticket_uuid": ticket.uuid}, {}
            if ticket.status != "open":
                ticket.status = "open"
                ticket.reopened += 1
            return 200, {"status": "open", "ticket_uuid": ticket.uuid}, {}

    async def _agent_message(
        self, body: dict[str, Any], external_id: str, err: Callable[[int, str, str], tuple[int, Any, dict[str, str]]]
    ) -> tuple[int, Any, dict[str, str]]:
        text = body.get("text") or ""
        attachments = body.get("attachments") or []
        if not isinstance(text, str) or not isinstance(attachments, list):
            return err(400, "invalid_payload", "text must be a string and attachments a list")
        if not text.strip() and not attachments:
            return err(400, "empty_message", "text or attachments are required")
        if not external_id:
            return err(400, "invalid_payload", "external_id is required")
        with self._lock:
            ticket = self.tickets.get(external_id)
        if ticket is None:
            return err(404, "ticket_not_found", "no such ticket for the given external_id")
        fetched: list[dict[str, Any]] = []
        for a in attachments:
            url = a.get("url") if isinstance(a, dict) else None
            if not url:
                continue
            if self.fetch_attachments:
                problem = await self._fetch(str(url))
                if problem is not None:
                    return 502, {"error": "attachment_fetch_failed", "message": f"failed fetching {url}: {problem}"}, {}
            fetched.append(a)
        message_uuid = str(uuid.uuid4())
        with self._lock:
            ticket.replies.append({**body, "message_uuid": message_uuid, "fetched": fetched})
        return 200, {"status": "sent", "ticket_uuid": ticket.uuid, "message_uuid": message_uuid}, {}

    async def _fetch(self, url: str) -> str | None:
        try:
            async with httpx.AsyncClient(timeout=10) as client, client.stream("GET", url) as response:
                if response.status_code >= 400:
                    return f"HTTP {response.status_code}"
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_ATTACHMENT:
                        return f"larger than {MAX_ATTACHMENT} bytes"
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None

    # ------------------------------------------------------------------ platform side (Weni -> helpline)

    def connect(self, helpline_url: str, api_token: str) -> None:
        """The ticketer config: ``base_url`` (e.g. ``http://h`` or ``http://h/sites/ke``) and ``api_token``."""
        self.helpline_url = helpline_url.rstrip("/")
        self.api_token = api_token
        if self._http is not None:
            self._http.close()
        self._http = httpx.Client(base_url=self.helpline_url, timeout=30)

    def call(
        self,
        path: str,
        body: Any,
        *,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        retry: bool = True,
        headers: dict[str, str] | None = None,
    ) -> CallResult:
        """POST ``body`` to helpline as mailroom's client does (retries 5xx/429 unless ``retry=False``)."""
        if self._http is None or self.api_token is None:
            raise RuntimeError("FakeWeni.connect() first")
        request_id = request_id or str(uuid.uuid4())
        sent = {
            "Authorization": f"Bearer {self.api_token}",
            "Content-Type": "application/json",
            "X-API-Version": "1",
            "X-Request-Id": request_id,
        }
        if idempotency_key:
            sent["Idempotency-Key"] = idempotency_key
        sent |= headers or {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        attempts = 0
        while True:
            attempts += 1
            r = self._http.post(path, content=content, headers=sent)
            retryable = r.status_code >= 500 or r.status_code == 429
            if not (retry and retryable and attempts <= self.retries):
                break
            wait = min(self.max_retry_wait_s, _retry_after(r.headers.get("retry-after")) or 0.1 * 2 ** (attempts - 1))
            time.sleep(wait)
        try:
            data: Any = r.json()
        except ValueError:
            data = r.text
        result = CallResult(r.status_code, data, dict(r.headers), attempts, request_id)
        with self._lock:
            self.calls.append(("POST", path, result))
        return result

    def new_contact(self, name: str | None = None, urn: str | None = None) -> tuple[str, str, str]:
        n = next(self._contacts)
        return str(uuid.uuid4()), urn or f"whatsapp:25470000{n:04d}", name or f"Contact {n}"

    def open_ticket(
        self,
        *,
        contact_uuid: str | None = None,
        urn: str | None = None,
        name: str | None = None,
        priority: str | None = "normal",
        topic: str | None = None,
        body: str | None = None,
        ticket_uuid: str | None = None,
        send_webhook_base_url: bool = True,
        idempotency_key: str | None = None,
    ) -> tuple[FakeTicket | None, CallResult]:
        """``POST /v1/tickets`` as mailroom's ``Open``; the ticket is ``None`` when helpline refused it."""
        new_uuid, new_urn, new_name = self.new_contact(name, urn)
        ticket = FakeTicket(
            uuid=ticket_uuid or str(uuid.uuid4()),
            contact_uuid=contact_uuid or new_uuid,
            contact_urn=urn or new_urn,
            contact_name=name or new_name,
        )
        metadata: dict[str, Any] = {
            "project_uuid": self.project_uuid,
            "org_uuid": self.org_uuid,
            "channel": {"uuid": str(uuid.uuid4()), "name": "WhatsApp", "address": "+254711000000"},
            "flow": {"uuid": str(uuid.uuid4()), "name": "Talk to a counselor"},
        }
        if priority is not None:
            metadata["priority"] = priority
        if send_webhook_base_url:
            metadata["webhook_base_url"] = self.webhook_base_url
        request: dict[str, Any] = {
            "ticket_id": ticket.uuid,
            "contact": {
                "uuid": ticket.contact_uuid,
                "name": ticket.contact_name,
                "urn": ticket.contact_urn,
                "urns": [ticket.contact_urn],
                "language": "eng",
            },
            "metadata": metadata,
            "opened_at": _rfc3339(),
        }
        if topic is not None:
            request["topic"] = {"uuid": str(uuid.uuid4()), "name": topic, "queue_uuid": str(uuid.uuid4())}
        if body is not None:
            request["body"] = body
        result = self.call("/v1/tickets", request, idempotency_key=idempotency_key or f"open-{ticket.uuid}")
        external_id: str | None = None
        if result.status in (200, 201) and isinstance(result.body, dict):
            external_id = result.body.get("external_id")
        elif result.status == 409 and isinstance(result.body, dict):
            external_id = (result.body.get("details") or {}).get("external_id")  # mailroom: reuse it
        if not external_id:
            return None, result
        ticket.external_id = str(external_id)
        with self._lock:
            self.tickets.setdefault(ticket.external_id, ticket)
            ticket = self.tickets[ticket.external_id]
        return ticket, result

    def _ticket_path(self, ticket: FakeTicket, action: str) -> str:
        assert ticket.external_id is not None
        return f"/v1/tickets/{ticket.external_id}/{action}"

    def forward(
        self,
        ticket: FakeTicket,
        text: str | None = None,
        *,
        attachments: list[dict[str, Any]] | None = None,
        message_uuid: str | None = None,
    ) -> CallResult:
        """``POST /v1/tickets/{external_id}/messages`` as mailroom's ``Forward``."""
        message_uuid = message_uuid or str(uuid.uuid4())
        request: dict[str, Any] = {
            "ticket_id": ticket.uuid,
            "external_id": ticket.external_id,
            "message_id": message_uuid,
            "direction": "incoming",
            "sender": {"type": "contact", "id": ticket.contact_uuid, "name": ticket.contact_name},
            "sent_at": _rfc3339(),
        }
        if text is not None and text.strip():
            request["text"] = text
        if attachments:
            request["attachments"] = attachments
        return self.call(self._ticket_path(ticket, "messages"), request, idempotency_key=f"forward-{message_uuid}")

    def close(self, ticket: FakeTicket) -> CallResult:
        """``POST /v1/tickets/{external_id}/close`` as mailroom's ``Close`` (a 409 means already closed)."""
        now = time.time()
        request = {
            "ticket_id": ticket.uuid,
            "external_id": ticket.external_id,
            "closed_by": {"type": "platform", "id": "system"},
            "closed_at": _rfc3339(now),
        }
        result = self.call(
            self._ticket_path(ticket, "close"), request, idempotency_key=f"close-{ticket.uuid}-{time.time_ns()}"
        )
        if result.status in (200, 409):
            ticket.status = "closed"
        return result

    def reopen(self, ticket: FakeTicket) -> CallResult:
        """``POST /v1/tickets/{external_id}/reopen`` as mailroom's ``Reopen``."""
        request = {
            "ticket_id": ticket.uuid,
            "external_id": ticket.external_id,
            "reopened_by": {"type": "platform", "id": "system"},
            "reopened_at": _rfc3339(),
        }
        result = self.call(
            self._ticket_path(ticket, "reopen"), request, idempotency_key=f"reopen-{ticket.uuid}-{time.time_ns()}"
        )
        if result.status == 200:
            ticket.status = "open"
        return result

    def send_history(self, ticket: FakeTicket, messages: list[dict[str, Any]]) -> list[CallResult]:
        """``POST /v1/tickets/{external_id}/history`` in batches of 50.

        Each message: ``{"direction": "incoming"|"outgoing", "text", "sent_at"?, "message_id"?,
        "attachments"?}``; the sender is the contact (incoming) or the bot (outgoing), as mailroom sends.
        """
        results = []
        for start in range(0, len(messages), HISTORY_BATCH):
            batch = []
            for m in messages[start : start + HISTORY_BATCH]:
                incoming = m["direction"] == "incoming"
                batch.append(
                    {
                        "message_id": m.get("message_id") or str(uuid.uuid4()),
                        "direction": m["direction"],
                        "sender": {"type": "contact", "id": ticket.contact_uuid} if incoming else {"type": "bot"},
                        "text": m.get("text", ""),
                        "attachments": m.get("attachments", []),
                        "sent_at": m.get("sent_at") or _rfc3339(),
                    }
                )
            request = {
                "ticket_id": ticket.uuid,
                "external_id": ticket.external_id,
                "contact": {"uuid": ticket.contact_uuid, "name": ticket.contact_name, "urn": ticket.contact_urn},
                "messages": batch,
                "metadata": {"project_uuid": self.project_uuid},
            }
            results.append(self.call(self._ticket_path(ticket, "history"), request))
        return results


def verify_timestamp_format(value: str) -> bool:
    """Go's ``time.Time`` JSON decoding: RFC 3339 with a zone."""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None
    except ValueError:
        return False


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
