"""``/openapi.json`` as the server behaves: what FastAPI cannot see from the routes, added once.

A generated client (or schemathesis) must find in the document every answer the server can give
and every rule it enforces:

- 422 is the one error body (``{"error": {...}}``; Weni's under ``/v1``), not FastAPI's ``detail``;
- the same routers are mounted under ``/sites/{site}/...``: that path parameter is declared;
- an app-wide guard refuses a NUL character anywhere (PostgreSQL cannot store one): 422 for one in
  the query, 404 for one in the path, on every operation; and every free-text string of a body or
  query says so in its schema (``pattern``), as the server's own checks do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI

from helpline.api import errors, weni

NO_NUL = "^[^\\u0000]*$"
"""A string without NUL characters (the server refuses them, see ``deps.refuse_nul``/``nul_field``)."""

SITE_PARAMETER: dict[str, Any] = {
    "name": "site",
    "in": "path",
    "required": True,
    "description": "the site's slug, as in sites.toml (404 `unknown_site` for another)",
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,31}$"},
}

Operation = dict[str, Any]


def install(app: FastAPI) -> None:
    """Post-process the generated document once (FastAPI caches it in ``app.openapi_schema``)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            complete(build())  # build() stores the document in app.openapi_schema: changed in place
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(schema: dict[str, Any]) -> None:
    for path, operation in _operations(schema):
        error_answers = weni.responses if path.startswith("/v1") else errors.responses
        _one_validation_body(operation, error_answers)
        if "{site}" in path:
            _declare_site(operation)
        answers = operation.setdefault("responses", {})
        answers.setdefault("422", error_answers(422)[422])  # a NUL in the query, on any route
        if "{" in path:
            answers.setdefault("404", error_answers(404)[404])  # a NUL (or an unknown id) in the path
        for parameter in operation.get("parameters", []):
            if parameter.get("in") in ("query", "path"):
                _forbid_nul(parameter.get("schema", {}))
        for media in operation.get("requestBody", {}).get("content", {}).values():
            _forbid_nul(media.get("schema", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, Operation]]:
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, operation


def _one_validation_body(operation: Operation, error_answers: Callable[..., dict[int | str, Any]]) -> None:
    """FastAPI documents ``HTTPValidationError`` on routes with parameters; they answer the one body."""
    answer = operation.get("responses", {}).get("422", {})
    ref = answer.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    if ref.endswith("/HTTPValidationError"):
        operation["responses"]["422"] = error_answers(422)[422]


def _declare_site(operation: Operation) -> None:
    parameters = operation.setdefault("parameters", [])
    if not any(p.get("name") == "site" and p.get("in") == "path" for p in parameters):
        parameters.insert(0, dict(SITE_PARAMETER))


def _forbid_nul(node: Any) -> None:
    """Every free-text string (no pattern, enum or const of its own) gets ``NO_NUL``; objects with
    free keys get it for their keys."""
    if isinstance(node, list):
        for item in node:
            _forbid_nul(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "string" and not ({"pattern", "enum", "const", "format"} & node.keys()):
        node["pattern"] = NO_NUL
    if node.get("type") == "object" and node.get("additionalProperties", True) is not False:
        node.setdefault("propertyNames", {"pattern": NO_NUL})
    for key, value in node.items():
        if key != "propertyNames":
            _forbid_nul(value)
