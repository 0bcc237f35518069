"""A real loopback HTTP server playing RapidPro's API v2 ``POST /api/v2/flow_starts.json``.

It validates like temba's ``FlowStartWriteSerializer`` (DRF error bodies included), stores the
*normalized* request (params keys rewritten to ``[a-zA-Z0-9_]``, strings cut to 640 characters,
at most 256 values) and answers 201 with a FlowStart body. Failure controls let tests make it
fail, slow down, or vanish and come back on the same port::

    with FakeRapidPro() as rp:
        rp.fail_next(2, status=503, retry_after=1)
        ...  # point a site's base_url at rp.url, token at rp.token, flow at rp.flow
        starts = rp.wait_for(1)
        assert starts[0].params["event"] == "message"

The server runs uvicorn + Starlette in a background thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = [
    "DEFAULT_FLOW",
    "DEFAULT_TOKEN",
    "FLOW_STARTS_PATH",
    "URN_SCHEMES",
    "FakeRapidPro",
    "ReceivedStart",
    "normalize_extra",
]

DEFAULT_TOKEN = "fake-rapidpro-token"
DEFAULT_FLOW = "8f4b2c1e-6d3a-4e5f-9a7b-0c1d2e3f4a5b"
FLOW_STARTS_PATH = "/api/v2/flow_starts.json"

# temba settings / serializer limits
PARAMS_SIZE = 256  # settings.FLOW_START_PARAMS_SIZE
PARAM_VALUE_LEN = 640
PARAM_KEY_LEN = 255
MAX_LIST_ITEMS = 100  # fields.DEFAULT_MAX_LIST_ITEMS

URN_SCHEMES = frozenset(
    {
        "tel", "whatsapp", "telegram", "facebook", "twitter", "twitterid", "viber", "line",
        "ext", "mailto", "discord", "instagram", "slack", "jiochat", "wechat", "freshchat",
        "rocketchat", "vk", "webchat", "weni", "fcm", "teams", "zendesk", "external",
    }
)  # fmt: skip

_INVALID_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_URN_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9]*):(.*)$", re.DOTALL)
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_TEL_FORMATTING = re.compile(r"[\s\-().]")
_DIGITS = re.compile(r"^[0-9]+$")
# DRF BooleanField's TRUE_VALUES / FALSE_VALUES (1 == True and 0 == False in a set)
_TRUE: frozenset[object] = frozenset({True, *"true True TRUE t T 1 yes Yes YES y Y on On ON".split()})
_FALSE: frozenset[object] = frozenset({False, *"false False FALSE f F 0 no No NO n N off Off OFF".split()})


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ReceivedStart:
    """One request the fake answered.

    ``headers`` has lower-case names. ``body`` is the request as RapidPro would store it
    (normalized) when it passed validation, else the parsed JSON as sent (``{}`` when it was
    not a JSON object; see ``raw``). ``status`` is what was answered, ``response`` the JSON
    (or text) answered, ``at`` the ``time.monotonic()`` of arrival.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes
    status: int
    response: Any
    at: float
    answered_at: float

    @property
    def accepted(self) -> bool:
        return self.status == 201

    @property
    def params(self) -> dict[str, Any] | None:
        """The flow start's effective ``extra``: ``params`` when given, else ``extra``."""
        value = self.body.get("params") or self.body.get("extra")
        return value if isinstance(value, dict) else None

    @property
    def urns(self) -> list[str]:
        value = self.body.get("urns")
        return list(value) if isinstance(value, list) else []

    @property
    def contacts(self) -> list[str]:
        value = self.body.get("contacts")
        return list(value) if isinstance(value, list) else []


@dataclass
class _Failure:
    remaining: int
    status: int
    retry_after: float | None
    body: str | None


@dataclass
class _Answer:
    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


class _Invalid(Exception):
    def __init__(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, payload)
        self.answer = _Answer(status, payload, headers or {})


def normalize_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """temba's ``normalize_extra``: keys to ``[a-zA-Z0-9_]`` (max 255), strings cut to 640,
    lists to dicts keyed ``"0"``, ``"1"``..., ``null`` to ``""``, at most 256 values."""
    result, _ = _normalize_extra(extra, -1)
    assert isinstance(result, dict)
    return result


def _normalize_extra(value: Any, count: int) -> tuple[Any, int]:
    if isinstance(value, str):
        return value[:PARAM_VALUE_LEN], count + 1
    if isinstance(value, bool | int | float):
        return value, count + 1
    if isinstance(value, dict | list):
        count += 1
        items = value.items() if isinstance(value, dict) else enumerate(value)
        normalized: dict[str, Any] = {}
        for key, item in items:
            nkey = _INVALID_KEY_CHARS.sub("_", str(key))[:PARAM_KEY_LEN]
            normalized[nkey], count = _normalize_extra(item, count)
            if count >= PARAMS_SIZE:
                break
        return normalized, count
    if value is None:
        return "", count + 1
    # pragma: no cover - json.loads produces nothing else
    raise ValueError(f"unsupported type {type(value).__name__} in extra")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _not_a_list(value: Any) -> str:
    return f'Expected a list of items but got type "{_type_name(value)}".'


def _too_many(value: Any) -> str | None:
    if isinstance(value, str | list | dict) and len(value) > MAX_LIST_ITEMS:
        return f"This field can only contain up to {MAX_LIST_ITEMS} items."
    return None


def _normalize_urn(value: Any) -> str | None:
    """The URN as RapidPro would store it, or None when RapidPro would reject it."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value)
    match = _URN_RE.match(text)
    if match is None:
        return None
    scheme, path = match.group(1).lower(), match.group(2).strip()
    if scheme not in URN_SCHEMES or not path:
        return None
    base, sep, rest = path.partition("#")  # display part: tel:+1234#Name
    base, qsep, query = base.partition("?")
    if scheme == "tel":
        base = _TEL_FORMATTING.sub("", base)
        digits = base.removeprefix("+")
        if not _DIGITS.match(digits):
            return None
    elif scheme in ("whatsapp", "telegram", "twitterid"):
        if not _DIGITS.match(base):
            return None
    elif scheme == "twitter":
        base = base.lstrip("@").lower()
    elif scheme == "mailto":
        base = base.lower()
        if "@" not in base.strip("@"):
            return None
    if not base or any(ch.isspace() for ch in base):
        return None
    return f"{scheme}:{base}{qsep}{query}{sep}{rest}"


def _validate_urns(value: Any) -> tuple[list[str] | None, Any]:
    """(normalized, error) for the ``urns`` field (a DRF ListField of URNField)."""
    if value is None:
        return None, ["This field may not be null."]
    too_many = _too_many(value)
    if too_many:
        return None, [too_many]
    if isinstance(value, str | dict) or not isinstance(value, list):
        return None, [_not_a_list(value)]
    errors: dict[str, list[str]] = {}
    normalized: list[str] = []
    for index, item in enumerate(value):
        if item is None:
            errors[str(index)] = ["This field may not be null."]
            continue
        if isinstance(item, str) and not item.strip():
            errors[str(index)] = ["This field may not be blank."]
            continue
        urn = _normalize_urn(item)
        if urn is None:
            errors[str(index)] = [f"Invalid URN: {item}. Ensure phone numbers contain country codes."]
            continue
        normalized.append(urn)
    if errors:
        return None, errors
    return normalized, None


def _validate_related(value: Any, known: Callable[[str], bool]) -> tuple[list[str] | None, Any]:
    """(values, error) for a many TembaModelField (``contacts`` / ``groups``)."""
    if value is None:
        return None, ["This field may not be null."]
    too_many = _too_many(value)
    if too_many:
        return None, [too_many]
    if isinstance(value, str) or not isinstance(value, list | dict):
        return None, [_not_a_list(value)]
    found: list[str] = []
    for item in value:  # DRF stops at the first bad item
        if isinstance(item, bool) or not isinstance(item, str | int):
            return None, ["Must be a string or integer"]
        if not known(str(item)):
            return None, [f"No such object: {item}"]
        found.append(str(item))
    return found, None


def _validate_bool(value: Any) -> tuple[bool | None, Any]:
    if value is None:
        return None, ["This field may not be null."]
    try:
        if value in _TRUE:
            return True, None
        if value in _FALSE:
            return False, None
    except TypeError:  # unhashable: list / dict
        pass
    return None, ["Must be a valid boolean."]


def _validate_extra(value: Any) -> tuple[dict[str, Any] | None, Any]:
    if value is None:
        return None, ["This field may not be null."]
    if not isinstance(value, dict):
        return None, ["Must be a valid JSON object"]
    return normalize_extra(value), None


def _iso_now() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- server


class FakeRapidPro:
    """RapidPro's ``flow_starts`` endpoint on ``127.0.0.1``, with failure controls.

    Thread-safe: tests drive it from the main thread while it serves in its own.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        flows: Iterable[str] = (DEFAULT_FLOW,),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.token = token
        self.flows: dict[str, str] = {
            f: ("Helpline events" if i == 0 else f"Flow {i + 1}") for i, f in enumerate(flows)
        }
        if not self.flows:
            raise ValueError("at least one flow is needed")
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._received: list[ReceivedStart] = []
        self._failures: list[_Failure] = []
        self._delay = 0.0
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._app = Starlette(
            routes=[
                Route(
                    FLOW_STARTS_PATH,
                    self._flow_starts,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                )
            ]
        )

    # ------------------------------------------------------------------ properties

    @property
    def flow(self) -> str:
        """The first (default) flow UUID."""
        return next(iter(self.flows))

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234`` (``base_url`` of a site)."""
        if not self.port:
            raise RuntimeError("FakeRapidPro has not been started yet")
        return f"http://{self.host}:{self.port}"

    @property
    def flow_starts_url(self) -> str:
        return self.url + FLOW_STARTS_PATH

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def received(self) -> list[ReceivedStart]:
        """Every request answered so far (a copy), oldest first."""
        with self._lock:
            return list(self._received)

    @property
    def accepted(self) -> list[ReceivedStart]:
        """Only the requests answered 201, oldest first."""
        with self._lock:
            return [r for r in self._received if r.status == 201]

    # ------------------------------------------------------------------ controls

    def fail_next(
        self,
        n: int,
        status: int = 500,
        retry_after: float | None = None,
        body: str | None = None,
    ) -> None:
        """The next ``n`` valid requests are answered ``status`` (with ``Retry-After`` when
        given) instead of 201. ``body`` defaults to what Django/DRF would answer. Queued after
        any failures still pending."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n:
            with self._lock:
                self._failures.append(_Failure(n, status, retry_after, body))

    def set_delay(self, seconds: float) -> None:
        """Delay every answer by ``seconds`` (0 to stop). A delayed request is still
        processed and recorded, like a server that commits and answers too late."""
        with self._lock:
            self._delay = max(0.0, float(seconds))

    def reset(self) -> None:
        """Forget the recorded requests, pending failures and the delay."""
        with self._lock:
            self._received.clear()
            self._failures.clear()
            self._delay = 0.0

    def wait_for(
        self,
        predicate_or_count: int | Callable[[list[ReceivedStart]], bool],
        timeout: float = 5.0,
        *,
        accepted_only: bool = True,
    ) -> list[ReceivedStart]:
        """Poll until ``len(accepted) >= n`` (or ``predicate(accepted)`` is true) and return
        that list. With ``accepted_only=False`` the predicate/count sees every request.
        Raises ``TimeoutError`` describing what was received."""
        predicate: Callable[[list[ReceivedStart]], bool]
        if isinstance(predicate_or_count, int):
            n = predicate_or_count

            def predicate(items: list[ReceivedStart]) -> bool:
                return len(items) >= n

            wanted = f"{n} {'accepted' if accepted_only else 'received'} request(s)"
        else:
            predicate = predicate_or_count
            wanted = f"predicate {getattr(predicate, '__name__', predicate)!r}"
        deadline = time.monotonic() + timeout
        while True:
            items = self.accepted if accepted_only else self.received
            if predicate(items):
                return items
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        everything = self.received
        summary = ", ".join(str(r.status) for r in everything[-20:]) or "nothing"
        raise TimeoutError(
            f"FakeRapidPro: waited {timeout}s for {wanted}; have {len(self.accepted)} accepted "
            f"of {len(everything)} received (last statuses: {summary})"
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Listen (on the remembered port after the first start) and wait until serving."""
        if self.running:
            return self
        # IPPROTO_TCP: so asyncio sets TCP_NODELAY on accepted connections (else ~40 ms per answer).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        ready = threading.Event()
        self._server = server
        thread = threading.Thread(
            target=self._run, args=(server, sock, ready), name=f"fake-rapidpro:{self.port}", daemon=True
        )
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + 10.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(timeout=5)
                sock.close()
                self._thread = None
                raise RuntimeError(f"FakeRapidPro could not start on {self.host}:{self.port}")
            time.sleep(0.005)
        ready.wait(timeout=5)
        return self

    def _run(self, server: uvicorn.Server, sock: socket.socket, ready: threading.Event) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._closing = asyncio.Event()
            ready.set()
            try:
                await server.serve(sockets=[sock])
            finally:
                sock.close()

        asyncio.run(main())

    def stop(self) -> None:
        """Stop listening and wait for the server thread to end. Recordings are kept."""
        thread, server, loop, closing = self._thread, self._server, self._loop, self._closing
        if thread is None or server is None:
            return
        server.should_exit = True
        if loop is not None and closing is not None:
            try:
                loop.call_soon_threadsafe(closing.set)
            except RuntimeError:  # loop already closed
                pass
        thread.join(timeout=15)
        if thread.is_alive():  # pragma: no cover - uvicorn stuck
            server.force_exit = True
            thread.join(timeout=5)
        self._thread = self._server = None
        self._loop = self._closing = None

    def go_down(self) -> None:
        """Stop listening: clients get "connection refused" until :meth:`come_back`."""
        self.stop()

    def come_back(self) -> None:
        """Listen again, on the same port."""
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self.port else "not started"
        return f"<FakeRapidPro {where} running={self.running} received={len(self._received)}>"

    # ------------------------------------------------------------------ HTTP

    async def _flow_starts(self, request: Request) -> Response:
        arrived = time.monotonic()
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        body: dict[str, Any] = {}
        try:
            self._authenticate(headers.get("authorization"))
            if request.method != "POST":
                raise _Invalid(405, {"detail": f'Method "{request.method}" not allowed.'})
            data = self._parse(headers.get("content-type", ""), raw)
            if isinstance(data, dict):
                body = data
            body = self._validate(data)
            answer = self._accept_or_fail(body)
        except _Invalid as invalid:
            answer = invalid.answer

        with self._lock:
            delay = self._delay
        if delay > 0 and self._closing is not None:
            try:
                await asyncio.wait_for(self._closing.wait(), timeout=delay)
            except TimeoutError:
                pass
            else:  # shutting down mid-delay: the server is going away
                answer = _Answer(
                    503,
                    {"detail": "Service unavailable: server shutting down."},
                    {"Connection": "close"},
                )

        record = ReceivedStart(
            method=request.method,
            path=request.url.path,
            headers=headers,
            body=body,
            raw=raw,
            status=answer.status,
            response=answer.payload,
            at=arrived,
            answered_at=time.monotonic(),
        )
        with self._lock:
            self._received.append(record)
        if isinstance(answer.payload, str):
            media = "application/json" if answer.payload.lstrip()[:1] in ("{", "[") else "text/html"
            return Response(answer.payload, answer.status, answer.headers, media_type=media)
        return JSONResponse(answer.payload, answer.status, answer.headers)

    def _authenticate(self, authorization: str | None) -> None:
        challenge = {"WWW-Authenticate": "Token"}
        if not authorization:
            raise _Invalid(401, {"detail": "Authentication credentials were not provided."}, challenge)
        parts = authorization.split()
        if not parts or parts[0].lower() != "token":
            raise _Invalid(401, {"detail": "Authentication credentials were not provided."}, challenge)
        if len(parts) == 1:
            raise _Invalid(401, {"detail": "Invalid token header. No credentials provided."}, challenge)
        if len(parts) > 2:
            raise _Invalid(
                401,
                {"detail": "Invalid token header. Token string should not contain spaces."},
                challenge,
            )
        if parts[1] != self.token:
            raise _Invalid(401, {"detail": "Invalid token."}, challenge)

    @staticmethod
    def _parse(content_type: str, raw: bytes) -> Any:
        media = content_type.split(";", 1)[0].strip().lower()
        if not raw:
            return {}
        if media != "application/json" and not media.endswith("+json"):
            raise _Invalid(415, {"detail": f'Unsupported media type "{content_type}" in request.'})
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Invalid(400, {"detail": f"JSON parse error - {exc}"}) from exc

    def _validate(self, data: Any) -> dict[str, Any]:
        """FlowStartWriteSerializer: field errors first (all of them), then ``validate``."""
        if not isinstance(data, dict):
            raise _Invalid(400, {"non_field_errors": ["Request body should be a single JSON object"]})
        errors: dict[str, Any] = {}
        out: dict[str, Any] = {}

        if "flow" not in data:
            errors["flow"] = ["This field is required."]
        else:
            flow = data["flow"]
            if flow is None:
                errors["flow"] = ["This field may not be null."]
            elif isinstance(flow, bool) or not isinstance(flow, str | int):
                errors["flow"] = ["Must be a string or integer"]
            elif str(flow) not in self.flows:
                errors["flow"] = [f"No such object: {flow}"]
            else:
                out["flow"] = str(flow)

        checks: list[tuple[str, Callable[[Any], tuple[Any, Any]]]] = [
            ("contacts", lambda v: _validate_related(v, lambda s: bool(_UUID_RE.match(s)))),
            ("groups", lambda v: _validate_related(v, lambda s: False)),
            ("urns", _validate_urns),
            ("restart_participants", _validate_bool),
            ("exclude_active", _validate_bool),
            ("extra", _validate_extra),
            ("params", _validate_extra),
        ]
        for name, check in checks:
            if name in data:
                value, error = check(data[name])
                if error is not None:
                    errors[name] = error
                else:
                    out[name] = value
        if errors:
            raise _Invalid(400, errors)
        if not (out.get("groups") or out.get("contacts") or out.get("urns")):
            raise _Invalid(400, {"non_field_errors": ["Must specify at least one group, contact or URN"]})
        return out

    def _accept_or_fail(self, body: dict[str, Any]) -> _Answer:
        with self._lock:
            failure = self._failures[0] if self._failures else None
            if failure is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.pop(0)
            start_id = next(self._ids)
        if failure is not None:
            headers: dict[str, str] = {}
            if failure.retry_after is not None:
                ra = failure.retry_after
                headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            payload: Any = failure.body if failure.body is not None else _default_error(failure)
            return _Answer(failure.status, payload, headers)

        extra = body.get("params") or body.get("extra")
        now = _iso_now()
        flow_uuid = body["flow"]
        payload = {
            "id": start_id,
            "uuid": str(uuid.uuid4()),
            "flow": {"uuid": flow_uuid, "name": self.flows[flow_uuid]},
            "status": "pending",
            "groups": [],
            "contacts": [{"uuid": c, "name": None} for c in body.get("contacts", [])],
            "restart_participants": body.get("restart_participants", True),
            "exclude_active": body.get("exclude_active", False),
            "extra": extra,
            "params": extra,
            "created_on": now,
            "modified_on": now,
        }
        return _Answer(201, payload)


def _reject_constant(name: str) -> Any:
    raise ValueError("Out of range float values are not JSON compliant")


def _default_error(failure: _Failure) -> Any:
    if failure.status == 429:
        wait = failure.retry_after if failure.retry_after is not None else 1
        return {"detail": f"Request was throttled. Expected available in {int(wait)} seconds."}
    if failure.status >= 500:
        return (
            "<h1>Server Error (500)</h1>"
            if failure.status == 500
            else (f"<html><body><h1>{failure.status}</h1>Service unavailable.</body></html>")
        )
    return {"detail": f"Fake failure {failure.status}."}
