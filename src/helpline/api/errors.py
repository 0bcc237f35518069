"""One error body everywhere: ``{"error": {"code", "message", "fields"}}``; one table of codes."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from helpline.domain import errors as d

log = structlog.get_logger("helpline.api")

STATUS: dict[type[d.DomainError], int] = {
    d.NotAuthenticated: 401,
    d.PermissionDenied: 403,
    d.NotFound: 404,
    d.Conflict: 409,
    d.Invalid: 422,
    d.RateLimited: 429,
}

# code, and the sentence a caller sees, for each status the API documents.
CODES: dict[int, tuple[str, str]] = {
    400: ("malformed_json", "the body is not valid JSON"),
    401: ("not_authenticated", "missing, expired or invalid token"),
    403: ("permission_denied", "this account may not do that"),
    404: ("not_found", "no such resource"),
    405: ("method_not_allowed", "method not allowed"),
    409: ("conflict", "the conversation is closed or the offer is no longer pending"),
    413: ("body_too_large", "the body is too large"),
    415: ("unsupported_media_type", "the body must be application/json"),
    422: ("validation_error", "the body or query is not valid"),
    429: ("rate_limited", "too many requests; retry after the given delay"),
    503: ("unavailable", "the store is unavailable; retry shortly"),
}


class ApiError(Exception):
    """An HTTP-level error raised by the API layer itself (body parsing, routing)."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        code: str | None = None,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        default_code, default_message = CODES.get(status, ("error", "error"))
        super().__init__(message or default_message)
        self.status = status
        self.code = code or default_code
        self.message = message or default_message
        self.fields = fields or {}
        self.headers = headers


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method served at the request's path. FastAPI makes one route per method, and the 405
    Starlette raises names only the first route whose path matched (``Allow: POST`` for
    ``/api/chat/``, which serves GET too). Asked of each route through Starlette's ``matches``."""
    routes = request.app.router.routes
    return [
        method
        for method in METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


def error_response(
    status: int, code: str, message: str, fields: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "fields": fields or {}}},
        status_code=status,
        headers=headers,
    )


def error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "fields"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "fields": {"type": "object"},
                },
            }
        },
    }


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {
        s: {"description": CODES[s][1], "content": {"application/json": {"schema": error_schema()}}} for s in statuses
    }


def _fields_from_validation(errors: list[Any]) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
        fields.setdefault(".".join(loc) or "__root__", []).append(str(e.get("msg", "invalid")))
    return fields


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.fields, exc.headers)

    @app.exception_handler(d.DomainError)
    async def _domain(_: Request, exc: d.DomainError) -> JSONResponse:
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
        headers = None
        if isinstance(exc, d.RateLimited):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        return error_response(status, exc.code, exc.message, exc.fields, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(
            422, "validation_error", "the request is not valid", _fields_from_validation(list(exc.errors()))
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, message = CODES.get(exc.status_code, ("error", str(exc.detail)))
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            message = str(exc.detail)
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(OSError)
    async def _store(_: Request, exc: Exception) -> JSONResponse:
        # Only the driver's own error class and first line: statements may carry message text.
        orig = getattr(exc, "orig", exc)
        log.warning("store unavailable", error=type(orig).__name__, detail=str(orig).splitlines()[0][:200])
        return error_response(
            503, "unavailable", "the store is unavailable; retry shortly", headers={"Retry-After": "2"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", error=type(exc).__name__)
        return error_response(500, "internal_error", "internal error")
