"""What every route needs: the core, the caller, and a JSON body read with the documented errors."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import orjson
import structlog
from fastapi import Path, Request
from fastapi.openapi.models import APIKey, APIKeyIn
from fastapi.security.base import SecurityBase
from pydantic import BaseModel, ValidationError
from starlette.requests import HTTPConnection

from helpline.api import signing
from helpline.api.errors import ApiError, _fields_from_validation
from helpline.domain.auth import Principal, authenticate
from helpline.domain.errors import NotAuthenticated
from helpline.domain.signatures import SeenSignatures
from helpline.runtime.core import Core, now

log = structlog.get_logger("helpline.api")

M = TypeVar("M", bound=BaseModel)

# A row id in a path: the columns are INTEGER, 32 bits on PostgreSQL. Out of range: 422, not a 503
# (PostgreSQL) or a 500 (SQLite past 64 bits) from the query.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def core_of(request: Request) -> Core:
    core: Core = request.app.state.core
    return core


def token_from_header(value: str | None) -> str:
    if not value:
        raise NotAuthenticated("missing Authorization header (Token <key>)")
    scheme, _, key = value.partition(" ")
    if scheme.lower() not in ("token", "bearer") or not key.strip():
        raise NotAuthenticated("the Authorization header must be 'Token <key>'")
    return key.strip()


def nul_field(data: Any, at: str = "") -> str | None:
    """The dotted name of the first key or string in ``data`` that holds a NUL character, if any.

    PostgreSQL cannot store U+0000 in text (SQLite can): such input is refused at the edge, with a
    4xx on both stores, before it can reach a query and come back as a 503.
    """
    if isinstance(data, str):
        return (at or "__root__") if "\x00" in data else None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        name = f"{at}.{key}" if at else str(key)
        if "\x00" in str(key):
            return name
        found = nul_field(value, name)
        if found is not None:
            return found
    return None


async def refuse_nul(conn: HTTPConnection) -> None:
    """App-wide dependency: a NUL character in a path parameter (404) or in the query (422)."""
    if any("\x00" in str(v) for v in conn.path_params.values()):
        raise ApiError(404, "no such resource")
    for name, value in conn.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            raise ApiError(422, "the query is not valid", fields={name: ["must not contain NUL characters"]})


AUTH_DOC = (
    "`Authorization: Token <key>` (`Bearer <key>` under `/v1`): a key from `POST /api/token/` or "
    "`helpline issuetoken`. A chatbot account given a signing secret (`helpline signing-secret`) also "
    "signs every request it makes with its key, with two headers: "
    f"`{signing.TIMESTAMP_HEADER}: <unix seconds, e.g. 1764000000.123>` and "
    f"`{signing.SIGNATURE_HEADER}: sha256=<hex HMAC-SHA256(secret, "
    '"<timestamp>\\n<METHOD>\\n<path?query>\\n" + raw body bytes)>`. '
    "The timestamp must be within `HELPLINE_SIGNATURE_TOLERANCE_S` (300 s) of the server's clock and "
    "each signature is accepted once; otherwise 401 with the code `signature_required`, `bad_signature`, "
    "`stale_timestamp` or `replayed`. Accounts without a secret ignore both headers."
)


class TokenAuth(SecurityBase):
    """FastAPI dependency: the authenticated caller, documented as the ``token`` security scheme.

    One callable that is its own security scheme, so the docs cost no extra dependency per request.
    An account without a signing secret costs nothing more than before (the principal is cached,
    the secret rides on it); one with a secret has its request's signature checked here.
    """

    def __init__(self) -> None:
        self.model = APIKey(**{"in": APIKeyIn.header}, name="Authorization", description=AUTH_DOC)
        self.scheme_name = "token"

    async def __call__(self, request: Request) -> Principal:
        who = await authenticate(core_of(request), token_from_header(request.headers.get("authorization")))
        if who.signing_secrets:
            await check_signature(request, who)
        return who


principal = TokenAuth()


def replay_cache_of(request: Request) -> signing.ReplayCache:
    """This instance's signatures already accepted (one per application)."""
    state = request.app.state
    cache: signing.ReplayCache | None = getattr(state, "signature_replays", None)
    if cache is None:
        cache = state.signature_replays = signing.ReplayCache()
    return cache


def seen_signatures_of(request: Request) -> SeenSignatures:
    """The signatures accepted by every instance (PostgreSQL; a no-op on SQLite), one per application."""
    state = request.app.state
    seen: SeenSignatures | None = getattr(state, "seen_signatures", None)
    if seen is None:
        seen = state.seen_signatures = SeenSignatures(core_of(request))
    return seen


async def check_signature(request: Request, who: Principal) -> None:
    """401 unless the request carries a valid, fresh, first-seen signature by one of ``who``'s secrets.

    First-seen by this instance (memory, no query), then, on PostgreSQL, by every instance.
    """
    body = await read_body(request)
    cache = replay_cache_of(request)
    t = now()
    try:
        key, until = signing.check(
            cache,
            who.signing_secrets,
            account=str(who.id),
            timestamp=request.headers.get(signing.TIMESTAMP_HEADER),
            signature=request.headers.get(signing.SIGNATURE_HEADER),
            method=request.method,
            target=signing.target_of(request.scope),
            body=body,
            now=t,
            tolerance=core_of(request).settings.signature_tolerance_s,
        )
        try:
            first = await seen_signatures_of(request).first_use(key, until, t)
        except BaseException:
            cache.discard(key)  # not accepted (the store failed): a copy may be sent again
            raise
        if not first:
            raise signing.replayed()  # accepted by another instance
    except signing.SignatureError as exc:
        log.warning("signature refused", user=who.username, code=exc.code, method=request.method)
        raise ApiError(401, exc.message, code=exc.code) from exc


async def read_body(request: Request) -> bytes:
    """The raw body, at most ``max_body_bytes`` (else 413), read once per request.

    Kept where Starlette keeps ``request.body()``'s, so every later reader of the request (``read_json``,
    the Weni routes, ``request.stream()``) gets these same bytes: the signature is checked before the
    route reads its body.
    """
    cached: bytes | None = getattr(request, "_body", None)
    if cached is not None:
        return cached
    limit = core_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    request._body = raw  # what Request.body() caches: request.stream() then yields it again
    return raw


async def read_json(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body: 415 not JSON, 413 too large, 400 malformed, 422 invalid."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(415, f"the body must be application/json, not {ctype}")
    raw = await read_body(request)
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object", fields={"__root__": ["expected an object"]})
    bad = nul_field(data)
    if bad is not None:
        raise ApiError(422, "the body is not valid", fields={bad: ["must not contain NUL characters"]})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "the body is not valid", fields=_fields_from_validation(exc.errors())) from exc


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its ``$defs`` (enums, nested models) written in place of their ``$ref``.

    ``openapi_extra`` cannot add to ``components/schemas``, so a ``$ref`` there would dangle.
    """
    defs: dict[str, Any] = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: walk(v) for k, v in node.items() if k != "$ref"}
                return {**walk(defs[ref.removeprefix("#/$defs/")]), **rest}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON request body read by :func:`read_json`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_defs(model.model_json_schema())}},
        }
    }
